"""A real browser on a real JupyterLab: open the panel notebook, run it, move a slider, click Merge and Stop, click
Merge again, check what renders.

JupyterLab serves on 127.0.0.1 with a token; headless Chromium (Debian's /usr/bin/chromium, which `make test`
installs) is driven by Python Playwright. Deselect locally with ``-m "not browser"``; `make test` runs it.
The screenshot goes to $NBMERGE_SCREENSHOT (default: build/browser/merge_panel.png).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage"]
SETTINGS = {
    "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"autoStartDefaultKernel": True},
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                        "checkForUpdates": False},
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str):
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            value = condition()
        except OSError:
            value = None
        if value:
            return value
        time.sleep(0.25)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """JupyterLab serving a folder that holds the panel notebook; yields (base URL, token, folder)."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: `make test` installs it (apt-get install chromium)")
    folder = tmp_path_factory.mktemp("lab")
    shutil.copy(ROOT / "example_notebooks" / "02_panels.ipynb", folder / "panels.ipynb")
    settings = folder / ".settings"
    for name, values in SETTINGS.items():
        (settings / name).parent.mkdir(parents=True, exist_ok=True)
        (settings / name).write_text(json.dumps(values))
    token, port = secrets.token_hex(16), free_port()
    env = dict(os.environ, JUPYTERLAB_SETTINGS_DIR=str(settings), JUPYTERLAB_WORKSPACES_DIR=str(folder / ".ws"),
               OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               f"--IdentityProvider.token={token}", "--LabApp.extension_manager=readonly",
               f"--ServerApp.root_dir={folder}", "--allow-root"]
    log = open(folder / "lab.log", "w")
    server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: get_json(f"{url}/api/status?token={token}"), 60, "JupyterLab to start")
        yield url, token, folder
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def run_all_cells(page, attempts: int = 3) -> None:
    """Run > Run All Cells, clicked again when no cell has started ([*] or [1]) within 30 s: on a loaded machine
    JupyterLab sometimes drops the first click while it is still wiring the kernel."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    started = page.locator(".jp-InputPrompt", has_text=re.compile(r"\[(\*|1)\]:")).first
    for attempt in range(attempts):
        page.get_by_role("menuitem", name="Run", exact=True).click()
        page.get_by_role("menuitem", name=re.compile(r"^Run All Cells")).click()
        try:
            started.wait_for(state="visible", timeout=30_000)
            return
        except PlaywrightTimeout:
            if attempt == attempts - 1:
                raise


def test_panel_in_jupyterlab(lab):
    from playwright.sync_api import expect, sync_playwright

    url, token, folder = lab
    screenshot = Path(os.environ.get("NBMERGE_SCREENSHOT", ROOT / "build" / "browser" / "merge_panel.png"))
    screenshot.parent.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1600})
            page.goto(f"{url}/lab/tree/panels.ipynb?token={token}")
            # JupyterLab says "idle" before the kernel is connected, and a Run All clicked then is dropped
            wait_for(lambda: any(k["connections"] >= 1 and k["execution_state"] == "idle"
                                 for k in get_json(f"{url}/api/kernels?token={token}")), 90, "a connected kernel")
            page.locator(".jp-NotebookPanel").first.wait_for()
            run_all_cells(page)
            expect(page.locator(".jp-InputPrompt", has_text="[1]:").first).to_be_visible(timeout=180_000)

            panel = page.locator(".widget-vbox", has=page.locator(".widget-button", has_text="Merge")).last
            status = panel.locator(".nbmerge-status")
            expect(status).to_contain_text("ties(density=0.4,", timeout=180_000)  # the notebook's own merge
            expect(panel.locator(".widget-output img")).to_have_count(1, timeout=120_000)
            density = panel.locator(".widget-slider", has_text="density")
            expect(density.locator(".widget-readout")).to_have_text("0.40")
            handle = density.locator(".noUi-handle")
            handle.focus()
            for _ in range(5):  # one slider step (a hundredth of the declared range) per key press
                handle.press("ArrowRight")
            expect(density.locator(".widget-readout")).to_have_text("0.45")
            merge_button = panel.locator(".widget-button", has_text="Merge")
            stop_button = panel.locator(".widget-button", has_text="Stop")
            expect(stop_button).to_be_disabled()
            # Stop while the merge runs: the kernel takes the click at once (the merge runs in a background thread)
            merge_button.click()
            expect(stop_button).to_be_enabled(timeout=10_000)
            expect(merge_button).to_be_disabled()
            stop_button.click()
            expect(status).to_contain_text("stopped", timeout=30_000)
            expect(status).to_contain_text("nothing was written")
            expect(merge_button).to_be_enabled()
            expect(stop_button).to_be_disabled()
            merge_button.click()
            # the merge summary, then the evaluation table of the new merge and the bar chart of both merges
            expect(status).to_contain_text("ties(density=0.45, sign=\"sum\", merge_func=\"mean\"", timeout=180_000)
            expect(status).to_contain_text("of 5 model(s) onto ")
            caption = panel.locator(".widget-output caption")
            expect(caption).to_contain_text("ties(density=0.45)", timeout=180_000)
            expect(panel.locator(".widget-output img")).to_have_count(1)
            rows = panel.locator(".widget-output tbody tr")
            expect(rows).to_have_count(6)  # five tasks and the average
            cells = [rows.nth(i).locator("td, th").all_inner_texts() for i in range(6)]
            tasks = {row[0]: (int(row[1]), float(row[2]), float(row[3])) for row in cells[:5]}
            assert set(tasks) == {"sentiment", "subjectivity", "debate_party", "chat_topic", "chat_language"}
            examples = sum(n for n, _, _ in tasks.values())
            average = sum(accuracy for _, accuracy, _ in tasks.values()) / 5
            assert cells[5][0] == "average" and int(cells[5][1]) == examples
            assert abs(float(cells[5][2]) - average) <= 0.051  # the rendered average is the mean of the rendered rows
            assert all(0 <= accuracy <= 100 and 0 < normalized <= 200 for _, accuracy, normalized in tasks.values())
            image = panel.locator(".widget-output img")
            page.wait_for_function("node => node.complete && node.naturalWidth > 300", arg=image.element_handle(),
                                   timeout=10_000)  # a real, decoded chart
            progress_text = panel.locator(".widget-html-content", has_text=" / ").first.inner_text()
            # after the merge's bytes the bar counts the pool's tasks as they are evaluated: all five done
            assert progress_text.strip() == "task 5 / 5", progress_text
            bar = panel.locator(".widget-hprogress .progress-bar")
            assert bar.evaluate("node => node.style.width") == "100%"
            assert "progress-bar-success" in bar.get_attribute("class")
            panel.scroll_into_view_if_needed()
            panel.screenshot(path=str(screenshot))
        finally:
            browser.close()
