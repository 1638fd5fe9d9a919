"""Shared fixtures. Every test session works in its own temporary runs/ and data/ folders."""

import os
import tempfile
from pathlib import Path

# Before the engine is imported anywhere: keep the repository's runs/ and data/ untouched, and let
# subprocesses (training jobs, servers) inherit the same folders.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="defects-tests-"))
os.environ["DEFECTS_RUNS_DIR"] = str(_SESSION_HOME / "runs")
os.environ["DEFECTS_DATA_DIR"] = str(_SESSION_HOME / "data")

import pytest  # noqa: E402

from engine import config  # noqa: E402


@pytest.fixture(scope="session")
def session_home() -> Path:
    """The temporary folder holding this session's runs/ and data/."""
    return _SESSION_HOME


@pytest.fixture(scope="session")
def tiny_dataset(session_home: Path) -> Path:
    """A generated 40-image 64x64 dataset with every split present."""
    from engine import synth

    out = session_home / "data" / "tiny"
    synth.generate_dataset(out, 40, seed=3, params=synth.SynthParams(size=64), workers=1)
    return out


@pytest.fixture(scope="session")
def trained_run(tiny_dataset: Path) -> str:
    """A real run: a small UNetTiny trained for two epochs on the tiny dataset."""
    from engine.train import TrainConfig, train

    cfg = TrainConfig(data=str(tiny_dataset), epochs=2, base=8, depth=2, crop=32, batch_size=8,
                      name="fixture", steps_per_epoch=4)
    return train(cfg)


@pytest.fixture
def runs_dir() -> Path:
    """The runs folder the engine uses in this session."""
    return config.RUNS_DIR
