"""A run's verdicts on a labelled split at its served recipe and at other thresholds, all at the images' own size.

Shows whether what misses is the model (its ranking) or the recipe training chose at its training scale (#37's
label loop: the fine-tune ranked KolektorSDD's test split perfectly, its recipe found 8 of 10).

    .venv/bin/python benchmarks/recipe_at_size.py --run RUN --data data/kolektorsdd --split test
    .venv/bin/python benchmarks/recipe_at_size.py --run RUN --data DIR --thresholds 0.5 0.75 0.9 0.98
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import recipe, runs, tuning  # noqa: E402
from engine.evaluate import select_samples  # noqa: E402
from engine.inference import Predictor  # noqa: E402


def main() -> int:
    """Collect the split's statistics once, print detection and false alarms per threshold at the recipe's area."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.5, 0.75, 0.9, 0.95, 0.98])
    args = parser.parse_args()
    folder = runs.resolve_run(args.run)
    served = recipe.load_recipe(folder)
    stats = tuning.collect_stats(Predictor(folder), select_samples(args.data, args.split))
    grid = stats._full_grid()
    area = int(np.argmin(np.abs(stats.min_areas - served.min_region_px)))
    rows = []
    for threshold in sorted({served.threshold, *args.thresholds}):
        t = int(np.argmin(np.abs(stats.thresholds - threshold)))
        rows.append({"threshold": round(float(stats.thresholds[t]), 3), "min_region_px": int(stats.min_areas[area]),
                     "served": abs(float(stats.thresholds[t]) - served.threshold) < 1e-6,
                     "detection": round(float(grid["detection_rate"][t, area, 0, 0]), 3),
                     "false_alarm_rate": round(float(grid["false_alarm_rate"][t, area, 0, 0]), 3)})
    print(json.dumps({"run": folder.name, "split": args.split, "n_defective": int(sum(stats.has_defect)),
                      "n_defect_free": len(stats.has_defect) - int(sum(stats.has_defect)), "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
