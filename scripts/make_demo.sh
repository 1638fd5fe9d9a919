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
du -sh runs/demo
