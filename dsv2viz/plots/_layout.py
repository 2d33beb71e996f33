"""The look every figure shares: template, fonts, width, expert colours, token axes, colour bars, hover text.

Figures are sized for a notebook cell about 900 px wide. Expert ids are coloured from one qualitative
palette (plotly's Dark24 then Light24, 48 colours) that cycles, so expert e has the same colour in every
figure; with more than 48 experts (V2-Lite has 64) two experts share a colour and hover tells them apart.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import plotly.colors as pc
import plotly.graph_objects as go

from ._text import token_labels

TEMPLATE = "plotly_white"
WIDTH = 900
FONT = {"family": "Helvetica Neue, Arial, sans-serif", "size": 13, "color": "#222"}
MONO = "Menlo, Consolas, DejaVu Sans Mono, monospace"
#: Width of one character of cell text, to cut labels to what a cell holds.
CHAR_PX = 7.5
#: More token ticks than this on one axis are thinned to every n-th position (hover still names each token).
MAX_TOKEN_TICKS = 96
#: Tick labels longer than this are cut with '…' (hover shows the whole token).
TICK_CHARS = 12
EXPERT_PALETTE: list[str] = pc.qualitative.Dark24 + pc.qualitative.Light24


def expert_color(expert: int, lighten: float = 0.0) -> str:
    """Expert `expert`'s palette colour, mixed with white by `lighten` (0: as is, 1: white), as rgb()."""
    r, g, b = (round(c + (255 - c) * lighten) for c in pc.hex_to_rgb(EXPERT_PALETTE[expert % len(EXPERT_PALETTE)]))
    return f"rgb({r}, {g}, {b})"


def expert_colorscale(n_experts: int, lighten: float = 0.0) -> list[tuple[float, str]]:
    """A stepped colour scale giving z = e its expert colour, for z in [-0.5, n_experts - 0.5]."""
    scale = []
    for e in range(n_experts):
        color = expert_color(e, lighten)
        scale += [(e / n_experts, color), ((e + 1) / n_experts, color)]
    return scale


def style(fig: go.Figure, title: str, *, height: int, subtitle: str | None = None) -> go.Figure:
    """Apply the shared look and the title, with a subtitle saying how to read the figure ('<br>' between lines)."""
    lines = subtitle.count("<br>") + 1 if subtitle else 0
    fig.update_layout(
        template=TEMPLATE,
        width=WIDTH,
        height=height,
        font=FONT,
        title={
            "text": title,
            "subtitle": {"text": subtitle or "", "font": {"size": 12, "color": "#555"}},
            "x": 0.01,
            "xanchor": "left",
            "font": {"size": 17},
        },
        margin={"l": 70, "r": 30, "t": 75 + 16 * lines, "b": 60},
        hoverlabel={"font": {"family": MONO, "size": 12}, "align": "left"},
    )
    return fig


def chars_that_fit(n_columns: int) -> int:
    """How many characters of cell text fit in one of `n_columns` equal columns across a figure."""
    return max(1, int((WIDTH - 100) / max(1, n_columns) / CHAR_PX))


def token_axis(
    texts: Sequence[str], positions: Sequence[int], title: str, *, others: Sequence[str] | None = None
) -> dict:
    """Axis settings that label `positions` with their token `texts` (raw; made safe here, cut to TICK_CHARS).

    `others` are a second sequence's texts at the same positions (a corrupted prompt beside the clean one):
    where they differ, the tick shows both, ``clean→other``.
    """
    step = math.ceil(len(texts) / MAX_TOKEN_TICKS) if texts else 1
    labels = token_labels(texts, TICK_CHARS)
    if others is not None:
        labels = [
            label if a == b else f"{label}→{other}"
            for label, other, a, b in zip(labels, token_labels(others, TICK_CHARS), texts, others)
        ]
    return {
        "title": title,
        "tickmode": "array",
        "tickvals": list(positions)[::step],
        "ticktext": labels[::step],
        "tickfont": {"family": MONO, "size": 11 if len(texts) <= 48 else 9},
        "showgrid": False,
    }


def row_axis(labels: Sequence[str], title: str, *, top_down: bool = True) -> dict:
    """A category-like axis for rows 0..n-1 (layers, experts) labelled with `labels`."""
    return {
        "title": title,
        "tickmode": "array",
        "tickvals": list(range(len(labels))),
        "ticktext": list(labels),
        "autorange": "reversed" if top_down else True,
        "showgrid": False,
    }


def colorbar(title: str, *, x: float | None = None, y: float = 0.5, length: float = 1.0) -> dict:
    """A slim vertical colour bar at the right, or between panels at `x` (paper coordinates, title on top)."""
    bar = {"title": {"text": title, "side": "right"}, "thickness": 12, "y": y, "yanchor": "middle", "len": length}
    if x is not None:
        bar.update(x=x, xanchor="left", title={"text": title, "side": "top"})
    return bar


def mark_generation_start(fig: go.Figure, prompt_len: int, n_tokens: int) -> None:
    """A dotted vertical line in every panel between the last prompt position and the first generated one
    (figures say so in their subtitle)."""
    if 0 < prompt_len < n_tokens:
        fig.add_vline(x=prompt_len - 0.5, line={"color": "#e8453c", "width": 2, "dash": "dot"}, row="all", col="all")


def hover(*lines: str) -> str:
    """A hovertemplate of these lines, without the trace-name box."""
    return "<br>".join(lines) + "<extra></extra>"


def bytes_label(n: float) -> str:
    """Bytes in binary units, at most three significant digits: '972 MiB', '8.44 GiB', '16 KiB'."""
    value, unit = float(n), "B"
    for name, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            value, unit = n / size, name
            break
    text = f"{value:.{2 if value < 10 else 1 if value < 100 else 0}f}"
    return f"{text.rstrip('0').rstrip('.') if '.' in text else text} {unit}"
