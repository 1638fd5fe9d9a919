"""`python -m api [--host H] [--port P] [--workers N]`: the API server (`python -m engine serve` starts this)."""

from __future__ import annotations

import argparse
import sys

import uvicorn

from api.settings import Settings
from engine import config
from engine.errors import EngineError


def positive_int(text: str) -> int:
    """argparse type: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def port_number(text: str) -> int:
    """argparse type: a TCP port, 0 (any free one) to 65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port number from 0 to 65535, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Check the DEFECTS_* settings (a bad value is one line, not a traceback inside uvicorn), then serve."""
    parser = argparse.ArgumentParser(prog="python -m api", description="the defect-detection API")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=port_number, default=8000)
    parser.add_argument("--workers", type=positive_int, default=1,
                        help="worker processes, each with its own models and DEFECTS_API_SLOTS inference threads "
                             "(default 1)")
    parser.add_argument("--no-access-log", action="store_true")
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    try:
        Settings.from_env()  # checked here once: with --workers, the app is only imported in the workers
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    # workers > 1: uvicorn's own supervisor binds the socket once, spawns the workers (each imports the app
    # and loads its models), replaces a worker that dies, and stops them all on SIGTERM or SIGINT.
    uvicorn.run("api.main:app", host=args.host, port=args.port, workers=args.workers, app_dir=str(config.ROOT),
                access_log=not args.no_access_log, log_level=args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
