"""GenerationDashboard: widget state after live generation (no browser): the strip, utilization, Stop, escaping,
interventions, notes in place of empty views, strict-JSON messages, and the pacing of live updates."""

from __future__ import annotations

import html
import json
import math
import re
import threading
import time

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

import dsv2viz
from dsv2viz import analysis, plots
from dsv2viz.traces import Recording
from dsv2viz.widgets import GenerationDashboard
from dsv2viz.widgets._figure import Drawn, json_safe, notice_html
from dsv2viz.widgets._live import STRIP_CHUNK, Streamer, Superseding, TokenStrip, span_color, token_span
from dsv2viz.widgets.dashboard import INSPECT_NOTE

PROMPT = [5, 6, 7, 8, 9]
SPAN = re.compile(r'<span class="tok" data-pos="(\d+)"[^>]*style="background:(rgb\([^)]*\))[^>]*>(.*?)</span>')


def spans(dash: GenerationDashboard) -> list[tuple[int, str, str]]:
    """(position, background, escaped text) of every token span in the strip."""
    return [(int(p), color, text) for p, color, text in SPAN.findall(dash.strip.value)]


def no_hooks(model) -> bool:
    return not any(h.active for h in model.hook_points.values())


@pytest.fixture
def dash(tiny_model) -> GenerationDashboard:
    d = GenerationDashboard(tiny_model())
    d.max_new_tokens.value = 12
    return d


def test_strip_and_utilization_follow_the_trace(dash):
    dash.run(PROMPT, wait=True)
    trace = dash.trace
    assert dash.status.value.startswith("generated: 12 tokens")
    strip = spans(dash)
    assert [p for p, _, _ in strip] == list(range(len(PROMPT) + 12)) == list(range(len(trace)))
    generated = [text for _, _, text in strip[len(PROMPT) :]]
    assert generated == [html.escape(t) for t in trace.token_texts[len(PROMPT) :]]  # '<42>' -> '&lt;42&gt;'
    util = analysis.expert_utilization(trace)
    K = trace.config.num_experts_per_tok
    assert dash.counts.sum(dim=1).tolist() == [len(trace) * K] * len(trace.moe_layers)
    assert torch.equal(dash.counts, util.counts)
    assert (dash.utilization.data[0].z == util.counts.numpy()).all()
    assert dash.latent.data[0].z.shape == (trace.config.num_hidden_layers, len(trace))
    assert len(dash.attention.data[0].y) == len(trace) and abs(sum(dash.attention.data[0].y) - 1) < 1e-4
    assert no_hooks(dash.model)


def test_layer_slider_recolours_the_strip(dash):
    dash.run(PROMPT)
    trace = dash.trace
    for layer in trace.moe_layers:
        dash.layer_slider.value = layer
        top1 = trace.routing(layer)[0][:, 0].tolist()
        expected = [span_color(e, p < trace.prompt_len) for p, e in enumerate(top1)]
        assert [color for _, color, _ in spans(dash)] == expected


def test_stop_ends_generation_early(tiny_model):
    dash = GenerationDashboard(tiny_model(max_position_embeddings=4096))
    dash.max_new_tokens.value = 4000
    streamer = dash.run(PROMPT, wait=False)
    deadline = time.monotonic() + 20
    while streamer.flushes == 0 and streamer.running and time.monotonic() < deadline:
        time.sleep(0.01)
    dash.stop()
    streamer.join(20)
    assert not dash.running and streamer.error is None and dash.streamer is streamer
    generated = len(dash.trace) - len(PROMPT)
    assert 0 < generated < 4000 and dash.trace.meta["finish_reason"] == "stopped"
    assert generated - streamer.tokens_at_stop <= 1  # at most the step in flight when Stop came
    assert len(spans(dash)) == len(dash.trace)
    assert no_hooks(dash.model)


class MarkupTokenizer:
    """Tokens whose bytes are markup, to check the strip escapes them."""

    eos_token_id = None

    def token_bytes(self, ids):
        return [(b"<img src=x onerror=alert(1)>" if i % 2 else f"<b>{i}</b>".encode()) for i in ids]


def test_markup_tokens_are_escaped(dash):
    dash.model.tokenizer = MarkupTokenizer()
    dash.run(PROMPT)
    strip = dash.strip.value
    assert "<img" not in strip and "<b>" not in strip
    assert "&lt;img src=x onerror=alert(1)&gt;" in strip
    dash.inspect.value = len(PROMPT)
    assert "&lt;img src=x onerror=alert(1)&gt;" in dash.candidates.value and "<img" not in dash.candidates.value
    dash.wait_attribution(30)  # the selection's attribution: every label and the progress line escaped
    shown = dash.attribution_figure.to_json() + dash.attribution_status.value
    read, target = dash.trace.token_texts[len(PROMPT)], dash.trace.token_texts[len(PROMPT) + 1]
    assert read.startswith("<") and target.startswith("<")  # both markup (MarkupTokenizer)
    assert "<img" not in shown and "<b>" not in shown
    assert f"after “{html.escape(read)}”" in dash.attribution_figure.layout.title.text
    assert f"what wrote {html.escape(target)}" in dash.attribution_status.value


def test_intervention_changes_routing_at_its_layer(dash):
    dash.run(PROMPT)
    layer = dash.trace.moe_layers[0]
    dash.iv_mode.value, dash.iv_layer.value = "ban", layer
    dash.iv_expert.value = int(dash.trace.routing(layer)[0][0, 0])  # the first token's top expert
    dash.regenerate(wait=True)
    cmp = dash.comparison
    row = cmp.layers.index(layer)
    assert cmp.routing_changed[row] > 0
    assert (dash.intervention_trace.routing(layer)[0] != dash.iv_expert.value).all()
    assert list(dash.compare_figure.data[0].y) == cmp.routing_changed.tolist()
    assert len(dash.compare_figure.data[1].y) == len(cmp.kl)
    assert no_hooks(dash.model)


def test_errors_show_in_the_status_line(dash):
    dash.max_new_tokens.value = 600  # past the tiny model's context of 512
    with pytest.raises(ValueError, match="exceeds the context"):
        dash.run(PROMPT)
    dash.generate_button.click()  # the button reports instead of raising (the text box holds text, no tokenizer)
    assert "error" in dash.status.value


def test_views_with_nothing_to_show_show_only_their_note(dash):
    panels = (dash.utilization_panel, dash.latent_panel, dash.attention_panel, dash.inspect_panel)
    assert all(p.children == (p.note,) for p in (*panels, dash.spectrum_panel, dash.compare_panel))  # no bare axes
    notes = []
    dash.inspect_panel.note.observe(lambda change: notes.append(change["new"]), names="value")
    dash.run(PROMPT)
    assert all(p.children == (p.figure,) for p in panels)
    assert notes == [notice_html(INSPECT_NOTE)]  # while generating it says when it is drawn, not "nothing yet"
    assert dash.spectrum_panel.children == (dash.spectrum_panel.note,)
    assert dash.compare_panel.children == (dash.compare_panel.note,)  # no intervention yet
    dash.spectrum_button.click()
    assert dash.spectrum_panel.children == (dash.spectrum,) and len(dash.spectrum.data) > 0
    dash.inspect.value = 0  # a prompt position: the model predicted nothing there
    assert dash.candidates.value == notice_html(
        f"no next-token distribution after position 0: it is recorded while generating, after positions "
        f"{len(PROMPT) - 1}..{len(dash.trace) - 2}"
    )
    dash.inspect.value = len(PROMPT) - 1  # the prompt's last token: the first generated token's distribution
    ids, probs = dash.trace.candidates(len(PROMPT) - 1)
    assert "<table>" in dash.candidates.value and f"{float(probs[0]):.3f}" in dash.candidates.value
    assert ids[0] == dash.trace.token_ids[len(PROMPT)]  # greedy: the top candidate is the token generated
    dash.regenerate()
    assert dash.compare_panel.children == (dash.compare_figure,)
    dash.run(PROMPT)  # a new run: the old comparison and spectrum no longer apply
    assert dash.compare_panel.children == (dash.compare_panel.note,)
    assert dash.spectrum_panel.children == (dash.spectrum_panel.note,)


def test_attention_not_recorded_shows_the_setting_that_records_it(dash):
    dash.recording = Recording(queries=False)
    dash.run(PROMPT)
    assert dash.attention_panel.children == (dash.attention_panel.note,)
    assert "Recording(queries=True)" in dash.attention_panel.note.value
    assert dash.status.value.startswith("generated: 12 tokens")  # the other panels are drawn as usual
    assert dash.latent_panel.children == (dash.latent,)


def test_json_safe_masks_every_non_finite_value():
    nan, inf = math.nan, math.inf
    assert json_safe({"z": [[1.0, nan], [-inf, 2]], "y": (inf, 3), "title": "nan"}) == {
        "z": [[1.0, None], [None, 2]],
        "y": [None, 3],
        "title": "nan",
    }
    masked = json_safe(torch.tensor([[0.5, nan], [inf, -1.0]]))
    assert masked == [[0.5, None], [None, -1.0]]
    assert json_safe(np.float32(nan)) is None and json_safe(np.float32(2.5)) == 2.5
    assert json_safe(torch.tensor([[inf, 0.5]], dtype=torch.bfloat16)) == [[None, 0.5]]  # a bf16 model's values
    finite = np.array([1.0, 2.0], dtype=np.float32)
    assert json_safe(finite) is finite  # untouched: plotly sends it as a binary buffer
    json.dumps(json_safe({"a": np.array([nan, 1.0]), "b": [np.array([[inf]])]}), allow_nan=False)


@pytest.fixture(scope="module")
def demo_model():
    """The bundled demo model: its tokenizer reads Chinese (as bytes)."""
    return dsv2viz.load(progress=False)


def test_no_widget_message_holds_nan_or_infinity(demo_model, widget_messages):
    """The quickstart's sequence: a run, ban expert 1 at layer 1 and regenerate, then a Chinese prompt."""
    dash = GenerationDashboard(demo_model)
    dash.max_new_tokens.value = 24  # as the quickstart: the banned expert's run then writes other tokens
    dash.run()
    dash.iv_mode.value, dash.iv_layer.value, dash.iv_expert.value = "ban", 1, 1
    dash.regenerate()
    assert dash.comparison.kl.isnan().any()  # steps after the runs' tokens differ cannot be compared
    dash.run("用中文写一个函数：")
    trace = dash.trace
    for position in (len(trace) - 1, trace.prompt_len - 1, 0):
        dash.inspect.value = position
    # what was drawn held NaN: experts a token did not choose are gaps in its routing across layers
    assert np.isnan(plots.routing_across_layers(trace, 0).data[0].z).any()
    assert dash.status.value == f"generated: {len(trace) - trace.prompt_len} tokens (length)"
    assert len(widget_messages) > 100
    for _, data in widget_messages:
        json.dumps(data, allow_nan=False)  # what Jupyter's message packer does: raises on NaN or infinity
    assert dash.candidates.value == notice_html(  # the prompt's first position: only the note
        f"no next-token distribution after position 0: it is recorded while generating, after positions "
        f"{trace.prompt_len - 1}..{len(trace) - 2}"
    )


def test_streamer_holds_flushes_until_the_browser_has_drawn(tiny_model):
    model = tiny_model()
    flushes: list[tuple[int, bool]] = []
    generation = model.generate(PROMPT, 30, stop_tokens=())
    streamer = Streamer(generation, lambda steps, g, final: flushes.append((len(steps), final)), ready=lambda: False)
    streamer.interval = 0.0  # a flush would be due after every step
    streamer.start()
    streamer.join(30)
    assert flushes == [(30, True)]  # nothing while the browser is busy; everything at the end


def test_drawn_waits_for_the_browser_or_patience():
    fig, hidden = go.FigureWidget(go.Heatmap(z=[[1, 2]])), go.FigureWidget(go.Heatmap(z=[[1, 2]]))
    drawn = Drawn([fig, hidden], patience=60)
    assert drawn.ready()  # nothing sent yet
    fig.data[0].z = hidden.data[0].z = [[3, 4]]
    drawn.sent()
    assert drawn.ready()  # no browser has drawn either figure: nothing to wait for
    fig._js2py_traceDeltas = {"trace_deltas": [], "trace_edit_id": fig._last_trace_edit_id}  # a browser drew it
    fig.data[0].z = hidden.data[0].z = [[5, 6]]
    drawn.sent()
    assert not drawn.ready()  # that browser has not drawn this update yet
    fig._js2py_traceDeltas = {"trace_deltas": [], "trace_edit_id": fig._last_trace_edit_id}  # now it has
    assert drawn.ready()  # the figure no browser shows holds nothing back
    fig.data[0].z = [[7, 8]]
    drawn.sent()
    drawn.patience = 0  # that browser stopped answering: the next update goes anyway
    assert drawn.ready()


def test_strip_sends_only_the_piece_that_grew(widget_messages):
    strip = TokenStrip()
    spans = [token_span(f"t{i}", i, i % 4, 5) for i in range(2 * STRIP_CHUNK + 10)]
    strip.show(spans)
    assert strip.value == "".join(spans)
    widget_messages.clear()
    spans.append(token_span("new", len(spans), 0, 5))
    strip.show(spans, start=len(spans) - 1)
    sent = [data["state"] for kind, data in widget_messages if kind == "comm_msg"]
    assert sent == [{"value": "".join(spans[2 * STRIP_CHUNK :])}]  # the last piece alone, not the whole strip
    assert strip.value == "".join(spans)
    strip.show(spans[:3])  # a new run: one piece left
    assert strip.value == "".join(spans[:3]) and len(strip.children) == 1


# ----- selecting a token: the strip, "inspect pos" and the attribution panel --------------------------------
def click(dash: GenerationDashboard, position: int) -> None:
    """What the strip's JavaScript sends when a token is clicked: a custom message from its piece."""
    piece = dash.strip.children[position // STRIP_CHUNK]
    piece._handle_msg({"content": {"data": {"method": "custom", "content": {"select": position}}}, "buffers": []})


def own_logit(model, trace, position: int, target: int) -> float:
    """The model's logit of `target` after `position`, from a plain forward pass over the trace's tokens."""
    with torch.no_grad():
        return float(model(trace.token_ids[None])[0, position, target])


def test_clicking_a_token_selects_it_and_shows_what_wrote_the_next_token(dash):
    dash.run(PROMPT)
    trace, p = dash.trace, len(PROMPT) + 3
    assert dash.attribution_panel.children == (dash.attribution_panel.note,)  # nothing selected yet
    statuses: list[str] = []
    dash.attribution_status.observe(lambda change: statuses.append(change["new"]), names="value")
    click(dash, p)
    assert dash.inspect.value == p and dash.strip.selected == p and dash.strip.children[0].selected == p
    dash.wait_attribution(30)
    assert dash.attribution_panel.children == (dash.attribution_figure,)
    fig = dash.attribution_figure
    target = int(trace.token_ids[p + 1])  # the token that came next
    assert (
        fig.layout.title.text
        == plots.logit_attribution(analysis.logit_attribution(dash.model, trace, p)).layout.title.text
    )
    assert f"(position {p})" in fig.layout.title.text and html.escape(trace.token_texts[p]) in fig.layout.title.text
    assert sum(fig.data[0].x) == pytest.approx(own_logit(dash.model, trace, p, target), abs=1e-4)  # bars add up
    L = dash.model.config.num_hidden_layers
    progress = [f"attribution of position {p}: layer {i} of {L}…" for i in range(1, L + 1)]
    assert [s for s in statuses if "layer" in s] == progress  # a progress line while it ran
    assert statuses[-1].startswith(f"attribution of position {p}: what wrote ")
    # the slider selects as a click does: the strip outlines the token, and its attribution follows
    dash.inspect.value = 2
    assert dash.strip.selected == 2 and dash.strip.children[0].selected == 2
    dash.wait_attribution(30)
    assert "(position 2)" in dash.attribution_figure.layout.title.text
    click(dash, len(trace))  # past the strip's end: ignored
    assert dash.inspect.value == 2
    dash.run(PROMPT)  # a new run: nothing selected, the panel back to its note
    assert dash.strip.selected is None and dash.attribution_panel.children == (dash.attribution_panel.note,)
    assert no_hooks(dash.model)


@pytest.fixture
def blocked_attribution(monkeypatch):
    """logit_attribution that waits for `release` before each call it is given, recording the positions."""
    real = analysis.logit_attribution
    calls: list[int] = []
    release = threading.Event()

    def slow(model, trace, position, **kwargs):
        calls.append(position)
        assert release.wait(30)
        return real(model, trace, position, **kwargs)

    monkeypatch.setattr(analysis, "logit_attribution", slow)
    return calls, release


def test_a_newer_selection_supersedes_and_the_dashboard_keeps_working(dash, blocked_attribution):
    calls, release = blocked_attribution
    dash.run(PROMPT)
    click(dash, 3)
    assert dash.attribution_status.value == "attribution of position 3: starting…"  # nothing ran before it
    deadline = time.monotonic() + 10
    while not calls and time.monotonic() < deadline:  # 3's attribution has started
        time.sleep(0.01)
    click(dash, 4)  # waits behind 3 ...
    assert dash.attribution_status.value == "attribution of position 4: waiting for the one before…"
    click(dash, 6)  # ... and is replaced by 6
    # while the attribution of 3 is still running: other controls work, the strip follows the last click
    assert dash.inspect.value == 6 and dash.strip.selected == 6
    dash.layer_slider.value = dash.trace.moe_layers[-1]
    top1 = dash.trace.routing(dash.trace.moe_layers[-1])[0][:, 0].tolist()
    assert [color for _, color, _ in spans(dash)] == [span_color(e, p < len(PROMPT)) for p, e in enumerate(top1)]
    release.set()
    dash.wait_attribution(30)
    assert calls == [3, 6]  # 4 never ran; 3's result was stale, never shown
    assert "(position 6)" in dash.attribution_figure.layout.title.text
    # a generation while an attribution runs: both finish, and the new run drops the old selection's result
    release.clear()
    click(dash, 5)
    deadline = time.monotonic() + 10
    while calls[-1] != 5 and time.monotonic() < deadline:  # 5's attribution has started
        time.sleep(0.01)
    dash.run(PROMPT, wait=False)
    release.set()
    dash.streamer.join(30)
    dash.wait_attribution(30)
    assert dash.status.value.startswith("generated: 12 tokens") and calls == [3, 6, 5]
    assert dash.attribution_panel.children == (dash.attribution_panel.note,)  # 5's result belonged to the old run
    assert no_hooks(dash.model)


def test_an_attribution_error_shows_in_the_panel_as_one_line(dash, monkeypatch):
    def fails(*args, **kwargs):
        raise ValueError("attributing went wrong\nsecond line")

    monkeypatch.setattr(analysis, "logit_attribution", fails)
    dash.run(PROMPT)
    click(dash, 4)
    dash.wait_attribution(30)
    assert dash.attribution_panel.children == (dash.attribution_panel.note,)
    assert dash.attribution_panel.note.value == notice_html(
        "attribution of position 4 failed: ValueError: attributing went wrong"
    )
    assert dash.attribution_status.value == "" and dash.status.value.startswith("generated: 12 tokens")


def test_a_job_that_raises_does_not_stop_the_superseding_worker(caplog):
    worker, done = Superseding("test-worker"), []

    def fails(ticket: int) -> None:
        raise RuntimeError("boom")

    worker.submit(fails)
    worker.join(10)
    assert not worker.busy and "boom" in caplog.text  # logged, and the worker is free again
    worker.submit(done.append)
    worker.join(10)
    assert done == [2]  # the next job runs
