"""Routing paths across layers: does a token keep to a family of experts through depth, and does it share
its experts with the token before it?

* Transitions: for each pair of consecutive MoE layers, how many tokens went from expert i at the first
  to expert j at the next. With ``top=1`` a token counts once, first choice to first choice; with
  ``top=k`` each of its k x k pairs of chosen experts counts once.
* Consecutive-token assignment, the statistic of the Mixtral paper (Jiang et al., 2024, section 5): per
  layer, how often a token shares its expert with the token before it, against chance. ``same_rate`` is
  the mean over consecutive token pairs (within one sequence) of |S_t ∩ S_t-1| / top, where S_t holds
  token t's first `top` experts: for ``top=1`` the fraction of tokens whose first choice is the previous
  token's first choice.
* The chance this module uses is that of two tokens drawn independently from the layer's own marginal
  routing over the tokens counted: sum_e f_e^2 / top, with f_e the fraction of tokens that have expert e
  among their first `top`. It is exact, E|S ∩ S'| = sum_e f_e^2 for independent S, S'; for ``top=1``
  it is sum_e p_e^2, the chance two tokens share their first expert. A rate well above it means routing
  follows the text locally (runs of code, a language, a word split in pieces), not only its token.

Every count adds across sequences, so a corpus statistic is the sum of its documents'
(:meth:`RoutingPaths.of_sequence`, added with ``+``); pairs never cross from one sequence to the next.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ._common import Routed, as_traces, is_corpus


@dataclass(eq=False)
class RoutingPaths:
    """Counts of routing paths over some sequences; M rows follow `layers` (the MoE layers). Equal when
    every count is equal."""

    layers: list[int]
    n_experts: int
    top: int  # each token's first `top` experts are counted
    transitions: torch.Tensor  # (M - 1, E, E) int64: [m, i, j] tokens with i at layers[m] and j at layers[m + 1]
    repeats: torch.Tensor  # (M,) int64: summed over consecutive token pairs, the experts both tokens used
    pairs: int  # consecutive token pairs counted (within sequences)
    counts: torch.Tensor  # (M, E) int64: tokens with expert e among their first `top`
    tokens: int

    @classmethod
    def of_sequence(
        cls, experts: torch.Tensor | np.ndarray, layers: list[int], n_experts: int, top: int
    ) -> RoutingPaths:
        """The counts of one sequence from its routing `experts` (M, S, K), best first (``trace.routing``)."""
        experts = torch.as_tensor(np.asarray(experts), dtype=torch.int64)
        M, S, K = experts.shape
        if not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= K:
            raise ValueError(f"top={top} must be between 1 and the {K} experts each token uses")
        chosen = torch.zeros(M, S, n_experts, dtype=torch.int64).scatter_(2, experts[..., :top], 1)  # (M, S, E) 0/1
        return cls(
            layers=list(layers),
            n_experts=n_experts,
            top=top,
            transitions=torch.einsum("mse,msf->mef", chosen[:-1], chosen[1:]),
            repeats=(chosen[:, 1:] * chosen[:, :-1]).sum(dim=(1, 2)),
            pairs=max(S - 1, 0),
            counts=chosen.sum(dim=1),
            tokens=S,
        )

    def __add__(self, other: RoutingPaths) -> RoutingPaths:
        """The counts of both collections of sequences."""
        if (self.layers, self.n_experts, self.top) != (other.layers, other.n_experts, other.top):
            raise ValueError("these routing paths count different layers, experts or top; add like with like")
        return RoutingPaths(
            self.layers,
            self.n_experts,
            self.top,
            self.transitions + other.transitions,
            self.repeats + other.repeats,
            self.pairs + other.pairs,
            self.counts + other.counts,
            self.tokens + other.tokens,
        )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingPaths):
            return NotImplemented
        same = (self.layers, self.n_experts, self.top, self.pairs, self.tokens) == (
            other.layers,
            other.n_experts,
            other.top,
            other.pairs,
            other.tokens,
        )
        return same and all(
            torch.equal(getattr(self, name), getattr(other, name)) for name in ("transitions", "repeats", "counts")
        )

    @property
    def same_rate(self) -> torch.Tensor:
        """(M,) float64: the mean share of a token's first `top` experts that the previous token also used."""
        return self.repeats.double() / (self.pairs * self.top)

    @property
    def chance(self) -> torch.Tensor:
        """(M,) float64: same_rate expected for independent tokens with each layer's marginal routing."""
        f = self.counts.double() / self.tokens
        return f.square().sum(-1) / self.top

    def to_frame(self) -> pd.DataFrame:
        """Per MoE layer: layer, same_rate, chance and their ratio (above 1: neighbours share experts more)."""
        return pd.DataFrame(
            {
                "layer": self.layers,
                "same_rate": self.same_rate.numpy(),
                "chance": self.chance.numpy(),
                "ratio": (self.same_rate / self.chance).numpy(),
            }
        )

    def flows(self, n: int | None = None) -> pd.DataFrame:
        """The `n` largest transitions (all when None): from_layer, from_expert, to_layer, to_expert, count
        and share (of all transitions between those two layers); largest first, ties in layer and expert order."""
        M1, E, _ = self.transitions.shape
        m, i, j = np.unravel_index(np.arange(M1 * E * E), (M1, E, E))
        counts = self.transitions.flatten().numpy()
        totals = self.transitions.sum(dim=(1, 2)).numpy()
        layers = np.asarray(self.layers)
        frame = pd.DataFrame(
            {
                "from_layer": layers[m],
                "from_expert": i,
                "to_layer": layers[m + 1],
                "to_expert": j,
                "count": counts,
                "share": counts / np.maximum(totals[m], 1),
            }
        )
        frame = frame[frame["count"] > 0].sort_values(
            ["count", "from_layer", "from_expert", "to_expert"], ascending=[False, True, True, True]
        )
        return (frame if n is None else frame.head(n)).reset_index(drop=True)


def routing_paths(routed: Routed, *, top: int = 1) -> RoutingPaths:
    """Transitions between consecutive MoE layers and consecutive-token assignment of a trace, a list of
    traces or a collected corpus, counting each token's first `top` experts (1 up to K).

    A corpus is recounted from its per-token rows, document by document (documents never pair up).
    """
    if is_corpus(routed):
        return _corpus_paths(routed, top)
    traces = as_traces(routed)
    config = traces[0].config
    if not config.moe_layers:
        raise ValueError("this model has no MoE layers: there are no routing paths")
    total = None
    for t in traces:
        experts = torch.stack([t.routing(layer)[0] for layer in t.moe_layers])  # (M, S, K)
        paths = RoutingPaths.of_sequence(experts, t.moe_layers, config.n_routed_experts, top)
        total = paths if total is None else total + paths
    return total


def _corpus_paths(corpus: Routed, top: int) -> RoutingPaths:
    layers, E = list(corpus.moe_layers), int(corpus.stats.counts.shape[1])
    rows = corpus.rows(["doc_index", "position", "layer", "experts"]).sort_values(["doc_index", "position", "layer"])
    M = len(layers)
    total = None
    for _, doc in rows.groupby("doc_index", sort=True):
        S = len(doc) // M
        if len(doc) != S * M or not np.array_equal(doc["position"].to_numpy()[::M], np.arange(S)):
            raise ValueError("a document's routing rows are not one row per (position, MoE layer); recollect it")
        experts = np.stack(doc["experts"].to_numpy()).reshape(S, M, -1).transpose(1, 0, 2)  # (M, S, K)
        paths = RoutingPaths.of_sequence(experts, layers, E, top)
        total = paths if total is None else total + paths
    if total is None:
        raise ValueError("this corpus has no routed tokens")
    return total
