"""Shared fixtures. Every test session works in its own temporary runs/ and data/ folders."""

import os
import tempfile
from pathlib import Path

# Before the engine is imported anywhere: keep the repository's runs/ and data/ untouched, and let
# subprocesses (training jobs, servers) inherit the same folders.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="defects-tests-"))
os.environ["DEFECTS_RUNS_DIR"] = str(_SESSION_HOME / "runs")
os.environ["DEFECTS_DATA_DIR"] = str(_SESSION_HOME / "data")
os.environ.pop("DEFECTS_DATABASE_URL", None)  # never a shared registry: tests that want PostgreSQL start their own

import pytest  # noqa: E402

from engine import config  # noqa: E402

# Fixtures that train a model for real or start a server or browser: every test that uses one, directly or through
# another fixture, is marked `slow` by pytest_collection_modifyitems below, so `./test.sh -m "not slow"` (the fast
# inner loop) leaves it out without each test remembering the mark. Tests that train or start a server inline carry
# an explicit @pytest.mark.slow. tests/test_layout.py checks that every fixture that trains or starts a process is
# named here or uses one that is.
SLOW_FIXTURES = frozenset({
    "trained_run",  # conftest: trains a UNetTiny (copy_run, exported, client, predictor... use it)
    "postgres",  # conftest: a PostgreSQL server
    "trained",  # test_inspection: trains from the pre-trained weights
    "generated_run",  # test_truthful: trains on generated images
    "finished",  # test_faults: `python -m engine train` to the end
    "server",  # test_browser: `streamlit run`
    "browser",  # test_browser: Chromium through Playwright
    "fresh_clone",  # test_readme: a copy of the repository whose README blocks train
})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `slow` every test that uses a fixture of SLOW_FIXTURES (however indirectly) or drives a browser."""
    for item in items:
        if SLOW_FIXTURES.intersection(getattr(item, "fixturenames", ())) or item.get_closest_marker("browser"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def session_home() -> Path:
    """The temporary folder holding this session's runs/ and data/."""
    return _SESSION_HOME


@pytest.fixture(scope="session")
def tiny_dataset(session_home: Path) -> Path:
    """A generated 40-image 64x64 dataset with every split present."""
    from engine import synth, synthset

    out = session_home / "data" / "tiny"
    synthset.generate_dataset(out, 40, seed=3, params=synth.SynthParams(size=64), workers=1)
    return out


@pytest.fixture(scope="session")
def trained_run(tiny_dataset: Path) -> str:
    """A real run: a small UNetTiny trained for two epochs on the tiny dataset."""
    from engine.train import TrainConfig, train

    cfg = TrainConfig(data=str(tiny_dataset), epochs=2, base=8, depth=2, crop=32, batch_size=8,
                      name="fixture", steps_per_epoch=4)
    return train(cfg)


@pytest.fixture
def copy_run(trained_run: str):
    """Make copies of the trained run under new ids (tests that damage or edit files use one); removed afterwards."""
    import shutil

    from engine import registry, runs

    made: list[str] = []

    def make(new_id: str) -> Path:
        target = config.RUNS_DIR / new_id
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(runs.run_dir(trained_run), target)
        runs.write_run_json(target, {**runs.read_run_json(target), "run_id": new_id})
        made.append(new_id)
        return target

    yield make
    for run_id in made:  # other test files pick the newest run; leave only the fixture's
        shutil.rmtree(config.RUNS_DIR / run_id, ignore_errors=True)
        registry.delete_run(run_id)


@pytest.fixture(scope="session")
def postgres():
    """A throw-away PostgreSQL server for this session (tests.postgres); skips where none can be run, but
    fails in CI, which must test the registry on PostgreSQL."""
    from tests.postgres import Postgres, server_binaries

    binaries = server_binaries()
    if binaries is None:
        message = "PostgreSQL's server is not installed (Debian: apt-get install postgresql; test.sh does it as root)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = Postgres(binaries).start()
    yield server
    server.stop()


@pytest.fixture
def runs_dir() -> Path:
    """The runs folder the engine uses in this session."""
    return config.RUNS_DIR
