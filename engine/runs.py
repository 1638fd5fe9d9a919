"""Run folders: naming, resolving `demo`/`latest`/ids, run.json, metrics.csv and checkpoints."""

from __future__ import annotations

import csv
import io
import json
import re
import secrets
from datetime import datetime, timezone
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine import config
from engine.errors import RunNotFound
from engine.metrics import (
    DETECTION_GOAL,
    FALSE_ALARM_GOAL,
    MIN_DEFECTIVE,
    good_images_needed,
    too_few_to_show,
    weak_groups,
)
from engine.storage import atomic_write_json, atomic_write_text

METRIC_COLUMNS = ["epoch", "train_loss", "val_loss", "val_dice", "val_iou", "val_ap", "val_score", "lr", "seconds",
                  "images_per_s", "minutes", "val_images", "val_detection", "val_false_alarm", "val_ready"]
_EPOCH_FILE = re.compile(r"model_epoch_(\d+)\.pth$")


def new_run_id(name: str = "run") -> str:
    """A unique, sortable run id such as 20261126-103512-synth-3f2a."""
    slug = re.sub(r"[^a-zA-Z0-9_-]+", "-", name).strip("-")[:40] or "run"
    return f"{datetime.now():%Y%m%d-%H%M%S}-{slug}-{secrets.token_hex(2)}"


def run_dir(run_id: str) -> Path:
    """Folder of a run id (the shipped demo run lives in the repository)."""
    if run_id == "demo" and not (config.RUNS_DIR / "demo").is_dir():
        return config.DEMO_RUN_DIR
    return config.RUNS_DIR / run_id


def list_run_dirs() -> list[Path]:
    """Run folders with a run.json, newest first (the demo run included)."""
    folders = {p.parent for p in config.RUNS_DIR.glob("*/run.json")}
    if (config.DEMO_RUN_DIR / "run.json").is_file():
        folders.add(config.DEMO_RUN_DIR)
    return sorted(folders, key=_mtime, reverse=True)


def _mtime(folder: Path) -> float:
    try:
        return folder.stat().st_mtime
    except OSError:  # deleted meanwhile
        return 0.0


def runs_with_models() -> dict[str, Path]:
    """Run id -> folder of every run that has a checkpoint, newest first (the shipped demo as 'demo')."""
    folders = {("demo" if folder == config.DEMO_RUN_DIR else folder.name): folder for folder in list_run_dirs()}
    return {run_id: folder for run_id, folder in folders.items()
            if (folder / "best.pth").is_file() or epochs_saved(folder)}


def own_runs_with_model() -> list[Path]:
    """Run folders with a best.pth, newest first, the shipped demo excluded (what `latest` picks from)."""
    return [p for p in list_run_dirs() if p != config.DEMO_RUN_DIR and (p / "best.pth").is_file()]


def newest_ready_run() -> Path | None:
    """The ready run (see `readiness`) that finished last, the shipped demo excluded; None if there is none."""
    finished = []
    for folder in own_runs_with_model():
        try:
            info = _cached_run_json(folder / "run.json", (folder / "run.json").stat().st_mtime_ns)
        except (OSError, RunNotFound):
            continue  # deleted or being rewritten right now
        if readiness(info)[0]:
            finished.append((str(info.get("finished_at") or ""), folder))
    return max(finished, key=lambda item: item[0])[1] if finished else None


def newer_not_ready(folder: Path) -> tuple[str, str] | None:
    """(run id, why not ready) of the newest run with a model, where it is newer than `folder` and not ready: the
    run a user most likely expects to answer, and why another does; None otherwise."""
    newest = own_runs_with_model()
    if not newest or newest[0] == folder:
        return None
    try:
        ready, reason = readiness(read_run_json(newest[0]))
    except RunNotFound:
        return None
    return None if ready else (newest[0].name, reason or "not ready")


@lru_cache(maxsize=256)
def _cached_run_json(path: Path, mtime_ns: int) -> dict[str, Any]:  # mtime in the key: a rewrite is re-read
    return read_run_json(path.parent)


def resolve_run(run: str | None) -> Path:
    """Folder of `run`: an id, `demo`, `latest` (newest run with a best.pth) or `ready` (newest ready run).

    `latest` and `ready` fall back to the demo when no run qualifies.
    """
    run = run or "latest"
    if run == "ready":
        ready = newest_ready_run()
        if ready is not None:
            return ready
        run = "demo"
    if run == "latest":
        with_model = own_runs_with_model()
        if with_model:
            return with_model[0]
        run = "demo"
    folder = run_dir(run)
    if not (folder / "run.json").is_file():
        raise RunNotFound(f"unknown run '{run}'; list runs with `python -m engine runs`")
    return folder


def read_run_json(folder: Path) -> dict[str, Any]:
    """The run.json of a run folder."""
    try:
        return json.loads((folder / "run.json").read_text())
    except (OSError, ValueError) as err:
        raise RunNotFound(f"{folder}: run.json missing or unreadable ({err})") from err


def write_run_json(folder: Path, info: dict[str, Any]) -> None:
    """Atomically replace run.json."""
    info["updated_at"] = datetime.now(timezone.utc).isoformat()
    atomic_write_json(folder / "run.json", info)


def epochs_saved(folder: Path) -> list[int]:
    """Epoch numbers that have a model_epoch_N.pth, ascending."""
    return sorted(int(m.group(1)) for p in folder.glob("model_epoch_*.pth") if (m := _EPOCH_FILE.search(p.name)))


def checkpoint_path(folder: Path, epoch: int | str | None = "best") -> Path:
    """Path of a run's checkpoint: `best`, `last`, or an epoch number."""
    if epoch in (None, "best"):
        path = folder / "best.pth"
        if path.is_file():
            return path
        epoch = "last"
    saved = epochs_saved(folder)
    if epoch == "last":
        if not saved:
            raise RunNotFound(f"run {folder.name} has no checkpoints yet")
        epoch = saved[-1]
    try:
        epoch = int(epoch)
    except (TypeError, ValueError):
        raise RunNotFound(f"epoch must be a number, 'best' or 'last', not '{epoch}'") from None
    path = folder / f"model_epoch_{epoch}.pth"
    if not path.is_file():
        raise RunNotFound(f"run {folder.name} has no epoch {epoch} (saved: {saved or 'none'})")
    return path


def read_metrics(folder: Path) -> list[dict[str, float]]:
    """Rows of metrics.csv as dicts of floats (epoch as int)."""
    path = folder / "metrics.csv"
    if not path.is_file():
        return []
    rows = []
    with path.open(newline="") as handle:
        for row in csv.DictReader(handle):
            rows.append({k: (int(v) if k == "epoch" else float(v)) for k, v in row.items() if v not in ("", None)})
    return rows


def write_metrics(folder: Path, rows: list[dict[str, float]]) -> None:
    """Atomically rewrite metrics.csv from rows."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(folder / "metrics.csv", buffer.getvalue())


def delete_run(run_id: str) -> None:
    """Delete a run's folder and its registry rows; refuses the demo run and a run that is still active."""
    import shutil

    from engine import registry
    from engine.errors import EngineError

    if run_id == "demo" or run_dir(run_id).resolve() == config.DEMO_RUN_DIR.resolve():
        raise EngineError("the demo run ships with the app and cannot be deleted")
    row = registry.get_run(run_id)
    folder = config.RUNS_DIR / run_id
    if row is None and not folder.is_dir():
        raise RunNotFound(f"unknown run '{run_id}'; it may already be deleted")
    if row is not None and row.status in registry.ACTIVE_STATUSES:
        raise EngineError(f"run {run_id} is {row.status}; cancel it before deleting")
    if folder.resolve().parent != config.RUNS_DIR.resolve():  # never follow an id out of the runs folder
        raise EngineError(f"'{run_id}' is not a run folder name")
    if folder.is_dir():
        shutil.rmtree(folder)
    registry.delete_run(run_id)


# --------------------------------------------------------------------------------------- readiness
# Training decides readiness once, at the end of a run, from its recipe on validation data, and stores it in
# run.json as "ready" (true/false) and "ready_reason". Runs from before this rule carry neither: they count
# as ready when completed, as they were served before.


def ready_label(status: str | None, ready: bool | None) -> str:
    """'yes', 'no' or '—' (not completed) for tables; runs from before the readiness rule count as ready."""
    if status != "completed":
        return "—"
    return "no" if ready is False else "yes"


def readiness(info: dict[str, Any]) -> tuple[bool, str | None]:
    """(ready, reason) of a run from its run.json: only completed runs whose recipe met its goal are ready."""
    status = info.get("status")
    if status != "completed":
        return False, f"run is {status or 'unknown'}, not completed"
    if info.get("ready") is False:
        return False, info.get("ready_reason") or "its recipe missed its goal on validation"
    return True, None


def ready_for(info: dict[str, Any]) -> str | None:
    """Where a ready run's verdicts were shown to hold, when narrower than the user's parts: "generated images only"
    for the shipped demo (trained and validated on generated images) and for a run last tuned on generated images;
    None otherwise (and for a run not ready)."""
    if not readiness(info)[0]:
        return None
    if info.get("run_id") == "demo" or (info.get("tuned_on") or {}).get("images") == "generated images":
        return "generated images only"
    return None


def validation_decides(info: dict[str, Any]) -> bool:
    """Whether training's validation could decide readiness: it measured the detection of real defects on enough
    images (metrics.too_few_to_show). Where it could not (defects painted, none or too few in the val split), a
    tuning on real labelled images decides instead."""
    val = info.get("best_val") or {}
    if (info.get("dataset") or {}).get("val_painted") or not val.get("n_defective"):
        return False
    return too_few_to_show(val["n_defective"], val.get("n_defect_free") or 0, false_alarm_goal(info)) is None


def false_alarm_goal(info: dict[str, Any]) -> float:
    """The false-alarm goal a run was trained to (what `tune` and the Review page hold it to unless told otherwise)."""
    goal = (info.get("params") or {}).get("max_false_alarm")
    return FALSE_ALARM_GOAL if goal is None else float(goal)  # a goal of 0 is a goal


def detection_goal(info: dict[str, Any]) -> float:
    """The detection goal a run was trained to (what `tune` holds it to unless told otherwise); DETECTION_GOAL for runs
    from before the goal was the line's to set."""
    goal = (info.get("params") or {}).get("goal_detection")
    return DETECTION_GOAL if goal is None else float(goal)


def goals_of(folder: Path) -> tuple[float, float]:
    """(false-alarm goal, detection goal) of the run in `folder`; the defaults where its run.json cannot be read."""
    try:
        info = read_run_json(folder)
    except RunNotFound:
        return FALSE_ALARM_GOAL, DETECTION_GOAL
    return false_alarm_goal(info), detection_goal(info)


def goal_of(folder: Path) -> float:
    """false_alarm_goal of the run in `folder`; the default goal where its run.json cannot be read."""
    try:
        return false_alarm_goal(read_run_json(folder))
    except RunNotFound:
        return FALSE_ALARM_GOAL


def next_steps(info: dict[str, Any]) -> list[str]:
    """What a user can do about a run that is not ready (empty for a ready run)."""
    ready, _ = readiness(info)
    if ready:
        return []
    if info.get("status") != "completed":
        return ["wait for the run to finish, or resume it with `python -m engine train --resume RUN`"]
    run_id = info.get("run_id", "RUN")
    if info.get("tuned_on"):
        return _after_tuning(run_id, info["tuned_on"], false_alarm_goal(info))
    counts = (info.get("dataset") or {}).get("counts") or {}
    steps = [f"train longer: `python -m engine train --resume {run_id} --minutes 30`"]
    weak = weak_groups((info.get("recipe") or {}).get("tuning") or {})
    if weak:  # one kind or size of defect is found far less than the rest
        steps.append(f"give it more labelled images of what it finds least ({weak}); where you have none, paint "
                     "that kind: `--paint 0.5 --paint-types KIND` (and `--paint-size` for small ones)")
    if counts.get("defective", 0) < 50:
        steps.append(f"label more defective images (this set has {counts.get('defective', 0)})")
    if validation_decides(info):
        return steps
    tune = (f"tune on real labelled defects with some good images that training did not use: `python -m engine "
            f"tune --run {run_id} --data DIR --split SPLIT` (SPLIT: test, or all for a folder of its own), or the "
            "Review page's 'Tune and save' (this decides whether the run is ready); no masks are needed where DIR is "
            "sorted by verdict: DIR/good/ beside a folder of rejected parts per defect kind")
    if (info.get("dataset") or {}).get("val_painted"):
        return [tune, "or add those labelled defects to the set and train again (a set with labelled defects is "
                      "not painted unless --paint is given)"]
    val = info.get("best_val") or {}
    thin = too_few_to_show(val.get("n_defective") or 0, val.get("n_defect_free") or 0, false_alarm_goal(info))
    give_val = (f"or give the val split more labelled images (the manifest's split column), at least {MIN_DEFECTIVE} "
                f"defective and {good_images_needed(false_alarm_goal(info))} good, and train again")
    if info.get("ready_reason") in (None, thin) or not val.get("n_defective"):  # nothing measured against the model
        return [tune, give_val]
    return [*steps, tune, give_val]  # it missed a goal, on validation too small to decide


def _after_tuning(run_id: str, tuned_on: dict[str, Any], goal: float) -> list[str]:
    """next_steps of a run that a tuning on labelled images judged not ready (recipe._judge_by_tuning)."""
    had = (f"the last tuning had {tuned_on['n_defective']} defective and {tuned_on['n_defect_free']} good images, "
           f"{tuned_on['flagged']} of the good ones flagged")
    needed = tuned_on.get("good_needed")
    tune = f"`python -m engine tune --run {run_id} --data DIR`"
    retrain = (f"train longer (`python -m engine train --resume {run_id} --minutes 30`), or again on more good "
               "images or with some of the tuning's defects outlined in the set (a mask each)")
    if tuned_on.get("short_of_images"):
        show = (f"{needed} good images with no more than {tuned_on['flagged']} flagged show the {goal:.0%} goal"
                if needed else f"more good images show the {goal:.0%} goal")
        return [f"tune again on more images the run did not train on: {show} ({had}): {tune}", f"or {retrain}"]
    held_out = tuned_on.get("held_out_false_alarm_rate")
    if held_out is not None and held_out > goal + 1e-9:
        had += (f"; {held_out:.0%} flagged where each half of them was judged by the recipe chosen on the other "
                f"half")
    return [f"the model misses the goals on {tuned_on.get('images') or 'real images'} ({had}): {retrain}",
            f"or tune again on other images the run did not train on: {tune}"]
