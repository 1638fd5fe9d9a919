#!/usr/bin/env bash
# Painting defects onto good parts (#13), proved on KolektorSDD with the README's commands and defaults:
#   1. good parts only: the defect-free train/val images, --paint 0.5, no real defect ever seen;
#   2. few labels: the whole train split (37 real cracks) with --paint 0.5 ...
#   3. ... against the same without painting;
#   4. a handful of labels (FEW_LABELS=5 of the 37 cracked train images, the rest left out) with and without
#      --paint 0.5.
# Each trains for MINUTES (default 15) one after the other, so they do not share the CPU, and is evaluated on
# the real test split (10 cracked, 69 good images). Output: OUT/summary.txt and each run's JSON.
# Usage: benchmarks/paint_proof.sh [MINUTES] [OUT] [NAME...]   (NAMEs: only these runs, e.g. ksdd-good-paint)
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
MINUTES=${1:-15}
OUT=${2:-/tmp/paint_proof}
KSDD=../shared/data/kolektorsdd
mkdir -p "$OUT"
[ -d data/kolektorsdd ] || python -m engine import "$KSDD"

# The good-only set: the defect-free images of the train and val splits, linked, with their splits.
GOOD="$OUT/ksdd-good"
python - "$KSDD" "$GOOD" <<'EOF'
import csv, os, sys
from pathlib import Path
src, out = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
(out / "images").mkdir(parents=True, exist_ok=True)
rows = [r for r in csv.DictReader(open(src / "meta.csv"))
        if r["split"] in ("train", "val") and float(r["defect_fraction"] or 0) == 0]
with open(out / "manifest.csv", "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["id", "split"])
    for row in rows:
        image = next((src / "images").glob(f"{row['id']}.*"))
        link = out / "images" / image.name
        if not link.exists():
            os.symlink(image, link)
        writer.writerow([row["id"], row["split"]])
print(f"{out}: {len(rows)} defect-free images")
EOF

# A handful of labels: every image of the train and val splits, but only the first FEW_LABELS (by id) of the
# train split's cracked images keep theirs; the other cracked train images are left out (never shown as good).
FEW="$OUT/ksdd-few"
python - "$KSDD" "$FEW" "${FEW_LABELS:-5}" <<'EOF'
import csv, os, sys
from pathlib import Path
src, out, keep = Path(sys.argv[1]).resolve(), Path(sys.argv[2]), int(sys.argv[3])
for sub in ("images", "masks"):
    (out / sub).mkdir(parents=True, exist_ok=True)
rows = [r for r in csv.DictReader(open(src / "meta.csv")) if r["split"] in ("train", "val")]
cracked = sorted(r["id"] for r in rows if r["split"] == "train" and float(r["defect_fraction"] or 0) > 0)
rows = [r for r in rows if r["id"] not in cracked[keep:]]
with open(out / "manifest.csv", "w", newline="") as handle:
    writer = csv.writer(handle)
    writer.writerow(["id", "split"])
    for row in rows:
        for sub in ("images", "masks"):
            for path in (src / sub).glob(f"{row['id']}.*"):
                if not (out / sub / path.name).exists():
                    os.symlink(path, out / sub / path.name)
        writer.writerow([row["id"], row["split"]])
print(f"{out}: {len(rows)} images, {keep} labelled cracks in train")
EOF

ONLY=" ${*:3} "
run() {  # NAME TRAIN-ARGS...
    local name=$1; shift
    [ "$ONLY" = "  " ] || [[ "$ONLY" == *" $name "* ]] || return 0
    local run_id
    run_id=$(python -m engine train "$@" --minutes "$MINUTES" --name "$name" 2> "$OUT/$name.log" | tail -1)
    python -m engine evaluate --run "$run_id" --data data/kolektorsdd --split test --json > "$OUT/$name.json"
    python - "$name" "$run_id" "$OUT/$name.json" >> "$OUT/summary.txt" <<'EOF'
import json, sys
from engine import runs
name, run_id, path = sys.argv[1:]
r, info = json.load(open(path)), runs.read_run_json(runs.run_dir(run_id))
print(f"{name:<18} {run_id}: detected {r['n_detected']}/{r['n_defective']}, false alarms "
      f"{r['n_false_alarms']}/{r['n_defect_free']}, image AP {r['average_precision']:.3f}, Dice {r['dice']:.3f}; "
      f"train {info.get('train_images_per_s')} img/s vs model alone {info.get('model_images_per_s')} img/s, "
      f"val_painted {info['dataset'].get('val_painted')}, ready {info.get('ready')}")
EOF
    tail -1 "$OUT/summary.txt"
}

run ksdd-good-paint --data "$GOOD" --paint 0.5
run ksdd-paint --data data/kolektorsdd --paint 0.5
run ksdd-nopaint --data data/kolektorsdd
run ksdd-few-paint --data "$FEW" --paint 0.5
run ksdd-few-nopaint --data "$FEW"
