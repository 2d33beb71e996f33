"""The two pieces every explorer shares: a FigureWidget kept in step with its controls, and a notice.

:func:`linked` wraps a figure function of :mod:`dsv2viz.plots` in one ``go.FigureWidget`` and redraws
that same widget in place (one ``batch_update``) whenever a control changes, so a notebook keeps the
widget, and the figure code stays in :mod:`dsv2viz.plots`.
"""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence

import ipywidgets
import plotly.graph_objects as go

#: Trace properties plotly sets on its own; never carried over from a figure function's output.
_OWN_PROPS = ("type", "uid")


def redraw(widget: go.FigureWidget, fig: go.Figure) -> None:
    """Make `widget` show `fig`: traces updated in place when their types match (else swapped), layout replaced."""
    with widget.batch_update():
        if [t.type for t in widget.data] == [t.type for t in fig.data]:
            for old, new in zip(widget.data, fig.data):
                props = new.to_plotly_json()
                stale = {k: None for k in old.to_plotly_json() if k not in props and k not in _OWN_PROPS}
                old.update({**stale, **props}, overwrite=True)
        else:
            widget.data = ()
            widget.add_traces(fig.data)
        widget.layout = fig.layout


def linked(controls: Sequence[ipywidgets.ValueWidget], build: Callable[[], go.Figure]) -> go.FigureWidget:
    """A FigureWidget of ``build()``, redrawn in place whenever one of `controls` changes value."""
    widget = go.FigureWidget(build())
    for control in controls:
        control.observe(lambda _change: redraw(widget, build()), names="value")
    return widget


def notice(text: str) -> ipywidgets.HTML:
    """A plain-text message (escaped) in a pale box, for what a trace cannot show."""
    return ipywidgets.HTML(
        f'<div style="padding:8px 12px;background:#fff8e1;border-left:4px solid #f0a500">{html.escape(text)}</div>'
    )
