"""Latent KV views: how much of its room the cached latent uses, which tokens write large entries, and
what the latent cache saves in memory.

* :func:`latent_spectrum`: singular values of each layer's c_kv over the trace's tokens (log scale),
  with the effective rank in the legend; a fast-falling spectrum means the latent could be smaller.
* :func:`latent_norms`: the norm of every token's cached latent per layer; tokens that write unusually
  large entries (often the first token, a sink) stand out.
* :func:`kv_cache_memory`: bytes of this model's latent cache against a standard multi-head K/V cache of
  the same heads, over context length: the memory argument for MLA.
"""

from __future__ import annotations

import numpy as np
import plotly.colors as pc
import plotly.graph_objects as go

from .. import analysis
from ..config import DeepseekV2Config
from ..traces import Trace
from ._layout import bytes_label, colorbar, hover, mark_generation_start, row_axis, style, token_axis
from ._text import token_labels


def latent_spectrum(trace: Trace, layers: list[int] | None = None) -> go.Figure:
    """Singular values of the uncentered c_kv (tokens x R) per layer, log y; legend: each layer's effective rank."""
    layers = list(range(trace.config.num_hidden_layers)) if layers is None else list(layers)
    # sample_colorscale needs two samples or more; one layer gets the scale's start colour
    colors = pc.sample_colorscale("Viridis", max(2, len(layers)), low=0.0, high=0.9)[: len(layers)]
    fig = go.Figure()
    for layer, color in zip(layers, colors):
        s = analysis.latent_spectrum(trace, layer)
        rank = analysis.effective_rank(s)
        fig.add_trace(
            go.Scatter(
                x=np.arange(1, len(s) + 1),
                y=s.numpy(),
                mode="lines",
                line={"color": color, "width": 1.8},
                name=f"layer {layer}: eff. rank {rank:.1f}",
                hovertemplate=hover(f"layer {layer} (effective rank {rank:.1f})", "singular value %{x}: %{y:.4g}"),
            )
        )
    fig.update_xaxes(title="singular value index (1 = largest)")
    fig.update_yaxes(title="singular value", type="log")
    R = trace.config.kv_lora_rank
    return style(
        fig,
        f"Spectrum of the cached latent c_kv ({len(trace)} tokens, R = {R})",
        height=520,
        subtitle="Effective rank: exp of the entropy of the normalised singular values; "
        f"how many of the latent's {R} directions the tokens spread over.",
    )


def latent_norms(trace: Trace) -> go.Figure:
    """Layer x position heat map of each token's cached latent norm, tokens on the x axis."""
    norms = analysis.latent_norms(trace).numpy()
    L, S = norms.shape
    tokens = np.array(list(enumerate(token_labels(trace.token_texts))), dtype=object)
    fig = go.Figure(
        go.Heatmap(
            z=norms,
            x=list(range(S)),
            y=list(range(L)),
            customdata=np.broadcast_to(tokens, (L, S, 2)),
            hovertemplate=hover("layer %{y}, position %{customdata[0]}: %{customdata[1]}", "‖c_kv‖ = %{z:.4g}"),
            colorscale="Viridis",
            colorbar=colorbar("‖c_kv‖"),
        )
    )
    fig.update_xaxes(token_axis(trace.token_texts, range(S), "token"))
    fig.update_yaxes(row_axis([str(layer) for layer in range(L)], "layer"))
    mark_generation_start(fig, trace.prompt_len, S)
    return style(
        fig,
        "Norm of each token's cached latent c_kv",
        height=min(900, 330 + 20 * L),
        subtitle="Which tokens write large entries into the latent KV cache, layer by layer.<br>"
        "Red dotted line: generation starts.",
    )


def kv_cache_memory(config: DeepseekV2Config, max_tokens: int = 32768) -> go.Figure:
    """Bytes of the latent cache against a standard multi-head K/V cache of the same heads, bf16, 1..max_tokens."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens={max_tokens} must be at least 1")
    tokens = np.unique(np.append(np.geomspace(1, max_tokens, 80).round().astype(np.int64), max_tokens))
    latent, mha = config.kv_cache_bytes_per_token(2), config.mha_cache_bytes_per_token(2)
    fig = go.Figure()
    for name, per_token, dash in (
        (f"standard multi-head K/V cache ({mha:,} B/token)", mha, "dash"),
        (f"MLA latent cache ({latent:,} B/token)", latent, "solid"),
    ):
        total = tokens * per_token
        fig.add_trace(
            go.Scatter(
                x=tokens,
                y=total,
                mode="lines",
                name=name,
                line={"width": 2.5, "dash": dash},
                customdata=[bytes_label(b) for b in total],
                hovertemplate=hover(name, "%{x:,} tokens: %{customdata}"),
            )
        )
    ticks = [4**i for i in range(21) if tokens[0] * latent / 4 <= 4**i <= tokens[-1] * mha * 4]
    fig.update_xaxes(title="context length (tokens)", type="log")
    fig.update_yaxes(
        title="cache size (bf16, all layers)",
        type="log",
        tickmode="array",
        tickvals=ticks,
        ticktext=[bytes_label(t) for t in ticks],
    )
    fig.update_layout(legend={"x": 0.01, "y": 0.99, "bgcolor": "rgba(255,255,255,0.8)"})
    return style(
        fig,
        f"KV-cache memory: the latent cache is {mha / latent:.1f}× smaller",
        height=480,
        subtitle=f"Per token: {latent:,} bytes of latent + roped key against {mha:,} bytes of per-head "
        f"keys and values ({config.num_hidden_layers} layers, bf16).<br>At {max_tokens:,} tokens: "
        f"{bytes_label(latent * max_tokens)} against {bytes_label(mha * max_tokens)}.",
    )
