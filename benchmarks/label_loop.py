"""Issue #37's bar "the loop pays", simulated through the engine calls the Label page makes.

From a run trained on the good parts of train+val alone (given with --run, else trained here for --base-minutes),
label the first N images of the queue over the train split (label_queue, ranking as if the set held no label), each
with its true mask or "good part", fine-tune for --minutes (labels.start_fine_tune, the page's "Train on my
labels"), and evaluate on the test split; then the same with N images drawn at random from the train split, once
per seed. Prints one JSON object: each arm's labels, detections and false alarms on test, and readiness.

    .venv/bin/python benchmarks/label_loop.py --data ../shared/data/kolektorsdd               # the bar: 15 + 4 x 5 min
    .venv/bin/python benchmarks/label_loop.py --data DIR --run RUN --minutes 5 --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import config, labelqueue, labels, readiness, runs  # noqa: E402
from engine.data import Sample, load_pair, scan_dataset  # noqa: E402
from engine.evaluate import evaluate  # noqa: E402
from engine.inference import Predictor  # noqa: E402


def good_parts(data: Path, out: Path) -> Path:
    """DIR's defect-free train and val images (linked, splits kept): what a line starting from good parts has."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for sample in scan_dataset(data).samples:
        if sample.split in ("train", "val") and not sample.defective:
            target = out / "images" / sample.image_path.name
            if not target.exists():
                target.symlink_to(sample.image_path.resolve())
            rows.append({"id": sample.id, "split": sample.split})
    with (out / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "split"])
        writer.writeheader()
        writer.writerows(rows)
    return out


def wait(run_id: str) -> dict:
    """run.json once the background run has ended."""
    while (info := runs.read_run_json(runs.run_dir(run_id))).get("status") not in ("completed", "failed", "cancelled"):
        time.sleep(5)
    return info


def label_and_tune(name: str, picked: list[Sample], run: str, minutes: float) -> dict:
    """Label the picked images with their truth (through save_label), fine-tune RUN on them, and say how it went."""
    folder = labels.labels_folder(name)
    for sample in picked:
        _, truth = load_pair(sample)
        labels.save_label(folder, sample.image_path, "drawn" if truth.any() else "good", truth if truth.any() else None)
    tuned = labels.start_fine_tune(folder, run, minutes)
    info = wait(tuned)
    return {"labelled": [s.id for s in picked], "with_defect": sum(bool(load_pair(s)[1].any()) for s in picked),
            "run": tuned, "status": info.get("status"), "ready": readiness.verdict(info)[0]}


def on_test(run_id: str, data: Path) -> dict:
    """Detections and false alarms of a run on DIR's test split."""
    result = evaluate(Predictor(runs.resolve_run(run_id)), scan_dataset(data).split("test"))
    return {key: result[key] for key in ("n_detected", "n_defective", "n_false_alarms", "n_defect_free",
                                         "average_precision")}


def main() -> int:
    """Run the queue arm and the random arms; print and return 0 (the figures are the output, not a verdict)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="a dataset with train, val and test splits")
    parser.add_argument("--run", help="the good-parts-only run to start from (default: train one)")
    parser.add_argument("--base-minutes", type=float, default=15.0)
    parser.add_argument("--minutes", type=float, default=5.0, help="each fine-tune's budget")
    parser.add_argument("--n", type=int, default=5, help="images labelled per arm")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                        help="seeds of the random draws (none: the queue arm alone)")
    parser.add_argument("--tag", default=time.strftime("%Y%m%d-%H%M%S"), help="names this simulation's folders")
    args = parser.parse_args()
    run = args.run
    if run is None:
        from engine.train import TrainConfig, train

        good = good_parts(args.data, config.DATA_DIR / f"loop-{args.tag}-good")
        run = train(TrainConfig(data=str(good), minutes=args.base_minutes, name=f"loop-{args.tag}-good"))
    train_split = scan_dataset(args.data).split("train")
    queue = labelqueue.label_queue(run, args.data, args.n, split="train", use_truth=False)
    by_id = {s.id: s for s in train_split}
    arms = {"queue": [by_id[item.id] for item in queue]}
    for seed in args.seeds:
        picks = np.random.default_rng(seed).choice(len(train_split), args.n, replace=False)
        arms[f"random seed {seed}"] = [train_split[i] for i in sorted(picks)]
    result = {"data": str(args.data.resolve()), "base_run": run, "base_on_test": on_test(run, args.data),
              "queue_reasons": [item.reason for item in queue], "arms": {}}
    for arm, picked in arms.items():
        outcome = label_and_tune(f"loop-{args.tag}-{arm.replace(' ', '-')}", picked, run, args.minutes)
        outcome["on_test"] = on_test(outcome["run"], args.data)
        result["arms"][arm] = outcome
        print(f"{arm}: {json.dumps(outcome)}", file=sys.stderr, flush=True)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
