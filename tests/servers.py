"""Helpers for tests that start real server processes (uvicorn, streamlit)."""

import subprocess


def stop_process(process: subprocess.Popen, timeout: float = 20) -> None:
    """Stop a server the tests started: SIGTERM, then SIGKILL if it has not exited within `timeout` s."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
