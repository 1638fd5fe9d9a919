"""Where the engine keeps its files: repository root, datasets, runs and the registry."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Tests and deployments point these elsewhere with environment variables.
DATA_DIR = Path(os.environ.get("DEFECTS_DATA_DIR", ROOT / "data"))
RUNS_DIR = Path(os.environ.get("DEFECTS_RUNS_DIR", ROOT / "runs"))
SAMPLE_DIR = DATA_DIR / "procedural_images"
DEMO_RUN_DIR = ROOT / "runs" / "demo"  # shipped in git, always read from the repository


def registry_path() -> Path:
    """Path of the SQLite run registry."""
    return RUNS_DIR / "registry.db"


def cpu_threads() -> int:
    """Number of CPU threads the engine should use for compute (the physical cores we may use)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)
