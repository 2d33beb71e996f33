"""Figures: each built from a real trace, its data checked against the trace and the analyses it draws."""

from __future__ import annotations

import dataclasses
import re
import sys
import types

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
import pytest
import torch

import dsv2viz
from dsv2viz import analysis as A
from dsv2viz import plots
from dsv2viz.plots._layout import TICK_CHARS, chars_that_fit, expert_color
from dsv2viz.plots._text import token_label, token_labels
from dsv2viz.plots.attribution import KIND_COLORS, REST_COLOR
from dsv2viz.random_checkpoint import write_random_checkpoint
from dsv2viz.traces import Recording, TraceError

EVIL = "<img src=x onerror=alert(1)>"
ESCAPED = "&lt;img src=x onerror=alert(1)&gt;"
EVERYTHING = Recording(router_probs=True, attention="full", queries=True, attention_layers=[1, 2])
PROMPT = "def f(x):\n\treturn x  + 1"
NEW = 8


@pytest.fixture(scope="module")
def byte_model(tmp_path_factory):
    """The random checkpoint with its byte-level tokenizer: 4 layers, MoE layers 1-3, 16 experts top-4, 4 heads."""
    folder = write_random_checkpoint(tmp_path_factory.mktemp("plots") / "m", dtype=torch.float32)
    return dsv2viz.load(folder, progress=False)


@pytest.fixture(scope="module")
def trace(byte_model):
    return byte_model.generate(PROMPT, NEW, record=EVERYTHING).run()


@pytest.fixture(scope="module")
def evil(trace):
    """The trace with two token texts made markup, its bytes dropped so every view reads those texts."""
    texts = list(trace.token_texts)
    texts[2] = texts[-1] = EVIL
    tensors = {k: v for k, v in trace.tensors.items() if k not in ("token_bytes", "token_offsets")}
    return dataclasses.replace(trace, token_texts=texts, tensors=tensors)


def heatmaps(fig: go.Figure) -> list[go.Heatmap]:
    return [t for t in fig.data if t.type == "heatmap"]


def z_of(trace_: go.Heatmap) -> np.ndarray:
    return np.asarray(trace_.z, dtype=float)


# ----- text ---------------------------------------------------------------------------------------------
def test_token_label_escapes_markup_and_shows_whitespace():
    assert token_label(EVIL) == ESCAPED
    assert token_label(" the") == "·the" and token_label("the ") == "the·" and token_label("a b") == "a b"
    assert token_label("   ") == "···" and token_label("") == "∅"
    assert token_label("\n") == "↵" and token_label("\t") == "⇥"
    assert token_label("\x00") == "␀" and token_label("\r\n") == "␍↵"
    assert token_label("\"x\" & 'y'") == "&#34;x&#34; &amp; &#x27;y&#x27;"  # plotly.js decodes numeric entities only
    assert token_label("$x$") == "&#36;x&#36;"  # never typeset as LaTeX
    assert token_label(EVIL, 5) == "&lt;img…"  # cut before escaping: no entity cut in half
    assert token_labels(["a", "<"]) == ["a", "&lt;"]


# ----- tokens -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_row", [16, 7])
def test_token_strip_cells_are_the_top1_experts(trace, per_row):
    layer = 2
    fig = plots.token_strip(trace, layer, per_row=per_row)
    experts = trace.routing(layer)[0]
    seen = {}
    for part in heatmaps(fig):
        z = z_of(part)
        assert z.shape[1] == per_row
        for r, c in zip(*np.nonzero(~np.isnan(z))):
            p = int(r) * per_row + int(c)
            assert (part.name == "prompt") == (p < trace.prompt_len)
            assert part.text[r][c] == token_label(trace.token_texts[p], chars_that_fit(per_row))
            assert part.customdata[r][c][0] == token_label(trace.token_texts[p])
            seen[p] = int(z[r, c])
    assert sorted(seen) == list(range(len(trace)))  # exactly one cell per token
    assert [seen[p] for p in range(len(trace))] == experts[:, 0].tolist()
    assert {t.name for t in heatmaps(fig)} == {"prompt", "generated"}
    prompt, generated = heatmaps(fig)
    assert prompt.colorscale != generated.colorscale  # prompt cells lighter


# ----- routing ------------------------------------------------------------------------------------------
def test_utilization_heatmap_counts_every_top_k_slot(tiny_model):
    model = tiny_model()
    corpus = [model.generate(list(range(3, 23)), 10).run(), model.generate([5, 6, 7], 6).run()]
    util = A.expert_utilization(corpus)
    fig = plots.utilization_heatmap(util)
    (counts,) = heatmaps(fig)
    z = z_of(counts)
    assert z.shape == (2, 8) and np.array_equal(z, util.counts.numpy())
    assert (z.sum(axis=1) == util.tokens * 3).all() and util.tokens == 39
    cv, ratio = (t for t in fig.data if t.type == "scatter")
    np.testing.assert_allclose(cv.x, util.cv.numpy())
    np.testing.assert_allclose(ratio.x, util.max_over_mean.numpy())
    assert list(fig.layout.yaxis.ticktext) == ["layer 1", "layer 2"]


def test_coactivation_matrix_is_the_analysis_matrix(trace):
    matrix = A.coactivation(trace, 3)
    fig = plots.coactivation_matrix(matrix, 3)
    z = z_of(heatmaps(fig)[0])
    assert np.array_equal(z, matrix.numpy()) and np.array_equal(z, z.T)
    assert np.diagonal(z).sum() == len(trace) * 4
    assert "layer 3" in fig.layout.title.text


@pytest.mark.parametrize("position", [4, -1])
def test_routing_across_layers_shows_the_top_k_of_each_layer(trace, position):
    fig = plots.routing_across_layers(trace, position)
    z = z_of(heatmaps(fig)[0])  # (experts, MoE layers)
    assert z.shape == (16, 3)
    for col, layer in enumerate(trace.moe_layers):
        experts, weights = trace.routing(layer)
        chosen = np.nonzero(np.nan_to_num(z[:, col]))[0]
        assert len(chosen) == 4 and set(chosen) == set(experts[position].tolist())
        for e, w in zip(experts[position].tolist(), weights[position].tolist()):
            assert z[e, col] == pytest.approx(w)
    assert f"position {range(len(trace))[position]}" in fig.layout.title.text


def with_a_forced_tie(trace):
    """The trace with layer 1's router distribution at position 3 tied between its K-th and (K+1)-th expert."""
    probs = trace.tensors["router_probs"].clone()
    order = probs[0, 3].argsort(descending=True)
    probs[0, 3, order[4]] = probs[0, 3, order[3]]
    return dataclasses.replace(trace, tensors={**trace.tensors, "router_probs": probs})


def test_routing_confidence_draws_margins_entropy_and_every_near_tie(trace):
    tied = with_a_forced_tie(trace)
    fig = plots.routing_confidence(tied)
    margin, entropy = heatmaps(fig)
    M, S = 3, len(trace)
    assert z_of(margin).shape == z_of(entropy).shape == (M, S)
    np.testing.assert_allclose(z_of(margin), A.topk_margin(tied).numpy())
    np.testing.assert_allclose(z_of(entropy), A.routing_entropy(tied).numpy())
    ties = A.near_ties(tied)
    assert len(ties) >= 1 and ((ties.position == 3) & (ties.layer == 1)).any()
    (markers,) = [t for t in fig.data if t.type == "scatter"]
    assert len(markers.x) == len(ties)
    assert list(markers.x) == ties.position.tolist()
    assert [tied.moe_layers[int(y)] for y in markers.y] == ties.layer.tolist()
    assert list(fig.layout.xaxis2.ticktext) == token_labels(trace.token_texts, TICK_CHARS)


def test_routing_confidence_without_router_probs_shows_top_k_weight_entropy(tiny_model):
    trace = tiny_model().generate(list(range(3, 23)), 5).run()
    fig = plots.routing_confidence(trace)
    (entropy,) = heatmaps(fig)
    assert z_of(entropy).shape == (2, 25)
    np.testing.assert_allclose(z_of(entropy), A.topk_weight_entropy(trace).numpy())
    assert not [t for t in fig.data if t.type == "scatter"]
    assert "router_probs=True" in fig.layout.title.subtitle.text


def test_top_tokens_per_expert_table_lists_the_frame(trace):
    frame = A.top_tokens_per_expert(trace, 2, n=3)
    fig = plots.top_tokens_per_expert(frame)
    columns = fig.data[0].cells.values
    experts = sorted(frame.expert.unique())
    assert list(columns[0]) == [str(e) for e in experts] and len(columns) == 2 + 3
    for row, e in enumerate(experts):
        mine = frame[frame.expert == e]
        assert columns[1][row] == pytest.approx(mine["count"].sum() / mine.share.sum())  # the expert's total
        first = mine.iloc[0]
        assert columns[2][row] == f"{token_label(first.token)}<br>{first.share:.0%}"
    some = plots.top_tokens_per_expert(frame, experts=[5, 0])
    assert list(some.data[0].cells.values[0]) == ["5", "0"]


# ----- attention ----------------------------------------------------------------------------------------
def test_attention_pattern_is_the_view_with_tokens_on_both_axes(trace):
    view = trace.attention(1, 2)
    fig = plots.attention_pattern(view, trace.token_texts)
    (pattern,) = heatmaps(fig)
    np.testing.assert_array_equal(z_of(pattern), view.pattern.numpy())
    labels = token_labels(trace.token_texts, TICK_CHARS)
    assert list(fig.layout.xaxis.ticktext) == labels and list(fig.layout.yaxis.ticktext) == labels
    assert list(fig.layout.yaxis.tickvals) == view.query_pos.tolist()
    with pytest.raises(ValueError, match="token texts"):
        plots.attention_pattern(view, trace.token_texts[:-1])


def test_attention_pattern_of_last_rows_labels_the_recorded_queries(tiny_model):
    rec = Recording(attention="last_row", attention_layers=[1])
    trace = tiny_model().generate(list(range(3, 13)), 4, record=rec).run()
    view = trace.attention(1, 0)
    fig = plots.attention_pattern(view, trace.token_texts)
    assert z_of(heatmaps(fig)[0]).shape == (5, 14)
    assert list(fig.layout.yaxis.tickvals) == [9, 10, 11, 12, 13]
    assert list(fig.layout.yaxis.ticktext) == token_labels([trace.token_texts[q] for q in range(9, 14)], TICK_CHARS)


def test_attention_parts_add_up_to_the_scores_behind_the_pattern(trace):
    view = trace.attention(2, 1)
    fig = plots.attention_parts(view, trace.token_texts)
    pattern, nope, rope = (z_of(h) for h in heatmaps(fig))
    causal = np.tril(np.ones_like(pattern, dtype=bool))
    assert np.isnan(nope[~causal]).all() and np.isnan(rope[~causal]).all()  # keys after the query: blank
    scores = nope + rope
    np.testing.assert_allclose(scores[causal], (view.scores_nope + view.scores_rope).numpy()[causal], rtol=1e-6)
    rebuilt = torch.tensor(np.where(causal, scores, -np.inf)).softmax(dim=-1).numpy()
    np.testing.assert_allclose(pattern, rebuilt, atol=1e-5)
    np.testing.assert_array_equal(pattern, view.pattern.numpy())
    _, part_nope, part_rope = heatmaps(fig)
    assert part_nope.coloraxis == part_rope.coloraxis == "coloraxis2"  # one diverging scale for both parts
    axis = fig.layout.coloraxis2
    assert axis.cmin == -axis.cmax and axis.cmax == pytest.approx(np.nanmax(np.abs([nope, rope])))
    stored_only = dataclasses.replace(view, scores_nope=None, scores_rope=None)
    with pytest.raises(TraceError, match="queries=True"):
        plots.attention_parts(stored_only, trace.token_texts)


@pytest.mark.parametrize("column", ["entropy", "rope_share"])
def test_heads_overview_is_layers_by_heads(trace, column):
    frame = A.head_entropy(trace) if column == "entropy" else A.rope_share(trace)
    fig = plots.heads_overview(frame, column)
    z = z_of(heatmaps(fig)[0])
    assert z.shape == (2, 4)  # recorded layers 1, 2 x 4 heads
    np.testing.assert_array_equal(z, A.head_matrix(frame, column).numpy())
    assert list(fig.layout.yaxis.ticktext) == ["1", "2"] and list(fig.layout.xaxis.ticktext) == ["0", "1", "2", "3"]


# ----- latent -------------------------------------------------------------------------------------------
def test_latent_spectrum_lines_are_the_singular_values(trace):
    fig = plots.latent_spectrum(trace)
    assert len(fig.data) == 4 and fig.layout.yaxis.type == "log"
    for layer, line in enumerate(fig.data):
        s = torch.linalg.svdvals(trace.tensors["c_kv"][layer].float())
        np.testing.assert_allclose(line.y, s.numpy(), rtol=1e-6)
        assert line.name == f"layer {layer}: eff. rank {A.effective_rank(s):.1f}"
    assert [t.name.split(":")[0] for t in plots.latent_spectrum(trace, layers=[3, 1]).data] == ["layer 3", "layer 1"]


def test_latent_norms_heatmap(trace):
    fig = plots.latent_norms(trace)
    z = z_of(heatmaps(fig)[0])
    assert z.shape == (4, len(trace))
    np.testing.assert_allclose(z, A.latent_norms(trace).numpy())
    assert list(fig.layout.xaxis.ticktext) == token_labels(trace.token_texts, TICK_CHARS)
    assert fig.layout.shapes[0].x0 == trace.prompt_len - 0.5  # where generation starts


def test_kv_cache_memory_of_v2_lite():
    config = dsv2viz.DEEPSEEK_V2_LITE
    assert config.kv_cache_bytes_per_token(2) == 31_104
    fig = plots.kv_cache_memory(config)
    mha, latent = fig.data
    assert fig.layout.xaxis.type == "log" and mha.x[-1] == latent.x[-1] == 32768 and latent.x[0] == 1
    assert latent.y[-1] == 31_104 * 32768 == config.kv_cache_bytes_per_token(2) * 32768
    assert mha.y[-1] == config.mha_cache_bytes_per_token(2) * 32768
    ratio = config.mha_cache_bytes_per_token(2) / config.kv_cache_bytes_per_token(2)
    assert f"{ratio:.1f}×" in fig.layout.title.text
    assert latent.customdata[-1] == "972 MiB" and mha.customdata[-1] == "8.44 GiB"
    assert plots.kv_cache_memory(config, max_tokens=1000).data[0].x[-1] == 1000


# ----- logit lens ---------------------------------------------------------------------------------------
def test_logit_lens_cells_are_the_top1_probabilities(byte_model, trace):
    frame = A.logit_lens(byte_model, trace, top=3)
    fig = plots.logit_lens(frame, trace.token_texts)
    z = z_of(heatmaps(fig)[0])
    assert z.shape == (5, len(trace))  # embedding + 4 layers
    top1 = frame[frame["rank"] == 0]
    for (layer, pos), prob in zip(zip(top1.layer, top1.position), top1.prob):
        assert z[layer + 1, pos] == pytest.approx(prob)
    cell = heatmaps(fig)[0].customdata[4][7]  # last layer, position 7
    best = frame[(frame.layer == 3) & (frame.position == 7)].sort_values("rank")
    assert cell[3] == "<br>".join(
        f"{r + 1}. {token_label(t)}  {p:.1%}" for r, t, p in zip(best["rank"], best.token, best.prob)
    )
    assert list(fig.layout.yaxis.ticktext) == ["embedding", "layer 0", "layer 1", "layer 2", "layer 3"]


# ----- attribution --------------------------------------------------------------------------------------
def bar_colors(frame) -> list[str]:
    return [expert_color(i) if k == "expert" else KIND_COLORS[k] for k, i in zip(frame.kind, frame["index"])]


def test_logit_attribution_bars_are_the_largest_parts_then_the_rest(byte_model, trace):
    attr = A.logit_attribution(byte_model, trace, -2, contrast=5)
    frame = attr.frame
    fig = plots.logit_attribution(attr, top=10)
    (bars,) = fig.data
    np.testing.assert_allclose(bars.x[:10], frame.contribution[:10])
    assert bars.x[10] == pytest.approx(frame.contribution[10:].sum()) and len(bars.x) == 11
    assert sum(bars.x) == pytest.approx(attr.logit, abs=1e-4)  # the bars add up to the logit difference
    assert list(fig.layout.yaxis.ticktext) == [*frame.component[:10], f"{len(frame) - 10} others"]
    assert list(bars.marker.color) == [*bar_colors(frame[:10]), REST_COLOR]
    every = plots.logit_attribution(attr, top=len(frame)).data[0]  # no rest bar: every part, experts included
    assert len(every.x) == len(frame) and list(every.marker.color) == bar_colors(frame)
    assert {expert_color(e) for e in frame[frame.kind == "expert"]["index"]} <= set(every.marker.color)
    assert KIND_COLORS["head"] in every.marker.color
    title = fig.layout.title.text
    assert token_label(attr.target_text) in title and token_label(attr.contrast_text) in title
    assert f"sum to {attr.logit:.4f}" in fig.layout.title.subtitle.text
    with pytest.raises(ValueError, match="top=0 must be a positive integer"):
        plots.logit_attribution(attr, top=0)


def test_ablation_effects_bars_with_their_gradient_estimates(byte_model, trace):
    p = len(trace) - 3
    effects = A.ablation_effects(byte_model, trace, p)
    estimates = A.attribution_patching(byte_model, trace, [p])
    fig = plots.ablation_effects(effects, estimates, top=8)
    bars, markers = fig.data
    np.testing.assert_allclose(bars.x[:8], effects.frame.effect[:8])
    assert bars.x[8] == pytest.approx(effects.frame.effect[8:].sum())
    assert list(bars.marker.color) == [*bar_colors(effects.frame[:8]), REST_COLOR]
    guess = estimates.at(p).set_index("component").estimate
    np.testing.assert_allclose(markers.x, guess[effects.frame.component[:8]].to_numpy())
    assert list(markers.y) == list(range(8))  # on their parts' bars
    assert len(plots.ablation_effects(effects).data) == 1
    with pytest.raises(ValueError, match="estimates are for another metric"):
        plots.ablation_effects(effects, A.attribution_patching(byte_model, trace, [p - 1]))


def patching_pair(byte_model, trace):
    """The trace, and its tokens with position 3 changed, with the clean run's two likeliest last tokens."""
    corrupted = trace.token_ids.clone()
    corrupted[3] = (corrupted[3] + 1) % byte_model.config.vocab_size
    with torch.no_grad():
        best = byte_model(trace.token_ids[None])[0, -1].topk(2).indices.tolist()
    return corrupted, best


def test_patching_heatmap_is_the_recovered_table(byte_model, trace):
    corrupted, (target, contrast) = patching_pair(byte_model, trace)
    result = A.activation_patching(byte_model, trace, corrupted, target=target, contrast=contrast)
    fig = plots.patching_heatmap(result)
    (cells,) = heatmaps(fig)
    np.testing.assert_array_equal(z_of(cells), result.recovered.numpy())
    assert cells.zmid == 0 and cells.zmax == -cells.zmin >= 1
    clean = token_labels(trace.token_texts, TICK_CHARS)
    other = token_label(byte_model.tokenizer.token_labels([int(corrupted[3])])[0], TICK_CHARS)
    assert list(fig.layout.xaxis.ticktext) == [*clean[:3], f"{clean[3]}→{other}", *clean[4:]]
    assert list(fig.layout.yaxis.ticktext) == ["0", "1", "2", "3"]
    assert cells.customdata[2][5][2] == pytest.approx(result.patched[2, 5].item())


def test_routing_sankey_draws_the_largest_flows_in_expert_colours(trace):
    paths = A.routing_paths(trace, top=2)
    fig = plots.routing_sankey(paths, n=12)
    (sankey,) = fig.data
    flows = paths.flows(12)
    labels = list(sankey.node.label)
    pairs = [(labels[a], labels[b]) for a, b in zip(sankey.link.source, sankey.link.target)]
    assert pairs == [(f"L{r.from_layer} E{r.from_expert}", f"L{r.to_layer} E{r.to_expert}") for r in flows.itertuples()]
    assert list(sankey.link.value) == flows["count"].tolist()
    assert list(sankey.node.color) == [expert_color(int(label.split("E")[1])) for label in labels]
    assert sankey.node.hovertemplate and sankey.link.hovertemplate
    assert "first 2 experts" in fig.layout.title.subtitle.text
    with pytest.raises(ValueError, match="n=0 must be a positive integer"):
        plots.routing_sankey(paths, n=0)


def test_same_expert_rate_is_each_layers_rate_beside_chance(trace):
    paths = A.routing_paths(trace)
    rate, chance = plots.same_expert_rate(paths).data
    assert list(rate.x) == list(chance.x) == [str(layer) for layer in trace.moe_layers]
    for m, layer in enumerate(trace.moe_layers):  # recounted from the first choices
        first = trace.routing(layer)[0][:, 0].tolist()
        same = sum(a == b for a, b in zip(first[1:], first[:-1])) / (len(first) - 1)
        shares = [first.count(e) / len(first) for e in set(first)]
        assert rate.y[m] == pytest.approx(same) and chance.y[m] == pytest.approx(sum(q * q for q in shares))
        assert rate.customdata[m] == pytest.approx(same / sum(q * q for q in shares))


# ----- safety and look ----------------------------------------------------------------------------------
def token_figures(model, trace) -> dict[str, go.Figure]:
    corrupted, (target, contrast) = patching_pair(model, trace)
    return {
        "token_strip": plots.token_strip(trace, 1),
        "routing_across_layers": plots.routing_across_layers(trace, 2),
        "routing_confidence": plots.routing_confidence(trace),
        "top_tokens_per_expert": plots.top_tokens_per_expert(A.top_tokens_per_expert(trace, 1, n=len(trace))),
        "attention_pattern": plots.attention_pattern(trace.attention(1, 0), trace.token_texts),
        "attention_parts": plots.attention_parts(trace.attention(2, 3), trace.token_texts),
        "latent_norms": plots.latent_norms(trace),
        "logit_lens": plots.logit_lens(A.logit_lens(model, trace, top=2), trace.token_texts),
        "logit_attribution": plots.logit_attribution(A.logit_attribution(model, trace, 2)),
        "ablation_effects": plots.ablation_effects(A.ablation_effects(model, trace, 2)),
        "patching_heatmap": plots.patching_heatmap(
            A.activation_patching(model, trace, corrupted, target=target, contrast=contrast, layers=[1])
        ),
    }


def test_token_text_is_escaped_in_every_figure(byte_model, evil):
    for name, fig in token_figures(byte_model, evil).items():
        text = fig.to_json()
        assert "<img" not in text, name
        assert ESCAPED in text, name


def test_every_figure_shares_one_look(byte_model, trace):
    figures = token_figures(byte_model, trace)
    figures.update(
        utilization_heatmap=plots.utilization_heatmap(A.expert_utilization(trace)),
        coactivation_matrix=plots.coactivation_matrix(A.coactivation(trace, 1), 1),
        heads_overview=plots.heads_overview(A.head_entropy(trace), "entropy"),
        latent_spectrum=plots.latent_spectrum(trace),
        kv_cache_memory=plots.kv_cache_memory(trace.config),
        routing_sankey=plots.routing_sankey(A.routing_paths(trace)),
        same_expert_rate=plots.same_expert_rate(A.routing_paths(trace, top=2)),
    )
    for name, fig in figures.items():
        assert fig.layout.template == pio.templates["plotly_white"], name
        assert fig.layout.title.text and fig.layout.width == 900 and fig.layout.height <= 900, name
        if name not in ("top_tokens_per_expert", "token_strip", "routing_sankey"):  # no axes to title
            assert any(ax.title.text for ax in fig.select_xaxes()) and any(
                ax.title.text for ax in fig.select_yaxes()
            ), name
        assert all(t.hovertemplate for t in fig.data if t.type not in ("table", "sankey")), name


# ----- export -------------------------------------------------------------------------------------------
def test_save_html_embeds_plotly_js(tmp_path, trace):
    path = plots.save_html(plots.token_strip(trace, 1), tmp_path / "out" / "strip.html")
    text = path.read_text(encoding="utf-8")
    assert path.stat().st_size > 1_000_000  # plotly.js itself is in the file
    assert not re.search(r"<script[^>]*\bsrc=", text)  # nothing fetched (plotly.js mentions cdn.plot.ly in a default)
    assert "* plotly.js v" in text and "Plotly.newPlot" in text


def test_save_image_without_kaleido_says_what_to_install(tmp_path, monkeypatch, trace):
    fig = plots.latent_norms(trace)
    monkeypatch.setitem(sys.modules, "kaleido", None)  # import kaleido fails
    with pytest.raises(RuntimeError, match=r"pip install kaleido") as info:
        plots.save_image(fig, tmp_path / "norms.png")
    assert "Chrom" in str(info.value) and "save_html" in str(info.value)
    with pytest.raises(ValueError, match=r"\.png or \.svg"):
        plots.save_image(fig, tmp_path / "norms.jpg")


def test_save_image_without_a_browser_says_what_to_install(tmp_path, monkeypatch, trace):
    monkeypatch.setitem(sys.modules, "kaleido", types.ModuleType("kaleido"))

    def no_chrome(self, *args, **kwargs):
        raise RuntimeError("Kaleido requires Google Chrome to be installed.")

    monkeypatch.setattr(go.Figure, "to_image", no_chrome)
    (tmp_path / "norms.svg").write_text("<svg>the previous image</svg>")
    with pytest.raises(RuntimeError, match=r"pip install kaleido[\s\S]*Google Chrome"):
        plots.save_image(plots.latent_norms(trace), tmp_path / "norms.svg")
    assert [p.name for p in tmp_path.iterdir()] == ["norms.svg"]  # the old image stays whole, no leftover
    assert (tmp_path / "norms.svg").read_text() == "<svg>the previous image</svg>"


def test_save_image_writes_what_the_renderer_returned(tmp_path, monkeypatch, trace):
    monkeypatch.setitem(sys.modules, "kaleido", types.ModuleType("kaleido"))
    monkeypatch.setattr(go.Figure, "to_image", lambda self, format, scale: f"{format} at {scale}x".encode())
    path = plots.save_image(plots.latent_norms(trace), tmp_path / "a" / "norms.png", scale=3)
    assert path.read_bytes() == b"png at 3x" and [p.name for p in path.parent.iterdir()] == ["norms.png"]


def test_latent_spectrum_of_one_layer(trace):
    fig = plots.latent_spectrum(trace, [1])
    assert len(fig.data) == 1
    torch.testing.assert_close(torch.tensor(fig.data[0].y, dtype=torch.float32), A.latent_spectrum(trace, 1))
