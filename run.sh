#!/usr/bin/env bash
# Set up (first time only) and start the app: the FastAPI sidecar on 127.0.0.1:8000 and Streamlit on :8501.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh requirements.txt
API_PORT=${API_PORT:-8000}
APP_PORT=${APP_PORT:-8501}
.venv/bin/python -m engine serve --host 127.0.0.1 --port "$API_PORT" &
api_pid=$!
trap 'kill $api_pid 2>/dev/null || true' EXIT
echo "API:  http://127.0.0.1:$API_PORT/docs"
.venv/bin/python -m streamlit run Home.py --server.port "$APP_PORT" --server.address 127.0.0.1
