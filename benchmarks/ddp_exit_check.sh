#!/usr/bin/env bash
# How often a two-process gloo DDP script that ends cleanly (barrier, destroy_process_group) still aborts at exit
# ("terminate called without an active exception"), against the same script ending with os._exit as
# engine.distributed.end_process does. No project code runs: it is torch's behaviour on this machine.
# Usage: benchmarks/ddp_exit_check.sh [RUNS_EACH]
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-40}
script=$(mktemp --suffix .py)
trap 'rm -f "$script"' EXIT
cat > "$script" <<'PY'
import os, sys
import torch
import torch.distributed as dist
dist.init_process_group("gloo")
model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(3, 1))
for _ in range(3):
    model(torch.ones(2, 3)).sum().backward()
dist.barrier()
dist.destroy_process_group()
if sys.argv[1] == "os-exit":
    sys.stdout.flush()
    os._exit(0)
PY
for mode in interpreter-exit os-exit; do
  aborted=0
  for _ in $(seq "$RUNS"); do
    if ! .venv/bin/python -m torch.distributed.run --standalone --nproc-per-node 2 "$script" "$mode" >/dev/null 2>&1
    then aborted=$((aborted + 1)); fi
  done
  echo "$mode: $aborted of $RUNS two-process runs failed"
done
