"""The logit lens as a picture: what the model would predict after each layer, at each position.

Each cell is the likeliest next token read off the residual stream after one layer (rows, the
embedding at the bottom) at one position (columns, labelled with the token read there), coloured by its
probability; bold where it is the token that actually came next. Reading a column upwards shows at
which depth the prediction forms and which layers change it; hover lists the top-k.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from ._layout import MONO, chars_that_fit, colorbar, hover, row_axis, style, token_axis
from ._text import token_label, token_labels


def logit_lens(frame: pd.DataFrame, token_texts: Sequence[str], token_ids: Sequence[int] | None = None) -> go.Figure:
    """Layers x positions heat map of the top-1 probability from :func:`dsv2viz.analysis.logit_lens`.

    `token_texts` label the positions (a trace's ``token_texts``). A guess is bold where its id is the
    id that came next, given `token_ids` (a trace's ``token_ids``); without them, where its label equals
    the next token's, which misses or misplaces a token that completes a character split across tokens.
    """
    layers, positions = sorted(frame.layer.unique()), sorted(frame.position.unique())
    ranked = frame.sort_values(["layer", "position", "rank"])
    top1 = ranked[ranked["rank"] == 0].set_index(["layer", "position"])
    index = pd.MultiIndex.from_product([layers, positions])
    probs = top1["prob"].reindex(index).to_numpy(dtype=float).reshape(len(layers), len(positions))
    guess = top1["token"].reindex(index).to_numpy(dtype=object).reshape(len(layers), len(positions))
    guess_ids = top1["token_id"].reindex(index).to_numpy(dtype=object).reshape(len(layers), len(positions))
    listing = (
        ranked.assign(
            line=[
                f"{r + 1}. {label}  {p:.1%}"
                for r, label, p in zip(ranked["rank"], token_labels(ranked.token), ranked.prob)
            ]
        )
        .groupby(["layer", "position"])["line"]
        .agg("<br>".join)
        .reindex(index)
        .to_numpy(dtype=object)
        .reshape(len(layers), len(positions))
    )
    width = chars_that_fit(len(positions))
    actual = [token_texts[p + 1] if p + 1 < len(token_texts) else None for p in positions]
    if token_ids is None:
        came_next = guess == np.array(actual, dtype=object)[None, :]
    else:
        next_ids = np.array([int(token_ids[p + 1]) if p + 1 < len(token_ids) else -1 for p in positions])
        came_next = guess_ids == next_ids[None, :]
    text = np.empty(guess.shape, dtype=object)
    for (i, j), g in np.ndenumerate(guess):
        label = token_label(g, width)
        text[i, j] = f"<b>{label}</b>" if came_next[i, j] else label
    read = token_labels([token_texts[p] for p in positions])
    nxt = ["(end of text)" if a is None else token_label(a) for a in actual]
    rows = ["embedding" if layer < 0 else f"layer {layer}" for layer in layers]
    custom = np.dstack(
        [
            np.broadcast_to(np.array(rows, dtype=object)[:, None], guess.shape),
            np.broadcast_to(
                np.array([f"position {p}: {r}" for p, r in zip(positions, read)], dtype=object), guess.shape
            ),
            np.broadcast_to(np.array(nxt, dtype=object), guess.shape),
            listing,
        ]
    )
    fig = go.Figure(
        go.Heatmap(
            z=probs,
            x=list(range(len(positions))),
            y=list(range(len(layers))),
            text=text,
            texttemplate="%{text}",
            textfont={"family": MONO, "size": 10},
            customdata=custom,
            colorscale="Blues",
            zmin=0,
            zmax=1,
            xgap=1,
            ygap=1,
            hovertemplate=hover(
                "after %{customdata[0]}, reading %{customdata[1]}",
                "actual next: %{customdata[2]}",
                "top guesses:",
                "%{customdata[3]}",
            ),
            colorbar=colorbar("top-1 probability"),
        )
    )
    fig.update_xaxes(
        token_axis([token_texts[p] for p in positions], range(len(positions)), "token read at the position")
    )
    fig.update_yaxes(row_axis(rows, "read out after", top_down=False))
    return style(
        fig,
        "Logit lens: the next-token guess after each layer",
        height=min(900, 300 + 30 * len(layers)),
        subtitle="Cell: the likeliest next token read from the residual stream after that layer, coloured by "
        "its probability;<br>bold: it is the token that came next. Hover for the top guesses.",
    )
