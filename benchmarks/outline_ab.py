"""Benchmark: what outlining counted regions down to the run's best-Dice threshold does to a served recipe.

Evaluates one run's recipe on a split twice, without an outline threshold and with the one training now gives it
(tuning.add_outline: the best-Dice threshold of validation, where the recipe stands above it). The verdicts must
not move; pixel Dice is what the outline is for. Nothing is saved.

    .venv/bin/python benchmarks/outline_ab.py --run RUN --data data/magnetic_tile
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.data import scan_dataset  # noqa: E402
from engine.evaluate import evaluate  # noqa: E402
from engine.inference import Predictor  # noqa: E402
from engine.recipe import load_recipe  # noqa: E402
from engine.tuning import add_outline  # noqa: E402


def main() -> int:
    """Evaluate the recipe without and with its outline; print one JSON line for each."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    args = parser.parse_args()
    predictor = Predictor.from_run(args.run)
    served = load_recipe(predictor.run_dir)
    outline = add_outline({"threshold": served.threshold}, predictor.threshold)["outline_threshold"]
    samples = scan_dataset(args.data).split(args.split)
    for name, recipe in (("no outline", dataclasses.replace(served, outline_threshold=None)),
                         ("outlined", dataclasses.replace(served, outline_threshold=outline))):
        result = evaluate(predictor, samples, recipe=recipe)
        print(json.dumps({"mask": name, "run": predictor.run_dir.name, "recipe": recipe.describe(),
                          "found": f"{result['n_detected']} of {result['n_defective']}",
                          "false_alarms": f"{result['n_false_alarms']} of {result['n_defect_free']}",
                          "dice": round(result["dice"], 4), "iou": round(result["iou"], 4),
                          "mean_image_dice": round(result["mean_image_dice"], 4)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
