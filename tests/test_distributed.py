"""Training in two processes under torchrun (gloo on the CPU): one run written by process 0 alone, resume, and a
clear failure. Real processes, real DistributedDataParallel."""

import os
import subprocess
import sys

import pytest

from engine import config, distributed, registry, runs
from engine.training.prepare import rank_seed

TINY = ["--epochs", "2", "--base", "8", "--depth", "2", "--crop", "32", "--batch-size", "8", "--steps-per-epoch", "3",
        "--init", "none"]


def _engine(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=config.ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(config.ROOT), "PYTHONFAULTHANDLER": "1"})


def test_launch_command_hands_the_rest_to_torchrun() -> None:
    command = distributed.launch_command(2, ["train", "--data", "d", "--nproc", "2", "--nproc=2", "--seed", "1"])
    assert command[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "engine",
                           "train", "--data", "d", "--seed", "1"]


def test_a_torchrun_process_ends_at_once_with_its_exit_code_and_its_output_written(trained_run) -> None:
    # under torchrun the CLI leaves through distributed.end_process (os._exit): nothing printed may be lost, even
    # from a buffered stdout
    buffered = {key: value for key, value in os.environ.items() if key != "PYTHONUNBUFFERED"}

    def engine(*args: str, **torchrun: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "engine", *args], cwd=config.ROOT, capture_output=True,
                              text=True, timeout=120, env={**buffered, "PYTHONPATH": str(config.ROOT), **torchrun})

    alone, in_group = engine("runs"), engine("runs", WORLD_SIZE="1", RANK="0")
    assert in_group.returncode == alone.returncode == 0 and trained_run in in_group.stdout
    assert in_group.stdout == alone.stdout
    failed = engine("train", "--epochs", "1", WORLD_SIZE="1", RANK="0")
    assert failed.returncode == 2 and failed.stderr == "error: train needs --data DIR (or --resume RUN)\n"


def test_each_process_draws_its_own_crops_and_process_0_keeps_the_run_seed() -> None:
    assert rank_seed(7, 0) == 7
    assert len({rank_seed(7, rank) for rank in range(4)}) == 4


@pytest.mark.slow
def test_two_processes_write_one_run_and_resume_it(tiny_dataset) -> None:
    result = _engine("train", "--data", str(tiny_dataset), *TINY, "--name", "ddp", "--nproc", "2")
    assert result.returncode == 0, result.stderr[-8000:]
    run_id = result.stdout.split()[-1]
    assert result.stdout.count(run_id) >= 1 and result.stdout.count("epoch 1 ") == 1  # process 0's log only
    assert [f.name for f in config.RUNS_DIR.iterdir() if "-ddp-" in f.name and "cancel" not in f.name] == [run_id]
    folder = config.RUNS_DIR / run_id
    info = runs.read_run_json(folder)
    assert info["status"] == "completed" and info["processes"] == 2 and info["epochs_done"] == 2
    assert info["command"].startswith("torchrun --nproc-per-node 2 -m engine train") and info["params"]["nproc"] == 2
    assert [row["epoch"] for row in runs.read_metrics(folder)] == [1, 2]
    assert [run.id for run in registry.list_runs() if run.name == "ddp"] == [run_id]

    resumed = _engine("train", "--resume", run_id, "--epochs", "3", "--nproc", "2")
    assert resumed.returncode == 0, resumed.stderr[-8000:]
    info = runs.read_run_json(folder)
    assert info["status"] == "completed" and info["epochs_done"] == 3 and info["init"] == "resumed from epoch 2"
    assert [row["epoch"] for row in runs.read_metrics(folder)] == [1, 2, 3]
    assert [m.epoch for m in registry.epoch_metrics(run_id)] == [1, 2, 3]


def test_a_batch_that_does_not_split_is_refused_before_any_process_starts(tiny_dataset) -> None:
    args = [a if a != "8" else "7" for a in TINY]  # batch 7 over 2 processes
    result = _engine("train", "--data", str(tiny_dataset), *args, "--name", "ddp-odd", "--nproc", "2")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == "error: --batch-size 7 does not split evenly over 2 processes\n"


@pytest.mark.slow
def test_a_group_started_from_the_app_is_cancelled_like_any_run(tiny_dataset) -> None:
    from engine import jobs
    from engine.train import TrainConfig
    from tests.test_train import _wait_for

    run_id = jobs.start_training(TrainConfig(data=str(tiny_dataset), name="ddp-cancel", epochs=200, base=8, depth=2,
                                             crop=32, batch_size=8, steps_per_epoch=3, init="none", nproc=2))
    folder = config.RUNS_DIR / run_id
    _wait_for(lambda: len(runs.epochs_saved(folder)) >= 1, 120, "one epoch")
    assert runs.read_run_json(folder)["processes"] == 2
    jobs.cancel(run_id)
    _wait_for(lambda: runs.read_run_json(folder).get("status") == "cancelled", 60, "cancelled status")
    assert registry.get_run(run_id).status == "cancelled"
    assert "--nproc 2" in runs.read_run_json(folder)["command"]


@pytest.mark.slow
def test_a_process_of_the_group_killed_ends_the_run_as_failed_with_a_cause(tiny_dataset) -> None:
    import signal
    import subprocess

    import psutil

    from tests.test_train import _wait_for

    launcher = subprocess.Popen([sys.executable, "-m", "engine", "train", "--data", str(tiny_dataset),
                                 *TINY, "--epochs", "500", "--name", "ddp-killed", "--nproc", "2"],
                                cwd=config.ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "PYTHONPATH": str(config.ROOT)})
    try:
        folder = lambda: next(config.RUNS_DIR.glob("*-ddp-killed-*"), None)  # noqa: E731
        _wait_for(lambda: folder() is not None and len(runs.epochs_saved(folder())) >= 1, 120, "one epoch")
        main_pid = runs.read_run_json(folder())["pid"]
        others = [p for p in psutil.Process(launcher.pid).children() if p.pid != main_pid]
        assert len(others) == 1
        others[0].send_signal(signal.SIGKILL)
        assert launcher.wait(timeout=120) != 0
    finally:
        if launcher.poll() is None:
            launcher.kill()
    info = runs.read_run_json(folder())
    assert info["status"] == "failed" and info["error"]  # process 0 recorded what it saw
    assert registry.get_run(folder().name).status == "failed"


def test_batches_on_the_device_cannot_paint() -> None:
    from engine.errors import EngineError
    from engine.train import TrainConfig

    with pytest.raises(EngineError, match="cannot paint defects"):
        TrainConfig(data="d", batches="device", paint=0.5).check()
    TrainConfig(data="d", batches="loader", paint=0.5).check()
