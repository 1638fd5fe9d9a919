"""INT8 quantization variants of one exported run side by side: accuracy, speed, and whether AVX2 can saturate.

Each variant is quantized with engine.export.quantize_int8 (the export's own code, other options), calibrated on
the images export calibrates on, and judged as export's gate judges: Dice on the run's check images against ONNX
Runtime fp32. p50 is batch 1 at 256x256, all variants interleaved. The saturation column is the largest
255 x (|w_k| + |w_k+1|) over adjacent int8 weights: above 32767, ONNX Runtime's U8S8 kernels on AVX2 CPUs
without VNNI (VPMADDUBSW, 16-bit pair sums) can saturate; uint8 weights use other kernels.

    .venv/bin/python benchmarks/int8_variants.py --run demo      # after `python -m engine export --run demo`
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import export  # noqa: E402
from engine.bench import BENCH_SIZE, machine_description, square_image, time_backends  # noqa: E402
from engine.checkdata import check_data, pick_samples, run_folder  # noqa: E402
from engine.data import load_pair  # noqa: E402
from engine.evaluate import evaluate  # noqa: E402
from engine.inference import Predictor  # noqa: E402

VARIANTS = {
    "QDQ U8S8": {"reduce_range": False},
    "QDQ U8S8 reduce_range (default)": {"reduce_range": True},
    "QDQ U8U8": {"weights": "uint8", "reduce_range": False},
    "QOperator U8S8": {"format": "QOperator", "reduce_range": False},
    "QOperator U8S8 reduce_range": {"format": "QOperator", "reduce_range": True},
}


def worst_pair(path: Path) -> int:
    """Largest 255 x (|w_k| + |w_k+1|) over adjacent int8 convolution weights of one output channel (0: none)."""
    worst = 0
    for tensor in onnx.load(str(path)).graph.initializer:
        if tensor.data_type == onnx.TensorProto.INT8 and len(tensor.dims) == 4:
            weights = numpy_helper.to_array(tensor).astype(np.int32).reshape(tensor.dims[0], -1)
            if weights.shape[1] > 1:
                worst = max(worst, 255 * int((np.abs(weights[:, :-1]) + np.abs(weights[:, 1:])).max()))
    return worst


def measure(run: str, rounds: int) -> list[str]:
    """Markdown rows, one per variant and one for ONNX Runtime fp32."""
    folder = run_folder(run)
    rows, predictors, dice = [], {}, {}
    with check_data(folder) as (dataset, _, _):
        samples = pick_samples(dataset, ("val", "test", "train"))
        calibration = [load_pair(s)[0] for s in pick_samples(dataset, ("train", "val"), export.CALIBRATION_IMAGES)]
        images = [square_image(load_pair(s)[0], BENCH_SIZE) for s in pick_samples(dataset, ("val", "test"), 8)]
        fp32 = predictors["ONNX Runtime fp32"] = Predictor(folder, backend="onnx")
        dice["ONNX Runtime fp32"] = evaluate(fp32, samples)["dice"]
        work = Path(tempfile.mkdtemp(dir=folder / "export", prefix=".variants-"))
        try:
            pairs = {}
            for name, options in VARIANTS.items():
                path = work / f"{len(pairs)}.onnx"
                export.quantize_int8(fp32.path, path, calibration, fp32.mean, fp32.std, fp32.stride, fp32.meta,
                                     options=options)
                predictors[name] = Predictor(folder, backend="int8", path=path)
                dice[name], pairs[name] = evaluate(predictors[name], samples)["dice"], worst_pair(path)
            timing = time_backends(predictors, images, iterations=rounds, warmup=5)
        finally:
            shutil.rmtree(work)
    for name in predictors:
        saturation = "-" if name not in pairs else f"{pairs[name]} ({'can' if pairs[name] > 32767 else 'cannot'})"
        rows.append(f"| {name} | {dice[name]:.4f} | {dice['ONNX Runtime fp32'] - dice[name]:+.4f} | "
                    f"{timing[name]['latency_p50_ms']:.2f} | {saturation} |")
    return rows


def main() -> None:
    """Print the markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="demo")
    parser.add_argument("--rounds", type=int, default=60, help="interleaved timing rounds")
    args = parser.parse_args()
    rows = measure(args.run, args.rounds)
    print(f"Run `{args.run}`, {machine_description()}, {args.rounds} interleaved rounds at {BENCH_SIZE}x{BENCH_SIZE}\n")
    print("| variant | Dice | Dice drop vs fp32 | p50 (ms) | worst pair sum x 255 (AVX2 saturation) |")
    print("| --- | ---: | ---: | ---: | ---: |")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
