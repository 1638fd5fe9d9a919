"""Benchmark: generate 1000 synthetic 256 px images (PNG writes included) and print images/s."""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import config  # noqa: E402
from engine.synth import SynthParams  # noqa: E402
from engine.synthset import generate_dataset  # noqa: E402


def _cpu_seconds() -> float:
    """CPU time (user + system) of this process and its finished children."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def main() -> None:
    """Run generate_dataset once into a temporary folder and print the throughput."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workers", type=int, default=None, help="default: all usable cores")
    parser.add_argument("--dir", default=None, help="parent folder of the temporary output (default: system temp)")
    args = parser.parse_args()
    workers = args.workers or config.cpu_threads()
    with tempfile.TemporaryDirectory(prefix="bench_synth_", dir=args.dir) as tmp:
        cpu0, started = _cpu_seconds(), time.perf_counter()
        result = generate_dataset(Path(tmp) / "data", args.count, seed=0, params=SynthParams(size=args.size),
                                  workers=workers)
        seconds, cpu = time.perf_counter() - started, _cpu_seconds() - cpu0
    print(f"{args.count} images of {args.size}px ({result['defective']} defective) with {workers} workers: "
          f"{seconds:.2f} s, {args.count / seconds:.0f} images/s; "
          f"CPU {cpu / args.count * 1e3:.2f} ms/image, i.e. {args.count * workers / cpu:.0f} images/s "
          f"if {workers} cores were free")


if __name__ == "__main__":
    main()
