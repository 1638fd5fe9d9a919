#!/usr/bin/env bash
# Rebuild the shipped demo run (runs/demo, kept under 3 MB: a 0.12 M-parameter UNetTiny, 4 epochs).
# It is produced by the project's own commands; run.json records the exact train command.
set -euo pipefail
cd "$(dirname "$0")/.."
py=.venv/bin/python
$py -m engine generate --out data/demo-train --count 600 --size 256 --seed 7 --defect-free 0.2
rm -rf runs/demo
$py -m engine train --data data/demo-train --base 8 --depth 3 --epochs 4 --steps-per-epoch 250 \
  --precision fp32 --minutes 6 --name demo --run-id demo
rm -f runs/demo/resume.pth runs/demo/train.log
# Self-contained: the dataset path relative to the repository, and a few labelled images of the same generator
# (all in the val split) so `export --run demo --int8` and `bench` check on real pixels in a fresh clone.
$py -m engine generate --out runs/demo/check --count 12 --size 256 --seed 8 --defect-free 0.25
$py - <<'PY'
import csv, json, pathlib
check = pathlib.Path("runs/demo/check/manifest.csv")
rows = list(csv.DictReader(check.open()))
with check.open("w", newline="") as handle:
    writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows({**row, "split": "val"} for row in rows)
run = pathlib.Path("runs/demo/run.json")
info = json.loads(run.read_text())
info["dataset"]["path"] = "data/demo-train"
run.write_text(json.dumps(info, indent=2) + "\n")
PY
du -sh runs/demo
