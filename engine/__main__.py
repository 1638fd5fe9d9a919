"""Command line: `python -m engine <command>` (see `--help`)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback

from engine import commands, config
from engine.errors import EngineError


def add_train_options(p: argparse.ArgumentParser) -> None:
    """The `train` options, one per TrainConfig field, with its default and help text."""
    from typing import get_type_hints

    from engine.training.config import TrainConfig

    types = get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.metadata.get("hidden") and f.name != "run_id":
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = next((t for t in (bool, int, float) if t in getattr(types[f.name], "__args__", (types[f.name],))), str)
        text = f.metadata.get("help", "")
        if f.default not in (None, "", dataclasses.MISSING) and kind is not bool and "default" not in text.lower():
            text += f" (default: {f.default})"
        extra = {"help": argparse.SUPPRESS if f.metadata.get("hidden") else text}
        if kind is bool:  # every boolean option defaults to on and has a --no- flag
            p.add_argument("--no-" + f.name.replace("_", "-"), dest=f.name, action="store_false", **extra)
            continue
        if "choices" in f.metadata:
            extra["choices"] = f.metadata["choices"]
        p.add_argument(flag, type=kind, default=f.default, **extra)
    p.add_argument("--config", help="a JSON file of these options (what the app writes); other options are ignored")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of every command."""
    from engine.paint import DEFECTS_PER_IMAGE
    from engine.synth import SynthParams

    # Over 60 lines on purpose: only declarations, one sub-parser per command in the order `--help` lists them.
    parser = argparse.ArgumentParser(prog="python -m engine", description="Metal-surface defect segmentation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    p = sub.add_parser("generate", help="write a synthetic dataset, or paint defects onto your good images (--onto)")
    p.add_argument("--out", default=str(config.SAMPLE_DIR))
    p.add_argument("--count", type=int, default=200)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--defect-free", type=float, default=0.4, help="share of defect-free images (default 0.4)")
    p.add_argument("--difficulty", type=float, default=0.5)
    p.add_argument("--tint", type=float, default=0.0, help="share of colour-tinted images")
    p.add_argument("--types", help="comma-separated defect types to draw (default: all)")
    p.add_argument("--onto", help="paint the defects onto the defect-free images of this folder instead of "
                                  "generated surfaces (needs --out)")
    p.add_argument("--defect-size", type=float, help="with --onto: the side of the square defects are drawn to, a "
                                                     "share of each image's short side (0 to 1) or px (> 1); "
                                                     "default: the whole short side")
    p.add_argument("--max-defects", type=int, help=f"most defects per defective image (default: "
                   f"{SynthParams().max_defects} generated, {DEFECTS_PER_IMAGE} painted)")
    p.set_defaults(func=commands.cmd_generate)

    p = sub.add_parser("train", help="train a model (one run)")
    add_train_options(p)
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser("evaluate", help="metrics of a run on a dataset split")
    _model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--threshold", type=_unit_float)
    p.add_argument("--per-image", action="store_true",
                   help="one line per image (missed defects and false alarms first); with --json, a per_image list")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.cmd_evaluate)

    p = sub.add_parser("predict", help="verdicts, masks, overlays and reports for images or folders")
    _model_args(p, backend="auto")
    p.add_argument("inputs", nargs="+", metavar="INPUT")
    p.add_argument("--out", help="write masks, overlays, report.csv/json/html here (resumes an interrupted batch)")
    p.add_argument("--threshold", type=_unit_float, help="override the run's recipe threshold")
    p.add_argument("--min-region-px", type=_non_negative_int, help="override the recipe's minimum region area")
    p.add_argument("--px-per-mm", type=_positive_float, help="pixel size, to report region areas in mm^2")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.cmd_predict)

    p = sub.add_parser("import", help="import a dataset folder or MVTec-AD category into the data folder")
    p.add_argument("src", metavar="SRC")
    p.add_argument("--name", help="dataset name (default: the folder name)")
    p.add_argument("--link", action="store_true", help="symlink the images instead of copying them")
    p.set_defaults(func=commands.cmd_import)

    p = sub.add_parser("tune", help="choose threshold and min region size on validation data; saves the recipe")
    _model_args(p)
    p.add_argument("--data", required=True)
    p.add_argument("--split", default="val", choices=["train", "val", "test", "all"])
    p.add_argument("--max-false-alarm", type=_unit_float,
                   help="highest acceptable share of defect-free images flagged (default: the goal the run was "
                        "trained to, train's --max-false-alarm)")
    p.add_argument("--confidence", type=_unit_float, default=0.95,
                   help="apply the goal to this upper confidence bound of the false-alarm rate, so that it holds on "
                        "new parts too, as readiness and the Review page do (default 0.95; 0.5 holds it on the rate "
                        "measured on the tuning images)")
    p.add_argument("--goal-detection", type=_unit_float,
                   help="lowest acceptable share of defective images found (default: the goal the run was trained "
                        "to, train's --goal-detection)")
    p.add_argument("--thresholds", help="comma-separated thresholds to try (default 0.05..0.95, 0.97, 0.98, 0.99)")
    p.add_argument("--min-areas", help="comma-separated minimum region areas in px to try (default: the grid "
                                       "training tunes on, in px of the full-size image)")
    p.add_argument("--no-save", action="store_true", help="print the best setting without saving the recipe")
    p.set_defaults(func=commands.cmd_tune)

    p = sub.add_parser("serve", help="the FastAPI sidecar: POST /predict, GET /health, GET /models")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--workers", type=int, default=1,  # checked by `python -m api`, which this becomes
                   help="worker processes behind the one port (default 1); each loads its own models and has its "
                        "own DEFECTS_API_SLOTS inference threads")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--no-access-log", action="store_true", help="do not log every request")
    p.set_defaults(func=commands.cmd_serve)

    p = sub.add_parser("export", help="export a run to ONNX (and INT8 behind an accuracy gate)")
    p.add_argument("--run", default="latest", help="run id, 'demo' or 'latest'")
    p.add_argument("--epoch", default="best", help="epoch number, 'best' or 'last'")
    p.add_argument("--int8", action="store_true", help="also quantize to INT8 (kept only if it passes the gate)")
    p.add_argument("--max-dice-drop", type=float, default=0.01,
                   help="largest validation Dice drop of INT8 vs fp32 ONNX that is accepted (default 0.01)")
    p.add_argument("--calibration-images", type=int, default=32, help="training images used to calibrate INT8")
    p.add_argument("--data", help="dataset folder for the checks (default: the run's own dataset)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.cmd_export)

    p = sub.add_parser("bench", help="size, latency, throughput and Dice of every backend of a run")
    p.add_argument("--run", default="latest", help="run id, 'demo' or 'latest'")
    p.add_argument("--data", help="dataset folder (default: the run's own dataset)")
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument("--size", type=int, default=256, help="side of the square images timed (default 256)")
    p.add_argument("--iterations", type=int, default=100, help="timed rounds over all backends")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=commands.cmd_bench)

    p = sub.add_parser("runs", help="list runs from the registry, or delete one")
    p.add_argument("--delete", metavar="RUN", help="delete this run: its folder (checkpoints, exports) and its "
                                                   "registry rows (not the demo run, nor a run still training)")
    p.set_defaults(func=commands.cmd_runs)
    p = sub.add_parser("registry", help="registry maintenance")
    p.add_argument("action", choices=["rebuild"])
    p.set_defaults(func=commands.cmd_registry)
    p = sub.add_parser("label-queue", help="the images a run is least sure of, ranked for labelling, with why")
    p.add_argument("--run", default="latest", help="run id, 'demo' or 'latest'")
    p.add_argument("--data", required=True, help="dataset folder (or a folder of images) to rank")
    p.add_argument("--top", type=_non_negative_int, default=20, help="how many images (0: all)")
    p.add_argument("--split", default="all", choices=["all", "train", "val", "test"])
    p.add_argument("--labels", help="a labelled dataset (the Label page's): its images are left out, and "
                   "its defects count toward those a fine-tune wants")
    p.add_argument("--ignore-masks", action="store_true",
                   help="rank as if DIR held no label (no wrong verdicts): to simulate labelling from scratch")
    p.add_argument("--json", action="store_true", help="JSON instead of CSV")
    p.set_defaults(func=commands.cmd_label_queue)
    p = sub.add_parser("cancel", help="cancel a running training job")
    p.add_argument("run")
    p.set_defaults(func=commands.cmd_cancel)
    return parser


def _model_args(p: argparse.ArgumentParser, backend: str = "torch") -> None:
    from engine.runfolder import BACKENDS

    p.add_argument("--run", default="latest", help="run id, 'demo' or 'latest'")
    p.add_argument("--epoch", default="best", help="epoch number, 'best' or 'last'")
    p.add_argument("--backend", default=backend, choices=["auto", *BACKENDS],
                   help=f"default {backend}; auto: the fastest exported backend that passed the accuracy gate on "
                        "this machine (timed once), torch when nothing is exported")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])


def _unit_float(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
    return value


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the command; user errors print one line and return 2."""
    try:
        args = build_parser().parse_args(argv)  # inside: the parser imports TrainConfig, which needs numpy
        args.func(args)
    except EngineError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:  # the machine, not the code: a full disk, a read-only or vanished folder
        where = f" ({err.filename})" if err.filename else ""
        print(f"error: {(err.strerror or str(err)).lower()}{where}; check the disk and the folder's permissions",
              file=sys.stderr)
        return 1
    except ModuleNotFoundError as err:  # run outside the venv: say how to fix it instead of a traceback
        if (err.name or "").split(".")[0] in ("engine", "api"):
            raise  # a module of this project is missing: a bug or a broken checkout, keep the traceback
        print(f"error: package '{err.name}' is not installed for {sys.executable}; run the command in the "
              f"project's venv (`source .venv/bin/activate`, created by ./run.sh or ./test.sh)", file=sys.stderr)
        return 2
    except Exception as err:
        if type(err).__module__.startswith("sqlalchemy") and getattr(err, "orig", None) is not None:
            # The run registry's database could not be opened or written (a read-only folder, a lost server).
            print(f"error: the run registry cannot be used ({str(err.orig).lower()}); check that {config.RUNS_DIR} "
                  "is writable, or set DEFECTS_RUNS_DIR to a writable folder", file=sys.stderr)
            return 1
        traceback.print_exc()  # a bug, not the user's fault: keep the traceback
        return 1
    return 0


if __name__ == "__main__":
    if os.environ.get(config.HEARTBEAT_ENV):  # a training the app started: it beats from here, before any import
        from engine import runstore

        runstore.Heartbeat(os.environ[config.HEARTBEAT_ENV])
    code = main()
    if "WORLD_SIZE" in os.environ and "RANK" in os.environ:  # a process of a torchrun group
        from engine import distributed

        distributed.end_process(code)
    sys.exit(code)
