#!/usr/bin/env bash
# Set up (first time only) and run the whole test suite, browser test and PostgreSQL registry tests included.
set -euo pipefail
cd "$(dirname "$0")"
scripts/setup.sh requirements-dev.txt
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's chromium for the browser test..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped"
fi
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && ! command -v initdb >/dev/null \
    && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  echo "installing Debian's postgresql for the registry tests..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) \
    || echo "warning: could not install postgresql; the PostgreSQL registry tests will be skipped (failed in CI)"
fi
exec .venv/bin/python -m pytest "$@"
