"""Plotly figures of traces and analyses: one function per view, each returning a ``go.Figure``.

Figures are built from :class:`~dsv2viz.traces.Trace` accessors and :mod:`dsv2viz.analysis` results,
share one look (plotly_white, ~900 px wide, one colour per expert id everywhere) and show token text
only through :func:`token_label`, which escapes it and makes whitespace visible.

    from dsv2viz import analysis, plots
    plots.token_strip(trace, layer=5)
    plots.utilization_heatmap(analysis.expert_utilization(trace))
    plots.save_html(plots.routing_confidence(trace), "confidence.html")
    plots.logit_attribution(analysis.logit_attribution(model, trace, -2))
"""

from ._text import token_label
from .attention import attention_parts, attention_pattern, heads_overview
from .attribution import ablation_effects, logit_attribution, patching_heatmap, routing_sankey, same_expert_rate
from .export import save_html, save_image
from .latent import kv_cache_memory, latent_norms, latent_spectrum
from .lens import logit_lens
from .routing import (
    coactivation_matrix,
    routing_across_layers,
    routing_confidence,
    top_tokens_per_expert,
    utilization_heatmap,
)
from .tokens import token_strip

__all__ = [
    "ablation_effects",
    "attention_parts",
    "attention_pattern",
    "coactivation_matrix",
    "heads_overview",
    "kv_cache_memory",
    "latent_norms",
    "latent_spectrum",
    "logit_attribution",
    "logit_lens",
    "patching_heatmap",
    "routing_across_layers",
    "routing_confidence",
    "routing_sankey",
    "same_expert_rate",
    "save_html",
    "save_image",
    "token_label",
    "token_strip",
    "top_tokens_per_expert",
    "utilization_heatmap",
]
