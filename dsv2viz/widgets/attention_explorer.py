"""AttentionExplorer: pick an attention head of a trace and see its pattern and where its scores come from.

An overview maps every recorded head's entropy (and, with recorded queries, the share of its scores
that comes from position, i.e. rope) to spot heads worth a look; the layer and head dropdowns, limited
to what the trace recorded, show one head's pattern beside its content (nope) and position (rope)
score parts when queries were recorded, or its pattern alone. Put the explorer last in a cell to show it.
"""

from __future__ import annotations

import ipywidgets
import plotly.graph_objects as go

from .. import analysis, plots
from ..traces import Trace
from ._figure import figure_widget, linked, notice

NO_ATTENTION = (
    "This trace recorded no attention: record it with Recording(attention='full' or 'last_row', "
    "or queries=True), with attention_layers naming the layers to keep."
)
NO_LATENTS = "This trace's attention needs its latents, which were not recorded: record with Recording(latents=True)."


def attention_layers(trace: Trace) -> list[int]:
    """The recorded layers whose attention the trace can give: a stored pattern or queries, and the latents
    wherever queries were kept (``trace.attention`` rebuilds the score parts from them)."""
    t = trace.tensors
    return [
        layer
        for layer in trace.recording.layers(trace.config)
        if (f"attention.{layer}" in t or f"q_nope.{layer}" in t) and (f"q_nope.{layer}" not in t or "c_kv" in t)
    ]


class AttentionExplorer(ipywidgets.VBox):
    """Attention views of one trace: heads overview, then the selected head's pattern (and score parts).

    Figures: ``entropy`` and ``rope_share`` (overviews; ``rope_share`` is None without the queries) and
    ``pattern`` (follows the ``layer`` and ``head`` dropdowns). All are None, and a message says which
    Recording setting to use, when the trace recorded no attention.
    """

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        layers = attention_layers(trace)
        self.layer = ipywidgets.Dropdown(options=[(f"layer {lay}", lay) for lay in layers], description="layer")
        self.head = ipywidgets.Dropdown(
            options=[(f"head {h}", h) for h in trace.recording.heads(trace.config)], description="head"
        )
        self.entropy: go.FigureWidget | None = None
        self.rope_share: go.FigureWidget | None = None
        self.pattern: go.FigureWidget | None = None
        if not layers:
            recorded = any(k.startswith(("attention.", "q_nope.")) for k in trace.tensors)
            super().__init__([notice(NO_LATENTS if recorded else NO_ATTENTION)])
            return
        self.entropy = figure_widget(plots.heads_overview(analysis.head_entropy(trace), "entropy"))
        overviews = [self.entropy]
        if all(f"q_nope.{layer}" in trace.tensors for layer in layers):
            self.rope_share = figure_widget(plots.heads_overview(analysis.rope_share(trace), "rope_share"))
            overviews.append(self.rope_share)
        self.pattern = linked([self.layer, self.head], self._head_figure)
        super().__init__([*overviews, ipywidgets.HBox([self.layer, self.head]), self.pattern])

    def _head_figure(self) -> go.Figure:
        view = self.trace.attention(self.layer.value, self.head.value)
        draw = plots.attention_parts if view.scores_nope is not None else plots.attention_pattern
        return draw(view, self.trace.token_texts)
