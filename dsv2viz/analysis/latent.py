"""The latent KV: how many of its R dimensions the cache really uses, and how large each token's entry is.

MLA caches one R-dimensional latent c_kv per token and layer (R = 512 in V2-Lite) instead of per-head
keys and values. Its singular value spectrum over many tokens says how much of that room the model
fills: an effective rank far below R means the latent could be compressed further, and the layers
where it is high are the ones that carry the most varied information from token to token.

The spectrum is that of the UNcentered matrix (tokens x R). Attention reads the latent as it is
(scores are q_lat . c_kv, and values are W_UV c_kv), mean included; the model never subtracts a mean,
so the uncentered spectrum measures the dimensions attention actually works in. A large common
component then shows up as a dominant first singular value (see ``top1_energy``), which is itself a
finding; centre the matrix yourself to study the variation around it.
"""

from __future__ import annotations

import pandas as pd
import torch

from ..traces import Trace
from ._common import Traces, as_traces, concat_positions, entropy


def latent_spectrum(traces: Traces, layer: int) -> torch.Tensor:
    """Singular values (descending, fp32) of the uncentered c_kv of `layer`, tokens of all traces stacked (S, R)."""
    c_kv = torch.cat([t.latent(layer)[0] for t in as_traces(traces)]).float()
    return torch.linalg.svdvals(c_kv)


def effective_rank(singular_values: torch.Tensor) -> float:
    """exp of the entropy of the singular values normalised to sum to one (Roy & Vetterli, 2007).

    A continuous count of the directions a matrix spreads over: n for n equal singular values, about 1
    when one dominates; unlike a numerical rank it needs no threshold.
    """
    s = singular_values.double()
    return float(entropy(s / s.sum()).exp())


def latent_summary(traces: Traces) -> pd.DataFrame:
    """Per layer: (layer, effective_rank, top1_energy, rank_for_90pct_energy) of the latent spectrum.

    ``top1_energy`` is s1^2 / sum s^2, the share of the latent's energy in its strongest direction;
    ``rank_for_90pct_energy`` is the fewest directions that hold 90% of it.
    """
    traces = as_traces(traces)
    rows = []
    for layer in range(traces[0].config.num_hidden_layers):
        s = latent_spectrum(traces, layer).double()
        energy = s.square().cumsum(0) / s.square().sum()
        rows.append((layer, effective_rank(s), float(energy[0]), int((energy < 0.9).sum()) + 1))
    return pd.DataFrame(rows, columns=["layer", "effective_rank", "top1_energy", "rank_for_90pct_energy"])


def latent_norms(traces: Traces) -> torch.Tensor:
    """(L, S) the norm of each token's c_kv in each layer (fp32): which tokens write large entries to the cache."""

    def one(t: Trace) -> torch.Tensor:
        return torch.stack([t.latent(layer)[0].float().norm(dim=-1) for layer in range(t.config.num_hidden_layers)])

    return concat_positions(traces, one)
