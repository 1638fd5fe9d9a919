"""What training records: run.json when a run starts and when it ends (the recipe it chooses on validation, its
verdict from readiness.of_training, where the time went, when it first met the readiness bars) and the lines that
say so."""

from __future__ import annotations

import os
import platform
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from engine import config, readiness, runstore
from engine.metrics import DETECTION_GOAL
from engine.model import UNetTiny, count_parameters
from engine.recipe import RECIPE_FILE, Recipe, load_recipe, save_recipe
from engine.runrecord import TuneResult
from engine.storage import atomic_write_bytes
from engine.training.config import PAINTED_CONFIDENCE, TrainConfig
from engine.training.pace import Pace
from engine.training.prepare import TrainData
from engine.tuning import DEFAULT_SURE_SCORES, DEFAULT_THRESHOLDS, TuneStats, add_outline, min_areas_at, tuned_recipe

CURVE_FIELDS = ("epoch", "minutes", "val_ap", "val_detection", "val_false_alarm", "val_images", "val_ready")


def time_to_ready(history: list[dict]) -> dict | None:
    """The first validated epoch whose recipe met the readiness bars: its epoch, minute and how many val images
    showed it; None where none did."""
    first = next((row for row in history if row.get("val_ready")), None)
    if first is None:
        return None
    return {"epoch": first["epoch"], "minutes": round(first["minutes"], 2), "val_images": int(first["val_images"])}


def time_to_ready_line(reached: dict | None, painted: bool) -> str:
    """The log line that names the minute at which validation first met the readiness bars."""
    if painted:
        return "time to ready: not measured (validation holds painted defects only)"
    if reached is None:
        return "time to ready: validation met the readiness bars at no validated epoch"
    return (f"time to ready: validation first met the readiness bars at minute {reached['minutes']:.1f} (epoch "
            f"{reached['epoch']}, on {reached['val_images']} val images)")


def training_recipe(probs: list[np.ndarray], truths: list[np.ndarray], dice_threshold: float,
                    max_false_alarm: float, painted: bool = False, kinds: list[tuple[str, ...]] | None = None,
                    goal_detection: float = DETECTION_GOAL, scale: float = 1.0) -> TuneResult:
    """The recipe training saves: on validation, the most detections with false alarms within the goal, over
    thresholds from the best-Dice one upwards (raising it trades a little Dice for fewer false alarms), minimum
    region areas and sure tiers (a smaller region counts where its peak reaches a sure score); of those that tie on
    verdicts, the highest Dice and the min area midway along the tie. On `painted` validation the goal holds on the
    upper confidence bound of false alarms and the most cautious recipe within noise of the most detections wins
    (TuneStats.best). `kinds` names each image's defect kinds, for detection per kind. On images at their own size
    for a model that sees them resized by `scale`, the minimum areas are the grid at the model's scale, in px of
    the full-size image (min_areas_at), as `tune` tries them."""
    thresholds = [t for t in DEFAULT_THRESHOLDS if t >= dice_threshold - 1e-9] or [dice_threshold]
    stats = TuneStats(sorted({dice_threshold, *thresholds}), min_areas_at(scale), DEFAULT_SURE_SCORES)
    for k, (probability, truth) in enumerate(zip(probs, truths)):
        stats.add(probability, truth, kinds=kinds[k] if kinds else ())
    if not any(stats.has_defect):  # nothing to detect on validation: keep the Dice threshold, no area rule
        at_threshold = int(np.searchsorted(stats.thresholds, dice_threshold - 1e-9))
        flagged = sum(bool(largest[at_threshold]) for largest in stats.largest)  # the good images still count
        return {"threshold": dice_threshold, "min_region_px": 0, "sure_score": None, "sure_min_px": 0,
                "detection_rate": None, "false_alarm_rate": round(flagged / len(truths), 6), "dice": None,
                "false_alarm_bound": None, "confidence": None, "goal_on": "measured", "goal_met": False,
                "cautious": False,
                "false_alarms_measured": True, "max_false_alarm": max_false_alarm,
                "n_images": len(truths), "n_defective": 0, "n_defect_free": len(truths)}
    chosen = stats.best(max_false_alarm, PAINTED_CONFIDENCE if painted else None, cautious=painted)
    if not painted:  # readiness (readiness_of) also asks the rule to hold on good images it was not chosen on
        chosen["held_out_false_alarm_rate"] = stats.held_out_false_alarm_rate(max_false_alarm)
    chosen.update(stats.breakdown(chosen), goal_detection=goal_detection)
    return add_outline(chosen, dice_threshold)


def recipe_line(chosen: TuneResult) -> str:
    """The log line that says which recipe training chose on validation, and by which rule."""
    bound = f", {chosen['false_alarm_bound']:.1%} at 95 % confidence" if chosen.get("goal_on") == "bound" else ""
    if chosen.get("held_out_false_alarm_rate") is not None:
        bound += f", {chosen['held_out_false_alarm_rate']:.1%} held out"
    picked = ("the most cautious within one standard error of the most defects found" if chosen["cautious"]
              else "the most defects found")
    if chosen["detection_rate"] is not None and not chosen["goal_met"]:
        rule = f"; no recipe meets it: of those with the fewest false alarms, {picked}"
    else:
        rule = f"; of the recipes that meet it, {picked}" if chosen["cautious"] else ""
    applied = Recipe(chosen["threshold"], chosen["min_region_px"], sure_score=chosen.get("sure_score"),
                     sure_min_px=chosen.get("sure_min_px") or 0,
                     outline_threshold=chosen.get("outline_threshold")).describe()
    kinds = "".join(f"; {kind} {c['found']} of {c['n']}" for kind, c in (chosen.get("per_kind") or {}).items())
    return (f"recipe: {applied} (validation: "
            f"detection {_rate(chosen['detection_rate'], chosen['n_defective'])}, false alarms "
            f"{_rate(chosen['false_alarm_rate'], chosen['n_defect_free'])}{bound}, "
            f"goal <= {chosen['max_false_alarm']:.0%}{rule}{kinds})")


def _rate(value: float | None, n: int) -> str:
    """A rate with the count it was measured on ("5 of 5, 100.0%"): on a handful of images the count says more."""
    return "n/a" if value is None else f"{round(value * n)} of {n}, {value:.1%}"


def save_recipe_for(folder: Path, chosen: TuneResult, context: dict) -> dict:
    """Save the inspection recipe picked on validation data; returns it as a dict. A recipe that was not training's
    (tuned with `tune` or the Review page, or written by hand) is kept beside it first, and the log says where."""
    base = load_recipe(folder)
    if (folder / RECIPE_FILE).is_file() and (base.tuning or {}).get("by") != "training":
        kept = folder / f"recipe.replaced-{datetime.now(timezone.utc):%Y%m%d-%H%M%S}.json"
        atomic_write_bytes(kept, (folder / RECIPE_FILE).read_bytes())
        print(f"note: the recipe tuned before this resume (threshold {base.threshold:.2f}, min region "
              f"{base.min_region_px} px) is replaced by training's for the new epochs and kept in {kept.name}; tune "
              "again, or copy it back over recipe.json", flush=True)
    recipe = tuned_recipe(chosen, base, context)
    save_recipe(folder, recipe)
    return recipe.as_dict()


def start_run_record(cfg: TrainConfig, folder: Path, info: dict, data: TrainData, arch: dict, model: UNetTiny,
                     device: torch.device, model_speed: float, init_note: str, processes: int = 1) -> dict:
    """Write run.json and the registry row for a run that starts (or resumes) now; returns run.json's dict."""
    now = datetime.now(timezone.utc)
    info.update({
        "run_id": cfg.run_id, "name": cfg.name, "status": "running", "params": asdict(cfg),
        "dataset": {"path": str(Path(cfg.data).resolve()), "hash": data.data_hash, "counts": data.counts,
                    "val_carved_from_train": data.val_carved, "val_painted": data.val_painted},
        "arch": {"in_channels": 1, **arch}, "parameters": count_parameters(model), "init": init_note,
        "normalisation": {"mean": data.mean, "std": data.std}, "device": str(device),
        **runstore.process_fields(os.getpid()),
        "epochs_planned": cfg.epoch_limit or 0, "seed": cfg.seed, "command": cfg.command,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__},
        "machine": f"{platform.machine()}, {config.cpu_threads()} cpu threads",
        "created_at": info.get("created_at", now.isoformat()), "started_at": now.isoformat(),
        "finished_at": None, "error": None, "model_images_per_s": round(model_speed, 1), "processes": processes,
    })
    info.setdefault("threshold", 0.5)
    info.setdefault("ready", None)  # decided at the end; a resumed run keeps its verdict until then
    info.setdefault("ready_reason", None)
    return runstore.save(folder, info)


def finish_run(cfg: TrainConfig, folder: Path, info: dict, best: dict, stop_reason: str, pace: Pace,
               model_speed: float, history: list[dict]) -> None:
    """Choose the recipe on validation (`best` holds it at the images' own size: selection.at_image_size), decide
    readiness, close run.json and the registry row, say why it stopped and where the time went."""
    judged = readiness.stopped("no epoch finished")
    if best["probs"] is not None:
        chosen = training_recipe(best["probs"], best["truths"], info["threshold"], cfg.max_false_alarm,
                                 painted=info["dataset"].get("val_painted", False), kinds=best.get("kinds"),
                                 goal_detection=cfg.goal_detection, scale=cfg.scale)
        context = {"data": str(Path(cfg.data).resolve()), "split": "val", "epoch": best["epoch"], "by": "training"}
        info["recipe"] = save_recipe_for(folder, chosen, context)
        judged = readiness.of_training(chosen, info["dataset"].get("val_painted", False), cfg.max_false_alarm,
                                       cfg.goal_detection)
        print(recipe_line(chosen), flush=True)
    status = "cancelled" if stop_reason == "cancelled" else "completed"
    if status == "cancelled":
        judged = readiness.stopped("training was cancelled")
    info.pop("before_resume", None)
    info.pop("tuned_on", None)  # readiness is training's again, until the next tuning
    info.update(status=status, stop_reason=stop_reason, finished_at=datetime.now(timezone.utc).isoformat(),
                wall_seconds=round(pace.clock.elapsed(), 1), ready=judged.ready, ready_reason=judged.reason,
                ready_note=judged.note, pid=None, pid_started=None, time_shares=pace.clock.shares(),
                time_to_ready=time_to_ready(history),
                curve=[{k: row.get(k) for k in CURVE_FIELDS} for row in history if "val_score" in row])
    runstore.save(folder, info, history)
    print(pace.clock.line(), flush=True)
    print(time_to_ready_line(info["time_to_ready"], info["dataset"].get("val_painted", False)), flush=True)
    print(f"finished: {stop_reason}; best epoch {best['epoch']}, val dice {info.get('best_dice') or 0:.4f} at "
          f"threshold {info['threshold']:.2f} (verdicts use the recipe's); training "
          f"{info.get('train_images_per_s', 0)} img/s vs model alone {model_speed:.1f} img/s", flush=True)
    now = readiness.judge(info)  # as recorded: the reason and next steps every reader of the run gets
    if now.ready:
        print(f"ready: {cfg.run_id}" + (f" (provisional: {now.note})" if now.note else ""), flush=True)
    else:
        print(f"NOT READY: {now.reason}", flush=True)
        for step in now.next_steps:
            print(f"  next: {step}", flush=True)

