"""Explorer widgets: their controls redraw their FigureWidgets in place with the trace's own data (no browser)."""

from __future__ import annotations

import dataclasses
import html
import json
import re

import ipywidgets
import numpy as np
import plotly.graph_objects as go
import pytest
from conftest import tiny_config

from dsv2viz import analysis, plots
from dsv2viz.model import DeepseekV2ForCausalLM
from dsv2viz.traces import Recording, Trace
from dsv2viz.widgets import AttentionExplorer, LatentExplorer, RoutingExplorer
from dsv2viz.widgets.latent_explorer import DIMMED

EVIL = "<img src=x onerror=alert(1)>"
ATTENTION = Recording(
    router_probs=True, attention="full", queries=True, attention_layers=[1, 2], attention_heads=[0, 2]
)
PROMPT = list(range(3, 13))


@pytest.fixture(scope="module")
def model():
    """The conftest tiny model (3 layers, MoE layers 1-2 with 8 experts top-3, 4 heads), built once here."""
    return DeepseekV2ForCausalLM(tiny_config()).init_weights(std=0.15, seed=0).eval().requires_grad_(False)


@pytest.fixture(scope="module")
def trace(model) -> Trace:
    return model.generate(PROMPT, 5, record=ATTENTION).run()


def figures(widget: ipywidgets.Widget) -> list[go.FigureWidget]:
    """Every FigureWidget shown inside `widget`, in display order."""
    if isinstance(widget, go.FigureWidget):
        return [widget]
    return [f for child in getattr(widget, "children", ()) for f in figures(child)]


def plain(value):
    """`value` as plain lists and numbers, NaN and infinity as None (a gap: what the widgets send)."""
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [plain(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if np.isfinite(value) else None
    return value.item() if isinstance(value, np.generic) else value


def data(fig: go.Figure) -> list[dict]:
    """A figure's traces as plain data, without the ids a FigureWidget gives them."""
    return [{k: plain(v) for k, v in t.to_plotly_json().items() if k != "uid"} for t in fig.data]


def z(fig: go.Figure, index: int = 0) -> np.ndarray:
    return np.asarray(fig.data[index].z, dtype=float)


def message(widget: ipywidgets.VBox) -> str:
    """The text of the first note an explorer shows, without its markup."""
    note = next(c.value for c in widget.children if isinstance(c, ipywidgets.HTML))
    return html.unescape(re.sub(r"<[^>]+>", "", note))


def test_routing_layer_control_redraws_strip_and_coactivation(trace):
    ex = RoutingExplorer(trace)
    strip, coactivation = ex.strip, ex.coactivation
    assert ex.layer.options == (("layer 1", 1), ("layer 2", 2)) and ex.layer.value == 1
    np.testing.assert_array_equal(z(coactivation), analysis.coactivation(trace, 1).numpy())
    ex.layer.value = 2
    assert ex.strip is strip and ex.coactivation is coactivation  # redrawn in place, not rebuilt
    np.testing.assert_array_equal(z(coactivation), analysis.coactivation(trace, 2).numpy())
    top1 = trace.routing(2)[0][:, 0].tolist()
    per_row = z(strip, 0).shape[1]
    for p, expert in enumerate(top1):  # prompt cells in the first heatmap, generated ones in the second
        part = 0 if p < trace.prompt_len else 1
        assert z(strip, part)[divmod(p, per_row)] == expert
    assert data(strip) == data(plots.token_strip(trace, 2))
    assert strip.layout.title.text == plots.token_strip(trace, 2).layout.title.text


def test_routing_position_control_redraws_routing_across_layers(trace):
    ex = RoutingExplorer(trace)
    ex.position.value = 3
    grid = z(ex.across_layers)  # experts x MoE layers, NaN where not chosen
    for col, layer in enumerate(trace.moe_layers):
        experts, weights = trace.routing(layer)
        assert set(np.flatnonzero(~np.isnan(grid[:, col]))) == set(experts[3].tolist())
        np.testing.assert_allclose(grid[experts[3], col], weights[3].numpy(), rtol=1e-6)
    assert ex.utilization is not None and ex.confidence is not None


def test_attention_controls_are_the_recorded_layers_and_heads(trace):
    ex = AttentionExplorer(trace)
    assert [v for _, v in ex.layer.options] == [1, 2]
    assert [v for _, v in ex.head.options] == [0, 2] == trace.recording.heads(trace.config)
    assert ex.rope_share is not None  # queries recorded
    pattern = ex.pattern
    ex.layer.value, ex.head.value = 2, 2
    assert ex.pattern is pattern
    np.testing.assert_array_equal(z(pattern), trace.attention(2, 2).pattern.numpy())
    assert len(pattern.data) == 3  # pattern, nope and rope parts
    assert data(pattern) == data(plots.attention_parts(trace.attention(2, 2), trace.token_texts))


def test_attention_without_queries_shows_the_pattern_alone(model):
    recorded = model.generate(PROMPT, 3, record=Recording(attention="last_row", attention_layers=[2])).run()
    patterns_only = {k: v for k, v in recorded.tensors.items() if not k.startswith(("q_nope.", "q_pe.", "w_uk."))}
    trace = dataclasses.replace(recorded, tensors=patterns_only)
    ex = AttentionExplorer(trace)
    assert [v for _, v in ex.layer.options] == [2] and ex.rope_share is None
    assert message(ex).endswith("record them with Recording(queries=True).")  # the rope share's place
    assert len(ex.pattern.data) == 1
    np.testing.assert_array_equal(z(ex.pattern), trace.attention(2, 0).pattern.numpy())


def test_latent_layer_control_highlights_that_layers_spectrum(trace):
    ex = LatentExplorer(trace)
    everything = data(plots.latent_spectrum(trace))
    assert data(ex.spectrum) == everything
    ex.layer.value = 1
    lines = data(ex.spectrum)
    assert [line["y"] for line in lines] == [line["y"] for line in everything]
    assert [line["opacity"] for line in lines] == [DIMMED, 1.0, DIMMED]
    assert lines[1]["line"]["width"] > everything[1]["line"]["width"]
    ex.layer.value = None
    assert data(ex.spectrum) == everything
    assert data(ex.memory) == data(plots.kv_cache_memory(trace.config))


def test_reopened_trace_gives_identical_figures(trace, tmp_path):
    reopened = Trace.load(trace.save(tmp_path / "t"))
    for explorer in (RoutingExplorer, AttentionExplorer, LatentExplorer):
        original, loaded = figures(explorer(trace)), figures(explorer(reopened))
        assert len(original) == len(loaded) > 0
        assert [data(f) for f in original] == [data(f) for f in loaded]


def test_missing_recordings_show_what_to_record(model):
    trace = model.generate(PROMPT, 2, record=Recording(latents=False)).run()
    attention = AttentionExplorer(trace)
    assert attention.pattern is None and figures(attention) == []
    assert "Recording(attention=" in message(attention)
    latent = LatentExplorer(trace)
    assert latent.spectrum is None and latent.norms is None and figures(latent) == [latent.memory]
    assert "Recording(latents=True)" in message(latent)
    queries_only = AttentionExplorer(model.generate(PROMPT, 2, record=Recording(queries=True, latents=False)).run())
    assert figures(queries_only) == []
    assert message(queries_only) == "This trace has no attention to show: record it with Recording(latents=True)."
    # stored patterns without latents: shown (the explorer used to hide them), their parts need the latents
    unsplit = model.generate(PROMPT, 2, record=Recording(attention="full", attention_layers=[2], latents=False)).run()
    patterns = AttentionExplorer(unsplit)
    assert figures(patterns) == [patterns.entropy, patterns.pattern] and len(patterns.pattern.data) == 1
    np.testing.assert_array_equal(z(patterns.pattern), unsplit.attention(2, 0).pattern.numpy())
    assert message(patterns).endswith("record them with Recording(latents=True).")
    routing = RoutingExplorer(model.generate(PROMPT, 2, record=Recording.off()).run())
    assert routing.strip is None and "Recording(routing=True)" in message(routing)


def test_token_text_is_never_raw_markup(trace):
    texts = list(trace.token_texts)
    texts[2] = texts[-1] = EVIL
    evil = dataclasses.replace(trace, token_texts=texts)
    routing = RoutingExplorer(evil)
    routing.position.value = 2
    attention = AttentionExplorer(evil)
    shown = figures(routing) + figures(attention) + figures(LatentExplorer(evil))
    assert len(shown) == 11
    for fig in shown:
        assert EVIL not in fig.to_json()
    assert "&lt;img src=x onerror=alert(1)&gt;" in routing.across_layers.to_json()


def test_no_explorer_message_holds_nan_or_infinity(trace, widget_messages):
    routing, attention, latent = RoutingExplorer(trace), AttentionExplorer(trace), LatentExplorer(trace)
    for position in range(len(trace)):
        routing.position.value = position
    routing.layer.value, attention.layer.value, attention.head.value, latent.layer.value = 2, 2, 2, 1
    assert np.isnan(plots.routing_across_layers(trace, 0).data[0].z).any()  # gaps where no expert was chosen
    assert len(widget_messages) > 20
    for _, data_ in widget_messages:
        json.dumps(data_, allow_nan=False)  # what Jupyter's message packer does: raises on NaN or infinity
