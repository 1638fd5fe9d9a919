#!/usr/bin/env bash
# Create .venv and install the pinned requirements (skipped when they have not changed since last time).
# Usage: scripts/setup.sh [requirements-file]   (default: requirements.txt)
set -euo pipefail
cd "$(dirname "$0")/.."
req="${1:-requirements.txt}"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
stamp_of() { echo ".venv/.installed-$(cat requirements.txt "$1" | sha256sum | cut -c1-16)"; }
stamp=$(stamp_of "$req")
if [ ! -f "$stamp" ]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  .venv/bin/python -m pip install --quiet -r "$req"
  touch "$stamp"
  # A file that includes requirements.txt (requirements-dev.txt) installed it too: ./run.sh need not again.
  if grep -qx -- "-r requirements.txt" "$req"; then touch "$(stamp_of requirements.txt)"; fi
fi
