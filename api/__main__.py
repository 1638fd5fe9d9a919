"""`python -m api [--host H] [--port P]`: the API server (`python -m engine serve` starts this)."""

from __future__ import annotations

import argparse
import sys

import uvicorn

from api.settings import Settings
from engine import config
from engine.errors import EngineError


def main(argv: list[str] | None = None) -> int:
    """Check the DEFECTS_* settings (a bad value is one line, not a traceback inside uvicorn), then serve."""
    parser = argparse.ArgumentParser(prog="python -m api", description="the defect-detection API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        Settings.from_env()
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    uvicorn.run("api.main:app", host=args.host, port=args.port, app_dir=str(config.ROOT),
                access_log=not args.no_access_log, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
