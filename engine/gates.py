"""Which exported backends may serve on this machine: export's accuracy gates, re-checked where the CPU differs.

export/report.json records each backend's gate (validation Dice within max_dice_drop of ONNX Runtime fp32) and
the CPU flags it ran under (engine.cpuflags). INT8 and bf16 kernels differ between AVX2, AVX-512 VNNI and AMX
CPUs, so a gate passed on one says little about another: where the flags differ, or no gate was recorded, the
backend is checked again here on the run's check images, once per process and export, and the result is cached
beside the export in recheck-<flags>.json. ONNX Runtime fp32 (and torch) are the references and always pass.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from engine.cpuflags import cpu_flags, flags_key
from engine.errors import EngineError
from engine.runfolder import RunFolder
from engine.storage import atomic_write_json

MAX_DICE_DROP = 0.01  # default accuracy gate: validation Dice of ONNX Runtime fp32 minus the backend's
REFERENCES = ("torch", "onnx")
RECHECK_IMAGES = 48  # check images a re-check evaluates (seconds on a 2-core CPU for this model size)
RECHECK_PREFIX = "recheck-"


@dataclass(frozen=True)
class Verdict:
    """Whether a backend may serve here, and the one line that says why."""

    backend: str
    accepted: bool
    reason: str
    rechecked: bool = False


def within_gate(reference_dice: float, dice: float, max_dice_drop: float) -> bool:
    """The accuracy gate: Dice at most max_dice_drop below the ONNX Runtime fp32 reference."""
    return reference_dice - dice <= max_dice_drop


def read_export_report(run_dir: Path) -> dict[str, Any] | None:
    """runs/<run>/export/report.json as a dict, or None when missing or unreadable."""
    try:
        report = json.loads(RunFolder(run_dir).report.read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def _max_drop(report: dict[str, Any], gate: dict[str, Any] | None) -> float:
    """The Dice drop the export allowed this backend."""
    for source in (gate or {}, report.get("gate") or {}):
        if isinstance(source.get("max_dice_drop"), (int, float)):
            return float(source["max_dice_drop"])
    return MAX_DICE_DROP


def describe(backend: str, entry: dict[str, Any], where: str) -> str:
    """One line for a gate result: passed or failed, the Dice against fp32, and by how much."""
    if "error" in entry:
        return f"{backend} failed its accuracy gate{where}: it does not run here ({entry['error']})"
    drop, limit = entry["dice_drop"], entry["max_dice_drop"]
    verdict = f"{'passed' if entry['accepted'] else 'failed'} its accuracy gate{where}"
    reference = f" vs ONNX fp32 {entry['reference_dice']:.4f}" if "reference_dice" in entry else ""
    return (f"{backend} {verdict}: Dice {entry['val_dice']:.4f}{reference} (drop {drop:+.4f} "
            f"{'<=' if entry['accepted'] else '>'} {limit})")


def verdicts(run_dir: Path, backends: list[str], measure: bool = True) -> dict[str, Verdict] | None:
    """The verdict of each backend on this CPU: the export's gate where it ran under the same flags, else a
    re-check here (cached); None when a re-check is due and `measure` is False."""
    report = read_export_report(run_dir) or {}
    gates, flags = report.get("gates") or {}, cpu_flags()
    found: dict[str, Verdict] = {}
    stale: list[str] = []
    for backend in backends:
        gate = gates.get(backend)
        if backend in REFERENCES:
            found[backend] = Verdict(backend, True, f"{backend} is the reference")
        elif isinstance(gate, dict) and gate.get("cpu_flags") == flags and "val_dice" in gate:
            entry = {**gate, "max_dice_drop": _max_drop(report, gate)}
            reason = describe(backend, entry, " at export on this CPU")
            found[backend] = Verdict(backend, bool(gate.get("accepted")), reason)
        else:
            stale.append(backend)
    if stale:
        rechecked = _rechecked(run_dir, report, stale, measure)
        if rechecked is None:
            return None
        found.update(rechecked)
    return {backend: found[backend] for backend in backends}


_lock = threading.Lock()
_memory: dict[tuple[str, str, str], dict[str, dict[str, Any]]] = {}


def _rechecked(run_dir: Path, report: dict[str, Any], backends: list[str], measure: bool) -> dict[str, Verdict] | None:
    """Verdicts from re-checks on this CPU: from memory, else from recheck-<flags>.json, else measured now
    (None instead where `measure` is False)."""
    flags = cpu_flags()
    path = RunFolder(run_dir).exported(f"{RECHECK_PREFIX}{flags_key(flags)}.json")
    # The report's whole content identifies the export: a re-export (or an edited gate) invalidates the cache.
    identity = hashlib.sha256(json.dumps(report, sort_keys=True, default=str).encode()).hexdigest()[:16]
    key = (str(run_dir.resolve()), identity, flags_key(flags))
    with _lock:  # one re-check at a time: concurrent first requests must not each evaluate the model
        entries = _memory.get(key)
        if entries is None:
            entries = _read_cache(path, identity)
        missing = [backend for backend in backends if backend not in entries]
        if missing and not measure:
            return None
        if missing:
            try:
                entries = {**entries, **recheck(run_dir, report, missing)}
            except EngineError as err:  # no check images, or the fp32 reference will not load: not served, and why
                return {name: Verdict(name, False, f"{name} could not be re-checked on this CPU ({err})", True)
                        for name in backends}
            try:
                atomic_write_json(path, {"cpu_flags": flags, "export": identity, "backends": entries})
            except OSError:  # a read-only export (a deployed copy): the re-check then holds for this process only
                pass
        _memory[key] = entries
    recorded = {name: (report.get("gates") or {}).get(name, {}).get("cpu_flags") for name in backends}
    return {name: Verdict(name, entries[name]["accepted"], describe(
        name, entries[name], f", re-checked on this CPU ({flags_key(flags)}; exported on "
        f"{flags_key(recorded[name]) if recorded[name] is not None else 'unrecorded flags'})"), True)
        for name in backends}


def _read_cache(path: Path, identity: str) -> dict[str, dict[str, Any]]:
    """The cached re-checks of this export on these flags (empty when absent, unreadable or of another export)."""
    try:
        cached = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cached, dict) or cached.get("export") != identity:
        return {}
    return {k: v for k, v in (cached.get("backends") or {}).items() if isinstance(v, dict) and "accepted" in v}


def recheck(run_dir: Path, report: dict[str, Any], backends: list[str]) -> dict[str, dict[str, Any]]:
    """Dice of each backend and of ONNX Runtime fp32 on up to RECHECK_IMAGES of the run's check images, here."""
    from engine.checkdata import check_data, pick_samples
    from engine.evaluate import evaluate
    from engine.inference import Predictor

    results: dict[str, dict[str, Any]] = {}
    with check_data(run_dir) as (dataset, note, _):
        samples = pick_samples(dataset, ("val", "test", "train"), RECHECK_IMAGES)
        reference = evaluate(Predictor(run_dir, backend="onnx"), samples)["dice"]
        for backend in backends:
            checked = {"cpu_flags": cpu_flags(), "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
            try:
                dice = evaluate(Predictor(run_dir, backend=backend), samples)["dice"]
            except EngineError as err:  # e.g. OpenVINO bf16 does not compile on a CPU without AVX-512
                results[backend] = {**checked, "accepted": False, "error": str(err)}
                continue
            limit = _max_drop(report, (report.get("gates") or {}).get(backend))
            results[backend] = {
                **checked, "accepted": within_gate(reference, dice, limit), "val_dice": dice,
                "reference_dice": reference, "dice_drop": reference - dice, "max_dice_drop": limit,
                "n_images": len(samples), "check_data": note}
    return results
