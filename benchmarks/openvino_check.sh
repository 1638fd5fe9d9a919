#!/usr/bin/env bash
# OpenVINO beside ONNX Runtime (#16), on one exported run: the backend table (latency, throughput, Dice on the
# test split), what `auto` picks, then the API at concurrency 1, 2 and 8 for ONNX Runtime INT8 (the default
# before OpenVINO), OpenVINO INT8 and auto. Run it on a quiet machine; everything prints to stdout.
# Usage: benchmarks/openvino_check.sh RUN [DATA]     (the run must be exported: python -m engine export --run RUN --int8)
set -euo pipefail
cd "$(dirname "$0")/.."
source .venv/bin/activate
RUN=$1
DATA=${2:-}
python -m engine bench --run "$RUN" ${DATA:+--data "$DATA"} --iterations 100
python - "$RUN" <<'PY'
import sys
from engine import runs, serving
choice = serving.auto_backend(runs.resolve_run(sys.argv[1]))
print(f"\nauto picks {choice.backend}: {choice.rule}; p50 ms {choice.p50_ms}\n")
PY
for backend in int8 openvino-int8 auto; do
    for concurrency in 1 2 8; do
        requests=$([ "$concurrency" = 1 ] && echo 400 || echo 1000)
        echo "### backend $backend, concurrency $concurrency, $requests requests"
        python benchmarks/load_api.py --run "$RUN" --backend "$backend" --concurrency "$concurrency" \
            --requests "$requests" 2>/dev/null | grep -E "^\| (errors|latency|API throughput|Predictor throughput|model|CPU per image|server VmRSS)|PASS|FAIL" || true
    done
done
