"""Where the engine keeps its files: repository root, datasets, runs and the registry."""

from __future__ import annotations

import os
import socket
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Tests and deployments point these elsewhere with environment variables.
DATA_DIR = Path(os.environ.get("DEFECTS_DATA_DIR", ROOT / "data"))
RUNS_DIR = Path(os.environ.get("DEFECTS_RUNS_DIR", ROOT / "runs"))
SAMPLE_DIR = DATA_DIR / "procedural_images"
DEMO_RUN_DIR = ROOT / "runs" / "demo"  # shipped in git, always read from the repository


# Any SQLAlchemy URL (postgresql+psycopg://user:password@host/db) puts the registry on a server that several
# machines share; unset, the registry is the SQLite file registry_path().
DATABASE_URL = os.environ.get("DEFECTS_DATABASE_URL") or None
HEARTBEAT_ENV = "DEFECTS_HEARTBEAT_RUN"  # set by jobs.start_training: the run its process beats for from its start


def registry_path() -> Path:
    """Path of the SQLite run registry (used when DATABASE_URL is unset)."""
    return RUNS_DIR / "registry.db"


def host() -> str:
    """This machine's name, stored beside a process id (a pid says nothing about another machine's processes)."""
    return socket.gethostname()


def cpu_threads() -> int:
    """Number of CPU threads the engine should use for compute (the physical cores we may use)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def devices() -> list[str]:
    """The devices a page offers: cpu, and cuda where an NVIDIA driver is loaded (a look at /proc that imports no
    torch; a run or predictor asked for cuda checks torch's CUDA itself and says so when it is missing)."""
    return ["cpu"] + (["cuda"] if Path("/proc/driver/nvidia/version").exists() else [])
