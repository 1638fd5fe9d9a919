"""End to end: a real `streamlit run Home.py` driven by Debian's Chromium through Playwright.

Every page is opened, used once, checked for Streamlit exception boxes and photographed
(into docs/screenshots/ with SAVE_SCREENSHOTS=1, else into a temporary folder). Page settle times
and the threshold round trip on Inspect are measured and written to app_timings.json next to them
(docs/_artifacts/ when saving). SCREENSHOT_RUN=/path/to/a/run/folder (two or more saved epochs) drives
Inspect and Review with a copy of that run instead of the tiny fixture run, for screenshots worth looking at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import stop_process

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
# Anything still loading or running: spinners, the running-man icon, stale (greyed) elements, lazy skeletons.
BUSY = ('[data-testid="stSpinner"], [data-testid="stStatusWidgetRunningIcon"], [data-stale="true"], '
        '[data-testid="stSkeleton"]')
TIMINGS: dict[str, float] = {}


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def shown_run(trained_run: str) -> str:
    """The run Inspect and Review are driven with: the fixture run, or a copy of SCREENSHOT_RUN."""
    from engine import config, registry_sync

    source = os.environ.get("SCREENSHOT_RUN")
    if not source:
        return trained_run
    source_dir = Path(source)
    target = config.RUNS_DIR / source_dir.name
    if not target.exists():
        shutil.copytree(source_dir, target, ignore=shutil.ignore_patterns("resume.pth", "*.log", "export"))
    registry_sync.rebuild()
    return source_dir.name


@pytest.fixture(scope="module")
def server(shown_run: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A streamlit server on a free port using this test session's runs/ and data/ (from the environment)."""
    if not CHROMIUM.exists():
        pytest.skip("Debian's chromium is not installed (/usr/bin/chromium); apt-get install -y chromium")
    port = free_port()
    log_path = tmp_path_factory.mktemp("streamlit") / "server.log"
    command = [sys.executable, "-m", "streamlit", "run", "Home.py", "--server.port", str(port),
               "--server.address", "127.0.0.1", "--server.headless", "true", "--browser.gatherUsageStats", "false"]
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, env=os.environ.copy(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as response:
                    if response.read() == b"ok":
                        break
            except OSError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"streamlit did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        stop_process(process, timeout=15)


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Where screenshots go; the timings are written next to them when the module's tests are done."""
    save = os.environ.get("SAVE_SCREENSHOTS") == "1"
    folder = ROOT / "docs" / "screenshots" if save else tmp_path_factory.mktemp("screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    yield folder
    timings_dir = ROOT / "docs" / "_artifacts" if save else folder
    timings_dir.mkdir(parents=True, exist_ok=True)
    (timings_dir / "app_timings.json").write_text(json.dumps(TIMINGS, indent=2) + "\n")
    print("\napp timings (s):", json.dumps(TIMINGS))


@pytest.fixture(scope="module")
def browser(server: str) -> Iterator[object]:
    """One headless Chromium for the module (Debian's binary; Playwright downloads nothing)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: object, server: str) -> Iterator[object]:
    """A fresh tab, tall enough that each page fits one screenshot."""
    context = browser.new_context(viewport={"width": 1400, "height": 2000})
    tab = context.new_page()
    tab.set_default_timeout(90_000)
    yield tab
    context.close()


def settle(page: object, initial_wait_ms: int = 210) -> None:
    """Wait until the script run is over and every element has rendered (Streamlit's own e2e recipe).

    initial_wait_ms gives a rerun triggered just before time to start; pass 0 after a navigation or
    after waiting for content that only the new run can produce.
    """
    page.wait_for_timeout(initial_wait_ms)
    page.wait_for_selector('[data-testid="stApp"][data-test-connection-state="CONNECTED"]', state="attached")
    page.wait_for_selector('[data-testid="stApp"][data-test-script-state="notRunning"]', state="attached")
    page.wait_for_function(f"!document.querySelector({BUSY!r}) && Array.from(document.images).every(i => i.complete)")


def open_settled(page: object, server: str, path: str, nav_label: str, title: str) -> None:
    """Open a page cold, then time two warm visits: a full reload, and the sidebar link from Home."""
    url = f"{server}/{path}"
    page.goto(url)
    settle(page, 0)
    start = time.perf_counter()
    page.goto(url)
    settle(page, 0)
    TIMINGS[f"{nav_label}: reload to settled"] = round(time.perf_counter() - start, 2)
    if path:
        page.goto(server)
        settle(page, 0)
        start = time.perf_counter()
        page.get_by_test_id("stSidebarNav").get_by_text(nav_label, exact=True).click()
        page.wait_for_selector(f"h1:has-text({title!r})")
        settle(page, 0)
        TIMINGS[f"{nav_label}: sidebar link to settled"] = round(time.perf_counter() - start, 2)


def check_and_shoot(page: object, shots: Path, name: str) -> None:
    """Fail on any Streamlit exception box, then save a screenshot of the page."""
    exceptions = page.locator('[data-testid="stException"]')
    assert exceptions.count() == 0, exceptions.first.inner_text()
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def pick(page: object, label: str, option: str) -> None:
    """Choose `option` in the selectbox labelled `label`."""
    page.locator('[data-testid="stSelectbox"]').filter(has_text=label).click()
    page.get_by_role("option", name=option).first.click()


def test_home(page: object, server: str, shots: Path) -> None:
    open_settled(page, server, "", "Home", "Metal-surface")
    assert page.get_by_text("Next step", exact=True).is_visible()  # the heading, not "next steps" in a notice
    check_and_shoot(page, shots, "Home")
    page.locator('[data-testid="stPageLink"]').filter(has_text="Inspect").click()
    page.wait_for_selector("h1:has-text('Inspect')")
    settle(page)
    check_and_shoot(page, shots, "Home-to-Inspect")


def test_generate(page: object, server: str, shots: Path) -> None:
    open_settled(page, server, "Generate_Data", "Generate data", "Generate data")
    assert page.locator('[data-testid="stImage"]').count() >= 6  # the preview grid
    name = page.get_by_label("Dataset name", exact=True)
    name.fill("browser-set")
    name.press("Enter")
    count = page.get_by_label("Images", exact=True)
    count.fill("8")
    count.press("Enter")
    settle(page)
    page.get_by_role("button", name="Generate", exact=True).click()
    page.wait_for_selector('[data-testid="stAlertContentSuccess"]:has-text("browser-set")')
    settle(page)
    check_and_shoot(page, shots, "Generate_Data")


def test_paint_onto_uploaded_good_images(page: object, server: str, shots: Path, tmp_path: Path) -> None:
    from engine import synth
    from engine.imageio import encode_png

    parts = []
    for seed in range(3):
        image, _, _ = synth.render_sample(seed, synth.SynthParams(size=96), defect_free=True)
        parts.append(tmp_path / f"good-part-{seed}.png")
        parts[-1].write_bytes(encode_png(image))
    open_settled(page, server, "Generate_Data", "Generate data", "Generate data")
    page.locator('[data-testid="stFileUploader"] input[type="file"]').set_input_files([str(p) for p in parts])
    page.wait_for_selector("text=3 image(s) kept")
    settle(page)
    page.get_by_role("button", name="Write the painted dataset").click()
    page.wait_for_selector('[data-testid="stAlertContentSuccess"]:has-text("painted")')
    settle(page)
    check_and_shoot(page, shots, "Generate_Data-painted")


def test_train(page: object, server: str, shots: Path, shown_run: str) -> None:
    open_settled(page, server, "Train", "Train", "Train")
    pick(page, "Run", shown_run)
    settle(page)
    page.get_by_text("Advanced").click()
    page.get_by_text("Crop (px)").wait_for()
    settle(page)
    assert page.get_by_text("Validation Dice / IoU").count() >= 1  # curves of the watched run
    check_and_shoot(page, shots, "Train")


def test_inspect_compare_epochs_and_threshold(page: object, server: str, shots: Path, shown_run: str) -> None:
    from engine import runs

    last = runs.epochs_saved(runs.run_dir(shown_run))[-1]
    open_settled(page, server, "Inspect", "Inspect", "Inspect")
    pick(page, "Run", shown_run)
    settle(page)
    epochs = page.locator('[data-testid="stSlider"]').filter(has_text="Epochs").get_by_role("slider")
    epochs.nth(0).press("Home")  # (1, x)
    settle(page)
    epochs.nth(1).press("End")  # (1, last): compare the first and the last saved epoch
    page.get_by_text(f"Difference: epoch 1 vs epoch {last}").wait_for()
    settle(page)
    check_and_shoot(page, shots, "Inspect")
    slider = page.locator('[data-testid="stSlider"]').filter(has_text="Threshold")
    # Browser clock: when the rerun's "finished" state arrives, and when everything (images too) is drawn.
    page.evaluate("""() => { const app = document.querySelector('[data-testid="stApp"]');
        new MutationObserver(() => { if (app.getAttribute('data-test-script-state') === 'notRunning')
            window.__finished = performance.now(); }).observe(app, {attributes: true}); }""")
    finished, settled = [], []
    for _ in range(5):
        value = float(slider.get_by_test_id("stSliderThumbValue").inner_text())
        start = page.evaluate("() => { window.__finished = null; return performance.now(); }")
        slider.get_by_role("slider").press("ArrowRight")
        page.get_by_text(f"threshold {value + 0.01:.2f}").first.wait_for()
        settle(page, 0)
        end, done = page.evaluate("() => [performance.now(), window.__finished]")
        finished.append(((done or end) - start) / 1000)  # a very quick rerun may never show "running"
        settled.append((end - start) / 1000)
    TIMINGS["Inspect: threshold keypress to rerun finished (median of 5)"] = round(sorted(finished)[2], 3)
    TIMINGS["Inspect: threshold keypress to all drawn (median of 5)"] = round(sorted(settled)[2], 3)
    check_and_shoot(page, shots, "Inspect-threshold")


def test_review(page: object, server: str, shots: Path, shown_run: str) -> None:
    open_settled(page, server, "Review", "Review", "Review a folder")
    pick(page, "Run", shown_run)
    settle(page)
    grid = page.locator('.st-key-review_table [data-testid="stDataFrame"]')  # the per-image table, not by kind
    box = grid.bounding_box()
    page.mouse.click(box["x"] + 16, box["y"] + 35 + 17)  # the selection cell of the first (worst) row
    page.get_by_role("heading", name=re.compile(r"^Image \d+")).wait_for()
    settle(page)
    check_and_shoot(page, shots, "Review")


def test_runs(page: object, server: str, shots: Path) -> None:
    open_settled(page, server, "Runs", "Runs", "Runs")
    pick(page, "Metric", "val_iou")
    settle(page)
    check_and_shoot(page, shots, "Runs")
