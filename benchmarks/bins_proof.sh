#!/usr/bin/env bash
# Tuning a good-parts-only run on images sorted by verdict (no masks), measured on images neither step saw.
#   benchmarks/bins_proof.sh OUT RUN...
# From ../shared/data/kolektorsdd (imported as data/kolektorsdd) it builds
#   OUT/bins:  crack/ = the 42 cracked images of the train and val splits (a good-parts-only run never sees them),
#              good/  = every other good image of the test split (35 of 69);
#   OUT/check: the 10 cracked test images with their masks and the other 34 good test images;
# then, for each RUN: `evaluate` on OUT/check as trained, `tune --run RUN --data OUT/bins`, `evaluate` again.
set -euo pipefail
out=${1:?usage: benchmarks/bins_proof.sh OUT RUN...}; shift
data=${DEFECTS_DATA_DIR:-data}/kolektorsdd
python=${PYTHON:-.venv/bin/python}
"$python" - "$data" "$out" <<'PY'
import csv, shutil, sys
from pathlib import Path
data, out = Path(sys.argv[1]), Path(sys.argv[2])
rows = list(csv.DictReader((data / "manifest.csv").open()))
cracked = lambda r: float(r["defect_fraction"] or 0) > 0
good_test = sorted(r["id"] for r in rows if r["split"] == "test" and not cracked(r))
shutil.rmtree(out / "bins", ignore_errors=True); shutil.rmtree(out / "check", ignore_errors=True)
for sub in ("bins/crack", "bins/good", "check/images", "check/masks"):
    (out / sub).mkdir(parents=True)
image = lambda i: next((data / "images").glob(f"{i}.*"))
for r in rows:
    if cracked(r) and r["split"] in ("train", "val"):
        shutil.copy(image(r["id"]), out / "bins/crack")
    elif cracked(r):
        shutil.copy(image(r["id"]), out / "check/images"); shutil.copy(data / "masks" / f"{r['id']}.png", out / "check/masks")
for k, i in enumerate(good_test):
    shutil.copy(image(i), out / ("bins/good" if k % 2 == 0 else "check/images"))
print({p.name: len(list(p.iterdir())) for p in [*(out / "bins").iterdir(), *(out / "check").iterdir()]})
PY
for run in "$@"; do
  echo "== $run: as trained, on OUT/check"
  "$python" -m engine evaluate --run "$run" --data "$out/check" --split all | grep -E "detection_rate|false_alarm_rate|average_precision|n_images"
  echo "== $run: tune on OUT/bins (verdicts only)"
  "$python" -m engine tune --run "$run" --data "$out/bins"
  echo "== $run: tuned, on OUT/check"
  "$python" -m engine evaluate --run "$run" --data "$out/check" --split all | grep -E "detection_rate|false_alarm_rate|average_precision|n_images"
done
