#!/usr/bin/env bash
# Train each preset for the same minutes on one dataset with the README's defaults, one after the other, and
# evaluate each on the test split: quality per CPU minute. Usage: benchmarks/preset_ab.sh DATA MINUTES PRESET...
set -euo pipefail
data=$1 minutes=$2; shift 2
py=${PYTHON:-.venv/bin/python}
lscpu | grep 'Model name'
for preset in "$@"; do
  name="ab-$(basename "$data")-$minutes-$preset"
  $py -m engine train --data "$data" --minutes "$minutes" --preset "$preset" --name "$name" | grep -E "^(epoch|ready|NOT READY|finished|time|recipe)" || true
  run=$(ls -td runs/*"$name"* | head -1 | xargs basename)
  $py -m engine evaluate --run "$run" --data "$data" --split test --json > "/tmp/$name.json"
  $py - "$preset" "/tmp/$name.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[2]))
kinds = "  ".join(f"{k} {v['n_detected']}/{v['n_defective']}" for k, v in (r.get("per_type") or {}).items() if v.get("n_defective"))
print(f"{sys.argv[1]}: detection {r['n_detected']}/{r['n_defective']} false alarms {r['n_false_alarms']}/{r['n_images'] - r['n_defective']} "
      f"AP {r.get('average_precision')} Dice {r['dice']:.3f}  {kinds}")
PY
done
