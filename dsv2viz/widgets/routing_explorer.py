"""RoutingExplorer: browse a trace's MoE routing in a notebook.

Pick an MoE layer to colour the text by its top-1 experts and see which experts that layer activates
together; pick a position to follow that token's experts through every MoE layer. Below: expert
utilization and routing confidence over the whole trace. Put the explorer last in a cell to show it.
"""

from __future__ import annotations

import ipywidgets
import plotly.graph_objects as go

from .. import analysis, plots
from ..traces import Trace
from ._figure import figure_widget, linked, notice


class RoutingExplorer(ipywidgets.VBox):
    """Routing views of one trace, driven by a MoE-layer dropdown and a position slider.

    Figures (``go.FigureWidget``, redrawn in place): ``strip``, ``coactivation`` (follow ``layer``),
    ``across_layers`` (follows ``position``), ``utilization`` and ``confidence`` (whole trace).
    They are None, and a message says why, when the trace recorded no routing.
    """

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        layers = trace.moe_layers
        self.layer = ipywidgets.Dropdown(options=[(f"layer {m}", m) for m in layers], description="MoE layer")
        self.position = ipywidgets.IntSlider(
            value=len(trace) - 1, min=0, max=len(trace) - 1, description="position", continuous_update=False
        )
        self.strip: go.FigureWidget | None = None
        self.coactivation: go.FigureWidget | None = None
        self.across_layers: go.FigureWidget | None = None
        self.utilization: go.FigureWidget | None = None
        self.confidence: go.FigureWidget | None = None
        if not trace.has("routing"):
            why = "this model has no MoE layers" if not layers else f"record it with {trace.missing('routing')}"
            super().__init__([notice(f"This trace has no routing to explore: {why}.")])
            return
        self.strip = linked([self.layer], lambda: plots.token_strip(trace, self.layer.value))
        self.coactivation = linked(
            [self.layer],
            lambda: plots.coactivation_matrix(analysis.coactivation(trace, self.layer.value), self.layer.value),
        )
        self.across_layers = linked([self.position], lambda: plots.routing_across_layers(trace, self.position.value))
        self.utilization = figure_widget(plots.utilization_heatmap(analysis.expert_utilization(trace)))
        self.confidence = figure_widget(plots.routing_confidence(trace))
        super().__init__(
            [
                self.layer,
                self.strip,
                self.coactivation,
                self.position,
                self.across_layers,
                self.utilization,
                self.confidence,
            ]
        )
