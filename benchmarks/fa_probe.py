"""Benchmark: where a run's false alarms come from, and what its ranking allows at the false-alarm goal.

Prints, on the test split: the served recipe's false alarms with and without its sure tier; the best recipe chosen
on test itself at each goal (an oracle, for scale only: what no recipe chosen on validation can beat); and the
recipes chosen on validation at tighter goals, each with its two-fold held-out false-alarm rate and its test result.
Nothing is saved.

    python benchmarks/fa_probe.py --run RUN --data data/magnetic_tile
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine.data import scan_dataset  # noqa: E402
from engine.inference import Predictor  # noqa: E402
from engine.recipe import load_recipe  # noqa: E402
from engine.tuning import DEFAULT_SURE_SCORES, DEFAULT_THRESHOLDS, TuneStats, collect_stats, min_areas_at  # noqa: E402

RULE = ("threshold", "min_region_px", "sure_score", "sure_min_px")


def on_test(test: TuneStats, chosen: dict) -> dict:
    """Detection and false-alarm rate of a recipe cell on the test stats."""
    flags = test.flagged(chosen)
    defective = [bool(d) for d in test.has_defect]
    found = [f for f, d in zip(flags, defective) if d]
    alarms = [f for f, d in zip(flags, defective) if not d]
    return {"test_detection": round(sum(found) / max(len(found), 1), 3),
            "test_false_alarm": round(sum(alarms) / max(len(alarms), 1), 3)}


def main() -> None:
    """Print one JSON line per finding."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--goals", type=float, nargs="+", default=[0.05, 0.04, 0.03, 0.02, 0.01, 0.0])
    args = parser.parse_args()
    predictor = Predictor.from_run(args.run)
    served = load_recipe(predictor.run_dir)
    report = scan_dataset(args.data)
    grid = (DEFAULT_THRESHOLDS, min_areas_at(predictor.scale), DEFAULT_SURE_SCORES)
    val, test = (collect_stats(predictor, report.split(split), *grid) for split in ("val", "test"))
    cell = {key: getattr(served, key) for key in RULE}
    print(json.dumps({"served": served.describe(), **on_test(test, cell),
                      "without_sure_tier": on_test(test, {**cell, "sure_score": None})}), flush=True)
    for goal in args.goals:
        oracle = test.best(goal)
        val_chosen = val.best(goal)
        print(json.dumps({"goal": goal, "oracle_on_test": {k: oracle[k] for k in (*RULE, "detection_rate")},
                          "chosen_on_val": {k: val_chosen[k] for k in (*RULE, "detection_rate", "false_alarm_rate")},
                          "val_held_out_false_alarm": val.held_out_false_alarm_rate(goal),
                          **on_test(test, val_chosen)}), flush=True)


if __name__ == "__main__":
    main()
