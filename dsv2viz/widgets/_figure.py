"""What every widget shares: JSON-safe figure updates, figures kept in step with controls, notes, pacing.

Every figure update of the widgets goes through :func:`json_safe`: widget state travels to the browser
as strict JSON, where NaN and infinity do not exist (a KL that is NaN for steps that cannot be
compared, a 0/0 share, routing weights left NaN where an expert was not chosen). They become None,
which plotly draws as a gap, instead of failing the message with "Out of range float values are not
JSON compliant".

:func:`linked` wraps a figure function of :mod:`dsv2viz.plots` in one ``go.FigureWidget`` and redraws
that same widget in place (one ``batch_update``) whenever a control changes, so a notebook keeps the
widget, and the figure code stays in :mod:`dsv2viz.plots`. A :class:`Panel` shows its figure, or only
a note saying why there is nothing to show (never bare axes). :class:`Drawn` tells a live widget
whether the browser has drawn its last update, so it never sends faster than the browser draws.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any

import ipywidgets
import numpy as np
import plotly.graph_objects as go
import torch

#: Trace properties plotly sets on its own; never carried over from a figure function's output.
_OWN_PROPS = ("type", "uid")


def json_safe(value: Any) -> Any:
    """`value` with every NaN and infinity replaced by None, through dicts, lists, arrays and tensors.

    Arrays and tensors without any are returned as numpy arrays (plotly sends 1-D ones as binary
    buffers); those with some become lists holding None there.
    """
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()  # numpy has no bf16
    if isinstance(value, np.ndarray):
        if value.dtype.kind != "f" or np.isfinite(value).all():
            return value
        return np.where(np.isfinite(value), value.astype(object), None).tolist()
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def figure_widget(fig: go.Figure) -> go.FigureWidget:
    """A FigureWidget showing `fig`, its non-finite values masked (see :func:`json_safe`)."""
    data = [trace.to_plotly_json() for trace in fig.data]  # arrays kept as numpy (the figure's own JSON packs them)
    return go.FigureWidget({"data": json_safe(data), "layout": json_safe(fig.layout.to_plotly_json())})


def update(widget: go.FigureWidget, traces: Sequence[Mapping[str, Any]] = (), **layout: Any) -> None:
    """Update `widget` in one message: its i-th trace takes ``traces[i]``'s properties, its layout `layout`.

    Values are made JSON-safe; every live update of a figure goes through here or :func:`redraw`.
    """
    with widget.batch_update():
        for trace, props in zip(widget.data, traces):
            trace.update(json_safe(props))
        if layout:
            widget.layout.update(json_safe(layout))


def redraw(widget: go.FigureWidget, fig: go.Figure) -> None:
    """Make `widget` show `fig`: traces updated in place when their types match (else swapped), layout replaced."""
    with widget.batch_update():
        if [t.type for t in widget.data] == [t.type for t in fig.data]:
            for old, new in zip(widget.data, fig.data):
                props = json_safe(new.to_plotly_json())
                stale = {k: None for k in old.to_plotly_json() if k not in props and k not in _OWN_PROPS}
                old.update({**stale, **props}, overwrite=True)
        else:
            widget.data = ()
            widget.add_traces([json_safe(t.to_plotly_json()) for t in fig.data])
        widget.layout = json_safe(fig.layout.to_plotly_json())


def linked(controls: Sequence[ipywidgets.ValueWidget], build: Callable[[], go.Figure]) -> go.FigureWidget:
    """A FigureWidget of ``build()``, redrawn in place whenever one of `controls` changes value."""
    widget = figure_widget(build())
    for control in controls:
        control.observe(lambda _change: redraw(widget, build()), names="value")
    return widget


def notice_html(text: str) -> str:
    """The HTML of a note: plain text (escaped) in a pale box."""
    return f'<div style="padding:8px 12px;background:#fff8e1;border-left:4px solid #f0a500">{html.escape(text)}</div>'


def notice(text: str) -> ipywidgets.HTML:
    """A plain-text message (escaped) in a pale box, for what a trace cannot show."""
    return ipywidgets.HTML(notice_html(text))


class Panel(ipywidgets.VBox):
    """A figure, or in its place only a note saying why there is nothing to show: never bare axes."""

    def __init__(self, figure: go.FigureWidget, note: str | None = None) -> None:
        self.figure = figure
        self.note = ipywidgets.HTML()
        super().__init__()
        if note is None:
            self.show_figure()
        else:
            self.show_note(note)

    @property
    def showing_figure(self) -> bool:
        return self.children == (self.figure,)

    def show_figure(self) -> None:
        if not self.showing_figure:
            self.children = (self.figure,)

    def show_note(self, text: str) -> None:
        self.note.value = notice_html(text)
        if self.children != (self.note,):
            self.children = (self.note,)


class Drawn:
    """Whether the browser has drawn the last update sent to some FigureWidgets: the pace of a live widget.

    plotly's front end answers every drawing of a FigureWidget, the first one and every update, with
    the id of the last edit it drew (its ``_js2py_traceDeltas`` message). A live widget that sends its
    next update only when that answer has come never gets ahead of the browser: updates sent faster than
    the browser draws them queue up there, and the page then keeps drawing old tokens for seconds after
    Stop, with the Stop click itself waiting behind the drawing. A figure nothing has drawn yet (no
    browser shows it: a script, a test) holds nothing back; one whose browser stopped answering (its
    output cleared) holds the next update back `patience` seconds at most.
    """

    def __init__(self, widgets: Sequence[go.FigureWidget], patience: float = 2.0) -> None:
        self.widgets, self.patience = list(widgets), patience
        self._drawn: list[int | None] = [None] * len(self.widgets)  # the last edit id each browser drew
        self._sent_at: float | None = None
        for i, widget in enumerate(self.widgets):
            widget.observe(partial(self._answer, i), names="_js2py_traceDeltas")

    def _answer(self, i: int, change: dict) -> None:  # the kernel's thread, when the browser's answer arrives
        if change["new"]:
            self._drawn[i] = max(self._drawn[i] or 0, change["new"]["trace_edit_id"])

    def sent(self) -> None:
        """Note that an update of the widgets has just been sent."""
        self._sent_at = time.monotonic()

    def ready(self) -> bool:
        """True when every browser showing these widgets has drawn their last update, or after `patience` s."""
        if self._sent_at is None or time.monotonic() - self._sent_at >= self.patience:
            return True
        # plotly numbers the edits it sends (_last_trace_edit_id); the answers carry the number drawn
        return all(drawn is None or drawn >= w._last_trace_edit_id for drawn, w in zip(self._drawn, self.widgets))
