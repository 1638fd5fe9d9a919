"""The README's command blocks, pasted into a clean shell in a fresh copy of the repository, all succeed.

Only the budgets are shortened (fewer images, fewer minutes, fewer timed rounds); every other word is the README's.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine import config

README = config.ROOT / "README.md"
SHARED = config.ROOT.parent / "shared"
# Short versions: the same commands with budgets a test can afford.
SHORTER = {"--count 1000": "--count 48", "--count 200": "--count 24", "--minutes 15": "--minutes 0.25",
           "--minutes 5": "--minutes 0.25", "bench --run latest": "bench --run latest --iterations 10"}


def readme_blocks() -> list[str]:
    """The README's runnable command blocks: the bash blocks that start by activating the venv."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), re.S)
    return [block for block in blocks if block.startswith("source .venv/bin/activate")]


def shorten(block: str) -> str:
    """The block with its budgets replaced by SHORTER."""
    for long, short in SHORTER.items():
        block = block.replace(long, short)
    return block


@pytest.fixture(scope="module")
def fresh_clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The repository's tracked files in a new folder (as a clone has them) with the venv the set-up made."""
    root = tmp_path_factory.mktemp("clone") / "repo"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=config.ROOT, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        source = config.ROOT / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    venv = Path(sys.prefix)  # the venv running these tests: the one ./test.sh made
    if not (venv / "bin" / "activate").is_file():
        pytest.skip("the tests do not run in a venv")
    (root / ".venv").symlink_to(venv)
    if SHARED.is_dir():
        (root.parent / "shared").symlink_to(SHARED)
    return root


def test_the_readme_has_runnable_blocks() -> None:
    blocks = readme_blocks()
    assert len(blocks) >= 2, "the README lost its command blocks"
    commands = [line for block in blocks for line in block.splitlines() if line.startswith("python -m engine")]
    for verb in ("generate", "train", "evaluate", "tune", "predict", "export", "bench", "runs", "import"):
        assert any(line.startswith(f"python -m engine {verb} ") or line.split("#")[0].strip() ==
                   f"python -m engine {verb}" for line in commands), f"no runnable `{verb}` example"
    for long in SHORTER:
        assert any(long in block for block in blocks), f"{long} is no longer in the README; update SHORTER"



def test_the_first_block_tunes_on_the_images_it_evaluates_on() -> None:
    # A tune without --split tuned on the held-out folder's val split alone (5 of its images), so the walk-through
    # always ended with a run that was not ready (issue 39).
    lines = [line.split("#")[0].split() for line in readme_blocks()[0].splitlines()]
    evaluate = next(line for line in lines if line[3:4] == ["evaluate"])
    tune = next(line for line in lines if line[3:4] == ["tune"])
    for flag in ("--data", "--split"):
        assert flag in tune and tune[tune.index(flag) + 1] == evaluate[evaluate.index(flag) + 1], (tune, evaluate)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(readme_blocks())))
def test_readme_block_runs_in_a_clean_shell(fresh_clone: Path, index: int) -> None:
    block = readme_blocks()[index]
    needs = re.findall(r"\.\./shared/data/(\w+)", block)
    if any(not (SHARED / "data" / name).is_dir() for name in needs):
        pytest.skip(f"needs ../shared/data/{needs[0]}")
    # A clean environment: no DEFECTS_* variables, no venv on PATH, nothing from this test process.
    env = {"HOME": str(fresh_clone.parent), "PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", shorten(block)], cwd=fresh_clone, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"README block {index} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    if index == 0:  # the walk-through ends with its run ready, or one line saying why not
        row = next(line for line in result.stdout.splitlines()
                   if line.split()[1:2] == ["completed"] and "-first-" in line.split()[0])
        assert row.split()[2] == "yes" or "(not ready: " in row, row


def test_outside_the_venv_a_missing_package_is_one_line(tmp_path: Path) -> None:
    # -S: the venv's interpreter without its site-packages, as a system python without the packages would be.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTUAL_ENV")}
    result = subprocess.run([sys.executable, "-S", "-m", "engine", "runs"],
                            cwd=config.ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not installed" in lines[0] and "source .venv/bin/activate" in lines[0], lines
