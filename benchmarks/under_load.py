"""Issue #39's bars on a loaded machine: CPU burners beside a Streamlit server driven by Chromium.

Three trainings started from the Train page, each watched to its end, are never shown as failed (the page is read
every half second: no "Run failed", no "No sign of life", no progress text "failed:"); a fourth is cancelled from
the page and must read "cancelled" within 5 s; Export shows a bar within 2 s of the click and ends on what
export/report.json says. Its own runs, data and registry live in a temporary folder. Prints one JSON object.

    .venv/bin/python benchmarks/under_load.py                  # two burners, 0.5-minute trainings
    .venv/bin/python benchmarks/under_load.py --burners 0      # the same, unloaded
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
FAILED_MARKS = ("Run failed", "No sign of life", "failed: epoch")


def start_server(env: dict, port: int, log: Path) -> subprocess.Popen:
    """The app on `port`, its health answered."""
    command = [sys.executable, "-m", "streamlit", "run", "Home.py", "--server.port", str(port), "--server.address",
               "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=2) as answer:
                if answer.read() == b"ok":
                    return process
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"streamlit did not start: {log.read_text()[-2000:]}")


def settle(page: object) -> None:
    """Wait until the script run is over (Streamlit's own e2e recipe)."""
    page.wait_for_timeout(250)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', state="attached")


def watch_to_end(page: object, timeout_s: float) -> dict:
    """Read the Train page every half second until the watched run settles; what it showed on the way."""
    start, seen, failed_shown = time.monotonic(), [], []
    while time.monotonic() - start < timeout_s:
        text = page.inner_text("body")
        bar = page.locator('[data-testid="stProgress"]')
        label = bar.first.inner_text() if bar.count() else ""
        if label and (not seen or seen[-1] != label):
            seen.append(label)
        failed_shown += [mark for mark in FAILED_MARKS if mark in text]
        if label.startswith(("completed", "cancelled")) and "Resume with more epochs" in text:
            break
        page.wait_for_timeout(500)
    return {"seconds": round(time.monotonic() - start, 1), "states": seen, "failed_shown": sorted(set(failed_shown))}


def train_three_and_cancel(page: object, url: str, minutes: float) -> dict:
    """Three trainings from the Train page watched to the end, then a fourth cancelled from the page."""
    result = {"trainings": []}
    page.goto(f"{url}/Train?minutes={minutes:g}")
    settle(page)
    for _ in range(3):
        page.get_by_role("button", name="Start training").click()
        page.get_by_text("Started run").wait_for(timeout=120_000)
        result["trainings"].append(watch_to_end(page, 1200))
    page.get_by_role("button", name="Start training").click()
    page.get_by_text("Started run").wait_for(timeout=120_000)
    page.get_by_role("button", name="Cancel run").wait_for(timeout=300_000)
    page.wait_for_function("Array.from(document.querySelectorAll('[data-testid=\"stProgress\"]'))"
                           ".some(e => e.innerText.startsWith('running'))", timeout=300_000)
    clicked = time.monotonic()
    page.get_by_role("button", name="Cancel run").click()
    page.wait_for_function("Array.from(document.querySelectorAll('[data-testid=\"stProgress\"]'))"
                           ".some(e => e.innerText.startsWith('cancelled'))", timeout=120_000)
    result["cancel_shown_after_s"] = round(time.monotonic() - clicked, 2)
    return result


def export_from_page(page: object, url: str, runs_dir: Path) -> dict:
    """Export the newest completed run from the Export page: when a bar shows, and whether it ends on report.json."""
    run_id = max(p.parent.name for p in runs_dir.glob("*/run.json")
                 if json.loads(p.read_text()).get("status") == "completed")  # the newest completed run
    page.goto(f"{url}/Export")
    settle(page)
    page.locator('[data-testid="stSelectbox"]').filter(has_text="Run").first.click()
    page.get_by_role("option", name=run_id).first.click()
    settle(page)
    clicked = time.monotonic()
    page.get_by_role("button", name="Export and benchmark").click()
    page.wait_for_selector('[data-testid="stProgress"]', timeout=60_000)
    bar_after = time.monotonic() - clicked
    first = page.locator('[data-testid="stProgress"]').first.inner_text()
    while page.locator('[data-testid="stProgress"]').first.inner_text() == first and time.monotonic() - clicked < 120:
        page.wait_for_timeout(100)
    moved_after = time.monotonic() - clicked
    page.wait_for_function("Array.from(document.querySelectorAll('[data-testid=\"stProgress\"]'))"
                           ".some(e => e.innerText.startsWith('Done'))", timeout=1_200_000)
    final = page.locator('[data-testid="stProgress"]').first.inner_text()
    report = json.loads((runs_dir / run_id / "export" / "report.json").read_text())
    kept = ", ".join(entry["kind"] for entry in report["artifacts"] if entry["accepted"])
    return {"run": run_id, "bar_shown_after_s": round(bar_after, 2), "bar_moved_after_s": round(moved_after, 2),
            "seconds": round(time.monotonic() - clicked, 1),
            "final_text": final, "matches_report": f"exported at {report['created_at']} ({kept})" in final}


def main() -> int:
    """Burners, a fresh app on a generated set, the Train and Export bars; prints the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--burners", type=int, default=2)
    parser.add_argument("--minutes", type=float, default=0.5, help="each training's budget")
    parser.add_argument("--port", type=int, default=8599)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    work = Path(tempfile.mkdtemp(prefix="under-load-"))
    env = {**os.environ, "DEFECTS_RUNS_DIR": str(work / "runs"), "DEFECTS_DATA_DIR": str(work / "data")}
    subprocess.run([sys.executable, "-m", "engine", "generate", "--out", str(work / "data" / "synth-60"), "--count",
                    "60", "--size", "128"], cwd=ROOT, env=env, check=True, capture_output=True)
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(args.burners)]
    server = None
    try:
        time.sleep(5)
        started = time.monotonic()
        server = start_server(env, args.port, work / "server.log")
        result = {"burners": args.burners, "machine": f"{platform.processor() or platform.machine()}, "
                  f"{os.cpu_count()} cpus", "server_start_s": round(time.monotonic() - started, 1)}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_context(viewport={"width": 1400, "height": 2000}).new_page()
            page.set_default_timeout(300_000)
            result.update(train_three_and_cancel(page, f"http://127.0.0.1:{args.port}", args.minutes))
            result["export"] = export_from_page(page, f"http://127.0.0.1:{args.port}", work / "runs")
            browser.close()
        result["load_average"] = os.getloadavg()
    finally:
        for process in [*burners, *([server] if server else [])]:
            process.terminate()
    result["bars"] = {
        "never shown as failed": all(not t["failed_shown"] for t in result["trainings"]),
        "cancel shown within 5 s": result["cancel_shown_after_s"] <= 5.0,
        "export bar within 2 s": result["export"]["bar_shown_after_s"] <= 2.0,
        "export bar moving within 2 s": result["export"]["bar_moved_after_s"] <= 2.0,
        "export ends as report.json says": result["export"]["matches_report"],
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
