"""Analyses of traces: routing, the latent KV, attention heads and the logit lens.

Functions take a :class:`~dsv2viz.traces.Trace` or a corpus (a list of traces from one model) and return
tensors, pandas DataFrames or small dataclasses with named fields, ready to plot or to test against.
Per-position tensors of a corpus concatenate its traces' positions; tables get a ``trace`` column.
"""

from .attention import head_entropy, head_matrix, rope_share
from .latent import effective_rank, latent_norms, latent_spectrum, latent_summary
from .logit_lens import logit_lens
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
    "ExpertUtilization",
    "TraceComparison",
    "coactivation",
    "compare",
    "effective_rank",
    "expert_utilization",
    "head_entropy",
    "head_matrix",
    "latent_norms",
    "latent_spectrum",
    "latent_summary",
    "logit_lens",
    "moe_contributions",
    "near_ties",
    "rope_share",
    "routing_entropy",
    "top_tokens_per_expert",
    "topk_margin",
    "topk_weight_entropy",
]
