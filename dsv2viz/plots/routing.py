"""Routing views: where one token goes layer by layer, how evenly experts are loaded, which experts work
together, how sure the router is, and what each expert is given.

* :func:`routing_across_layers`: one token's experts and weights at every MoE layer; shows whether a
  token keeps to a family of experts through depth and how much weight its first choice carries.
* :func:`utilization_heatmap`: tokens per expert and layer with each layer's load-balance figures
  (coefficient of variation, busiest over mean); idle and overloaded experts stand out.
* :func:`coactivation_matrix`: how often two experts serve the same token; teams show off the diagonal.
* :func:`routing_confidence`: the gap between a token's K-th and (K+1)-th expert and the entropy of its
  routing, by layer and position, with near-ties (choices a bf16 rounding could flip) marked; read no
  meaning into those.
* :func:`top_tokens_per_expert`: each expert's most frequent tokens, the first look at specialisation.

All figures draw results of :mod:`dsv2viz.analysis` and the trace's recorded routing.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .. import analysis
from ..analysis import ExpertUtilization
from ..traces import Trace
from ._layout import MONO, colorbar, expert_color, hover, mark_generation_start, row_axis, style, token_axis
from ._text import token_label, token_labels


def routing_across_layers(trace: Trace, position: int) -> go.Figure:
    """Experts x MoE layers for the token at `position` (negative counts from the end); colour: routing weight."""
    position = range(len(trace))[position]
    layers, E = trace.moe_layers, trace.config.n_routed_experts
    K = trace.config.num_experts_per_tok
    z = np.full((E, len(layers)), np.nan)
    rank = np.zeros((E, len(layers)), dtype=int)
    for col, layer in enumerate(layers):
        experts, weights = trace.routing(layer)
        for k, (e, w) in enumerate(zip(experts[position].tolist(), weights[position].tolist())):
            z[e, col], rank[e, col] = w, k + 1
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=list(range(len(layers))),
            y=list(range(E)),
            customdata=np.dstack([np.broadcast_to(layers, z.shape), rank]),
            hovertemplate=hover(
                "layer %{customdata[0]}, expert %{y}", f"weight %{{z:.4f}} (choice %{{customdata[1]}} of {K})"
            ),
            colorscale="Viridis",
            zmin=0,
            hoverongaps=False,
            xgap=1,
            ygap=1,
            colorbar=colorbar("routing weight"),
        )
    )
    fig.update_xaxes(
        title="MoE layer", tickmode="array", tickvals=list(range(len(layers))), ticktext=[str(lay) for lay in layers]
    )
    fig.update_yaxes(title="expert", autorange="reversed", showgrid=False, zeroline=False)
    part = "prompt" if position < trace.prompt_len else "generated"
    label = token_label(trace.token_texts[position])
    return style(
        fig,
        f"Routing of “{label}” (position {position}, {part}) across MoE layers",
        height=min(900, max(380, 170 + 11 * E)),
        subtitle=f"Each column holds the token's {K} chosen experts at one layer; colour: their routing weight.",
    )


def utilization_heatmap(util: ExpertUtilization) -> go.Figure:
    """Layer x expert token counts, beside each layer's load-balance CV and busiest-over-mean ratio."""
    M, E = util.counts.shape
    fig = make_subplots(rows=1, cols=2, shared_yaxes=True, column_widths=[0.78, 0.22], horizontal_spacing=0.1)
    layers = [f"layer {lay}" for lay in util.layers]
    fig.add_trace(
        go.Heatmap(
            z=util.counts.numpy(),
            x=list(range(E)),
            y=list(range(M)),
            customdata=np.dstack(
                [np.broadcast_to(np.array(util.layers)[:, None], (M, E)), 100 * util.fractions.numpy()]
            ),
            hovertemplate=hover(
                "layer %{customdata[0]}, expert %{x}",
                f"%{{z}} tokens: %{{customdata[1]:.1f}}% of the {util.tokens} tokens",
            ),
            colorscale="Blues",
            zmin=0,
            xgap=1,
            ygap=1,
            colorbar=colorbar("tokens", x=fig.layout.xaxis.domain[1] + 0.005, length=0.9),
        ),
        row=1,
        col=1,
    )
    for name, values, symbol in (
        ("CV of the load (0: even)", util.cv, "circle"),
        ("busiest / mean load", util.max_over_mean, "diamond"),
    ):
        fig.add_trace(
            go.Scatter(
                x=values.numpy(),
                y=list(range(M)),
                mode="markers+lines",
                name=name,
                marker={"symbol": symbol, "size": 8},
                customdata=util.layers,
                hovertemplate=hover("layer %{customdata}", name + ": %{x:.2f}"),
            ),
            row=1,
            col=2,
        )
    fig.update_xaxes(title="expert", row=1, col=1, showgrid=False)
    fig.update_yaxes(row_axis(layers, "MoE layer"), row=1, col=1)
    fig.update_xaxes(title="load balance", row=1, col=2, rangemode="tozero")
    fig.update_layout(
        legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.0, "yanchor": "bottom", "font": {"size": 11}}
    )
    return style(
        fig,
        f"Expert utilization over {util.tokens} tokens",
        height=min(900, 260 + 24 * M),
        subtitle="Left: tokens each expert received (all top-k slots). Right: each layer's load balance;<br>"
        "an even router has CV 0 and busiest/mean 1.",
    )


def coactivation_matrix(matrix: torch.Tensor, layer: int) -> go.Figure:
    """Expert x expert token counts from :func:`dsv2viz.analysis.coactivation`; the diagonal is each expert's count."""
    counts = matrix.numpy()
    E = len(counts)
    off_diagonal = counts[~np.eye(E, dtype=bool)]
    pairs = [
        [
            (f"expert {a}", "tokens routed to it") if a == b else (f"experts {a} and {b}", "tokens routed to both")
            for b in range(E)
        ]
        for a in range(E)
    ]
    fig = go.Figure(
        go.Heatmap(
            z=counts,
            x=list(range(E)),
            y=list(range(E)),
            customdata=np.array(pairs, dtype=object),
            hovertemplate=hover("%{customdata[0]}", "%{z} %{customdata[1]}"),
            colorscale="Blues",
            zmin=0,
            zmax=max(1, int(off_diagonal.max(initial=0))),
            xgap=1,
            ygap=1,
            colorbar=colorbar("tokens"),
        )
    )
    fig.update_xaxes(title="expert", showgrid=False, constrain="domain")
    fig.update_yaxes(title="expert", autorange="reversed", scaleanchor="x", showgrid=False, constrain="domain")
    return style(
        fig,
        f"Expert co-activation at layer {layer}",
        height=780,
        subtitle="Cell (i, j): tokens that had both experts among their top-k. The diagonal holds each "
        "expert's own count; the colour scale stops at the largest pair.",
    )


def routing_confidence(trace: Trace) -> go.Figure:
    """Top-k margin (with near-ties marked) and routing entropy by MoE layer and position.

    With ``router_probs`` recorded: the K-th minus (K+1)-th router probability and the entropy of the full
    router distribution. Without: the entropy of each token's top-k weights only.
    """
    K, E = trace.config.num_experts_per_tok, trace.config.n_routed_experts
    full = trace.has("router_probs")
    if full:
        panels = [
            (
                f"top-k margin: probability of choice {K} minus choice {K + 1}",
                analysis.topk_margin(trace),
                "Viridis",
                "margin",
            ),
            (
                f"entropy of the router distribution (nats, at most ln {E} = {math.log(E):.2f})",
                analysis.routing_entropy(trace),
                "Blues",
                "entropy",
            ),
        ]
        subtitle = (
            "Small margin: a tiny change would swap an expert; ✕ near-ties under bf16 rounding, choices "
            "rounding could flip.<br>Red dotted line: generation starts."
        )
    else:
        panels = [
            (
                f"entropy of the top-{K} weights (nats, at most ln {K} = {math.log(K):.2f})",
                analysis.topk_weight_entropy(trace),
                "Blues",
                "entropy",
            )
        ]
        subtitle = (
            f"Low: one expert carries the token. Margins and near-ties need {trace.missing('router_probs')}.<br>"
            "Red dotted line: generation starts."
        )
    layers, S = trace.moe_layers, len(trace)
    fig = make_subplots(
        rows=len(panels),
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.1,
        subplot_titles=[title for title, *_ in panels],
    )
    tokens = np.broadcast_to(
        np.array(list(enumerate(token_labels(trace.token_texts))), dtype=object), (len(layers), S, 2)
    )
    for row, (_, values, scale, name) in enumerate(panels, start=1):
        suffix = str(row) if row > 1 else ""
        domain = fig.layout[f"yaxis{suffix}"].domain
        fig.add_trace(
            go.Heatmap(
                z=values.numpy(),
                x=list(range(S)),
                y=list(range(len(layers))),
                customdata=tokens,
                hovertemplate=hover("position %{customdata[0]}: %{customdata[1]}", f"{name}: %{{z:.4g}}"),
                coloraxis=f"coloraxis{suffix}",
            ),
            row=row,
            col=1,
        )
        bar = colorbar(name, y=sum(domain) / 2, length=domain[1] - domain[0])
        fig.update_layout({f"coloraxis{suffix}": {"colorscale": scale, "colorbar": bar}})
        fig.update_yaxes(row_axis([str(lay) for lay in layers], "MoE layer"), row=row, col=1)
    if full:
        ties = analysis.near_ties(trace)
        fig.add_trace(
            go.Scatter(
                x=ties.position,
                y=[layers.index(lay) for lay in ties.layer],
                mode="markers",
                name="near-tie",
                marker={"symbol": "x", "size": 11, "color": "white", "line": {"width": 1.5, "color": "#111"}},
                customdata=np.stack(
                    [token_labels(ties.token), ties.kth_expert, ties.next_expert, ties.layer, ties.position], axis=-1
                ),
                hovertemplate=hover(
                    "near-tie at layer %{customdata[3]}, position %{customdata[4]}: %{customdata[0]}",
                    f"expert %{{customdata[1]}} (choice {K}) vs runner-up %{{customdata[2]}}",
                    "margin below the bf16 rounding of the K-th probability",
                ),
            ),
            row=1,
            col=1,
        )
    fig.update_xaxes(token_axis(trace.token_texts, range(S), "token"), row=len(panels), col=1)
    mark_generation_start(fig, trace.prompt_len, S)
    fig.update_layout(showlegend=False)
    return style(
        fig,
        "Routing confidence by layer and position",
        height=min(900, 250 + len(panels) * (90 + 20 * len(layers))),
        subtitle=subtitle,
    )


#: Height of one expert's row in the top-tokens table: two 12 px lines (token, share) and the cell padding.
TABLE_ROW_PX = 46


def top_tokens_per_expert(frame: pd.DataFrame, *, experts: list[int] | None = None) -> go.Figure:
    """A table, one row per expert, of its top tokens and their shares.

    `frame` is :func:`dsv2viz.analysis.top_tokens_per_expert`'s table; `experts` picks rows (default: all, ascending).
    """
    chosen = sorted(frame.expert.unique()) if experts is None else list(experts)
    groups = {e: frame[frame.expert == e] for e in chosen}
    n = max((len(g) for g in groups.values()), default=0)
    totals = [round(g["count"].iloc[0] / g["share"].iloc[0]) if len(g) else 0 for g in groups.values()]
    ranks = [
        [f"{label}<br>{share:.0%}" for label, share in zip(token_labels(g.token), g.share)] + [""] * (n - len(g))
        for g in groups.values()
    ]
    fig = go.Figure(
        go.Table(
            columnwidth=[60, 70] + [100] * n,
            header={
                "values": ["expert", "routed"] + [f"#{i + 1}" for i in range(n)],
                "fill_color": "#e8ecf2",
                "font": {"size": 12},
                "align": "left",
            },
            cells={
                "values": [[str(e) for e in chosen], totals] + [list(col) for col in zip(*ranks)],
                "fill_color": [[expert_color(e, 0.6) for e in chosen]] + ["white"] * (n + 1),
                "align": "left",
                "font": {"family": MONO, "size": 12},
                "height": TABLE_ROW_PX,
            },
        )
    )
    # sized to show every row (a two-line cell renders 46 px tall; 40 px per row hid the last ones),
    # with a small bottom margin since a table has no x axis below it: 16 experts fit in 900 px
    style(
        fig,
        "Top tokens per expert",
        height=min(900, 150 + TABLE_ROW_PX * len(chosen)),
        subtitle="Each expert's most frequent tokens and their share of all tokens routed to it (routed: that total).",
    )
    return fig.update_layout(margin_b=20)
