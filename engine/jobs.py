"""Background work: training jobs (start, cancel, find, read their log) and one-off work in a fresh process."""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from queue import Empty
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:  # a config is all this module needs of training
    from engine.training.config import TrainConfig

from engine import config, registry, runs, runstore
from engine.errors import EngineError
from engine.progress import Progress
from engine.runfolder import CONFIG_FILE as CONFIG_NAME
from engine.runfolder import LOG_FILE as LOG_NAME
from engine.storage import atomic_write_json

T = TypeVar("T")
_STARTING = threading.Lock()  # one start at a time in this process: the active-run check and the queueing together
_CHILDREN: list[subprocess.Popen] = []  # training processes this process started, until reaped


def train_command(**options: object) -> list[str]:
    """The `python -m engine train` command line for these options (None and False values are left out)."""
    command = [sys.executable, "-m", "engine", "train"]
    for key, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        command += [flag] if value is True else [flag, str(value)]
    return command


def start_training(cfg: TrainConfig, parallel: bool = False) -> str:
    """Start a training run in its own process (survives the caller); returns the run id at once.

    Refused while another run is queued or running unless parallel=True (a double click on the page starts one
    run). The config goes to the process as a file (runs/<id>/train_config.json), so every TrainConfig field
    reaches it as it is; run.json records the equivalent command line.
    """
    cfg.check()
    with _STARTING:
        busy = [run for run in active_runs() if run.id != (cfg.resume and runs.resolve_run(cfg.resume).name)]
        if busy and not parallel:
            raise EngineError(f"run {busy[0].id} is still {busy[0].status}; wait for it to end or cancel it, or "
                              "allow parallel runs")
        return _launch(cfg)


def _launch(cfg: TrainConfig) -> str:
    """Queue the run and start its process (start_training, once the start is allowed)."""
    run_id = runs.resolve_run(cfg.resume).name if cfg.resume else (cfg.run_id or runs.new_run_id(cfg.name))
    shown = train_command(**{k: v for k, v in cfg.options().items() if k != "run_id"})
    cfg = replace(cfg, resume=run_id if cfg.resume else None, run_id=None if cfg.resume else run_id,
                  command=" ".join(["python -m engine"] + shown[3:]))
    folder = config.RUNS_DIR / run_id
    folder.mkdir(parents=True, exist_ok=True)
    config_file = atomic_write_json(folder / CONFIG_NAME, asdict(cfg))
    queued = {"name": cfg.name, "command": cfg.command, "pid": None}
    if not cfg.resume:  # a resumed run keeps what it has; a new one is listed with what is known so far
        queued.update(dataset={"path": str(Path(cfg.data).resolve())}, epochs_planned=int(cfg.epochs or 0),
                      params=asdict(cfg))
    runstore.queue(folder, **queued)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "DEFECTS_RUNS_DIR": str(config.RUNS_DIR),
           "DEFECTS_DATA_DIR": str(config.DATA_DIR), config.HEARTBEAT_ENV: run_id}
    with (folder / LOG_NAME).open("ab") as log:
        process = subprocess.Popen(train_command(config=config_file), cwd=config.ROOT, stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   start_new_session=True)
    _CHILDREN.append(process)
    runstore.update(folder, **runstore.process_fields(process.pid))
    return run_id


def cancel(run_id: str) -> None:
    """Ask a run to stop after its current step (registry flag, plus SIGTERM once it is running).

    A queued run's process is still starting (importing, loading data: minutes on a loaded machine), before it
    catches signals: it is stopped at once and the run recorded as cancelled (a resume goes back to the state it
    left). A queued run of another host stops at its first step, where it reads the flag.
    """
    run = registry.get_run(run_id)
    if run is None:
        raise EngineError(f"unknown run '{run_id}'")
    registry.request_cancel(run_id)
    local = run.pid and run.host in (None, "", config.host()) and os.name != "nt"
    if run.status == "queued" and local and registry.pid_alive(run.pid, run.pid_started):
        _stop_before_start(run.pid)
        runstore.cancelled_before_start(runs.run_dir(run_id))
    elif run.pid and run.status == "running":
        try:
            os.kill(run.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _stop_before_start(pid: int) -> None:
    """Kill a training process that has not begun training (its whole session: torchrun's workers too) and wait
    until it is gone, so that nothing it writes comes after the record of the cancel."""
    try:
        if os.getpgid(pid) == pid:  # start_training gave it a session of its own
            os.killpg(pid, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        return
    for child in _CHILDREN:
        if child.pid == pid:
            child.wait()
    deadline = time.monotonic() + 10
    while registry.pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def active_runs() -> list[registry.Run]:
    """Runs that are queued or running (stale ones already count as failed)."""
    _CHILDREN[:] = [child for child in _CHILDREN if child.poll() is None]  # reap the ended ones: no <defunct>
    return [run for run in registry.list_runs() if run.status in registry.ACTIVE_STATUSES]


def log_tail(run_id: str, lines: int = 30) -> str:
    """The last lines of a run's training log (progress-bar redraws collapsed)."""
    path: Path = config.RUNS_DIR / run_id / LOG_NAME
    if not path.is_file():
        return ""
    text = path.read_bytes()[-20000:].decode("utf-8", errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def progress(run_id: str) -> dict:
    """Where a run stands, from the registry: status, epochs, elapsed and estimated remaining seconds, epoch rows."""
    run = registry.get_run(run_id)
    if run is None:
        raise EngineError(f"unknown run '{run_id}'; it may have been deleted")
    rows = [row.model_dump(exclude={"id", "run_id"}) for row in registry.epoch_metrics(run_id)]
    started = registry.as_utc(run.started_at)
    active = run.status in registry.ACTIVE_STATUSES
    end = registry.utcnow() if active or run.finished_at is None else registry.as_utc(run.finished_at)
    elapsed = (end - started).total_seconds() if started else None
    eta = None
    if active and rows and run.epochs_planned:
        # Epochs of this session only (a resumed run has older rows with other timings).
        recent = [row["seconds"] for row in rows[-5:] if row.get("seconds")]
        if recent:
            eta = max(0.0, (run.epochs_planned - run.epochs_done) * sum(recent) / len(recent))
    minutes = run.params.get("minutes")
    if active and minutes and elapsed is not None:
        budget_left = max(0.0, float(minutes) * 60 - elapsed)
        eta = budget_left if eta is None else min(eta, budget_left)
    # Share of the run done: by epochs when planned, else by the minutes budget; full only once completed (a failed
    # or cancelled run shows how far it got).
    fraction = run.epochs_done / run.epochs_planned if run.epochs_planned else None
    if active and minutes and elapsed is not None:
        fraction = max(fraction or 0.0, elapsed / (float(minutes) * 60))
    elif run.status == "completed":
        fraction = 1.0
    return {"run_id": run.id, "status": run.status, "error": run.error, "epochs_done": run.epochs_done,
            "fraction": min(1.0, fraction) if fraction is not None else None,
            "epochs_planned": run.epochs_planned, "elapsed_s": elapsed, "eta_s": eta, "best_epoch": run.best_epoch,
            "best_dice": run.best_dice, "best_iou": run.best_iou, "metrics": rows, "active": active,
            "settled": not active and not judged_gone_only(run)}


def judged_gone_only(run: registry.Run) -> bool:
    """Whether a run shows as failed only because its heartbeat stopped while its record (run.json) still says it
    trains: a verdict that a late heartbeat or the run's own end may still overturn, so pages keep watching it."""
    if run.status != "failed" or not (run.error or "").startswith(registry.STALE_ERROR):
        return False
    try:
        return runs.read_record(runs.run_dir(run.id)).status in registry.ACTIVE_STATUSES
    except EngineError:
        return False


# --------------------------------------------------------------------------------------- isolated work

def run_isolated(target: Callable[..., T], *args: Any, progress: Progress | None = None,
                 **kwargs: Any) -> T:
    """target(*args, progress=..., **kwargs) in a fresh process; returns its result.

    For heavy one-off work started from the app (export, benchmark): the models, ONNX Runtime sessions and
    allocator caches it needs go back to the OS when it ends, so the long-lived app process stays small
    (measured: export + benchmark added 0.4 GB to the Streamlit process that never came back). progress calls
    are relayed from the child; an EngineError there is raised here with its message. If the caller is
    interrupted (a user leaves the page), the child gets SIGINT, so its clean-up code runs. progress hears at once
    that the child starts, and the last stage again every 0.5 s that the child says nothing.
    """
    context = multiprocessing.get_context("spawn")  # never fork a process that runs threads
    queue = context.Queue()
    process = context.Process(target=_isolated_main, args=(queue, target, args, kwargs), daemon=True)
    last: tuple[float, float, str] = (0.0, 1.0, "starting a worker process")
    if progress is not None:
        progress(*last)  # at once: the child takes seconds (minutes under load) to import what it needs
    process.start()
    try:
        while True:
            try:
                kind, payload = queue.get(timeout=0.5)
            except Empty:
                if not process.is_alive():
                    raise EngineError(f"the worker process ended without an answer (exit code {process.exitcode})")
                if progress is not None:
                    progress(*last)  # a stage that reports nothing for a while: the bar's clock still moves
                continue
            if kind == "progress" and progress is not None:
                last = payload
                progress(*payload)
            elif kind == "result":
                return payload
            elif kind == "error":
                raise EngineError(payload)
            elif kind == "crash":
                raise RuntimeError(payload)
    finally:
        if process.is_alive():
            os.kill(process.pid, signal.SIGINT)
            process.join(30)
        if process.is_alive():
            process.kill()
        process.join()


def _isolated_main(queue: Any, target: Callable[..., Any], args: tuple, kwargs: dict) -> None:
    """The child's side of run_isolated: run, and send progress, then the result or the error."""
    try:
        result = target(*args, progress=lambda done, total, what="": queue.put(("progress", (done, total, what))),
                        **kwargs)
        queue.put(("result", result))
    except EngineError as err:
        queue.put(("error", str(err)))
    except KeyboardInterrupt:
        pass  # the caller went away; finally-blocks in target have run
    except Exception as err:  # a bug: the caller shows it, the log keeps the traceback
        traceback.print_exc()
        queue.put(("crash", f"{type(err).__name__}: {err}"))
