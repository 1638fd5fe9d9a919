"""`python -m engine serve --workers N`: real worker processes that answer alike, and start and stop cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import psutil
import pytest

from engine import config
from engine.imageio import encode_png
from engine.synth import SynthParams, render_sample
from tests.servers import stop_process, wait_until_up


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _serve_env(runs_dir: Path, **env: str) -> dict[str, str]:
    """The environment of a server on its own empty runs folder (the demo run comes from the repository)."""
    full = {**os.environ, "DEFECTS_RUNS_DIR": str(runs_dir), **env}
    full.pop("DEFECTS_API_KEY", None)
    return full


@contextmanager
def workers_server(runs_dir: Path, workers: int, **env: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """A real `python -m engine serve --workers N` on a free loopback port; yields the process and its base URL.

    The process is uvicorn's supervisor (`engine serve` execs `python -m api`); whatever the test leaves
    running is stopped afterwards, workers included."""
    port = _free_port()
    log = tempfile.TemporaryFile("w+")  # a pipe nobody reads would fill up and block the access log
    server = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--port", str(port), "--workers", str(workers)],
                              cwd=config.ROOT, env=_serve_env(runs_dir, **env), stdout=log, stderr=subprocess.STDOUT,
                              text=True)
    base = f"http://127.0.0.1:{port}"
    children: list[psutil.Process] = []
    try:
        wait_until_up(server, base, log, timeout=120)
        children = psutil.Process(server.pid).children(recursive=True)
        yield server, base
    finally:
        if server.poll() is None:
            stop_process(server)
        for child in children:  # only if the test failed before the supervisor stopped them
            if child.is_running():
                child.kill()
        log.seek(0)
        print(log.read())  # shown by pytest when the test fails
        log.close()


def _client_round(base: str, images: list[bytes]) -> tuple[int, int, list[dict]]:
    """On one keep-alive connection: /health, every image through /predict, /health again.

    A connection is accepted by exactly one worker, so when both /health answers name the same pid, that worker
    also answered the predictions in between."""
    with httpx.Client(base_url=base, timeout=60, limits=httpx.Limits(max_connections=1)) as http:
        before = http.get("/health").json()["pid"]
        answers = []
        for number, data in enumerate(images):
            response = http.post("/predict", files={"file": (f"{number}.png", data, "image/png")})
            assert response.status_code == 200, response.text
            answers.append(response.json())
        after = http.get("/health").json()["pid"]
    return before, after, answers


def _verdict(answer: dict) -> tuple:
    """What must not depend on the worker: model, verdict and regions (scores rounded to 4 places)."""
    regions = [(tuple(r["bbox"]), r["area_px"], round(r["max_score"], 4)) for r in answer["regions"]]
    return (answer["model"]["run"], answer["model"]["backend"], answer["verdict"], tuple(regions),
            round(answer["max_score"], 4))


@pytest.mark.slow
def test_api_workers_start_answer_alike_and_stop_cleanly(tmp_path: Path) -> None:
    """The bar of the replicas issue, in small: 2 workers, concurrent clients, SIGTERM, nothing left behind."""
    params = SynthParams(size=96)
    images = [encode_png(render_sample(seed, params, defect_free=seed == 3)[0]) for seed in range(4)]
    # Pinned to torch: `auto` times the backends in each worker, and two workers could pick different ones.
    with workers_server(tmp_path / "runs", 2, DEFECTS_API_RUN="demo", DEFECTS_API_BACKEND="torch") as (server, base):
        workers = psutil.Process(server.pid).children(recursive=True)
        worker_pids = {p.pid for p in workers if "spawn_main" in " ".join(p.cmdline())}
        assert len(worker_pids) == 2, [p.cmdline() for p in workers]
        health = httpx.get(f"{base}/health", timeout=10).json()
        assert health["status"] == "ok" and health["model"]["run"] == "demo"
        assert health["host"] == socket.gethostname() and health["pid"] in worker_pids

        by_pid: dict[int, list[dict]] = {}
        deadline = time.monotonic() + 120
        with ThreadPoolExecutor(8) as pool:  # concurrency 8, a fresh connection per client
            while len(by_pid) < 2 or sum(map(len, by_pid.values())) < 16 * len(images):
                assert time.monotonic() < deadline, f"answers came only from {sorted(by_pid)}"
                for before, after, answers in pool.map(lambda _: _client_round(base, images), range(8)):
                    if before == after:
                        by_pid.setdefault(before, []).extend(answers)
        assert set(by_pid) == worker_pids
        # No run of the user's own: every answer says that the demo, trained on generated images, answered it.
        warnings = {a["warning"] for answers in by_pid.values() for a in answers}
        assert warnings == {"answered by the demo model, trained on generated images only, not on your parts; train "
                            "one on your own images with `python -m engine train --data DIR`"}
        for number in range(len(images)):  # the same image gets the same answer from every worker
            answers = {_verdict(a) for pid_answers in by_pid.values() for a in pid_answers[number::len(images)]}
            assert len(answers) == 1, answers

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(workers, timeout=10)
        assert not alive, [p.pid for p in alive]


def test_serve_refuses_fewer_than_one_worker() -> None:
    for command in (["engine", "serve"], ["api"]):
        result = subprocess.run([sys.executable, "-m", *command, "--workers", "0", "--port", str(_free_port())],
                                cwd=config.ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 2
        assert "argument --workers: must be at least 1, got 0" in result.stderr, result.stderr


def test_a_bad_setting_stops_serve_with_workers_with_one_line(tmp_path: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "engine", "serve", "--workers", "2", "--port", str(_free_port())],
                            cwd=config.ROOT, env=_serve_env(tmp_path / "runs", DEFECTS_API_SLOTS="0"),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: bad DEFECTS_* API setting"), lines
    assert "DEFECTS_API_SLOTS" in lines[0]
