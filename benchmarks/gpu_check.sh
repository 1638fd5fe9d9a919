#!/usr/bin/env bash
# One-shot check of the CUDA paths on a GPU machine: the CUDA tests, a timed CUDA training run on generated
# data, recipe tuning and evaluation on held-out generated sets, then export and `bench` (with its torch-cuda
# row), the GPU data path's speed against the model alone, and a 2-GPU torchrun run where there are 2 GPUs
# (#14). Everything it writes goes to $OUT (default /tmp/gpu-check): logs, run.json, recipe.json, best.pth.
#   usage: OUT=/tmp/gpu-check MINUTES=4 bash benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
MINUTES=${MINUTES:-4}
PY=${PY:-python3}
WORK=$(mktemp -d)
export PYTHONUNBUFFERED=1 DEFECTS_RUNS_DIR=$WORK/runs DEFECTS_DATA_DIR=$WORK/data
mkdir -p "$OUT"
step() { echo "== $(date +%T) $*"; }

step machine
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, os; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'cpus', os.cpu_count())"

step tests
$PY -m pytest tests/test_cuda.py tests/test_train.py -k "cuda or workers" -q -p no:cacheprovider 2>&1 | tail -5

step data
$PY -m engine generate --out "$WORK/data/synth-6000-df40" --count 6000 --seed 9 --defect-free 0.4
$PY -m engine generate --out "$WORK/data/synth-tune-df50" --count 1000 --seed 8 --defect-free 0.5
$PY -m engine generate --out "$WORK/data/synth-eval-df50" --count 1000 --seed 7 --defect-free 0.5

step "train $MINUTES min on cuda"
$PY -m engine train --data "$WORK/data/synth-6000-df40" --preset balanced --device cuda --minutes "$MINUTES" \
    --epochs 400 --patience 60 --name "gpu-${MINUTES}min-df40" 2>&1 | grep -v "^\s*$" | tee "$OUT/train.log" | tail -4
RUN=$(ls "$DEFECTS_RUNS_DIR" | grep "gpu-${MINUTES}min" | tail -1)

step "GPU data path (#14): training vs model-only speed, both measured inside the run, 1 min each"
$PY -c "import torch; print('bf16 autocast:', torch.cuda.is_bf16_supported())"
for path in device loader; do
  $PY -m engine train --data "$WORK/data/synth-6000-df40" --device cuda --minutes 1 --batches $path \
      --name "gpu-batches-$path" 2>&1 | grep -v "^\s*$" > "$OUT/train-batches-$path.log"
  $PY -c "import json, sys; d = json.load(open(sys.argv[1])); print(sys.argv[2], 'training', d['train_images_per_s'],
'img/s, model alone', d['model_images_per_s'], 'img/s, ratio', round(d['train_images_per_s'] / d['model_images_per_s'], 3))" \
      "$DEFECTS_RUNS_DIR/$(tail -1 "$OUT/train-batches-$path.log")/run.json" "batches on the $path:"
done
if [ "$(nvidia-smi -L | wc -l)" -ge 2 ]; then
  step "torchrun on 2 GPUs (NCCL), 1 min"
  torchrun --standalone --nproc-per-node 2 -m engine train --data "$WORK/data/synth-6000-df40" --device cuda \
      --minutes 1 --name gpu-torchrun-2 2>&1 | grep -v "^\s*$" | tail -3
else
  echo "one GPU on this machine: no 2-GPU torchrun run"
fi

step "tune and evaluate $RUN"
$PY -m engine tune --run "$RUN" --data "$WORK/data/synth-tune-df50" --split all --device cuda \
    --thresholds 0.5,0.6,0.7,0.8,0.85,0.9,0.95,0.97,0.98,0.99 2>&1 | tail -3
$PY -m engine evaluate --run "$RUN" --data "$WORK/data/synth-eval-df50" --split all --device cuda --json \
    > "$OUT/eval-heldout.json"
head -c 800 "$OUT/eval-heldout.json"; echo
cp "$DEFECTS_RUNS_DIR/$RUN/run.json" "$DEFECTS_RUNS_DIR/$RUN/recipe.json" "$DEFECTS_RUNS_DIR/$RUN/best.pth" "$OUT/"

# Production-shaped sets with the README's commands and defaults, 3 minutes each on the GPU, where the data
# travelled along (copy them under an ignored folder named in the device call's `carry`; see docs/RESULTS.md).
for set in ${REAL_SETS:-}; do
  [ -d "$set/images" ] || { echo "skip $set: not here"; continue; }
  step "defaults on $(basename "$set"), 3 min on cuda"
  $PY -m engine train --data "$set" --minutes 3 --device cuda --name "gpu-3min-$(basename "$set")" 2>&1 \
      | tee "$OUT/train-$(basename "$set").log" | tail -3
  RRUN=$(tail -1 "$OUT/train-$(basename "$set").log")
  $PY -m engine evaluate --run "$RRUN" --data "$set" --split test --device cuda --json > "$OUT/eval-$(basename "$set").json"
  head -c 600 "$OUT/eval-$(basename "$set").json"; echo
done

step "export and bench"
$PY -m engine export --run "$RUN" --int8 2>&1 | tail -3
$PY -m engine bench --run "$RUN" 2>&1 | tee "$OUT/bench.txt" | tail -12
step done
