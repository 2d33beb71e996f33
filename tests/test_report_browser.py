"""The HTML report in a real browser: written by the command line, opened offline in headless Chromium.

Needs Debian's Chromium at /usr/bin/chromium and the playwright package (`.ci/run` installs both). The
page may not reach any network: every request that is not the report file itself is refused and
counted, so a report that fetched plotly.js from a CDN would fail here.
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import launch_chromium

import dsv2viz
from dsv2viz.html_report import report
from dsv2viz.random_checkpoint import write_random_checkpoint
from dsv2viz.traces import Recording

EVIL = "<img src=x onerror=alert(1)>"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = launch_chromium(p)
        yield b
        b.close()


def open_offline(browser, path: Path):
    """Open a file with every other request refused; returns (page, refused urls, dialogs shown)."""
    page = browser.new_page(viewport={"width": 1100, "height": 900})
    refused: list[str] = []
    dialogs: list[str] = []

    def route(r):
        if r.request.url == path.as_uri():
            r.continue_()
        else:
            refused.append(r.request.url)
            r.abort()

    page.route("**/*", route)
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(path.as_uri())
    return page, refused, dialogs


def test_cli_report_renders_every_plot_offline(tmp_path, browser):
    model_dir = write_random_checkpoint(tmp_path / "m")
    html_path = tmp_path / "report.html"
    cmd = [
        sys.executable,
        "-m",
        "dsv2viz",
        "generate",
        "--model",
        str(model_dir),
        "--prompt",
        "def f(x):",
        "--max-new-tokens",
        "8",
        "--attention",
        "full",
        "--attention-layers",
        "1,2",
        "--device",
        "cpu",
        "--trace",
        str(tmp_path / "trace"),
        "--report",
        str(html_path),
        "--quiet",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = html_path.read_text()
    expected = text.count('class="plotly-graph-div"')
    assert expected >= 12
    assert "<h2>Direct logit attribution: what wrote " in text  # generate has the model: its last token explained
    assert re.search(r"<script[^>]*\bsrc=", text) is None  # plotly.js is inline, not fetched

    page, refused, _ = open_offline(browser, html_path)
    page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length === {expected}", timeout=60_000)
    assert page.locator(".js-plotly-plot .main-svg").count() >= expected  # each one drew its SVG
    assert refused == []
    page.screenshot(path=str(tmp_path / "report.png"), full_page=False)

    # the report command rebuilds the same page from the saved trace
    again = tmp_path / "again.html"
    done = subprocess.run(
        [sys.executable, "-m", "dsv2viz", "report", str(tmp_path / "trace"), "-o", str(again)],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    # no model given: no logit lens and no attribution of the last token, each a note saying to pass the model
    assert again.read_text().count('class="plotly-graph-div"') == expected - 2


def test_token_text_never_runs_in_the_report(tmp_path, browser):
    model = dsv2viz.load(write_random_checkpoint(tmp_path / "m", dtype=torch.float32), progress=False)
    trace = model.generate(
        f"hello {EVIL} world", 4, record=Recording(attention="full", queries=True, attention_layers=[1])
    ).run()  # the prompt's text is markup (each byte its own token, so no label holds all of it)
    texts = list(trace.token_texts)
    texts[2] = EVIL
    texts[-1] = EVIL
    trace = dataclasses.replace(trace, token_texts=texts)  # and two labels too
    path = report(trace, tmp_path / "evil.html", model=model)
    html = path.read_text()
    assert EVIL not in html
    assert "&lt;img src=x onerror=alert(1)&gt;" in html

    page, refused, dialogs = open_offline(browser, path)
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length > 5", timeout=60_000)
    page.wait_for_timeout(500)
    assert dialogs == [] and refused == []
    assert page.locator("img").count() == 0  # no element was injected
    assert EVIL in page.locator(".report-text").inner_text()  # shown as text
    # hover labels and tick labels render the literal text as well
    assert page.locator("text", has_text="<img src=x onerror=alert(1)>").count() > 0


def test_a_chinese_and_emoji_prompt_reads_exactly_in_the_browser(tmp_path, browser):
    """The demo tokenizer cuts these characters into byte tokens; the page shows the text, and the labels their bytes."""
    model = dsv2viz.load(progress=False)
    prompt = "深度求索：混合专家 🙂👨\u200d👩\u200d👧 🇨🇳 café e\u0301\n\tend"
    trace = model.generate(prompt, 3, record=Recording(attention="full", attention_layers=[0])).run()
    assert any("⟨" in t for t in trace.token_texts)  # characters really were split across tokens
    path = report(trace, tmp_path / "zh.html")

    page, refused, _ = open_offline(browser, path)
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length > 5", timeout=60_000)
    assert refused == []
    shown = page.evaluate("document.querySelector('.report-text').textContent")
    assert shown == trace.text and shown.startswith(model.tokenizer.bos_token + prompt)
    assert page.evaluate("document.querySelector('.report-text .generated').textContent") == trace.generated_text
    assert "\ufffd" not in shown
    # a split character's first token shows its bytes in the figures' text: the strip's cells and axis ticks
    first = next(t for t in trace.token_texts if t.startswith("⟨"))
    assert page.locator("text", has_text=first).count() > 0
    assert page.locator("text", has_text="深").count() > 0
