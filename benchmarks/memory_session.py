"""A full session in a real browser while sampling the app's resident memory (issue: Streamlit Community Cloud).

Starts `streamlit run Home.py` on fresh data/ and runs/ folders, drives Debian's Chromium through every
page (generate, train for a minute, inspect two epochs on a 2048x2048 upload, review, export, label a 1,250x500
image, runs), and samples the resident memory (RSS) of the app process alone and of the app plus its children (the
training job) every 0.2 s. Bars: the app alone <= 1.0 GB, the app plus its training job <= 2.5 GB.

    .venv/bin/python benchmarks/memory_session.py [--train-minutes 1] [--out docs/_artifacts/memory_session.json]

Exit status 1 when a bar is missed. Needs /usr/bin/chromium (./test.sh installs it) and requirements-dev.txt.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
APP_BAR_GB, TOTAL_BAR_GB = 1.0, 2.5
BUSY = ('[data-testid="stSpinner"], [data-testid="stStatusWidgetRunningIcon"], [data-stale="true"], '
        '[data-testid="stSkeleton"]')


class MemorySampler(threading.Thread):
    """Peak RSS of a process alone and with all its descendants, overall and per named stage."""

    def __init__(self, pid: int, every_s: float = 0.2) -> None:
        super().__init__(daemon=True)
        self.process, self.every_s = psutil.Process(pid), every_s
        self.stage, self.peaks, self.done = "start", {}, threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            try:
                app = self.process.memory_info().rss
                children = sum(_rss(child) for child in self.process.children(recursive=True))
            except psutil.NoSuchProcess:
                return
            peak = self.peaks.setdefault(self.stage, {"app": 0, "app_and_children": 0})
            peak["app"] = max(peak["app"], app)
            peak["app_and_children"] = max(peak["app_and_children"], app + children)
            time.sleep(self.every_s)


def _rss(process: psutil.Process) -> int:
    try:
        return process.memory_info().rss
    except psutil.NoSuchProcess:
        return 0


def settle(page, wait_ms: int = 250) -> None:
    """Wait until Streamlit's script run is over and everything has rendered."""
    page.wait_for_timeout(wait_ms)
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', state="attached")
    page.wait_for_function(f"!document.querySelector({BUSY!r})")


def pick(page, label: str, option: str) -> None:
    """Choose `option` in the selectbox labelled `label`."""
    page.locator('[data-testid="stSelectbox"]').filter(has_text=label).first.click()
    page.get_by_role("option", name=option).first.click()
    settle(page)


def visit(page, url: str, title: str) -> None:
    """Open a page and wait for its title and a finished script run."""
    page.goto(url)
    page.wait_for_selector(f"h1:has-text({title!r})")
    settle(page)


def session(page, url: str, sampler: MemorySampler, upload: Path, train_minutes: float) -> tuple[str, bool]:
    """Every page once, as a user would; returns the trained run id and whether two epochs were compared."""
    from engine import registry

    sampler.stage = "home"
    visit(page, url, "Metal-surface")
    sampler.stage = "generate"
    visit(page, f"{url}/Generate_Data", "Generate data")
    page.get_by_label("Dataset name", exact=True).fill("memory-set")
    page.get_by_label("Dataset name", exact=True).press("Enter")
    page.get_by_label("Images", exact=True).fill("300")
    page.get_by_label("Images", exact=True).press("Enter")
    settle(page)
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_selector('[data-testid="stAlertContentSuccess"]:has-text("memory-set")', timeout=300_000)

    sampler.stage = "train"
    visit(page, f"{url}/Train", "Train")
    pick(page, "Dataset", "memory-set")
    page.locator('[data-testid="stRadio"]').filter(has_text="Stop after").get_by_text("minutes", exact=True).click()
    settle(page)
    page.get_by_label("Minutes", exact=True).fill(str(train_minutes))
    page.get_by_label("Minutes", exact=True).press("Enter")
    settle(page)
    page.get_by_role("button", name="Start training").click()
    page.wait_for_selector('[data-testid="stAlertContentSuccess"]:has-text("Started run")')
    run = next(r for r in registry.list_runs() if r.name == "memory-set")
    deadline = time.monotonic() + train_minutes * 60 + 600
    while registry.get_run(run.id).status in registry.ACTIVE_STATUSES:
        if time.monotonic() > deadline:
            raise SystemExit(f"training {run.id} did not finish in time")
        time.sleep(2)

    sampler.stage = "inspect 2048x2048, two epochs"
    visit(page, f"{url}/Inspect", "Inspect")
    pick(page, "Run", run.id)
    page.locator('[data-testid="stRadio"]').filter(has_text="Image").get_by_text("Upload", exact=True).click()
    settle(page)
    page.locator('[data-testid="stFileUploaderDropzoneInput"]').set_input_files(str(upload))
    page.wait_for_selector("text=Verdict", timeout=600_000)
    settle(page)
    epochs = page.locator('[data-testid="stSlider"]').filter(has_text="Epochs").get_by_role("slider")
    compared = epochs.count() == 2  # a run that saved one epoch has nothing to compare
    if compared:
        epochs.nth(0).press("Home")
        settle(page)
        epochs.nth(1).press("End")
        page.get_by_text("Difference:").wait_for(timeout=600_000)
        settle(page)

    sampler.stage = "review"
    visit(page, f"{url}/Review", "Review a folder")
    pick(page, "Run", run.id)
    sampler.stage = "export"
    visit(page, f"{url}/Export", "Export")
    pick(page, "Run", run.id)
    page.get_by_role("button", name="Export and benchmark").click()
    page.wait_for_selector('[data-testid="stAlertContentSuccess"]:has-text("ONNX fp32 written")', timeout=600_000)
    settle(page)
    label(page, url, sampler, run.id, upload)
    sampler.stage = "runs"
    visit(page, f"{url}/Runs", "Runs")
    return run.id, compared


def label(page, url: str, sampler: MemorySampler, run_id: str, upload: Path) -> None:
    """The Label page on a 1,250x500 image (cut from the upload): rank, paint a stroke, save it."""
    import cv2

    from engine import config

    tall = config.DATA_DIR / "label-tall" / "images" / "tall.png"
    tall.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(tall), cv2.imread(str(upload), cv2.IMREAD_UNCHANGED)[:1250, :500])
    sampler.stage = "label"
    visit(page, f"{url}/Label", "Label what the run is unsure of")
    pick(page, "Run", run_id)
    pick(page, "Images to label", "label-tall")
    page.get_by_role("button", name="Rank images").click()
    page.get_by_text("Why this image").wait_for(timeout=600_000)
    settle(page)
    box = page.locator(".upper-canvas").first.bounding_box()
    page.mouse.move(box["x"] + 50, box["y"] + 50)
    page.mouse.down()
    page.mouse.move(box["x"] + 250, box["y"] + 80, steps=10)
    page.mouse.up()
    settle(page, 500)
    page.get_by_role("button", name="Save and next").click()
    page.wait_for_selector('[data-testid="stAlertContentSuccess"]:has-text("saved as drawn")')
    settle(page)


def make_upload(folder: Path) -> Path:
    """A 2048x2048 generated metal surface with defects, as a PNG."""
    from engine import synth, synthset

    synthset.generate_dataset(folder / "big", 1, seed=11, params=synth.SynthParams(size=2048, defect_free=0.0), workers=1)
    return next((folder / "big" / "images").glob("*.png"))


def main() -> int:
    """Run the session, print and save the peaks, and compare them with the bars."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-minutes", type=float, default=1.0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "_artifacts" / "memory_session.json")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="memory-session-"))
    os.environ.update(DEFECTS_DATA_DIR=str(home / "data"), DEFECTS_RUNS_DIR=str(home / "runs"))
    sys.path.insert(0, str(ROOT))
    from playwright.sync_api import sync_playwright

    upload = make_upload(home)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = (home / "streamlit.log").open("wb")
    app = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "Home.py", "--server.port", str(port),
                            "--server.headless", "true", "--browser.gatherUsageStats", "false"],
                           cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    sampler = MemorySampler(app.pid)
    started = time.monotonic()
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2):
                    break
            except OSError:
                time.sleep(0.2)
        sampler.start()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path="/usr/bin/chromium",
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_context(viewport={"width": 1400, "height": 1800}).new_page()
            page.set_default_timeout(180_000)
            run_id, compared = session(page, url, sampler, upload, args.train_minutes)
            browser.close()
    finally:
        sampler.done.set()
        app.terminate()
        app.wait(30)
    gb = 1024**3
    peak_app = max(p["app"] for p in sampler.peaks.values()) / gb
    peak_total = max(p["app_and_children"] for p in sampler.peaks.values()) / gb
    result = {
        "command": "python benchmarks/memory_session.py " + " ".join(sys.argv[1:]),
        "machine": f"{os.cpu_count()} CPU threads, {psutil.virtual_memory().total / gb:.0f} GiB",
        "run": run_id, "two_epochs_compared": compared, "train_minutes": args.train_minutes, "seconds": round(time.monotonic() - started),
        "peak_app_gb": round(peak_app, 3), "peak_app_and_children_gb": round(peak_total, 3),
        "bars_gb": {"app": APP_BAR_GB, "app_and_children": TOTAL_BAR_GB},
        "per_stage_gb": {stage: {k: round(v / gb, 3) for k, v in peak.items()} for stage, peak in sampler.peaks.items()},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    missed = peak_app > APP_BAR_GB or peak_total > TOTAL_BAR_GB
    print("bars missed" if missed else "bars met", file=sys.stderr)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
