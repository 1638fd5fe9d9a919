"""Benchmark: what the sure tier of the region rule buys on one trained run, kind by kind.

Chooses two recipes on the run's validation images the way training does (most detections within the false-alarm
goal, same grid): one with the sure tier, one with a single minimum area. Then evaluates both on the test split
and prints detection per kind and size band, and false alarms. Nothing is saved.

    python benchmarks/region_rule_ab.py --run RUN --data data/magnetic_tile
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import readiness, runs  # noqa: E402
from engine.data import scan_dataset  # noqa: E402
from engine.evaluate import evaluate  # noqa: E402
from engine.inference import Predictor  # noqa: E402
from engine.recipe import Recipe
from engine.tuning import DEFAULT_SURE_SCORES, DEFAULT_THRESHOLDS, collect_stats, min_areas_at  # noqa: E402


def main() -> None:
    """Choose both recipes on val, evaluate both on test, print one JSON line per recipe."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True)
    args = parser.parse_args()
    predictor = Predictor.from_run(args.run)
    info = runs.read_run_json(predictor.run_dir)
    goal = readiness.false_alarm_goal(info)
    report = scan_dataset(args.data)
    stats = collect_stats(predictor, report.split("val"), DEFAULT_THRESHOLDS, min_areas_at(predictor.scale),
                          DEFAULT_SURE_SCORES)
    for name, chosen in (("sure tier", stats.best(goal)), ("one min area", stats.without_sure_tier().best(goal))):
        recipe = Recipe(chosen["threshold"], chosen["min_region_px"], sure_score=chosen["sure_score"],
                        sure_min_px=chosen["sure_min_px"])
        result = evaluate(predictor, report.split("test"), recipe=recipe)
        print(json.dumps({"rule": name, "recipe": recipe.describe(), "val_detection": chosen["detection_rate"],
                          "val_false_alarm": chosen["false_alarm_rate"], "test_detection": result["detection_rate"],
                          "test_false_alarm": result["false_alarm_rate"], "n_detected": result["n_detected"],
                          "n_defective": result["n_defective"], "n_false_alarms": result["n_false_alarms"],
                          "n_defect_free": result["n_defect_free"], "average_precision": result["average_precision"],
                          "dice": result["dice"],
                          "per_kind": {k: f"{v['n_detected']} of {v['n_defective']}"
                                       for k, v in result["per_type"].items() if v["n_defective"]},
                          "by_size": {k: f"{v['n_detected']} of {v['n_defective']}"
                                      for k, v in result["by_size"].items()}}), flush=True)


if __name__ == "__main__":
    main()
