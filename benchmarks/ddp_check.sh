#!/usr/bin/env bash
# Distributed training on this CPU machine (#14): the same synthetic data, global batch and epochs, trained by one
# process and by torchrun with 2 processes (gloo). Prints each run's best validation Dice and speed, and checks
# that the torchrun run wrote one run folder and one registry row.
# Usage: benchmarks/ddp_check.sh [DATA] [EPOCHS] [OUT_RUNS_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${1:-data/synth}
EPOCHS=${2:-10}
export DEFECTS_RUNS_DIR=${3:-/tmp/ddp_check_runs}
mkdir -p "$DEFECTS_RUNS_DIR"
[ -d "$DATA/images" ] || .venv/bin/python -m engine generate --out "$DATA" --count 1000 --seed 0
common=(--data "$DATA" --epochs "$EPOCHS" --init none --batch-size 16 --seed 0)
.venv/bin/python -m engine train "${common[@]}" --name single-process
.venv/bin/torchrun --standalone --nproc-per-node 2 -m engine train "${common[@]}" --name torchrun-2
.venv/bin/python - <<'PY'
import json, os
from pathlib import Path
from engine import registry
root = Path(os.environ["DEFECTS_RUNS_DIR"])
for name in ("single-process", "torchrun-2"):
    folders = sorted(f for f in root.iterdir() if f.is_dir() and f.name.split("-", 2)[-1].startswith(name))
    rows = [r for r in registry.list_runs() if r.name == name]
    info = json.loads((folders[-1] / "run.json").read_text())
    print(f"{name}: {len(folders)} run folder(s), {len(rows)} registry row(s), processes {info.get('processes', 1)}, "
          f"best val Dice {info['best_dice']:.4f} (epoch {info['best_epoch']} of {info['epochs_done']}), "
          f"training {info['train_images_per_s']} img/s, model alone {info['model_images_per_s']} img/s, "
          f"wall {info['wall_seconds']} s")
PY
