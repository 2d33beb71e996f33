"""What every analysis shares: a trace or a corpus of traces taken as a list, and the entropy of distributions.

A corpus is a list of traces from one model. Per-position results of a corpus concatenate the traces'
positions in corpus order; tables get a ``trace`` column holding each row's index in the corpus. The
routing analyses also take a collection of routed tokens such as a collected
:class:`~dsv2viz.corpus.Corpus` (``dsv2viz collect``), through the small :class:`RoutingCollection`
protocol: the analyses never import the corpus package, which builds on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol, Union, runtime_checkable

import numpy as np
import pandas as pd
import torch

from ..traces import Trace

Traces = Union[Trace, Sequence[Trace]]


@runtime_checkable
class RoutingCollection(Protocol):
    """What the routing analyses read from a collection of routed tokens (:class:`dsv2viz.corpus.Corpus`).

    `stats` holds per-layer sums that add across shards: ``counts`` (M, E), ``coactivation`` (M, E, E),
    ``token_experts`` (a table of layer, token_id, expert, count); ``per_layer(column)`` gives a per-token
    column as (M, S, ...) in collection order; ``rows`` reads per-token rows; ``token_text`` labels ids.
    """

    stats: Any
    moe_layers: list[int]
    tokens: int

    def per_layer(self, column: str) -> np.ndarray: ...

    def rows(self, columns: Sequence[str] | None = None, *, layers: Sequence[int] | None = None) -> pd.DataFrame: ...

    def token_text(self, token_ids: Sequence[int]) -> list[str]: ...


Routed = Union[Traces, RoutingCollection]  # what the routing analyses accept


def is_corpus(x: Any) -> bool:
    """Whether `x` is a collection of routed tokens (a collected Corpus) rather than traces."""
    return isinstance(x, RoutingCollection)


def as_traces(traces: Traces) -> list[Trace]:
    """`traces` as a list: a single trace becomes a one-trace corpus. Refuses an empty corpus or mixed models."""
    out = [traces] if isinstance(traces, Trace) else list(traces)
    if not out:
        raise ValueError("no traces given: pass a Trace or a non-empty list of them")
    if any(t.config != out[0].config for t in out[1:]):
        raise ValueError("these traces come from models of different configurations; analyse them separately")
    return out


def concat_positions(traces: Traces, per_trace: Callable[[Trace], torch.Tensor]) -> torch.Tensor:
    """`per_trace` (a tensor whose last dim is positions) of each trace, concatenated along positions."""
    return torch.cat([per_trace(t) for t in as_traces(traces)], dim=-1)


def frame_per_trace(traces: Traces, per_trace: Callable[[Trace], pd.DataFrame]) -> pd.DataFrame:
    """`per_trace` of each trace stacked into one table, with a leading ``trace`` column (index in the corpus)."""
    frames = [per_trace(t).assign(trace=i) for i, t in enumerate(as_traces(traces))]
    df = pd.concat(frames, ignore_index=True)
    return df[["trace"] + [c for c in df.columns if c != "trace"]]


def entropy(p: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Entropy in nats of distributions along `dim` (0 log 0 = 0), computed in float64."""
    return torch.special.entr(p.double()).sum(dim)
