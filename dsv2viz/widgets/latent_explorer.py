"""LatentExplorer: look at what a trace's latent KV cache holds and what it saves.

The singular-value spectrum of every layer's cached latent c_kv shows how many of the latent's
directions the tokens use; pick a layer to highlight its line; below, every token's latent norm per layer (large entries,
sinks) and the memory of this model's latent cache against a standard K/V cache. Put the explorer
last in a cell to show it.
"""

from __future__ import annotations

import ipywidgets
import plotly.graph_objects as go

from .. import plots
from ..traces import Trace
from ._figure import figure_widget, linked, notice

#: Opacity of the other layers' spectra while one layer is selected.
DIMMED = 0.2


def spectrum(trace: Trace, layer: int | None) -> go.Figure:
    """:func:`plots.latent_spectrum` of every layer, with `layer`'s line (if any) drawn over the others dimmed."""
    fig = plots.latent_spectrum(trace)
    if layer is not None:
        for line, shown in zip(fig.data, range(trace.config.num_hidden_layers)):
            line.update(opacity=1.0 if shown == layer else DIMMED)
            if shown == layer:
                line.line.width = 3.5
    return fig


class LatentExplorer(ipywidgets.VBox):
    """Latent-KV views of one trace, the spectrum's highlighted layer picked by a dropdown ("all layers": none).

    Figures: ``spectrum`` (follows ``layer``) and ``norms`` (None, with a message, when latents were not
    recorded) and ``memory`` (from the trace's config, always shown).
    """

    def __init__(self, trace: Trace) -> None:
        self.trace = trace
        self.layer = ipywidgets.Dropdown(
            options=[("all layers", None)] + [(f"layer {lay}", lay) for lay in range(trace.config.num_hidden_layers)],
            description="layer",
        )
        self.memory = figure_widget(plots.kv_cache_memory(trace.config))
        self.spectrum: go.FigureWidget | None = None
        self.norms: go.FigureWidget | None = None
        if not trace.has("latents"):
            why = f"This trace recorded no latents: record them with {trace.missing('latents')} (the default)."
            super().__init__([notice(why), self.memory])
            return
        self.spectrum = linked([self.layer], lambda: spectrum(trace, self.layer.value))
        self.norms = figure_widget(plots.latent_norms(trace))
        super().__init__([self.layer, self.spectrum, self.norms, self.memory])
