"""What each `python -m engine` command does once its arguments are parsed (the parser: engine/__main__.py)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from engine import config
from engine.errors import EngineError

if TYPE_CHECKING:  # commands import their packages when run, so a missing one is reported in one line
    from engine.runrecord import TuneResult


def cmd_generate(args: argparse.Namespace) -> None:
    from engine import synth, synthset

    if args.onto:
        return _paint_onto(args)
    if args.defect_size is not None:
        raise EngineError("--defect-size sizes defects painted onto your images: it goes with --onto (generated "
                          "images are --size px, their defects sized to them)")
    params = synth.SynthParams(size=args.size, defect_free=args.defect_free, difficulty=args.difficulty,
                               tint=args.tint)
    if args.max_defects is not None:
        params.max_defects = args.max_defects
    params.defect_weights = synth.only_types(params.defect_weights, args.types)
    with _progress_bar("generating") as progress:
        result = synthset.generate_and_register(args.out, args.count, seed=args.seed, params=params, progress=progress)
    rate = result["images"] / max(result["seconds"], 1e-9)
    print(f"{args.out}: {result['images']} images ({result['defective']} defective, {result['defect_free']} "
          f"defect-free; {synthset.splits_text(result['per_split'])}) in {result['seconds']:.1f}s, {rate:.0f} images/s")


def _paint_onto(args: argparse.Namespace) -> None:
    """`generate --onto GOOD_DIR`: the generator's defects painted onto the user's own defect-free images."""
    from engine.paint import DEFECTS_PER_IMAGE, EVERY_KIND, params_for
    from engine.paintset import paint_dataset

    if args.out == str(config.SAMPLE_DIR):
        raise EngineError("--onto needs --out DIR: the folder to write the painted dataset to")
    params = params_for(args.types, args.difficulty, 0.0 if args.defect_size is None else args.defect_size,
                        DEFECTS_PER_IMAGE if args.max_defects is None else args.max_defects)
    with _progress_bar("painting") as progress:
        result = paint_dataset(args.onto, args.out, args.count, args.defect_free, args.seed, params, progress)
    print(f"{args.out}: {result['images']} images ({result['defective']} with painted defects, "
          f"{result['defect_free']} defect-free, {len(result['skipped'])} unreadable skipped) onto {args.onto} "
          f"in {result['seconds']:.1f}s")
    if not args.types:
        print(f"note: every kind of the generator's defects was painted; name the kinds your line looks for with "
              f"--types (e.g. scratch,crack): {EVERY_KIND}")


def cmd_train(args: argparse.Namespace) -> None:
    from engine import distributed, train

    if args.config:  # written by jobs.start_training (the app); it holds every option
        cfg = train.TrainConfig.from_file(args.config)
    else:
        names = {f.name for f in dataclasses.fields(train.TrainConfig)} - {"command"}
        cfg = train.TrainConfig(**{name: getattr(args, name) for name in names})
    if not cfg.resume and not cfg.data:
        raise EngineError("train needs --data DIR (or --resume RUN)")
    cfg.check()
    if cfg.nproc > 1 and not distributed.under_torchrun():  # this command again, in nproc processes
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, config.cpu_threads() // cfg.nproc)))
        os.execv(sys.executable, distributed.launch_command(cfg.nproc, sys.argv[1:]))
    run_id = train.train(cfg)
    if distributed.rank() == 0:
        print(run_id)


def cmd_evaluate(args: argparse.Namespace) -> None:
    from engine.evaluate import evaluate, select_samples
    from engine.recipe import Recipe
    from engine.serving import open_predictor

    predictor = open_predictor(args.run, args.epoch, args.backend, args.device)
    samples = select_samples(args.data, args.split)
    with _progress_bar("evaluating") as progress:
        result = evaluate(predictor, samples, args.threshold, progress=progress)
    per_image = result.pop("per_image")
    if args.per_image:
        result["per_image"] = per_image
    if args.json:
        print(json.dumps(result))
    else:
        counts = {"detection_rate": ("n_detected", "n_defective"), "false_alarm_rate": ("n_false_alarms", "n_defect_free")}
        for key in ("dice", "iou", "precision", "recall", "mean_image_dice", "detection_rate", "false_alarm_rate",
                    "auroc", "average_precision"):
            value = result[key]
            count = f"  ({result[counts[key][0]]} of {result[counts[key][1]]})" if key in counts else ""
            print(f"{key:>18}: {'n/a' if value is None else f'{value:.4f}'}{count}")
        model = result["model"]
        rule = Recipe.from_dict(result["recipe"]).describe()
        print(f"{'n_images':>18}: {result['n_images']}  ({rule}; run {model['run']}, "
              f"epoch {model['epoch']}, {model['backend']}{'' if model['ready'] else ', NOT READY'})")
        for name, row in result["per_type"].items():
            if not row["n_defective"]:  # good parts: what counts is how many were flagged
                print(f"{name:>18}: false alarms {row['n_false_alarms']} of {row['n_images']} images")
            else:
                pixels = "" if row["dice"] is None else f"dice {row['dice']:.4f}  iou {row['iou']:.4f}  "
                print(f"{name:>18}: {pixels}detected {row['n_detected']} of {row['n_images']} images")
        for band, row in result["by_size"].items():
            print(f"{'size ' + band:>18}: detected {row['n_detected']} of {row['n_defective']} images")
        if args.per_image:
            _print_per_image(per_image)
        if result["too_few"]:
            print(f"note: {result['too_few']}; these rates show little")
        if result["goal_missed"]:
            print(f"note: {'the run is ready (judged on its validation), but ' if model['ready'] else ''}"
                  f"{result['goal_missed']}")


def _print_per_image(rows: list[dict]) -> None:
    """One line per image, the wrong verdicts first (missed defects, then false alarms), each by its score."""
    def outcome(row: dict) -> str:
        if row["has_defect"]:
            return "found" if row["flagged"] else "MISSED"
        return "FALSE ALARM" if row["flagged"] else "passed"

    order = {"MISSED": 0, "FALSE ALARM": 1, "found": 2, "passed": 3}
    print(f"{'image':>18}  {'truth':<6} {'outcome':<11} {'max prob':>8} {'regions':>7} {'largest px':>10} {'dice':>6}")
    for row in sorted(rows, key=lambda r: (order[outcome(r)], -r["score"])):
        dice = f"{row['dice']:.3f}" if row["has_defect"] and row["dice"] is not None else "-"
        print(f"{row['id']:>18}  {'defect' if row['has_defect'] else 'good':<6} {outcome(row):<11} "
              f"{row['max_score']:>8.3f} {row['regions']:>7} {row['largest_region_px']:>10} {dice:>6}")


def cmd_predict(args: argparse.Namespace) -> None:
    """Inspect images or folders under the run's recipe; with --out write masks, overlays and reports."""
    from engine import batch
    from engine.inspector import Inspector
    from engine.serving import open_predictor, serving_warning

    items = batch.collect_inputs(args.inputs, exclude=args.out)
    predictor = open_predictor(args.run, args.epoch, args.backend, args.device)
    rules = Inspector(predictor).recipe(threshold=args.threshold, min_region_px=args.min_region_px,
                                        px_per_mm=args.px_per_mm)
    warning = serving_warning(predictor)
    if warning:
        print(f"warning: {warning}", file=sys.stderr)

    def show(result: dict, reused: bool) -> None:
        if "error" in result:
            print(f"skipped: {result['error']}", file=sys.stderr)
        elif not args.json and not args.out:
            print(f"{result['file']}: {result['verdict']}  regions {len(result['regions'])}  "
                  f"max score {result['max_score']:.3f}")

    with _progress_bar("inspecting") as progress:
        result = batch.run_batch(predictor, items, args.out, rules, progress=progress, on_result=show)
    counts = result.counts()
    if args.json:
        print(json.dumps(result.as_dict()))
    elif args.out:
        print(f"{counts['images']} images: {counts['defect']} defect, {counts['ok']} ok, {counts['errors']} errors "
              f"({result.computed} inspected, {result.reused} from an earlier run) in {result.seconds:.1f}s; "
              f"report: {result.reports['html']}")
    if counts["errors"] == counts["images"]:
        raise EngineError("no image could be read")


def cmd_import(args: argparse.Namespace) -> None:
    """Import a dataset folder or MVTec-AD category into the data folder and register it."""
    from engine.importer import import_dataset

    with _progress_bar("importing") as progress:
        report = import_dataset(args.src, args.name or Path(args.src).resolve().name, link=args.link,
                                progress=progress)
    for line in report.lines():
        print(line)


def cmd_tune(args: argparse.Namespace) -> None:
    """Pick threshold and min region size for the best detection within the false-alarm budget; save the recipe."""
    from engine import readiness, recipe, runs, tuning
    from engine.evaluate import select_samples
    from engine.serving import open_predictor

    thresholds = _number_list(args.thresholds, float) if args.thresholds else tuning.DEFAULT_THRESHOLDS
    min_areas = _number_list(args.min_areas, int) if args.min_areas else None  # the run's own grid
    predictor = open_predictor(args.run, args.epoch, args.backend, args.device)
    samples = select_samples(args.data, args.split)
    split = "sorted" if any(s.sorted_into for s in samples) else args.split  # a folder sorted by verdict: all of it
    context = {"data": str(Path(args.data).resolve()), "split": split}
    with _progress_bar("predicting") as progress:
        tuned, best, notes = tuning.tune_run(predictor, samples, args.max_false_alarm, args.confidence, thresholds,
                                             min_areas, context, save=not args.no_save, progress=progress,
                                             goal_detection=args.goal_detection)
    for note in notes:
        print(f"warning: {note}", file=sys.stderr)
    where = "not saved (--no-save)" if args.no_save else f"saved to {predictor.run_dir / recipe.RECIPE_FILE}"

    def rate(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    bound_label = f"fa_bound@{best['confidence']:.0%}"
    print(f"{'threshold':>9} {'min_region_px':>13} {'detection':>9} {'false_alarm':>11} {bound_label:>13} {'dice':>6}")
    print(f"{best['threshold']:>9.2f} {best['min_region_px']:>13d} {rate(best['detection_rate']):>9} "
          f"{rate(best['false_alarm_rate']):>11} {rate(best['false_alarm_bound']):>13} {rate(best['dice']):>6}")
    if best.get("held_out_false_alarm_rate") is not None:
        print(f"held out: {best['held_out_false_alarm_rate']:.1%} of the {best['n_defect_free']} good images flagged "
              "where each half is judged by the recipe chosen on the other")
    goal = (f"the {args.confidence:.0%} upper bound of false alarms" if best["goal_on"] == "bound" else "false alarms")
    _print_by_kind(best, tuned.describe())
    print(f"recipe {where}: {tuned.describe()} "
          f"({best['n_defective']} defective and {best['n_defect_free']} defect-free {split} images, "
          f"goal: {goal} <= {best['max_false_alarm']:g}, detection >= {best['goal_detection']:g})")
    if best.get("readiness"):
        print(best["readiness"])
        for step in readiness.judge(runs.read_record(predictor.run_dir)).next_steps:
            print(f"  next: {step}")


def _print_by_kind(best: TuneResult, rule: str) -> None:
    """Defective images found per kind and size band under the chosen rule and, where it has a sure tier, under the
    best single minimum area: what each candidate rule costs per kind."""
    plain = best.get("without_sure_tier")
    columns = f"{'chosen':>10}" + (f" {'one min area':>13}" if plain else "")
    print(f"found per kind and size ({rule}" + (f"; one min area: {plain['recipe']})" if plain else ")"))
    print(f"{'':>18} {columns}")
    for group in ("per_kind", "by_size"):
        for name, counts in best[group].items():
            other = plain[group].get(name, {"found": 0}) if plain else None
            line = f"{counts['found']:>3} of {counts['n']:<4}" + (f" {other['found']:>6} of {counts['n']:<4}"
                                                                  if other else "")
            print(f"{name:>18} {line}")


def _number_list(text: str, kind: type) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise EngineError(f"'{text}' is not a comma-separated list of numbers") from None


def cmd_export(args: argparse.Namespace) -> None:
    from engine import export

    with _progress_bar("exporting") as progress:
        report = export.export_run(args.run, args.epoch, int8=args.int8, data=args.data,
                                   max_dice_drop=args.max_dice_drop, calibration_images=args.calibration_images,
                                   progress=progress)
    print(json.dumps(report) if args.json else export.format_report(report))


def cmd_bench(args: argparse.Namespace) -> None:
    from engine import bench

    with _progress_bar("benchmarking") as progress:
        result = bench.benchmark(args.run, data=args.data, split=args.split, size=args.size,
                                 iterations=args.iterations, warmup=args.warmup, progress=progress)
    print(json.dumps(result) if args.json else bench.bench_markdown(result))


def cmd_runs(args: argparse.Namespace) -> None:
    from engine import runs, runstore

    if args.delete:
        runs.delete_run(args.delete)
        print(f"deleted run {args.delete}: its folder and its registry rows")
        return
    print(f"{'run':<44} {'status':<10} {'ready':<6} {'epochs':>7}         best validation")
    for row in runstore.overview():
        best = (f"dice {row['best_dice']:.4f} @ epoch {row['best_epoch']}"
                + (" on painted defects" if row["validated_on"] == "painted defects" else "")
                if row["best_dice"] is not None else "no epochs yet")
        why = f"  (not ready: {row['ready_reason']})" if row["ready"] == "no" and row["ready_reason"] else ""
        print(f"{row['run_id']:<44} {row['status']:<10} {row['ready']:<6} {row['epochs']:>7} epochs  {best}{why}")


def cmd_registry(args: argparse.Namespace) -> None:
    from engine import runstore

    count, datasets = runstore.rebuild()
    print(f"registry rebuilt from {count} run folders in {config.RUNS_DIR} and {datasets} dataset folders")


def cmd_cancel(args: argparse.Namespace) -> None:
    from engine import jobs

    jobs.cancel(args.run)
    print(f"cancel requested for {args.run}")


def cmd_label_queue(args: argparse.Namespace) -> None:
    """Print the images of DIR the run is least sure of, ranked, with why (CSV, or JSON with --json)."""
    import csv

    from engine import labelqueue

    with _progress_bar("ranking") as progress:
        queue = labelqueue.label_queue(args.run, args.data, args.top, args.split, args.labels,
                                       use_truth=not args.ignore_masks, progress=progress)
    rows = labelqueue.as_rows(queue)
    if args.json:
        print(json.dumps(rows))
        return
    writer = csv.DictWriter(sys.stdout, fieldnames=labelqueue.COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)


def cmd_serve(args: argparse.Namespace) -> None:
    # The engine imports no front end: the API package has its own entry point, which this process becomes.
    command = [sys.executable, "-m", "api", "--host", args.host, "--port", str(args.port), "--workers",
               str(args.workers), "--log-level", args.log_level]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(config.ROOT), os.environ.get("PYTHONPATH")]))}
    os.execve(sys.executable, command + (["--no-access-log"] if args.no_access_log else []), env)


class _progress_bar:
    """A tqdm bar on stderr that is an engine.progress callback: progress(done, total, what)."""

    def __init__(self, desc: str) -> None:
        self.desc = desc

    def __enter__(self):
        from tqdm import tqdm

        self.bar = tqdm(total=0, desc=self.desc, file=sys.stderr, disable=None, leave=False)
        return self

    def __call__(self, done: float, total: float, what: str = "") -> None:
        from engine.progress import describe

        if self.bar.total != total:
            self.bar.reset(total=total)
        self.bar.n = done
        self.bar.set_description(f"{self.desc}: {describe(done, total, what)[1]}" if what else self.desc,
                                 refresh=False)
        self.bar.refresh()

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
