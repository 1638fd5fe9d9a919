"""Load test of the API: a real uvicorn on a free local port, a fixed number of requests, a markdown report.

Measures latency percentiles, throughput, errors and the server's memory (VmRSS) before and after, next to
the raw Predictor's throughput on the same images with the same backend, measured in the same run.

    nice -n 15 .venv/bin/python benchmarks/load_api.py --requests 200     # quick, during development
    .venv/bin/python benchmarks/load_api.py                               # 1,000 requests at concurrency 8
    .venv/bin/python benchmarks/load_api.py --workers 2                   # `serve --workers 2`
    .venv/bin/python benchmarks/load_api.py --url http://127.0.0.1:8000   # a server that is already running

With --workers, the server's CPU and memory are those of the whole process tree (supervisor and workers).
With --url, the model is the one the server's /health names, and the server's CPU and memory are not measured.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from engine import config, runs  # noqa: E402
from engine.imageio import decode_image, encode_png  # noqa: E402
from engine.inference import Predictor  # noqa: E402
from engine.inspection import inspect  # noqa: E402
from engine.recipe import load_recipe  # noqa: E402
from engine.runfolder import BACKENDS  # noqa: E402
from engine.serving import resolve_backend, run_reference  # noqa: E402
from engine.synth import SynthParams, render_sample  # noqa: E402

BAR = 0.80  # the API must deliver at least this share of the Predictor's throughput


def make_images(count: int, size: int, seed: int = 0) -> list[bytes]:
    """`count` synthetic metal-surface PNGs of size x size pixels (every 5th defect-free)."""
    params = SynthParams(size=size)
    return [encode_png(render_sample(seed + i, params, defect_free=i % 5 == 4)[0]) for i in range(count)]


def predictor_block(predictor: Predictor, arrays: list[np.ndarray], count: int, offset: int = 0) -> tuple[float, float]:
    """Wall and CPU seconds of `count` Predictor.predict + inspect calls (what the API does after decoding)."""
    rules = load_recipe(predictor.run_dir)
    wall, cpu = time.perf_counter(), time.process_time()
    for i in range(offset, offset + count):
        inspect(predictor.predict(arrays[i % len(arrays)], rules.threshold).probability, rules).as_dict()
    return time.perf_counter() - wall, time.process_time() - cpu


def process_tree(pid: int) -> list[int]:
    """A process and all its descendants (uvicorn's supervisor and its workers), by pid."""
    return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]


def cpu_seconds(pid: int) -> dict[int, float]:
    """User + system CPU seconds of a process and of each of its descendants, by pid, from /proc/<pid>/stat."""
    used = {}
    for member in process_tree(pid):
        try:
            fields = Path(f"/proc/{member}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:  # ended between the listing and the read
            continue
        used[member] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return used


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its descendants in MB, from /proc/<pid>/status."""
    total = 0.0
    for member in process_tree(pid):
        try:
            lines = Path(f"/proc/{member}/status").read_text().splitlines()
        except FileNotFoundError:
            continue
        total += next((int(line.split()[1]) / 1024 for line in lines if line.startswith("VmRSS:")), 0.0)
    return total


def free_port() -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(port: int, run: str, backend: str, slots: int | None, workers: int = 1) -> subprocess.Popen:
    """`python -m engine serve --workers N` on 127.0.0.1:port serving run/backend; returns once /health says ok."""
    env = {**os.environ, "DEFECTS_API_RUN": run, "DEFECTS_API_BACKEND": backend}
    env.pop("DEFECTS_API_KEY", None)
    if slots:
        env["DEFECTS_API_SLOTS"] = str(slots)
    server = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", str(port), "--workers", str(workers),
                               "--no-access-log", "--log-level", "warning"], cwd=config.ROOT, env=env)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"server exited with status {server.returncode} before it was ready")
        try:
            server_health(f"http://127.0.0.1:{port}")
            return server
        except httpx.TransportError:
            time.sleep(0.3)
    server.kill()
    raise SystemExit("server did not answer /health within 120 s")


def server_health(base: str) -> dict:
    """The server's /health; exits when it serves no model."""
    health = httpx.get(f"{base}/health", timeout=10).json()
    if health["status"] != "ok":
        raise SystemExit(f"server has no model: {health.get('detail')}")
    return health


async def load(base: str, images: list[bytes], count: int, concurrency: int,
               pid: int | None = None) -> tuple[list[float], list[str], float, list[float]]:
    """Send `count` POST /predict with `concurrency` in flight; latencies (ms), errors, wall seconds, RSS samples."""
    latencies: list[float] = []
    errors: list[str] = []
    memory: list[float] = []
    next_index = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # Multipart bodies encoded once: the client shares the CPUs with the server and should cost it little.
    bodies = []
    for number, data in enumerate(images):
        request = httpx.Request("POST", base, files={"file": (f"{number}.png", data, "image/png")})
        bodies.append((request.read(), {"content-type": request.headers["content-type"]}))

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal next_index
        while next_index < count:
            index = next_index
            next_index += 1
            started = time.perf_counter()
            try:
                body, headers = bodies[index % len(bodies)]
                response = await client.post("/predict", content=body, headers=headers)
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
            except httpx.HTTPError as err:
                errors.append(f"{type(err).__name__}: {err}")
            latencies.append((time.perf_counter() - started) * 1000)
            if pid and index % max(1, count // 10) == 0:
                memory.append(rss_mb(pid))

    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    return latencies, errors, wall, memory


def main() -> int:
    """Measure the Predictor, start the server, load it, print the markdown report; 1 if a bar is missed."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--run", default="latest", help="run id, 'demo' or 'latest'")
    parser.add_argument("--backend", choices=["auto", *BACKENDS], default="auto",
                        help="default auto: what the API picks (the fastest gated backend, timed here)")
    parser.add_argument("--images", type=int, default=16, help="distinct images, sent round-robin")
    parser.add_argument("--size", type=int, default=256, help="image side in pixels")
    parser.add_argument("--warmup", type=int, default=32, help="requests before the first memory reading")
    parser.add_argument("--rounds", type=int, default=5, help="alternating Predictor/API blocks")
    parser.add_argument("--slots", type=int, help="DEFECTS_API_SLOTS for the server (default: its own default)")
    parser.add_argument("--workers", type=int, default=1, help="`serve --workers N`: worker processes (default 1)")
    parser.add_argument("--url", help="load this already running server instead of starting one (its /health "
                                      "names the model; --run, --backend, --slots, --workers do not apply)")
    parser.add_argument("--predictor-images", type=int, help="images for the Predictor baseline (default: "
                        "a fifth of --requests, at least 50)")
    args = parser.parse_args()

    if args.url:
        served = server_health(args.url.rstrip("/"))["model"]
        run_dir, backend = runs.resolve_run(served["run"]), served["backend"]
        run = run_reference(run_dir)
    else:
        run_dir = runs.resolve_run(args.run)
        run, backend = run_reference(run_dir), resolve_backend(run_dir, "best", args.backend)
    images = make_images(args.images, args.size)
    arrays = [decode_image(data) for data in images]
    predictor = Predictor(run_dir, backend=backend)
    baseline_count = args.predictor_images or max(50, args.requests // 5)
    # The Predictor runs on one worker thread, like the server's inference. (On a busy machine OpenMP's
    # spin-waiting can make the main thread several times slower, which would flatter the API.)
    baseline = ThreadPoolExecutor(1)
    baseline.submit(predictor_block, predictor, arrays, 3).result()  # warm-up: allocations, kernel choice

    if args.url:
        server, base = None, args.url.rstrip("/")
    else:
        port = free_port()
        server = start_server(port, run, backend, args.slots, args.workers)
        base = f"http://127.0.0.1:{port}"
    pid = server.pid if server else None
    latencies: list[float] = []
    errors: list[str] = []
    samples: list[float] = []
    server_cpu: dict[int, float] = {}
    api_wall = raw_wall = raw_cpu = client_cpu = 0.0
    rss_before = rss_after = 0.0
    try:
        print(f"warm-up: {args.warmup} requests ...", file=sys.stderr)
        errors += asyncio.run(load(base, images, args.warmup, args.concurrency))[1]
        if pid:
            rss_before = rss_mb(pid)
        # Interleaved blocks, so that both sides see the same background load on a shared machine.
        for block in range(args.rounds):
            share = args.requests // args.rounds + (block < args.requests % args.rounds)
            raw_share = baseline_count // args.rounds + (block < baseline_count % args.rounds)
            print(f"round {block + 1}/{args.rounds}: Predictor {raw_share} images, API {share} requests at "
                  f"concurrency {args.concurrency} ...", file=sys.stderr)
            wall, cpu = baseline.submit(predictor_block, predictor, arrays, raw_share, block * raw_share).result()
            raw_wall, raw_cpu = raw_wall + wall, raw_cpu + cpu
            before, client_before = cpu_seconds(pid) if pid else {}, time.process_time()
            block_latencies, block_errors, wall, block_samples = asyncio.run(
                load(base, images, share, args.concurrency, pid))
            for member, seconds in (cpu_seconds(pid) if pid else {}).items():
                server_cpu[member] = server_cpu.get(member, 0.0) + seconds - before.get(member, 0.0)
            client_cpu += time.process_time() - client_before
            api_wall += wall
            latencies += block_latencies
            errors += block_errors
            samples += block_samples
        if pid:
            rss_after = rss_mb(pid)
    finally:
        if server:
            server.terminate()
            server.wait(timeout=30)
        baseline.shutdown()

    api, raw = args.requests / api_wall, baseline_count / raw_wall
    p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
    ratio = api / raw
    growth = rss_after - rss_before
    memory_flat = growth <= max(25.0, 0.10 * rss_before)
    # Per process: how the work spread over uvicorn's workers (the supervisor itself uses next to nothing).
    spread = " / ".join(f"{seconds:.1f}" for _, seconds in sorted(server_cpu.items()) if seconds >= 0.05)
    where = f"{args.url} (already running)" if args.url else f"`serve --workers {args.workers}`, started here"
    rows = [
        ("server", where),
        ("requests / concurrency", f"{args.requests} / {args.concurrency}"),
        ("images", f"{args.images} synthetic PNGs, {args.size}x{args.size} px"),
        ("model", f"run {run}, backend {backend}"),
        ("errors", f"{len(errors)}"),
        ("latency p50 / p95 / p99", f"{p50:.1f} / {p95:.1f} / {p99:.1f} ms"),
        ("API throughput", f"{api:.1f} images/s"),
        ("Predictor throughput (same images, backend)", f"{raw:.1f} images/s ({baseline_count} images)"),
        ("API / Predictor", f"{ratio:.0%} (bar {BAR:.0%})"),
        ("CPU per image: server / Predictor / load client",
         (f"{1000 * sum(server_cpu.values()) / args.requests:.0f}" if pid else "not measured")
         + f" / {1000 * raw_cpu / baseline_count:.0f} / {1000 * client_cpu / args.requests:.0f} ms"),
        ("server CPU seconds by process (busy ones)", spread if pid else "not measured"),
        ("server VmRSS before / after / max during (all its processes)",
         f"{rss_before:.0f} / {rss_after:.0f} / {max(samples + [rss_after]):.0f} MB ({growth:+.1f} MB)"
         if pid else "not measured"),
        ("machine", f"{platform.machine()}, {os.cpu_count()} CPUs usable {config.cpu_threads()}, "
                    f"load average {os.getloadavg()[0]:.1f}"),
    ]
    print("\n| API load test | |\n| --- | --- |")
    for name, value in rows:
        print(f"| {name} | {value} |")
    failures = []
    if errors:
        failures.append(f"{len(errors)} errors, first: {errors[0]}")
    if args.concurrency >= 2 and ratio < BAR:
        failures.append(f"API delivers {ratio:.0%} of the Predictor's throughput (< {BAR:.0%})")
    if not memory_flat:
        failures.append(f"server memory grew by {growth:.1f} MB")
    print("\n" + ("PASS" if not failures else "FAIL: " + "; ".join(failures)))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
