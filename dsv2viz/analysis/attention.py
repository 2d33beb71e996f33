"""Attention heads: how much of a head's score is position (rope) and how much content (nope), and how focused it is.

MLA splits every query-key score into a content part, q_nope . k_nope (through the shared latent), and
a position part, q_pe . k_pe (a small rotary key shared by all heads). Their balance tells positional
heads (previous-token, attention sinks) from content heads. These functions use ``trace.attention``,
so they cover the layers and heads a trace recorded (``Recording(attention=..., queries=True,
attention_layers=..., attention_heads=...)``); the rope share needs the queries and the latents.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator

import pandas as pd
import torch

from ..traces import AttentionView, TraceError
from ._common import Traces, as_traces, entropy


def _views(traces: Traces, layer: int | None, head: int | None, *, parts: bool = False) -> Iterator[AttentionView]:
    """The views of each trace's heads it can show (`parts`: those whose scores split into nope and rope),
    restricted to `layer` and `head` when given."""
    view, what = (
        ("attention_parts", "attention scores split into nope and rope") if parts else ("attention", "attention")
    )
    for t in as_traces(traces):
        if not t.has(view):
            raise TraceError(f"this trace recorded no {what}: record it with {t.missing(view)}")
        layers = (t.attention_parts_layers() if parts else t.attention_layers()) if layer is None else [layer]
        heads = t.attention_heads() if head is None else [head]
        for lay in layers:
            for h in heads:
                yield t.attention(lay, h)


def _frame(totals: dict[tuple[int, int], list[float]], column: str) -> pd.DataFrame:
    """Rows (layer, head, numerator / denominator) from accumulated [numerator, denominator] per head."""
    rows = [(lay, h, num / den) for (lay, h), (num, den) in sorted(totals.items())]
    return pd.DataFrame(rows, columns=["layer", "head", column])


def rope_share(traces: Traces, layer: int | None = None, head: int | None = None) -> pd.DataFrame:
    """(layer, head, rope_share): the part of each head's attended scores that comes from position.

    rope_share = sum(pattern * |rope|) / sum(pattern * (|nope| + |rope|)) over all query rows and their
    causal keys, so scores count as much as attention is paid to them. 1: the head attends by position
    alone; 0: by content alone. Over a corpus the sums run over all traces. Needs the queries and the
    latents (``Recording(queries=True, latents=True)``) to split the scores.
    """
    totals: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for v in _views(traces, layer, head, parts=True):
        if v.scores_rope is None or v.scores_nope is None:
            raise TraceError(
                f"layer {v.layer}'s scores do not split into nope and rope parts: record its queries with "
                f"Recording(queries=True, latents=True), with attention_layers including {v.layer}"
            )
        weight = v.pattern.double()  # zero on non-causal keys, so only causal keys count
        rope = float((weight * v.scores_rope.double().abs()).sum())
        nope = float((weight * v.scores_nope.double().abs()).sum())
        totals[(v.layer, v.head)][0] += rope
        totals[(v.layer, v.head)][1] += rope + nope
    return _frame(totals, "rope_share")


def head_entropy(traces: Traces, layer: int | None = None, head: int | None = None) -> pd.DataFrame:
    """(layer, head, entropy): mean entropy in nats of each recorded head's attention rows.

    Near 0: the head looks at one token per query (a sink, the previous token, a copy source); high:
    it averages over its context. Every recorded query row counts, the first position's (always 0) too.
    """
    totals: dict[tuple[int, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
    for v in _views(traces, layer, head):
        totals[(v.layer, v.head)][0] += float(entropy(v.pattern).sum())
        totals[(v.layer, v.head)][1] += len(v.query_pos)
    return _frame(totals, "entropy")


def head_matrix(frame: pd.DataFrame, column: str) -> torch.Tensor:
    """A (layer, head, value) table as a (layers, heads) tensor, for heat maps of :func:`rope_share` or
    :func:`head_entropy`: rows are the table's layers ascending, columns its heads ascending, NaN where missing."""
    wide = frame.pivot(index="layer", columns="head", values=column).sort_index().sort_index(axis=1)
    return torch.tensor(wide.to_numpy(dtype=float))
