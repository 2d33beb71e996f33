"""End to end: the quickstart notebook's live dashboard in JupyterLab, driven in headless Chromium.

Starts a JupyterLab server on loopback in a temporary folder, opens notebooks/01_quickstart.ipynb and
runs it through JupyterLab's own command registry (the app is exposed in the page with
``--expose-app-in-browser``): the command runs once the notebook and its kernel are ready, and again
if nothing started, and the test waits for every cell's execution count rather than for time to pass.
Then it presses Generate, watches the token strip grow, presses Stop and checks that Stop takes effect
at once: few tokens appear after the click, the kernel got the click promptly and generated at most one
more token, and the dashboard returns to ready showing exactly the tokens generated. Last, it clicks a
token of a markup prompt in the strip and checks that the attribution panel shows that token's figure,
with the markup shown as text. It must hold on a
busy machine (two other processes keeping both cores busy). It runs on the bundled demo model, as a
person opening the quickstart would.

A screenshot of the dashboard and the times measured (Run All to a filled dashboard, Stop to the kernel
and to the last token shown) are saved as test artifacts (DSV2VIZ_ARTIFACTS, default ./test-artifacts;
BENCHMARKS.md quotes them). Needs Debian's chromium and playwright, which .ci/run installs.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import launch_chromium

REPO = Path(__file__).resolve().parents[1]
MARKUP = "<img src=x onerror=alert(1)> <b>bold</b>"  # a prompt whose tokens are markup
ASKED = 3000  # far more tokens than the test waits for: only Stop can end this generation early
NOTEBOOK_TOKENS = 24  # the quickstart's own run
MINUTE = 60_000  # ms: the first render of a notebook takes several seconds on 2 busy cores
#: Seconds for the click's way to the kernel and the final update's to the page beyond the browser's own
#: drawing (the websocket, the server, the kernel's threads, on a busy machine).
SLACK_S = 0.5

# JavaScript run in the page; `window.jupyterapp` is JupyterLab's application object.
NOTEBOOK = "window.jupyterapp.shell.currentWidget"
CODE_CELLS = f"{NOTEBOOK}.content.widgets.filter(c => c.model.type === 'code')"
READY = """() => {
    const panel = window.jupyterapp?.shell.currentWidget;
    return !!(panel?.content?.widgets?.length && panel.context?.isReady
              && panel.sessionContext?.session?.kernel?.status === 'idle');
}"""
STARTED = f"() => {CODE_CELLS}.some(c => c.model.executionState === 'running' || c.model.executionCount !== null)"
FINISHED = f"""() => {CODE_CELLS}.every(c => c.model.executionCount !== null && c.model.executionState !== 'running')
    && {NOTEBOOK}.sessionContext.session.kernel.status === 'idle'"""
OUTPUTS = f"() => {CODE_CELLS}.flatMap(c => c.model.outputs.toJSON())"
KERNEL_EXEC = f"""async (code) => {{
    const future = {NOTEBOOK}.sessionContext.session.kernel.requestExecute({{code, store_history: false}});
    let out = '';
    future.onIOPub = (msg) => {{
        if (msg.header.msg_type === 'stream') out += msg.content.text;
        if (msg.header.msg_type === 'error') out += msg.content.ename + ': ' + msg.content.evalue;
    }};
    await future.done;
    return out;
}}"""
# The plotly figures drawn in the page, with data (an update that reaches a figure before its first drawing
# is done leaves it blank: wait for them before generating).
DRAWN_FIGURES = "() => [...document.querySelectorAll('.js-plotly-plot')].filter(gd => gd.data?.length).length"
# Every change of the number of token spans, with its time (ms since the epoch), and the Stop click's time.
WATCH = """() => {
    window.counts = [];
    window.stopClick = null;
    new MutationObserver(() => {
        const n = document.querySelectorAll('.tok').length;
        if (!window.counts.length || window.counts.at(-1)[1] !== n) window.counts.push([Date.now(), n]);
    }).observe(document.body, {childList: true, subtree: true});
    document.addEventListener('click', (e) => {
        if (e.target.closest('button')?.title === 'Stop') window.stopClick = performance.timeOrigin + e.timeStamp;
    }, true);
}"""


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
            "--expose-app-in-browser",  # window.jupyterapp: run cells through the command registry
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


def run_all(page) -> float:
    """Run every cell with JupyterLab's ``notebook:run-all-cells`` once the notebook and kernel are ready;
    run it again when no cell started (the command was not taken). Returns when it was first issued."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    page.wait_for_function(READY, timeout=2 * MINUTE)
    first = time.time()
    for _ in range(3):
        page.evaluate("() => { window.jupyterapp.commands.execute('notebook:run-all-cells'); }")
        try:
            page.wait_for_function(STARTED, timeout=MINUTE // 2)
            return first
        except PlaywrightTimeout:
            page.wait_for_function(READY, timeout=MINUTE)
    pytest.fail("JupyterLab took none of three Run All commands")


def kernel(page, code: str) -> str:
    """What `code` prints, run in the notebook's kernel (the test reads the dashboard's own record)."""
    return page.evaluate(KERNEL_EXEC, code)


def kernel_json(page, expression: str):
    out = kernel(page, f"import json; print(json.dumps({expression}))")
    try:
        return json.loads(out)
    except json.JSONDecodeError:
        pytest.fail(f"the kernel answered {out!r} to {expression}")


def check_attribution_on_click(page, artifacts: Path) -> None:
    """A prompt whose text is markup, generated from the kernel; a click on its '<' token fills the
    attribution panel with that token's figure, outlines the token and moves "inspect pos", and the markup
    shows as text (no element injected, no dialog)."""
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    kernel(page, f"dash.max_new_tokens.value = 4; dash.run({MARKUP!r}, wait=True)")
    tokens = kernel_json(page, "len(dash.trace)")
    page.wait_for_function(f"document.querySelectorAll('.tok').length === {tokens}", timeout=MINUTE)
    position = kernel_json(
        page, "next(p for p, t in enumerate(dash.trace.token_texts) if p > 0 and '<' in t)"
    )  # not BOS
    page.locator(f'.tok[data-pos="{position}"]').click()
    titles = "[...document.querySelectorAll('.js-plotly-plot .gtitle')].map(t => t.textContent)"
    page.wait_for_function(f"{titles}.some(t => t.includes('(position {position})'))", timeout=MINUTE)
    kernel(page, "import html; from dsv2viz import analysis, plots")
    figure = f"plots.logit_attribution(analysis.logit_attribution(dash.model, dash.trace, {position}))"
    expected = kernel_json(page, f"html.unescape({figure}.layout.title.text)")  # as the browser shows it
    assert kernel_json(page, "[dash.inspect.value, dash.strip.selected]") == [position, position]
    shown = [t for t in page.evaluate(titles) if f"(position {position})" in t]
    assert shown == [expected] and "<" in expected.split("after “")[1], (shown, expected)
    assert page.evaluate("[...document.querySelectorAll('.tok.selected')].map(t => +t.dataset.pos)") == [position]
    assert page.locator('img[src="x"]').count() == 0 and dialogs == []  # the markup stayed text
    page.locator(".js-plotly-plot", has_text=f"(position {position})").scroll_into_view_if_needed()
    page.screenshot(path=str(artifacts / "attribution.png"), full_page=False)


def test_quickstart_dashboard_streams_and_stops(lab):
    from playwright.sync_api import sync_playwright

    artifacts = Path(os.environ.get("DSV2VIZ_ARTIFACTS", REPO / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    timing: dict[str, float | int] = {}
    with sync_playwright() as p:
        browser = launch_chromium(p)
        page = browser.new_page(viewport={"width": 1500, "height": 1600})
        page.goto(f"{lab}/lab/tree/01_quickstart.ipynb")
        started = run_all(page)
        try:  # the notebook's own run fills the strip: the prompt and its generated tokens
            page.wait_for_function(f"document.querySelectorAll('.tok').length > {NOTEBOOK_TOKENS}", timeout=3 * MINUTE)
        except Exception:
            page.screenshot(path=str(artifacts / "failure.png"))  # what the page showed instead
            raise
        timing["run_all_to_filled_dashboard_s"] = round(time.time() - started, 1)
        page.wait_for_function(FINISHED, timeout=3 * MINUTE)
        outputs = json.dumps(page.evaluate(OUTPUTS))
        assert '"output_type": "error"' not in outputs, outputs
        assert "serialization failed" not in outputs.lower(), outputs  # NaN or infinity sent to the browser

        new_tokens = page.locator(".widget-inline-hbox", has=page.locator("label", has_text="new tokens")).locator(
            "input"
        )
        new_tokens.fill(str(ASKED))
        new_tokens.press("Enter")
        page.locator(".widget-checkbox", has_text="stop at EOS").locator("input").uncheck()  # only Stop may end it
        deadline = time.time() + 60
        while kernel_json(page, "[dash.max_new_tokens.value, dash.stop_at_eos.value]") != [ASKED, False]:
            assert time.time() < deadline, "the kernel never got the new settings"
            page.wait_for_timeout(100)
        page.wait_for_function(f"({DRAWN_FIGURES})() >= 4", timeout=MINUTE)  # utilization, latent, attention, inspect
        page.evaluate(WATCH)
        page.locator('.jupyter-button[title="Generate"]').click()
        page.wait_for_selector('.jupyter-button[title="Stop"]:not([disabled])', timeout=MINUTE)  # the kernel took it
        page.wait_for_function("window.counts.length >= 5", timeout=2 * MINUTE)  # the strip grew 4 times
        page.locator(".widget-vbox").first.scroll_into_view_if_needed()
        page.screenshot(path=str(artifacts / "dashboard.png"), full_page=False)
        drawn_while_streaming = page.evaluate(DRAWN_FIGURES)

        page.locator('.jupyter-button[title="Stop"]').click()
        page.wait_for_function("window.stopClick !== null", timeout=MINUTE)
        page.wait_for_selector('.jupyter-button[title="Generate"]:not([disabled])', timeout=MINUTE)
        page.wait_for_selector('.jupyter-button[title="Stop"][disabled]', timeout=MINUTE)
        run = kernel_json(
            page,
            "dict(at=dash.streamer.stop_requested_at, before=dash.streamer.tokens_at_stop, "
            "generated=len(dash.trace) - dash.trace.prompt_len, tokens=len(dash.trace), "
            "finish=dash.trace.meta['finish_reason'], times=dash.streamer.step_times)",
        )
        assert run["finish"] == "stopped" and run["generated"] < ASKED
        assert re.search(rf"generated: {run['generated']} tokens \(stopped\)", page.inner_text("body")), run
        page.wait_for_function(f"document.querySelectorAll('.tok').length === {run['tokens']}", timeout=MINUTE)
        counts, click = page.evaluate("window.counts"), page.evaluate("window.stopClick") / 1000
        check_attribution_on_click(page, artifacts)
        browser.close()

    assert drawn_while_streaming >= 3, "the live figures went blank"  # utilization, latent, attention
    # the strip grew while generating, update by update ([0]: the notebook's run, until the new one replaced it)
    streamed = [(t / 1000, n) for t, n in counts if t / 1000 < click][1:]
    assert len(streamed) >= 4 and [n for _, n in streamed] == sorted(n for _, n in streamed), streamed
    interval = max(b[0] - a[0] for a, b in itertools.pairwise(streamed))  # the longest wait for an update
    shown_at_click, after = streamed[-1][1], [(t / 1000, n) for t, n in counts if t / 1000 >= click]
    stop_to_kernel, last_change = run["at"] - click, after[-1][0] if after else click
    times, prompt_len = run["times"], run["tokens"] - run["generated"]  # when the kernel had each token
    timing |= {
        "stop_to_kernel_s": round(stop_to_kernel, 3),
        "stop_to_last_token_s": round(last_change - click, 2),
        "tokens_after_stop": run["tokens"] - shown_at_click,
        "tokens_unshown_at_click": sum(t < click for t in times) - (shown_at_click - prompt_len),
        "updates_after_stop": len(after),
        "tokens_per_s": round(len(times) / (times[-1] - times[0]), 1),
        "longest_update_interval_s": round(interval, 2),
    }
    (artifacts / "quickstart_timing.json").write_text(json.dumps(timing))
    # Stop took effect at once: the kernel had the click as soon as the browser had drawn the update in
    # progress (the browser handles the click after it), and generated at most the step in flight after it.
    assert stop_to_kernel < interval + SLACK_S, timing
    assert run["generated"] - run["before"] <= 1, run
    # The page did not lag behind: at most three updates after the click (the one being drawn, one the kernel
    # sent before it had Stop, the final one), the last drawn within two update intervals (before the updates
    # were paced by the browser, the strip grew for 2 to 6 s after Stop, some 15 updates). The tokens it
    # showed after the click were all written less than one update interval before the click, or after it
    # while the click was on its way to the kernel, or are the step in flight: every token the kernel had
    # earlier was already shown.
    assert len(after) <= 3 and last_change - click < 2 * interval + SLACK_S, timing
    assert shown_at_click - prompt_len >= sum(t < click - interval - SLACK_S for t in times), timing
