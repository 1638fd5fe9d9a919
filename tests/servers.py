"""Helpers for tests that start real server processes (uvicorn, streamlit)."""

import subprocess
import time
from typing import IO

import httpx


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a server the tests started: SIGTERM, then SIGKILL if it has not exited within `timeout` s."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_until_up(server: subprocess.Popen, base: str, log: IO[str], timeout: float = 90) -> None:
    """Wait until a server the tests started answers GET /health with 200; fail with its log if it exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert server.poll() is None, log.seek(0) or log.read()
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.3)
