"""Analyses of traces: routing, the latent KV, attention heads, the logit lens, and attribution.

Functions take a :class:`~dsv2viz.traces.Trace` or a corpus (a list of traces from one model) and return
tensors, pandas DataFrames or small dataclasses with named fields, ready to plot or to test against.
Per-position tensors of a corpus concatenate its traces' positions; tables get a ``trace`` column.
Attribution reruns the model over a trace's tokens (or a text, or token ids): which parts wrote a logit
(:func:`logit_attribution`), what removing each changes (:func:`ablation_effects`, and the gradient estimate
:func:`attribution_patching`), where two prompts' difference lives (:func:`activation_patching`), and how
routing runs from layer to layer and token to token (:func:`routing_paths`).
"""

from .ablation import AblationEffects, AttributionPatching, ablation_effects, attribution_patching
from .attention import head_entropy, head_matrix, rope_share
from .attribution import LogitAttribution, component_name, logit_attribution, logit_attributions
from .latent import effective_rank, latent_norms, latent_spectrum, latent_summary
from .logit_lens import logit_lens
from .patching import ActivationPatching, activation_patching, patch_recovery
from .paths import RoutingPaths, routing_paths
from .routing import (
    BF16_ROUNDOFF,
    ExpertUtilization,
    TraceComparison,
    coactivation,
    compare,
    expert_utilization,
    moe_contributions,
    near_ties,
    routing_entropy,
    top_tokens_per_expert,
    topk_margin,
    topk_weight_entropy,
)

__all__ = [
    "BF16_ROUNDOFF",
    "AblationEffects",
    "ActivationPatching",
    "AttributionPatching",
    "ExpertUtilization",
    "LogitAttribution",
    "RoutingPaths",
    "TraceComparison",
    "ablation_effects",
    "activation_patching",
    "attribution_patching",
    "coactivation",
    "compare",
    "component_name",
    "effective_rank",
    "expert_utilization",
    "head_entropy",
    "head_matrix",
    "latent_norms",
    "latent_spectrum",
    "latent_summary",
    "logit_attribution",
    "logit_attributions",
    "logit_lens",
    "moe_contributions",
    "near_ties",
    "patch_recovery",
    "rope_share",
    "routing_entropy",
    "routing_paths",
    "top_tokens_per_expert",
    "topk_margin",
    "topk_weight_entropy",
]
