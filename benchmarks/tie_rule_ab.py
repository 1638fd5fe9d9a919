"""Benchmark: where, along a run of minimum areas that tie on validation's verdicts, training places the recipe's.

For each run: predicts its validation images once (as training split them) and chooses the recipe the way
training does (engine.training.record.training_recipe, the run's goals) twice:
- "midway": the tied min area midway along the run of tied ones (nearer the larger), the rule engine.tuning ships;
- "weighted": the run divided in proportion to the images behind each end (the smaller end is where validation's
  good images stop counting, the larger where its smallest defect does), so nearer the end seen on more images.
Then evaluates both on the test split of --data. Nothing is saved.

    .venv/bin/python benchmarks/tie_rule_ab.py --data data/kolektorsdd --runs RUN [RUN ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import labels, readiness, runs  # noqa: E402
from engine.data import load_pair, scan_dataset  # noqa: E402
from engine.evaluate import evaluate  # noqa: E402
from engine.inference import Predictor  # noqa: E402
from engine.recipe import Recipe  # noqa: E402
from engine.training import record  # noqa: E402
from engine.tuning import TuneStats  # noqa: E402


def weighted(feasible: np.ndarray, detection: np.ndarray, false_alarm: np.ndarray, n_defective: int,
             n_defect_free: int) -> tuple[np.ndarray, np.ndarray]:
    """The candidate: minus each tied cell's distance in grid steps from the point of its run of tied min areas that
    divides it in proportion to the images behind each end."""
    tied, _ = TuneStats._tied_verdicts(feasible, detection, false_alarm)  # the shipped rule's tie, its margin aside
    rows = np.moveaxis(tied, 1, -1).reshape(-1, tied.shape[1])
    toward_larger = n_defective / max(1, n_defective + n_defect_free)
    margin = np.zeros(rows.shape, np.float64)
    for i in np.flatnonzero(rows.any(axis=1)):
        run = np.flatnonzero(rows[i])
        margin[i, run] = -np.abs(run - (run[0] + toward_larger * (run[-1] - run[0])))
    return tied, np.moveaxis(margin.reshape(np.moveaxis(tied, 1, -1).shape), -1, 1)


class WeightedStats(TuneStats):
    """TuneStats with the candidate tie rule."""

    def _order(self, grid, feasible, detection, false_alarm, cautious, measured):  # noqa: ANN001, ANN202
        n_defective = int(sum(self.has_defect))
        n_defect_free = len(self.has_defect) - n_defective
        self._tied_verdicts = lambda f, d, a: weighted(f, d, a, n_defective, n_defect_free)
        return super()._order(grid, feasible, detection, false_alarm, cautious, measured)


def main() -> int:
    """Choose both recipes on each run's val, evaluate both on test, print one JSON line per run and rule."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the dataset whose test split judges both recipes")
    parser.add_argument("--runs", nargs="+", required=True)
    args = parser.parse_args()
    test = scan_dataset(args.data).split("test")
    for run in args.runs:
        predictor = Predictor.from_run(run)
        info = runs.read_run_json(predictor.run_dir)
        probs, truths, kinds = [], [], []
        for sample in labels.run_splits(run)[2]:
            image, mask = load_pair(sample)
            probs.append(predictor.predict_proba(image))
            truths.append(mask)
            kinds.append(sample.kinds)
        common = {"dice_threshold": info["threshold"], "max_false_alarm": readiness.false_alarm_goal(info),
                  "kinds": kinds, "goal_detection": readiness.detection_goal(info), "scale": predictor.scale}
        for name, stats_class in (("midway", TuneStats), ("weighted", WeightedStats)):
            record.TuneStats = stats_class
            chosen = record.training_recipe(probs, truths, **common)
            record.TuneStats = TuneStats
            recipe = Recipe(chosen["threshold"], chosen["min_region_px"], sure_score=chosen.get("sure_score"),
                            sure_min_px=chosen.get("sure_min_px") or 0)
            result = evaluate(predictor, test, recipe=recipe)
            found, flagged = (round((chosen[k] or 0) * chosen[n]) for k, n in
                              (("detection_rate", "n_defective"), ("false_alarm_rate", "n_defect_free")))
            print(json.dumps({"run": predictor.run_dir.name, "rule": name, "recipe": recipe.describe(),
                              "val": f"{found} of {chosen['n_defective']} at {flagged} of {chosen['n_defect_free']}",
                              "test": f"{result['n_detected']} of {result['n_defective']} at "
                                      f"{result['n_false_alarms']} of {result['n_defect_free']}",
                              "per_kind": {k: f"{v['n_detected']} of {v['n_defective']}"
                                           for k, v in result["per_type"].items() if v["n_defective"]},
                              "dice": result["dice"]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
