"""Several API server settings side by side, fair on a shared machine: `serve --workers N` with DEFECTS_API_SLOTS S.

All servers start at once (idle ones cost nothing: no inference thread spins) and take turns, one block of
requests each per round with the first server rotating, so that each sees the same background load. Prints a
markdown table per setting: errors, latency percentiles, throughput over all its blocks and the median block.

    .venv/bin/python benchmarks/api_workers_ab.py --run RUN                      # 1x2, 2x2, 2x1 (workers x slots)
    .venv/bin/python benchmarks/api_workers_ab.py --run RUN --settings 1x2 2x1 --rounds 20 --block 50
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from load_api import free_port, load, make_images, rss_mb, start_server  # noqa: E402

from engine import config, runs  # noqa: E402
from engine.runfolder import BACKENDS  # noqa: E402
from engine.serving import resolve_backend, run_reference  # noqa: E402


def parse_setting(text: str) -> tuple[int, int]:
    """`WxS`: W worker processes with S inference slots each."""
    workers, _, slots = text.partition("x")
    return int(workers), int(slots)


def main() -> int:
    """Start every setting's server, alternate blocks of requests between them, print the table; 1 on errors."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="latest", help="run id, 'demo' or 'latest'")
    parser.add_argument("--backend", choices=["auto", *BACKENDS], default="auto",
                        help="resolved here once, then pinned on every server (auto: the fastest gated backend)")
    parser.add_argument("--settings", nargs="+", default=["1x2", "2x2", "2x1"], help="WORKERSxSLOTS each")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--block", type=int, default=100, help="requests per server per round")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=64, help="requests per server before the first round")
    args = parser.parse_args()

    run_dir = runs.resolve_run(args.run)
    run, backend = run_reference(run_dir), resolve_backend(run_dir, "best", args.backend)
    images = make_images(16, 256)
    settings = [parse_setting(text) for text in args.settings]
    servers, bases = [], []
    try:
        for workers, slots in settings:
            port = free_port()
            servers.append(start_server(port, run, backend, slots, workers))
            bases.append(f"http://127.0.0.1:{port}")
        for base in bases:
            asyncio.run(load(base, images, args.warmup, args.concurrency))
        latencies: list[list[float]] = [[] for _ in settings]
        walls: list[list[float]] = [[] for _ in settings]
        errors: list[list[str]] = [[] for _ in settings]
        for round_number in range(args.rounds):
            print(f"round {round_number + 1}/{args.rounds} ...", file=sys.stderr)
            for turn in range(len(settings)):
                index = (round_number + turn) % len(settings)
                block_latencies, block_errors, wall, _ = asyncio.run(
                    load(bases[index], images, args.block, args.concurrency))
                latencies[index] += block_latencies
                errors[index] += block_errors
                walls[index].append(wall)
        memory = [rss_mb(server.pid) for server in servers]
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=30)

    print(f"\nrun {run}, backend {backend}; {args.rounds} rounds of {args.block} requests per setting at concurrency "
          f"{args.concurrency}; {os.cpu_count()} CPUs, usable {config.cpu_threads()}, load average "
          f"{os.getloadavg()[0]:.1f} at the end\n")
    print("| workers x slots | requests | errors | p50 / p95 / p99 (ms) | throughput (img/s) | median block (img/s) "
          "| VmRSS, all processes (MB) |")
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: |")
    for index, (workers, slots) in enumerate(settings):
        p50, p95, p99 = np.percentile(latencies[index], [50, 95, 99])
        total = len(latencies[index])
        blocks = [args.block / wall for wall in walls[index]]
        print(f"| {workers} x {slots} | {total} | {len(errors[index])} | {p50:.1f} / {p95:.1f} / {p99:.1f} | "
              f"{total / sum(walls[index]):.1f} | {float(np.median(blocks)):.1f} | {memory[index]:.0f} |")
    return 1 if any(errors) else 0


if __name__ == "__main__":
    sys.exit(main())
