"""Attribution views: which parts of the model wrote a token, what removing them changes, where two prompts'
difference lives, and how routing flows from layer to layer.

* :func:`logit_attribution`: the largest direct contributions to one logit as signed horizontal bars (the
  rest summed in one grey bar, so the bars add up to the logit).
* :func:`ablation_effects`: the change in the target's log-probability when each part is removed, the
  gradient estimates of :func:`dsv2viz.analysis.attribution_patching` beside them when given.
* :func:`patching_heatmap`: layers x positions, the share of the clean logit difference one patched
  activation recovers.
* :func:`routing_sankey`: the largest flows of tokens between consecutive MoE layers' experts.
* :func:`same_expert_rate`: per MoE layer, how often a token keeps the previous token's expert, against chance.

Routed experts keep the colour they have in every figure (:func:`~dsv2viz.plots._layout.expert_color`);
heads and the other parts are drawn in neutral greys.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ..analysis import AblationEffects, ActivationPatching, AttributionPatching, LogitAttribution, RoutingPaths
from ._layout import colorbar, expert_color, hover, row_axis, style, token_axis
from ._text import token_label

#: Colours of the parts that are not routed experts: neutral, so the experts' colours stand out.
KIND_COLORS = {
    "embedding": "#5f6368",
    "head": "#9aa0a6",
    "bias": "#c8cbcf",
    "shared": "#3c4043",
    "dense": "#7a7f85",
}
#: The bar that sums every part not shown.
REST_COLOR = "#e3e5e8"
BAR_PX = 22  # height of one bar's row


def part_color(kind: str, index: int) -> str:
    """A part's colour: its expert colour for a routed expert, else its kind's neutral grey."""
    return expert_color(index) if kind == "expert" else KIND_COLORS[kind]


def _bar_rows(frame: pd.DataFrame, column: str, top: int) -> pd.DataFrame:
    """The `top` rows of a table sorted largest |column| first, plus one row summing the others."""
    if not isinstance(top, int) or isinstance(top, bool) or top < 1:
        raise ValueError(f"top={top!r} must be a positive integer")
    shown = frame.head(top).copy()
    shown["color"] = [part_color(k, i) for k, i in zip(shown["kind"], shown["index"])]
    shown["label"] = shown["component"]
    rest = frame.iloc[top:]
    if len(rest):
        summed = {column: rest[column].sum(), "kind": "rest", "layer": -1, "index": -1, "weight": np.nan}
        summed.update(color=REST_COLOR, label=f"{len(rest)} others", component=f"the {len(rest)} other parts")
        shown = pd.concat([shown, pd.DataFrame([summed])], ignore_index=True)
    return shown


def _weight_text(weights: pd.Series) -> list[str]:
    return ["" if np.isnan(w) else f"router weight {w:.4f}" for w in weights]


def _bar_figure(rows: pd.DataFrame, column: str, value_name: str) -> go.Figure:
    fig = go.Figure(
        go.Bar(
            x=rows[column].to_numpy(dtype=float),
            y=list(range(len(rows))),
            orientation="h",
            marker={"color": list(rows["color"]), "line": {"color": "#444", "width": 0.5}},
            customdata=np.stack([rows["component"], rows["kind"], _weight_text(rows["weight"])], axis=-1),
            hovertemplate=hover(
                "%{customdata[0]} (%{customdata[1]})", f"{value_name}: %{{x:+.4f}}", "%{customdata[2]}"
            ),
            name=value_name,
        )
    )
    fig.update_yaxes(row_axis(list(rows["label"]), "part"))
    fig.add_vline(x=0, line={"color": "#444", "width": 1})
    return fig


def logit_attribution(attr: LogitAttribution, *, top: int = 20) -> go.Figure:
    """The `top` largest direct contributions to the logit of :func:`dsv2viz.analysis.logit_attribution`."""
    rows = _bar_rows(attr.frame, "contribution", top)
    what = f"logit({token_label(attr.target_text)})"
    if attr.contrast is not None:
        what += f" − logit({token_label(attr.contrast_text)})"
    fig = _bar_figure(rows, "contribution", "contribution")
    fig.update_xaxes(title=f"direct contribution to {what}", zeroline=False)
    read = token_label(attr.token_text)
    return style(
        fig,
        f"What wrote {what} after “{read}” (position {attr.position})",
        height=min(900, 190 + BAR_PX * len(rows)),
        subtitle=f"Each part's output read through lm_head with the final norm's scale frozen; all "
        f"{len(attr.frame)} parts sum to {attr.logit:.4f}.<br>Experts in their expert colour, heads and "
        "other parts in grey; the last bar sums the parts not shown.",
    )


def ablation_effects(
    effects: AblationEffects, estimates: AttributionPatching | None = None, *, top: int = 20
) -> go.Figure:
    """Bars: the change in the target's log-probability when each part is removed (largest first); with
    `estimates` (:func:`dsv2viz.analysis.attribution_patching` whose metric is this position's target), a
    ◆ marker on each bar at its gradient estimate."""
    rows = _bar_rows(effects.frame, "effect", top)
    fig = _bar_figure(rows, "effect", "change in log-probability")
    if estimates is not None:
        if estimates.positions != [effects.position] or estimates.targets != [effects.target]:
            raise ValueError(
                "these estimates are for another metric: compute them with attribution_patching(model, tokens, "
                f"[{effects.position}], target={effects.target})"
            )
        guess = estimates.at(effects.position).set_index("component")["estimate"]
        shown = rows[rows["kind"] != "rest"]
        fig.add_trace(
            go.Scatter(
                x=guess.reindex(shown["component"]).to_numpy(dtype=float),
                y=list(range(len(shown))),
                mode="markers",
                marker={"symbol": "diamond", "size": 9, "color": "#111"},
                name="gradient estimate",
                customdata=shown["component"],
                hovertemplate=hover("%{customdata}", "gradient estimate: %{x:+.4f}"),
            )
        )
        fig.update_layout(
            showlegend=True, legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.0, "yanchor": "bottom"}
        )
    target = token_label(effects.target_text)
    fig.update_xaxes(title=f"change in log p({target}) when the part is removed", zeroline=False)
    return style(
        fig,
        f"What removing each part does to p({target}) after “{token_label(effects.token_text)}” "
        f"(position {effects.position})",
        height=min(900, 190 + BAR_PX * len(rows)),
        subtitle=f"Exact reruns: each routed expert removed from routing (the next-best takes its slot), each "
        f"head, the shared experts<br>or the dense MLP zeroed, at this position only. Unablated: log p = "
        f"{effects.clean_logprob:.4f}." + (" ◆: gradient estimate." if estimates is not None else ""),
    )


PATCH_TITLES = {
    "resid_pre": "the residual stream entering the layer",
    "c_kv": "the cached latent c_kv",
    "routing": "the routing decision (the clean top-k experts)",
}


def patching_heatmap(result: ActivationPatching) -> go.Figure:
    """Layers x positions: the part of the clean logit difference recovered by patching one activation."""
    z = result.recovered.numpy()
    clean = [result.clean_texts[p] for p in result.positions]
    corrupted = [result.corrupted_texts[p] for p in result.positions]
    cols = list(range(len(result.positions)))
    cell = np.empty((*z.shape, 4), dtype=object)
    cell[..., 0] = np.array(result.layers)[:, None]
    cell[..., 1] = np.array(
        [
            f"{p}: {token_label(a)}" + ("" if a == b else f" (corrupted: {token_label(b)})")
            for p, a, b in zip(result.positions, clean, corrupted)
        ],
        dtype=object,
    )[None, :]
    cell[..., 2] = result.patched.numpy()
    cell[..., 3] = 100 * z
    bound = max(1.0, float(np.nanmax(np.abs(z))) if z.size else 1.0)
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=cols,
            y=list(range(len(result.layers))),
            customdata=cell,
            colorscale="RdBu",
            zmid=0,
            zmin=-bound,
            zmax=bound,
            xgap=1,
            ygap=1,
            hovertemplate=hover(
                "layer %{customdata[0]}, position %{customdata[1]}",
                "logit difference patched: %{customdata[2]:.4f}",
                "recovered: %{customdata[3]:.1f}%",
            ),
            colorbar=colorbar("recovered"),
        )
    )
    fig.update_xaxes(token_axis(clean, cols, "patched position (clean→corrupted where they differ)", others=corrupted))
    fig.update_yaxes(row_axis([str(layer) for layer in result.layers], "layer", top_down=False))
    target, contrast = token_label(result.target_text), token_label(result.contrast_text)
    return style(
        fig,
        f"Activation patching of {PATCH_TITLES[result.kind]}",
        height=min(900, 260 + 28 * len(result.layers)),
        subtitle=f"Cell: (patched − corrupted) / (clean − corrupted) of logit({target}) − logit({contrast}) after "
        f"position {result.readout}: 1 recovers the clean run, 0 changes nothing.<br>Clean: "
        f"{result.clean:.4f}, corrupted: {result.corrupted:.4f}; one activation patched per cell from the clean run.",
    )


def routing_sankey(paths: RoutingPaths, *, n: int = 40) -> go.Figure:
    """The `n` largest flows of tokens between consecutive MoE layers' experts, from
    :func:`dsv2viz.analysis.routing_paths`; node colour: the expert's colour."""
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r} must be a positive integer")
    flows = paths.flows(n)
    ends = pd.concat(
        [
            flows[["from_layer", "from_expert"]].set_axis(["layer", "expert"], axis=1),
            flows[["to_layer", "to_expert"]].set_axis(["layer", "expert"], axis=1),
        ]
    )
    nodes = sorted(set(zip(ends["layer"].tolist(), ends["expert"].tolist())))
    node_id = {node: i for i, node in enumerate(nodes)}
    column = {layer: i for i, layer in enumerate(paths.layers)}
    per_layer = pd.Series([layer for layer, _ in nodes]).value_counts().to_dict()
    row = {node: sum(1 for other in nodes[:i] if other[0] == node[0]) for i, node in enumerate(nodes)}
    last = max(1, len(paths.layers) - 1)
    counted = "first expert" if paths.top == 1 else f"first {paths.top} experts (each pair once)"
    fig = go.Figure(
        go.Sankey(
            arrangement="snap",
            node={
                "label": [f"L{layer} E{e}" for layer, e in nodes],
                "color": [expert_color(e) for _, e in nodes],
                "x": [0.01 + 0.98 * column[layer] / last for layer, _ in nodes],
                "y": [(row[node] + 0.5) / per_layer[node[0]] for node in nodes],  # experts in id order
                "pad": 6,
                "thickness": 14,
                "line": {"color": "#444", "width": 0.5},
                "customdata": [[layer, e] for layer, e in nodes],
                "hovertemplate": hover("layer %{customdata[0]}, expert %{customdata[1]}", "%{value} tokens shown"),
            },
            link={
                "source": [node_id[(a, e)] for a, e in zip(flows["from_layer"], flows["from_expert"])],
                "target": [node_id[(b, e)] for b, e in zip(flows["to_layer"], flows["to_expert"])],
                "value": flows["count"].tolist(),
                "color": [expert_color(e, 0.55) for e in flows["from_expert"]],
                "customdata": np.stack(
                    [
                        flows["from_layer"],
                        flows["from_expert"],
                        flows["to_layer"],
                        flows["to_expert"],
                        100 * flows["share"],
                    ],
                    axis=-1,
                )
                if len(flows)
                else np.empty((0, 5)),
                "hovertemplate": hover(
                    "layer %{customdata[0]} expert %{customdata[1]} → layer %{customdata[2]} expert %{customdata[3]}",
                    "%{value} tokens: %{customdata[4]:.1f}% of this layer pair's flows",
                ),
            },
        )
    )
    total = int(paths.transitions.gt(0).sum())
    return style(
        fig,
        f"Routing paths: the {len(flows)} largest flows between consecutive MoE layers",
        height=min(900, max(420, 200 + 26 * max(per_layer.values(), default=0))),
        subtitle=f"Each link: tokens whose {counted} at one layer led to an expert at the next; "
        f"{len(flows)} of {total} distinct flows over {paths.tokens} tokens.<br>Node colour: the expert's colour "
        "everywhere else; columns are the MoE layers.",
    )


def same_expert_rate(paths: RoutingPaths) -> go.Figure:
    """Per MoE layer: how often a token shares its expert(s) with the token before it, beside the chance of
    two independent tokens with that layer's own routing (:func:`dsv2viz.analysis.routing_paths`)."""
    frame = paths.to_frame()
    layers = [str(layer) for layer in frame["layer"]]
    counted = "first expert" if paths.top == 1 else f"first {paths.top} experts (the share in common)"
    fig = go.Figure()
    for column, name, color in (("same_rate", "previous token", "#1f77b4"), ("chance", "chance", "#c8cbcf")):
        fig.add_bar(
            x=layers,
            y=frame[column].to_numpy(dtype=float),
            name=name,
            marker_color=color,
            customdata=frame["ratio"].to_numpy(dtype=float),
            hovertemplate=hover(f"layer %{{x}}: {name}", "%{y:.3f} (rate / chance: %{customdata:.2f})"),
        )
    fig.update_xaxes(title="MoE layer", type="category")
    fig.update_yaxes(title=f"same {counted} as the previous token", rangemode="tozero")
    fig.update_layout(
        barmode="group", legend={"orientation": "h", "x": 1, "xanchor": "right", "y": 1.0, "yanchor": "bottom"}
    )
    return style(
        fig,
        "Same expert as the previous token, against chance",
        height=380,
        subtitle=f"Over {paths.pairs} consecutive token pairs of {paths.tokens} tokens; chance: two independent "
        "tokens routed<br>like this layer's tokens (Σ share²). Above chance: routing follows the text locally.",
    )
