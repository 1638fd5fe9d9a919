"""Benchmark: where training chooses its final recipe, at the training scale or at the images' own size.

For one trained run whose model sees images resized (scale < 1), predicts the val split once at the model's scale
and chooses two recipes the way training does (engine.training.record.training_recipe, same goals):
- "training scale": on the resized probabilities and resized masks (a pixel counts where it is at least half
  covered), minimum areas converted to full-size px afterwards (training before this change);
- "own size": on the same probabilities upsampled as the Predictor serves them, with the masks as labelled
  (training now).
Then evaluates both on the test split. Nothing is saved.

    .venv/bin/python benchmarks/recipe_scale_ab.py --run RUN --data data/kolektorsdd
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import readiness, runs  # noqa: E402
from engine.data import load_pair, scan_dataset  # noqa: E402
from engine.evaluate import evaluate  # noqa: E402
from engine.inference import Predictor  # noqa: E402
from engine.recipe import NEVER_PX, Recipe  # noqa: E402
from engine.training.batches import rescale_pair  # noqa: E402
from engine.training.record import training_recipe  # noqa: E402
from engine.training.validation import upsample  # noqa: E402


def full_size_px(px: int, scale: float) -> int:
    """A minimum area measured at `scale` in px of the full-size image, as training converted it before."""
    return px if px >= NEVER_PX else min(int(round(px / scale**2)), NEVER_PX - 1)


def main() -> int:
    """Choose both recipes on val, evaluate both on test, print one JSON line per recipe."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True)
    args = parser.parse_args()
    predictor = Predictor.from_run(args.run)
    scale, info = predictor.scale, runs.read_run_json(predictor.run_dir)
    if scale == 1.0:
        print(f"{args.run} trained at scale 1: both recipes are the same")
        return 1
    goal = readiness.false_alarm_goal(info)
    report = scan_dataset(args.data)
    predictor.scale = 1.0  # the images below are resized already, as training's val set holds them
    small_probs, small_masks, full_masks, kinds = [], [], [], []
    for sample in report.split("val"):
        image, mask = load_pair(sample)
        small_image, small_mask = rescale_pair(image, mask, scale)
        small_probs.append(predictor.predict_proba(small_image))
        small_masks.append(small_mask)
        full_masks.append(mask)
        kinds.append(sample.kinds)
    predictor.scale = scale
    common = {"dice_threshold": predictor.threshold, "max_false_alarm": goal, "kinds": kinds,
              "goal_detection": readiness.detection_goal(info)}
    at_scale = training_recipe(small_probs, small_masks, **common)
    at_scale["min_region_px"] = full_size_px(at_scale["min_region_px"], scale)
    at_scale["sure_min_px"] = full_size_px(at_scale.get("sure_min_px") or 0, scale)
    own_size = training_recipe([upsample(p, m.shape) for p, m in zip(small_probs, full_masks)], full_masks,
                               scale=scale, **common)
    for name, chosen in (("training scale", at_scale), ("own size", own_size)):
        recipe = Recipe(chosen["threshold"], chosen["min_region_px"], sure_score=chosen.get("sure_score"),
                        sure_min_px=chosen.get("sure_min_px") or 0)
        result = evaluate(predictor, report.split("test"), recipe=recipe)
        found, flagged = (round(chosen[k] * chosen[n]) for k, n in (("detection_rate", "n_defective"),
                                                                     ("false_alarm_rate", "n_defect_free")))
        print(json.dumps({"chosen at": name, "run": predictor.run_dir.name, "recipe": recipe.describe(),
                          "val": f"{found} of {chosen['n_defective']} at {flagged} of {chosen['n_defect_free']}",
                          "test": f"{result['n_detected']} of {result['n_defective']} at {result['n_false_alarms']} of "
                                  f"{result['n_defect_free']}",
                          "average_precision": result["average_precision"], "dice": result["dice"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
