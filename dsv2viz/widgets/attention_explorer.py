"""AttentionExplorer: pick an attention head of a trace and see its pattern and where its scores come from.

An overview maps every head's entropy (and, when its scores split into content and position parts, the
share that comes from position, i.e. rope) to spot heads worth a look; the layer and head dropdowns,
limited to what the trace can show (``trace.attention_layers()``, ``trace.attention_heads()``), show one
head's pattern beside its content (nope) and position (rope) score parts when the queries and latents
were recorded, or its pattern alone. A view the trace cannot show is a note naming the Recording setting
that would record it. Put the explorer last in a cell to show it.
"""

from __future__ import annotations

import ipywidgets
import plotly.graph_objects as go

from .. import analysis, plots
from ..traces import Trace
from ._figure import figure_widget, linked, notice


class AttentionExplorer(ipywidgets.VBox):
    """Attention views of one trace: heads overview, then the selected head's pattern (and score parts).

    Figures: ``entropy`` and ``rope_share`` (overviews) and ``pattern`` (follows the ``layer`` and ``head``
    dropdowns). A figure the trace cannot show is None, with a note in its place naming what to record:
    all of them without attention, ``rope_share`` without the queries or the latents.
    """

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        layers = trace.attention_layers()
        self.layer = ipywidgets.Dropdown(options=[(f"layer {lay}", lay) for lay in layers], description="layer")
        self.head = ipywidgets.Dropdown(options=[(f"head {h}", h) for h in trace.attention_heads()], description="head")
        self.entropy: go.FigureWidget | None = None
        self.rope_share: go.FigureWidget | None = None
        self.pattern: go.FigureWidget | None = None
        if not trace.has("attention"):
            super().__init__(
                [notice(f"This trace has no attention to show: record it with {trace.missing('attention')}.")]
            )
            return
        self.entropy = figure_widget(plots.heads_overview(analysis.head_entropy(trace), "entropy"))
        if trace.has("attention_parts"):
            self.rope_share = figure_widget(plots.heads_overview(analysis.rope_share(trace), "rope_share"))
            rope = self.rope_share
        else:
            rope = notice(
                "The rope share of each head needs its scores split into content and position parts: "
                f"record them with {trace.missing('attention_parts')}."
            )
        self.pattern = linked([self.layer, self.head], self._head_figure)
        super().__init__([self.entropy, rope, ipywidgets.HBox([self.layer, self.head]), self.pattern])

    def _head_figure(self) -> go.Figure:
        view = self.trace.attention(self.layer.value, self.head.value)
        draw = plots.attention_parts if view.scores_nope is not None else plots.attention_pattern
        return draw(view, self.trace.token_texts)
