"""Routing statistics of a corpus, computed per shard and merged: every field adds up across shards.

Counts (tokens per expert, pairs of experts chosen together, tokens per (token id, expert), near ties,
an entropy histogram, routing paths) add exactly; the two float sums (router weights, entropies) are added
in shard order, so a corpus gives the same statistics however its shards were spread over workers.

Routing paths (:class:`dsv2viz.analysis.RoutingPaths`: transitions between consecutive MoE layers,
experts shared with the previous token of the same document, the marginal counts chance needs) are
counted for each token's first expert (``top=1``) and its K experts (``top=K``). Collections written
before they were counted open without them (``paths`` is None).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file

from ..analysis.paths import RoutingPaths
from ..files import atomic_path

#: Bins of the routing-entropy histogram over [0, log E].
ENTROPY_BINS = 32

_TENSORS = ("counts", "weight_sums", "coactivation", "entropy_sum", "entropy_hist", "near_ties")
_PATH_TENSORS = ("transitions", "repeats", "counts")  # of each RoutingPaths; pairs in the metadata


@dataclass
class RoutingStats:
    """Mergeable routing statistics over some documents; M rows follow `layers` (the MoE layers)."""

    layers: list[int]
    n_experts: int
    top_k: int
    tokens: int = 0
    documents: int = 0
    counts: torch.Tensor = None  # (M, E) int64: tokens routed to each expert (over the K slots)
    weight_sums: torch.Tensor = None  # (M, E) float64: sum of the routing weights each expert received
    coactivation: torch.Tensor = None  # (M, E, E) int64: tokens with both experts in their top-k; diagonal = counts
    entropy_sum: torch.Tensor = None  # (M,) float64: sum of each token's router entropy (nats)
    entropy_hist: torch.Tensor = None  # (M, ENTROPY_BINS) int64: tokens per entropy bin over [0, log E]
    near_ties: torch.Tensor = None  # (M,) int64: tokens whose K-th and (K+1)-th experts nearly tied
    token_experts: pd.DataFrame = field(default=None)  # (layer, token_id, expert, count), sorted, no zero counts
    # routing paths by top (1 and K); None for a collection written before they were counted
    paths: dict[int, RoutingPaths] | None = field(default=None)

    def __post_init__(self) -> None:
        M, E = len(self.layers), self.n_experts
        zeros = {
            "counts": torch.zeros(M, E, dtype=torch.int64),
            "weight_sums": torch.zeros(M, E, dtype=torch.float64),
            "coactivation": torch.zeros(M, E, E, dtype=torch.int64),
            "entropy_sum": torch.zeros(M, dtype=torch.float64),
            "entropy_hist": torch.zeros(M, ENTROPY_BINS, dtype=torch.int64),
            "near_ties": torch.zeros(M, dtype=torch.int64),
        }
        for name, value in zeros.items():
            if getattr(self, name) is None:
                setattr(self, name, value)
        if self.token_experts is None:
            self.token_experts = _token_experts_frame(
                np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.int64)
            )
        if self.paths is None:
            self.paths = self._paths(np.empty((M, 0, self.top_k), np.int64), np.empty(0, bool))

    @property
    def path_tops(self) -> list[int]:
        """The tops routing paths are counted for: the first expert and all K."""
        return sorted({1, self.top_k})

    def _paths(self, experts: np.ndarray, starts: np.ndarray) -> dict[int, RoutingPaths]:
        """Routing paths of tokens laid end to end, `experts` (M, S, K), for each of :attr:`path_tops`."""
        return {
            top: RoutingPaths.of_sequences(experts, starts, self.layers, self.n_experts, top) for top in self.path_tops
        }

    @property
    def mean_entropy(self) -> torch.Tensor:
        """(M,) mean router entropy per token, in nats (at most log E)."""
        return self.entropy_sum / max(self.tokens, 1)

    @classmethod
    def from_rows(
        cls, layers: list[int], n_experts: int, top_k: int, rows: Mapping[str, np.ndarray], documents: int
    ) -> RoutingStats:
        """Statistics of per-token routing rows: the arrays :func:`dsv2viz.corpus.shard.row_arrays` gives
        (``experts`` and ``weights`` as (N, K) arrays; ``layer``, ``token_id``, ``entropy``, ``near_tie`` as (N,))."""
        stats = cls(list(layers), n_experts, top_k, documents=documents)
        if len(rows["layer"]) == 0:
            return stats
        M, E, K = len(layers), n_experts, top_k
        layer = np.asarray(rows["layer"], np.int64)
        layer_row = np.full(max(layers) + 1, -1, np.int64)
        layer_row[layers] = np.arange(M)
        layer_row = layer_row[layer]  # (N,) row of each token's layer
        experts = np.asarray(rows["experts"], np.int64)  # (N, K)
        weights = np.asarray(rows["weights"], np.float64)  # (N, K)
        stats.tokens = int((layer_row == 0).sum())
        flat = (layer_row[:, None] * E + experts).ravel()
        stats.counts = torch.from_numpy(np.bincount(flat, minlength=M * E).reshape(M, E))
        stats.weight_sums = torch.from_numpy(np.bincount(flat, weights=weights.ravel(), minlength=M * E).reshape(M, E))
        pairs = (layer_row[:, None, None] * E + experts[:, :, None]) * E + experts[:, None, :]  # (N, K, K)
        stats.coactivation = torch.from_numpy(np.bincount(pairs.ravel(), minlength=M * E * E).reshape(M, E, E))
        entropy = np.asarray(rows["entropy"], np.float64)
        stats.entropy_sum = torch.from_numpy(np.bincount(layer_row, weights=entropy, minlength=M))
        bins = np.clip((entropy / math.log(E) * ENTROPY_BINS).astype(np.int64), 0, ENTROPY_BINS - 1)
        stats.entropy_hist = torch.from_numpy(
            np.bincount(layer_row * ENTROPY_BINS + bins, minlength=M * ENTROPY_BINS).reshape(M, ENTROPY_BINS)
        )
        stats.near_ties = torch.from_numpy(np.bincount(layer_row[np.asarray(rows["near_tie"], bool)], minlength=M))
        token = np.asarray(rows["token_id"], np.int64)
        stats.token_experts = _count_triples(
            np.repeat(layer, K), np.repeat(token, K), experts.ravel(), np.ones(len(layer) * K, np.int64)
        )
        stats.paths = stats._paths(*_token_major(rows, layer_row, experts, M))
        return stats

    def merge(self, other: RoutingStats) -> RoutingStats:
        """The statistics of both sets of documents (a new object; neither input changes)."""
        if (self.layers, self.n_experts, self.top_k) != (other.layers, other.n_experts, other.top_k):
            raise ValueError("these statistics come from models with different MoE layers or experts")
        te = pd.concat([self.token_experts, other.token_experts], ignore_index=True)
        merged = RoutingStats(
            self.layers,
            self.n_experts,
            self.top_k,
            self.tokens + other.tokens,
            self.documents + other.documents,
            token_experts=_count_triples(
                *(te[c].to_numpy().astype(np.int64) for c in ("layer", "token_id", "expert", "count"))
            ),
        )
        for name in _TENSORS:
            setattr(merged, name, getattr(self, name) + getattr(other, name))
        counted = self.paths is not None and other.paths is not None  # a part without them: the sum is unknown
        merged.paths = {top: self.paths[top] + other.paths[top] for top in self.path_tops} if counted else None
        return merged

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RoutingStats):
            return NotImplemented
        same = (self.layers, self.n_experts, self.top_k, self.tokens, self.documents) == (
            other.layers,
            other.n_experts,
            other.top_k,
            other.tokens,
            other.documents,
        )
        return (
            same
            and all(torch.equal(getattr(self, n), getattr(other, n)) for n in _TENSORS)
            and self.token_experts.equals(other.token_experts)
            and self.paths == other.paths
        )

    def save(self, folder: Path, stem: str) -> None:
        """Write ``{stem}.safetensors`` (tensors, sizes in its metadata; routing paths as ``paths.top{t}.*``)
        and ``{stem}.token_experts.parquet``, each whole or not at all."""
        meta = {
            "layers": ",".join(map(str, self.layers)),
            "n_experts": str(self.n_experts),
            "top_k": str(self.top_k),
            "tokens": str(self.tokens),
            "documents": str(self.documents),
        }
        tensors = {n: getattr(self, n).contiguous() for n in _TENSORS}
        for top, paths in (self.paths or {}).items():
            tensors |= {f"paths.top{top}.{n}": getattr(paths, n).contiguous() for n in _PATH_TENSORS}
            meta[f"paths.top{top}.pairs"] = str(paths.pairs)
        with atomic_path(folder / f"{stem}.safetensors") as tmp:
            save_file(tensors, tmp, metadata=meta)
        with atomic_path(folder / f"{stem}.token_experts.parquet") as tmp:
            self.token_experts.to_parquet(tmp, index=False)

    @classmethod
    def load(cls, folder: Path, stem: str) -> RoutingStats:
        from safetensors import safe_open

        path = folder / f"{stem}.safetensors"
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        tensors = load_file(path)
        counted = {n: tensors.pop(n) for n in [n for n in tensors if n.startswith("paths.")]}
        stats = cls(
            [int(x) for x in meta["layers"].split(",") if x],
            int(meta["n_experts"]),
            int(meta["top_k"]),
            int(meta["tokens"]),
            int(meta["documents"]),
            token_experts=pd.read_parquet(folder / f"{stem}.token_experts.parquet"),
            **tensors,
        )
        if not counted:  # written before routing paths were counted
            stats.paths = None
            return stats
        stats.paths = {
            top: RoutingPaths(
                stats.layers,
                stats.n_experts,
                top,
                pairs=int(meta[f"paths.top{top}.pairs"]),
                tokens=stats.tokens,
                **{n: counted[f"paths.top{top}.{n}"] for n in _PATH_TENSORS},
            )
            for top in stats.path_tops
        }
        return stats


def _token_experts_frame(layer: np.ndarray, token: np.ndarray, expert: np.ndarray, count: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "layer": layer.astype(np.int16),
            "token_id": token.astype(np.int32),
            "expert": expert.astype(np.int16),
            "count": count.astype(np.int64),
        }
    )


def _token_major(
    rows: Mapping[str, np.ndarray], layer_row: np.ndarray, experts: np.ndarray, M: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-(token, layer) rows as routing (M, S, K) in document and position order, and (S,) True where a
    document starts: what :meth:`RoutingPaths.of_sequences` counts."""
    doc = np.asarray(rows["doc_index"], np.int64)
    position = np.asarray(rows["position"], np.int64)
    order = np.lexsort((layer_row, position, doc))
    doc, position, layer_row = doc[order][::M], position[order][::M], layer_row[order]
    S = len(doc)
    if len(order) != S * M or not np.array_equal(layer_row, np.tile(np.arange(M), S)):
        raise ValueError("routing rows are not one row per (token, MoE layer); collect the documents again")
    starts = np.ones(S, bool)
    starts[1:] = (doc[1:] != doc[:-1]) | (position[1:] != position[:-1] + 1)
    return experts[order].reshape(S, M, -1).transpose(1, 0, 2), starts


def _count_triples(layer: np.ndarray, token: np.ndarray, expert: np.ndarray, count: np.ndarray) -> pd.DataFrame:
    """Sum `count` per (layer, token, expert); sorted by that key."""
    if len(layer) == 0:
        return _token_experts_frame(layer, token, expert, count)
    key = (layer << 42) | (token << 16) | expert  # layer < 2**21, token id < 2**26, expert < 2**16
    unique, inverse = np.unique(key, return_inverse=True)
    sums = np.bincount(inverse, weights=count, minlength=len(unique)).astype(np.int64)
    return _token_experts_frame(unique >> 42, (unique >> 16) & ((1 << 26) - 1), unique & 0xFFFF, sums)
