"""End to end: the quickstart notebook's live dashboard in JupyterLab, driven in headless Chromium.

Starts a JupyterLab server on loopback in a temporary folder, opens notebooks/01_quickstart.ipynb, runs
it, presses Generate and watches the token strip grow over time, presses Stop and checks that it stops
growing. It runs on the bundled demo model, as a person opening the quickstart would. A screenshot of the
dashboard and the seconds from Run All to a filled dashboard are saved as test artifacts
(DSV2VIZ_ARTIFACTS, default ./test-artifacts; BENCHMARKS.md quotes them). Needs Debian's chromium and
playwright, which .ci/run installs.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ASKED = 3000  # far more tokens than the test waits for: only Stop can end this generation early


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def lab(tmp_path):
    """A JupyterLab server on loopback whose root holds the quickstart; DSV2VIZ_MODEL is unset: the demo model."""
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(REPO / "notebooks" / "01_quickstart.ipynb", root)
    port = free_port()
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')  # no news pop-up
    env = {k: v for k, v in os.environ.items() if k != "DSV2VIZ_MODEL"}
    env |= {"PYTHONPATH": str(REPO), "JUPYTERLAB_SETTINGS_DIR": str(tmp_path / "lab-settings")}
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jupyterlab",
            "--no-browser",
            "--allow-root",
            f"--port={port}",
            "--ServerApp.token=",
            "--ServerApp.password=",
            "--ServerApp.ip=127.0.0.1",
            "--LabApp.news_url=None",
            f"--ServerApp.root_dir={root}",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(f"{url}/api/status", timeout=1)
                break
            except OSError:
                time.sleep(0.5)
        else:
            pytest.fail("JupyterLab did not start within a minute")
        yield url
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_quickstart_dashboard_streams_and_stops(lab):
    from playwright.sync_api import sync_playwright

    artifacts = Path(os.environ.get("DSV2VIZ_ARTIFACTS", REPO / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 1600})
        page.goto(f"{lab}/lab/tree/01_quickstart.ipynb")
        page.wait_for_selector(".jp-Notebook", timeout=90_000)
        page.wait_for_function(
            "document.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status') === 'idle'",
            timeout=90_000,
        )
        page.locator(".jp-CodeCell .jp-InputArea-editor").first.click()
        page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
        page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
        run_all = time.time()

        generate = page.locator('.jupyter-button[title="Generate"]')
        try:
            generate.wait_for(timeout=120_000)
        except Exception:
            page.screenshot(path=str(artifacts / "failure.png"))  # what the page showed instead
            raise
        tokens = page.locator(".tok")
        # the notebook's own run fills the strip: the prompt and 24 new tokens
        page.wait_for_function("document.querySelectorAll('.tok').length >= 24", timeout=120_000)
        (artifacts / "quickstart_timing.json").write_text(
            json.dumps({"run_all_to_filled_dashboard_s": round(time.time() - run_all, 1)})
        )
        page.wait_for_function(
            "document.querySelector('.jp-Notebook-ExecutionIndicator')?.getAttribute('data-status') === 'idle'",
            timeout=120_000,
        )
        new_tokens = page.locator(".widget-inline-hbox", has=page.locator("label", has_text="new tokens")).locator(
            "input"
        )
        new_tokens.fill(str(ASKED))
        new_tokens.press("Enter")
        page.locator(".widget-checkbox", has_text="stop at EOS").locator("input").uncheck()  # only Stop may end it
        before = tokens.count()  # the notebook's run: the new generation replaces it at its first flush
        generate.click()
        page.wait_for_function(f"document.querySelectorAll('.tok').length !== {before}", timeout=60_000)

        seen: list[int] = []
        deadline = time.time() + 60
        while time.time() < deadline and len(set(seen)) < 4:
            seen.append(tokens.count())
            page.wait_for_timeout(300)
        assert len(set(seen)) >= 4, f"the strip did not grow while generating: {seen}"
        assert seen == sorted(seen)
        page.locator(".widget-vbox").first.scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "dashboard.png"), full_page=False)

        page.locator('.jupyter-button[title="Stop"]').click()
        page.wait_for_timeout(2000)
        after_stop = tokens.count()
        page.wait_for_timeout(2000)
        assert tokens.count() == after_stop, "the strip kept growing after Stop"
        assert after_stop < ASKED
        browser.close()
