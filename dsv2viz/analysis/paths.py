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

Every count adds across sequences, so a corpus statistic is the sum of its documents' or its shards'
(:meth:`RoutingPaths.of_sequences`, added with ``+``); pairs never cross from one sequence to the next.
``dsv2viz collect`` counts them with its other statistics for ``top=1`` and ``top=K``, so
:func:`routing_paths` of a collected corpus reads two small tables rather than every row.
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
        S = np.asarray(experts).shape[1]
        return cls.of_sequences(experts, np.arange(S) == 0, layers, n_experts, top)

    @classmethod
    def of_sequences(
        cls,
        experts: torch.Tensor | np.ndarray,
        starts: np.ndarray,
        layers: list[int],
        n_experts: int,
        top: int,
    ) -> RoutingPaths:
        """The counts of sequences laid end to end: routing `experts` (M, S, K), best first, and `starts`
        (S,) True where a sequence begins (its token pairs with none before it).

        Counted with bincounts one layer at a time, so memory stays a few times the routing itself however
        many experts there are (a corpus shard holds a million tokens).
        """
        experts = np.asarray(experts, dtype=np.int64)
        M, S, K = experts.shape
        if not isinstance(top, int) or isinstance(top, bool) or not 1 <= top <= K:
            raise ValueError(f"top={top} must be between 1 and the {K} experts each token uses")
        E, chosen = n_experts, experts[..., :top]  # (M, S, top)
        follows = ~np.asarray(starts, dtype=bool)[1:]  # (S - 1,) token s + 1 pairs with token s
        transitions = np.zeros((max(M - 1, 0), E, E), dtype=np.int64)
        repeats, counts = np.zeros(M, dtype=np.int64), np.zeros((M, E), dtype=np.int64)
        for m in range(M):
            now = chosen[m]  # (S, top)
            counts[m] = np.bincount(now.ravel(), minlength=E)
            shared = (now[1:, :, None] == now[:-1, None, :]).sum(axis=(1, 2))  # (S - 1,) experts both tokens used
            repeats[m] = shared[follows].sum()
            if m + 1 < M:
                keys = now[:, :, None] * E + chosen[m + 1][:, None, :]  # (S, top, top): from i here to j next
                transitions[m] = np.bincount(keys.ravel(), minlength=E * E).reshape(E, E)
        return cls(
            layers=list(layers),
            n_experts=E,
            top=top,
            transitions=torch.from_numpy(transitions),
            repeats=torch.from_numpy(repeats),
            pairs=int(follows.sum()),
            counts=torch.from_numpy(counts),
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

    A corpus holds these counts for ``top=1`` and ``top=K`` already (``dsv2viz collect`` sums them shard by
    shard with its other statistics), so nothing is reread from its rows.
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
    """The routing paths a collection counted when it was collected (its ``stats.paths``, by top)."""
    counted = corpus.stats.paths
    if counted is None:
        where = getattr(corpus, "folder", "this collection")
        raise ValueError(
            f"{where} was collected by an older dsv2viz that did not count routing paths; run the same "
            "dsv2viz collect command again with a new --out folder to get them"
        )
    if top not in counted:
        tops = " and ".join(f"top={t}" for t in sorted(counted))
        raise ValueError(f"a collection counts routing paths for {tops}; top={top!r} is not one of them")
    if not corpus.moe_layers:
        raise ValueError("this model has no MoE layers: there are no routing paths")
    return counted[top]
