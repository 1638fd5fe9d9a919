"""The training job: resolve the run (new, queued or resumed), run the loop (engine/training/loop.py), and record a
failure with its cause. Writes the run folder and the registry as it goes.

Run with `python -m engine train --data DIR ...` (see engine/__main__.py) or start it in the
background with engine.jobs.start_training.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path

from engine import config, distributed, runs, runstore, storage
from engine.errors import EngineError
from engine.runfolder import RunFolder
from engine.training.checkpoints import load_resume
from engine.training.config import TrainConfig
from engine.training.loop import fit
from engine.training.setup import pick_device

__all__ = ["TrainConfig", "train"]


def resolve_config(cfg: TrainConfig) -> tuple[TrainConfig, Path, dict, int]:
    """The config, folder, run.json and first epoch of this job; a resume keeps the run's own settings."""
    if not cfg.resume:
        run_id = cfg.run_id or runs.new_run_id(cfg.name)
        folder = config.RUNS_DIR / run_id
        info = runs.read_run_json(folder) if RunFolder(folder).run_json.is_file() else {}
        if info and info.get("status") != "queued":  # only a run queued by jobs.start_training is taken over
            raise EngineError(f"run {run_id} already exists; resume it with --resume {run_id} or pick another id")
        return replace(cfg, run_id=run_id), folder, info, 0
    folder = runs.resolve_run(cfg.resume)
    info = runs.read_run_json(folder)
    other = runstore.trained_elsewhere(info)
    if other:
        raise EngineError(f"run {info['run_id']} is training now (process {other}); wait for it to finish, or stop "
                          f"it with `python -m engine cancel {info['run_id']}`")
    saved = {k: v for k, v in info["params"].items() if k in TrainConfig.__dataclass_fields__}
    # Keep the architecture and data of the run; take the new epoch/minute budget and device.
    resumed = replace(TrainConfig(**saved), epochs=cfg.epochs, minutes=cfg.minutes, device=cfg.device,
                      nproc=cfg.nproc, resume=info["run_id"], run_id=info["run_id"], command=cfg.command)
    start_epoch = int(load_resume(folder)["epoch"])
    if resumed.epoch_limit is not None and start_epoch >= resumed.epoch_limit:
        raise EngineError(f"run {resumed.run_id} already has {start_epoch} epochs; pass --epochs above "
                          f"{start_epoch} or --minutes")
    info = runstore.queue(folder)  # remembers the state it leaves, for a resume that fails before an epoch
    return resumed, folder, info, start_epoch


def train(cfg: TrainConfig) -> str:
    """Run one training job to the end (or budget, early stop, cancel); returns the run id.

    A failure is recorded with its cause in run.json and the registry before it is raised (a resume that failed
    before its first new epoch leaves the run as it was); a full disk gives the record its reserved space first.
    Under torchrun, process 0 does all of that and the others only train (a failure of one ends them all).
    """
    group = distributed.join(pick_device(cfg.device))
    if group.active and "--nproc" not in cfg.command:  # record what ran: torchrun, directly or through --nproc
        n_nodes = group.world_size // group.local_world_size
        nodes = f"--nnodes {n_nodes} " if n_nodes > 1 else ""
        cfg = replace(cfg, nproc=group.local_world_size, command=cfg.command.replace(
            "python -m engine", f"torchrun {nodes}--nproc-per-node {group.local_world_size} -m engine", 1))
    try:
        if not group.is_main:
            cfg, folder, start_epoch = group.share(None)  # the run process 0 resolved
            with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # one log: process 0's
                run_id = fit(cfg, Path(folder), {}, start_epoch, group)
        else:
            cfg, folder, info, start_epoch = resolve_config(cfg)
            group.share((cfg, str(folder), start_epoch))
            with runstore.beating(cfg.run_id):  # from now on, whatever the loop does (validation, tuning)
                run_id = _fit_recorded(cfg, folder, info, start_epoch, group)
        group.wait()  # every process leaves together, once process 0 has written the end of the run
        return run_id
    finally:
        group.leave()


def _fit_recorded(cfg: TrainConfig, folder: Path, info: dict, start_epoch: int, group: distributed.Group) -> str:
    """fit, with the cause of a failure recorded in run.json and the registry before it is raised."""
    try:
        with storage.Reserve(folder) as reserve:
            try:
                return fit(cfg, folder, info, start_epoch, group)
            except BaseException:
                reserve.release()  # the failure record must fit on a full disk
                raise
    except BaseException as err:
        cause = str(err) if isinstance(err, EngineError) else f"{type(err).__name__}: {err}".rstrip(": ")
        try:
            runstore.fail(folder, cause)
        except EngineError as record_err:  # run.json unwritable: the registry alone has the record
            raise EngineError(f"{cause} (recorded in the registry only: {record_err})") from err
        raise

