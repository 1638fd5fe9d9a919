"""Readiness: whether a run's verdicts may be served on a line, and if not, why and what helps.

Every rule that decides a run's "ready" lives here: training's verdict on its validation (`of_training`), a
tuning's (`after_tuning`), a stopped run's (`stopped`) and that of a run.json as it stands (`judge`). Training,
tuning, serving, the CLI and the pages write or show what these return; nothing else decides.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Union

from pydantic import BaseModel, Field

from engine.metrics import (
    DETECTION_GOAL,
    FALSE_ALARM_GOAL,
    MIN_DEFECTIVE,
    good_images_needed,
    good_images_to_bound,
    too_few_to_show,
)
from engine.runrecord import RunRecord, TuneResult

RunLike = Union[RunRecord, Mapping[str, Any]]  # a RunRecord, or run.json's dict as read

PAINTED_VALIDATION = ("validated only on defects painted onto its good images, so its detection of real defects is "
                      "unknown: a tuning on labelled real images decides whether it is ready")


@dataclass(frozen=True)
class Readiness:
    """A run's readiness: whether its verdicts may be served, why not, what helps, and what a ready verdict's
    images were too few to show (`note`, "provisional")."""

    ready: bool
    reason: str | None = None
    next_steps: tuple[str, ...] = ()
    note: str | None = None


def judge(info: RunLike) -> Readiness:
    """The readiness of a run as its run.json stands now: verdict, next steps, and what a ready one could not show."""
    run = RunRecord.of(info)
    ready, reason = verdict(run)
    return Readiness(ready, reason, tuple(next_steps(run)), run.ready_note if ready else None)


class Served(BaseModel):
    """A run's readiness as every answer that serves it shows it: the API's, the catalogue, Predictor.describe."""

    ready: bool = Field(description="false when training or a tuning judged the run not ready (its recipe missed a "
                                    "goal), or the run has not completed")
    ready_for: str | None = Field(None, description="where `ready` was shown to hold, when narrower than your parts: "
                                                  "'generated images only' for the demo model")
    ready_reason: str | None = Field(None, description="why the run is not ready")
    not_ready_reason: str | None = Field(None, description="the same as ready_reason (the name in docs/DESIGN.md)")
    ready_note: str | None = Field(None, description="where a ready run is ready provisionally: what its validation "
                                                     "held too few images to show (the detection goal, a rare kind)")


def served(info: RunLike) -> Served:
    """How a run's readiness is shown where it is served (judge, in the fields of Served)."""
    run = RunRecord.of(info)
    judged = judge(run)
    return Served(ready=judged.ready, ready_for=ready_for(run), ready_reason=judged.reason,
                  not_ready_reason=judged.reason, ready_note=judged.note)


def stopped(reason: str) -> Readiness:
    """The readiness of a run whose training stopped without choosing a recipe: failed, cancelled, no epoch."""
    return Readiness(False, reason)


def of_training(chosen: TuneResult, painted: bool, max_false_alarm: float, goal_detection: float) -> Readiness:
    """Training's readiness from the recipe chosen on its validation: painted defects cannot show the detection of
    real ones (a tuning decides); otherwise readiness_of, provisional where the images are too few to show all."""
    if painted:
        few = too_few_to_show(chosen["n_defective"], chosen["n_defect_free"], max_false_alarm)
        return Readiness(False, PAINTED_VALIDATION + (f"; besides, {few}" if few else ""))
    ready, reason = readiness_of(chosen, max_false_alarm, goal_detection=goal_detection)
    return Readiness(ready, reason, note=provisional(chosen, goal_detection) if ready else None)


def after_tuning(info: RunLike, best: TuneResult, max_false_alarm: float,
                 kind: str = "real images") -> tuple[Readiness, dict[str, Any]] | None:
    """A finished run's readiness after a tuning on labelled images (`kind`: generated or real, in words), defective
    and good, with the `tuned_on` record that explains it; None where the tuning does not decide. The recipe tune
    saves is the one served from now on, so:
    - a run whose validation could not decide (defects painted, none or too few real ones there) is ready when the
      recipe meets the goal on the upper bound of its false alarms (training's rule for it, tuning_readiness);
    - a run its validation judged is judged again by the same rule as validation (readiness_of), where the tuning
      set is large enough to show the goals; on fewer images validation's judgement stands."""
    run = RunRecord.of(info)
    if run.status != "completed" or not best.get("n_defective") or not best.get("n_defect_free"):
        return None
    goal_detection = best.get("goal_detection", DETECTION_GOAL)
    if not validation_decides(run):
        ready, reason = tuning_readiness(best, max_false_alarm)
    elif too_few_to_show(best["n_defective"], best["n_defect_free"], max_false_alarm) is None:
        ready, reason = readiness_of(best, max_false_alarm, "tuning", goal_detection)
    else:
        return None
    detection, false_alarm = best.get("detection_rate") or 0.0, best.get("false_alarm_rate") or 0.0
    flagged = round(false_alarm * best["n_defect_free"])
    # Where the tuning's images meet the goals as measured, only their number kept the run from ready.
    short_of_images = (not ready and detection >= goal_detection - 1e-9 and false_alarm <= max_false_alarm + 1e-9
                       and held_out_missed(best, max_false_alarm) is None)
    on_bound = best.get("goal_on") == "bound" or not validation_decides(run)
    tuned_on = {"images": kind, "n_defective": best["n_defective"], "n_defect_free": best["n_defect_free"],
                "flagged": flagged, "held_out_false_alarm_rate": best.get("held_out_false_alarm_rate"),
                "short_of_images": short_of_images,
                "good_needed": (good_images_to_bound(flagged, max_false_alarm, best.get("confidence") or 0.95)
                                if on_bound else good_images_needed(max_false_alarm))}
    return Readiness(ready, None if ready else f"tuned on {kind}: {reason}"), tuned_on


def weak_groups(chosen: TuneResult, where: str = "validation") -> str | None:
    """The kinds and size bands of defect of which the recipe finds under half on `where`, among those with at least
    MIN_DEFECTIVE images, in words ("blowhole: 0 of 16 found on validation"); None where there are none, or only one
    group of each (then it is the detection rate itself)."""
    weak = []
    for name, groups in (("kind", chosen.get("per_kind") or {}), ("size", chosen.get("by_size") or {})):
        if len(groups) < 2:
            continue
        weak += [f"{'defects of ' if name == 'size' else ''}{group}: {c['found']} of {c['n']} found on {where}"
                 for group, c in groups.items() if c["n"] >= MIN_DEFECTIVE and c["found"] < c["n"] / 2]
    return "; ".join(weak) or None


def readiness_of(chosen: TuneResult, max_false_alarm: float, where: str = "validation",
                 goal_detection: float = DETECTION_GOAL) -> tuple[bool, str | None]:
    """Whether a recipe chosen on labelled images (`where`: validation, a tuning set) makes an inspector worth serving,
    and if not, why: it meets both goals on images enough to show them, and finds at least half of every kind and
    size of defect there is enough of to judge. The reason names the kinds and sizes found least."""
    weak = weak_groups(chosen, where)
    missed = goal_missed(chosen, max_false_alarm, where, goal_detection)
    if missed:
        return False, missed + (f"; {weak}" if weak else "")
    reason = (too_few_to_show(chosen["n_defective"], chosen["n_defect_free"], max_false_alarm, where)
              or held_out_missed(chosen, max_false_alarm, where) or weak)
    return reason is None, reason


def provisional(chosen: TuneResult, goal_detection: float = DETECTION_GOAL, where: str = "validation") -> str | None:
    """What a ready recipe's images are too few to show, in words: the detection goal (too few defective images to
    bound its misses within EVIDENCE_FACTOR x the goal's, metrics.good_images_needed), and kinds too rare to judge;
    None where they show everything."""
    notes, n = [], chosen.get("n_defective") or 0
    needed = good_images_needed(1 - goal_detection)
    if n < needed:
        found = round((chosen.get("detection_rate") or 0) * n)
        notes.append(f"{where} holds {n} defective images ({found} found), too few to show the {goal_detection:.0%} "
                     f"detection goal (at least {needed})")
    rare = [f"{kind} ({c['n']})" for kind, c in (chosen.get("per_kind") or {}).items() if c["n"] < MIN_DEFECTIVE]
    if rare:
        notes.append(f"too few to judge on {where}: {', '.join(rare)}")
    return "; ".join(notes) or None


def held_out_missed(chosen: TuneResult, max_false_alarm: float, where: str = "validation") -> str | None:
    """Why the recipe rule misses the false-alarm goal on good images it was not chosen on
    (TuneStats.held_out_false_alarm_rate), in words; None when it does not, or where that was not measured."""
    held_out = chosen.get("held_out_false_alarm_rate")
    if held_out is None or held_out <= max_false_alarm + 1e-9:
        return None
    return (f"{where} false alarms {held_out:.0%} above the {max_false_alarm:.0%} goal where each half of its "
            f"{chosen['n_defect_free']} good images is judged by the recipe chosen on the other half "
            f"({chosen['false_alarm_rate']:.0%} on the images the recipe was chosen on)")


def goal_missed(chosen: TuneResult, max_false_alarm: float, where: str = "validation",
                goal_detection: float = DETECTION_GOAL) -> str | None:
    """Which goal a recipe misses on a set of images (`where`: the validation it was chosen on, a tuning set, a set
    evaluated), in words; None when it meets them."""
    detection, false_alarm = chosen["detection_rate"], chosen["false_alarm_rate"]
    if detection is None:
        return f"the {where} images hold no defect, so detection could not be measured"
    if false_alarm is not None and false_alarm > max_false_alarm + 1e-9:
        return (f"{where} false alarms {false_alarm:.0%} above the {max_false_alarm:.0%} goal "
                f"({chosen['n_defect_free']} defect-free images)")
    if chosen.get("goal_on") == "bound" and chosen.get("goal_met") is False:
        return (f"the {chosen['confidence']:.0%} upper bound of false alarms, "
                f"{chosen['false_alarm_bound']:.1%} at best, is above the {max_false_alarm:.0%} goal "
                f"({chosen['n_defect_free']} defect-free images are too few to show it)")
    if detection < goal_detection - 1e-9:
        n = chosen["n_defective"]
        return (f"{where} detection {detection:.0%} below the {goal_detection:.0%} goal ({round(detection * n)} of {n} "
                "defective images found)")
    return None


def tuning_readiness(best: TuneResult, max_false_alarm: float) -> tuple[bool, str | None]:
    """Readiness of a run judged by a tuning (its validation could not decide): readiness_of, with the goal held on
    the upper confidence bound of false alarms as training holds painted runs to it, whatever the tuning's own
    --confidence."""
    reason = goal_missed(best, max_false_alarm, "tuning", best.get("goal_detection", DETECTION_GOAL))
    bound = best.get("false_alarm_bound")
    if reason is None and best.get("goal_on") != "bound" and (bound is None or bound > max_false_alarm + 1e-9):
        shown = "unknown" if bound is None else f"{bound:.1%}"
        reason = (f"the {best['confidence']:.0%} upper bound of false alarms at this recipe, {shown}, "
                  f"is above the {max_false_alarm:.0%} goal ({best['n_defect_free']} defect-free images); "
                  f"tune with --confidence {best['confidence']:g} on more good images")
    reason = reason or too_few_to_show(best["n_defective"], best["n_defect_free"], max_false_alarm, "the tuning set")
    reason = reason or held_out_missed(best, max_false_alarm, "tuning")
    return reason is None, reason


def ready_label(status: str | None, ready: bool | None) -> str:
    """'yes', 'no' or '—' (not completed) for tables; runs from before the readiness rule count as ready."""
    if status != "completed":
        return "—"
    return "no" if ready is False else "yes"


def verdict(info: RunLike) -> tuple[bool, str | None]:
    """(ready, reason) of a run from its run.json: only completed runs whose recipe met its goal are ready."""
    run = RunRecord.of(info)
    if run.status != "completed":
        return False, f"run is {run.status or 'unknown'}, not completed"
    if run.ready is False:
        return False, run.ready_reason or "its recipe missed its goal on validation"
    return True, None


def ready_for(info: RunLike) -> str | None:
    """Where a ready run's verdicts were shown to hold, when narrower than the user's parts: "generated images only"
    for the shipped demo (trained and validated on generated images) and for a run last tuned on generated images;
    None otherwise (and for a run not ready)."""
    run = RunRecord.of(info)
    if not verdict(run)[0]:
        return None
    if run.run_id == "demo" or (run.tuned_on or {}).get("images") == "generated images":
        return "generated images only"
    return None


def validation_decides(info: RunLike) -> bool:
    """Whether training's validation could decide readiness: it measured the detection of real defects on enough
    images (metrics.too_few_to_show). Where it could not (defects painted, none or too few in the val split), a
    tuning on real labelled images decides instead."""
    run = RunRecord.of(info)
    val = run.best_val
    if run.dataset.val_painted or not val.get("n_defective"):
        return False
    return too_few_to_show(val["n_defective"], val.get("n_defect_free") or 0, false_alarm_goal(run)) is None


def false_alarm_goal(info: RunLike) -> float:
    """The false-alarm goal a run was trained to (what `tune` and the Review page hold it to unless told otherwise)."""
    return float(RunRecord.of(info).param("max_false_alarm", FALSE_ALARM_GOAL))  # a goal of 0 is a goal


def detection_goal(info: RunLike) -> float:
    """The detection goal a run was trained to (what `tune` holds it to unless told otherwise); DETECTION_GOAL for runs
    from before the goal was the line's to set."""
    return float(RunRecord.of(info).param("goal_detection", DETECTION_GOAL))


def next_steps(info: RunLike) -> list[str]:
    """What a user can do about a run that is not ready (empty for a ready run)."""
    run = RunRecord.of(info)
    ready, _ = verdict(run)
    if ready:
        return []
    if run.status != "completed":
        return ["wait for the run to finish, or resume it with `python -m engine train --resume RUN`"]
    run_id, goal = run.run_id or "RUN", false_alarm_goal(run)
    if run.tuned_on:
        return _after_tuning(run_id, run.tuned_on, goal)
    counts = run.dataset.counts
    steps = [f"train longer: `python -m engine train --resume {run_id} --minutes 30`"]
    weak = weak_groups((run.recipe or {}).get("tuning") or {})
    if weak:  # one kind or size of defect is found far less than the rest
        steps.append(f"give it more labelled images of what it finds least ({weak}); where you have none, paint "
                     "that kind: `--paint 0.5 --paint-types KIND` (and `--paint-size` for small ones)")
    if counts.get("defective", 0) < 50:
        steps.append(f"label more defective images (this set has {counts.get('defective', 0)})")
    if validation_decides(run):
        return steps
    tune = (f"tune on real labelled defects with some good images that training did not use: `python -m engine "
            f"tune --run {run_id} --data DIR --split SPLIT` (SPLIT: test, or all for a folder of its own), or the "
            "Review page's 'Tune and save' (this decides whether the run is ready); no masks are needed where DIR is "
            "sorted by verdict: DIR/good/ beside a folder of rejected parts per defect kind")
    if run.dataset.val_painted:
        return [tune, "or add those labelled defects to the set and train again (a set with labelled defects is "
                      "not painted unless --paint is given)"]
    val = run.best_val
    thin = too_few_to_show(val.get("n_defective") or 0, val.get("n_defect_free") or 0, goal)
    give_val = (f"or give the val split more labelled images (the manifest's split column), at least {MIN_DEFECTIVE} "
                f"defective and {good_images_needed(goal)} good, and train again")
    if run.ready_reason in (None, thin) or not val.get("n_defective"):  # nothing measured against the model
        return [tune, give_val]
    return [*steps, tune, give_val]  # it missed a goal, on validation too small to decide


def _after_tuning(run_id: str, tuned_on: dict[str, Any], goal: float) -> list[str]:
    """next_steps of a run that a tuning on labelled images judged not ready (after_tuning)."""
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
