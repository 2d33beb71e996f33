"""GenerationDashboard: widget state after live generation (no browser): the strip, utilization, Stop, escaping, interventions."""

from __future__ import annotations

import html
import re
import time

import pytest
import torch

from dsv2viz import analysis
from dsv2viz.widgets import GenerationDashboard
from dsv2viz.widgets._live import span_color

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
    assert not dash.running and streamer.error is None
    generated = len(dash.trace) - len(PROMPT)
    assert 0 < generated < 4000 and dash.trace.meta["finish_reason"] == "stopped"
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
