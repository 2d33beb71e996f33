"""Attention views: one head's pattern, the content and position parts of its scores, and all heads at a glance.

MLA splits each query-key score into a content part (q_nope through the shared latent) and a position
part (q_pe . k_pe, one roped key shared by all heads). :func:`attention_parts` shows both beside the
pattern on one diverging scale, so a reader sees whether a head's stripes (previous token, sinks) come
from position or from content. :func:`heads_overview` maps every recorded head's entropy or rope share
(:func:`dsv2viz.analysis.head_entropy`, :func:`dsv2viz.analysis.rope_share`) to pick heads worth a look.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .. import analysis
from ..traces import AttentionView, TraceError
from ._layout import colorbar, hover, row_axis, style, token_axis
from ._text import token_labels

PATTERN_SCALE = "Blues"
SCORE_SCALE = "RdBu_r"  # red: the part raises the score, blue: lowers it

#: How to title and colour the columns of analysis.head_entropy and analysis.rope_share; others get a generic look.
HEAD_COLUMNS = {
    "entropy": (
        "Mean attention entropy of each head (nats)",
        (
            "Low: each query looks at one token (a sink, the previous token, a copy source); "
            "high: it averages over its context."
        ),
        {"colorscale": "Blues", "zmin": 0},
    ),
    "rope_share": (
        "Position (rope) share of each head's attended scores",
        "1: the head attends by position alone; 0: by content alone (MLA's nope part through the latent).",
        {"colorscale": "RdBu_r", "zmin": 0, "zmax": 1, "zmid": 0.5},
    ),
}


def _cells(view: AttentionView, token_texts: Sequence[str]) -> tuple[list[int], np.ndarray]:
    """(query positions, per-cell [query position, query label, key position, key label]) for a view's (Q, S) grid.

    Hover names positions from here: on an axis with token tick labels, plotly's %{x} is the tick label.
    """
    S = view.pattern.shape[1]
    if len(token_texts) != S:
        raise ValueError(f"{len(token_texts)} token texts for a pattern over {S} keys: pass the trace's token_texts")
    labels = token_labels(token_texts)
    queries = view.query_pos.tolist()
    grid = np.empty((len(queries), S, 4), dtype=object)
    grid[..., 0] = np.array(queries)[:, None]
    grid[..., 1] = np.array([labels[q] for q in queries], dtype=object)[:, None]
    grid[..., 2] = np.arange(S)[None, :]
    grid[..., 3] = np.array(labels, dtype=object)[None, :]
    return queries, grid


def _heatmap(z: np.ndarray, queries: list[int], grid: np.ndarray, what: str, coloraxis: str) -> go.Heatmap:
    return go.Heatmap(
        z=z,
        x=list(range(z.shape[1])),
        y=queries,
        customdata=grid,
        coloraxis=coloraxis,
        hoverongaps=False,
        hovertemplate=hover(
            "query %{customdata[0]}: %{customdata[1]}", "key %{customdata[2]}: %{customdata[3]}", f"{what}: %{{z:.4f}}"
        ),
    )


def _axes(fig: go.Figure, token_texts: Sequence[str], queries: list[int], cols: int) -> None:
    """Keys along x in every panel, queries down y, both labelled with their tokens."""
    for col in range(1, cols + 1):
        fig.update_xaxes(token_axis(token_texts, range(len(token_texts)), "key"), row=1, col=col)
    fig.update_yaxes(token_axis([token_texts[q] for q in queries], queries, "query"), row=1, col=1)
    fig.update_yaxes(autorange="reversed", showgrid=False)


def attention_pattern(view: AttentionView, token_texts: Sequence[str]) -> go.Figure:
    """Query x key heat map of one head's attention weights, tokens on both axes."""
    queries, grid = _cells(view, token_texts)
    fig = make_subplots(rows=1, cols=1)
    fig.add_trace(_heatmap(view.pattern.float().numpy(), queries, grid, "attention", "coloraxis"))
    fig.update_layout(coloraxis={"colorscale": PATTERN_SCALE, "cmin": 0, "colorbar": colorbar("attention weight")})
    _axes(fig, token_texts, queries, 1)
    return style(
        fig,
        f"Attention of layer {view.layer}, head {view.head}",
        height=min(900, 380 + 12 * len(token_texts)),
        subtitle="Row: a query token; column: the key tokens it attends to (each row sums to 1).",
    )


def attention_parts(view: AttentionView, token_texts: Sequence[str]) -> go.Figure:
    """Pattern, content (nope) and position (rope) score parts of one head, the parts on one diverging scale.

    Score parts are shown on causal cells only (key <= query); nope + rope is the pre-softmax score.
    """
    if view.scores_nope is None or view.scores_rope is None:
        raise TraceError(
            f"layer {view.layer}'s queries were not recorded: the score parts need Recording(queries=True)"
        )
    queries, grid = _cells(view, token_texts)
    causal = torch.arange(len(token_texts))[None, :] <= view.query_pos[:, None]
    nope, rope = (
        np.where(causal.numpy(), part.float().numpy(), np.nan) for part in (view.scores_nope, view.scores_rope)
    )
    limit = float(np.nanmax(np.abs(np.concatenate([nope, rope]))))
    fig = make_subplots(
        rows=1,
        cols=3,
        shared_yaxes=True,
        horizontal_spacing=0.1,  # room for the pattern's colour bar and its tick labels between the panels
        subplot_titles=("pattern (softmax)", "content score (nope)", "position score (rope)"),
    )
    for col, (z, what, axis) in enumerate(
        (
            (view.pattern.float().numpy(), "attention", "coloraxis"),
            (nope, "content (nope) score", "coloraxis2"),
            (rope, "position (rope) score", "coloraxis2"),
        ),
        start=1,
    ):
        fig.add_trace(_heatmap(z, queries, grid, what, axis), row=1, col=col)
    fig.update_layout(
        coloraxis={
            "colorscale": PATTERN_SCALE,
            "cmin": 0,
            "colorbar": colorbar("weight", x=fig.layout.xaxis.domain[1] + 0.006),
        },
        coloraxis2={"colorscale": SCORE_SCALE, "cmin": -limit, "cmax": limit, "colorbar": colorbar("score part")},
    )
    _axes(fig, token_texts, queries, 3)
    return style(
        fig,
        f"Attention of layer {view.layer}, head {view.head}: pattern and score parts",
        height=min(900, 400 + 10 * len(token_texts)),
        subtitle="Scores = content + position; red raises a score, blue lowers it (same scale in both). "
        "Blank: keys after the query.",
    )


def heads_overview(frame: pd.DataFrame, column: str) -> go.Figure:
    """Layers x heads heat map of one column of :func:`analysis.head_entropy` or :func:`analysis.rope_share`."""
    z = analysis.head_matrix(frame, column).numpy()
    layers, heads = sorted(frame.layer.unique()), sorted(frame["head"].unique())
    title, subtitle, colors = HEAD_COLUMNS.get(column, (f"{column} of each head", "", {"colorscale": "Viridis"}))
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(len(heads))),
            y=list(range(len(layers))),
            texttemplate="%{z:.2f}",
            textfont={"size": 10},
            customdata=np.dstack(np.meshgrid(heads, layers)),
            hovertemplate=hover("layer %{customdata[1]}, head %{customdata[0]}", f"{column}: %{{z:.4f}}"),
            hoverongaps=False,
            xgap=1,
            ygap=1,
            colorbar=colorbar(column),
            **colors,
        )
    )
    fig.update_xaxes(row_axis([str(h) for h in heads], "head", top_down=False))
    fig.update_yaxes(row_axis([str(lay) for lay in layers], "layer"))
    return style(fig, title, height=min(900, 220 + 26 * len(layers)), subtitle=subtitle)
