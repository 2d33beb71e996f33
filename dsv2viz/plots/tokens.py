"""The text itself, each token coloured by the expert its router ranked first at one MoE layer.

This is the first view of what experts do: runs of one colour are stretches of text one expert owns
(code indentation, digits, a language), and a colour that recurs on the same word across the text is
an expert specialised in it. Prompt tokens are drawn in a lighter shade of their expert's colour,
generated ones in full colour after a black bar; hover shows each token's full top-k with weights.
"""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go

from ..traces import Trace
from ._layout import MONO, chars_that_fit, expert_colorscale, hover, style
from ._text import token_labels

PROMPT_LIGHTEN = 0.55  # prompt cells: the expert's colour this far towards white


def token_strip(trace: Trace, layer: int, *, per_row: int = 16) -> go.Figure:
    """The trace's tokens in rows of `per_row`, each cell coloured by its top-1 expert at MoE `layer`."""
    experts, weights = trace.routing(layer)
    S, K = experts.shape
    E = trace.config.n_routed_experts
    rows = math.ceil(S / per_row)
    full, short = token_labels(trace.token_texts), token_labels(trace.token_texts, chars_that_fit(per_row))
    fig = go.Figure()
    for part, span, lighten in (
        ("prompt", range(trace.prompt_len), PROMPT_LIGHTEN),
        ("generated", range(trace.prompt_len, S), 0.0),
    ):
        if not span:
            continue
        z = np.full((rows, per_row), np.nan)
        text = np.full((rows, per_row), "", dtype=object)
        info = np.full((rows, per_row, 3), "", dtype=object)
        for p in span:
            r, c = divmod(p, per_row)
            z[r, c] = int(experts[p, 0])
            text[r, c] = short[p]
            chosen = "<br>".join(f"  expert {int(e):>3}  weight {float(w):.3f}" for e, w in zip(experts[p], weights[p]))
            info[r, c] = (full[p], f"position {p}, {part}", chosen)
        fig.add_trace(
            go.Heatmap(
                z=z,
                text=text,
                texttemplate="%{text}",
                textfont={"family": MONO, "size": 11},
                customdata=info,
                hovertemplate=hover(
                    "%{customdata[0]}", "%{customdata[1]}", f"top-{K} experts at layer {layer}:", "%{customdata[2]}"
                ),
                colorscale=expert_colorscale(E, lighten),
                zmin=-0.5,
                zmax=E - 0.5,
                xgap=2,
                ygap=2,
                hoverongaps=False,
                name=part,
                showscale=False,
            )
        )
    if 0 < trace.prompt_len < S:  # a bar before the first generated token
        r, c = divmod(trace.prompt_len, per_row)
        fig.add_shape(type="line", x0=c - 0.5, x1=c - 0.5, y0=r - 0.5, y1=r + 0.5, line={"color": "#111", "width": 4})
    fig.update_xaxes(visible=False)
    fig.update_yaxes(
        autorange="reversed",
        tickmode="array",
        tickvals=list(range(rows)),
        ticktext=[f"pos {r * per_row}" for r in range(rows)],
        showgrid=False,
        zeroline=False,
    )
    return style(
        fig,
        f"Tokens by top-1 expert at layer {layer}",
        height=150 + 34 * rows,
        subtitle=f"Colour: the expert the router ranked first; one colour, one expert ({E} experts, top-{K}; "
        "hover for all).<br>Light cells: the prompt; full colour: generated tokens, from the black bar on.",
    )
