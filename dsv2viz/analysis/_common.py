"""What every analysis shares: a trace or a corpus of traces taken as a list, and the entropy of distributions.

A corpus is a list of traces from one model. Per-position results of a corpus concatenate the traces'
positions in corpus order; tables get a ``trace`` column holding each row's index in the corpus. The
routing analyses also take a collection of routed tokens such as a collected
:class:`~dsv2viz.corpus.Corpus` (``dsv2viz collect``), through the small :class:`RoutingCollection`
protocol: the analyses never import the corpus package, which builds on them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol, Union, runtime_checkable

import numpy as np
import pandas as pd
import torch

from ..tokenizer import SequenceText
from ..traces import Trace

if TYPE_CHECKING:
    from ..model import DeepseekV2ForCausalLM

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
Tokens = Union[Trace, str, Sequence[int], torch.Tensor]  # what the analyses that rerun the model read

#: Most copies of a sequence one forward pass of the batched analyses (ablations, patching) may hold.
MAX_BATCH = 1024


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


def token_sequence(model: DeepseekV2ForCausalLM, tokens: Tokens) -> tuple[torch.Tensor, list[str]]:
    """(ids (T,) int64 on the CPU, their token texts) of a trace, a text or token ids, checked against `model`.

    A trace keeps its own token texts; a text is encoded as ``model.generate`` encodes a plain prompt (BOS
    first when the tokenizer adds one); ids get their texts from the model's tokenizer. A trace recorded with
    a model of another configuration, an empty sequence, ids outside the vocabulary, or more tokens than the
    model's context are refused.
    """
    if isinstance(tokens, Trace):
        if tokens.config != model.config:
            raise ValueError("this trace was recorded with a model of another configuration; rerun it with that model")
        return tokens.token_ids.long().cpu(), list(tokens.token_texts)
    if isinstance(tokens, str):
        if model.tokenizer is None:
            raise ValueError("this model has no tokenizer (no tokenizer.json in its folder): pass token ids")
        tokens = model.tokenizer.encode(tokens, max_tokens=model.config.max_position_embeddings)
    elif isinstance(tokens, bytes) or not isinstance(tokens, (Sequence, torch.Tensor, np.ndarray)):
        raise ValueError(f"pass a trace, a text or token ids; got {type(tokens).__name__}")
    try:
        ids = torch.as_tensor(tokens)
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"token ids must be integers in one sequence; got {str(tokens)[:60]} ({e})") from None
    if ids.dim() == 2 and ids.shape[0] == 1:  # (1, T), as the model takes them
        ids = ids[0]
    if ids.numel() == 0:
        raise ValueError("no tokens given: pass a trace or at least one token id")
    if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise ValueError(
            f"token ids must be integers in one sequence (T,) or (1, T); got {tuple(ids.shape)} {ids.dtype}"
        )
    if len(ids) > model.config.max_position_embeddings:
        raise ValueError(f"{len(ids)} tokens exceed the model's context of {model.config.max_position_embeddings}")
    V = model.config.vocab_size
    bad = ids[(ids < 0) | (ids >= V)]
    if len(bad):
        raise ValueError(f"token ids {bad[:5].tolist()} are outside the vocabulary of {V}")
    ids = ids.long().cpu()
    text = SequenceText(model.tokenizer)
    text.append(ids.tolist())
    return ids, text.labels


def sequence_positions(positions: int | Sequence[int], length: int) -> list[int]:
    """Positions in a sequence of `length` tokens, negative ones counted from the end, repeats dropped."""
    wanted = [positions] if isinstance(positions, int) else list(positions)
    out = []
    for p in wanted:
        if not isinstance(p, (int, np.integer)) or isinstance(p, bool):
            raise ValueError(f"positions must be integers; got {p!r}")
        if not -length <= p < length:
            raise ValueError(f"position {p} is outside the sequence of {length} tokens")
        out.append(int(p) % length)
    if not out:
        raise ValueError("no positions given: pass at least one")
    return list(dict.fromkeys(out))


def token_id(model: DeepseekV2ForCausalLM, token: object, what: str) -> int:
    """`token` checked as an id of the model's vocabulary (`what` names it in the error)."""
    V = model.config.vocab_size
    if not isinstance(token, (int, np.integer)) or isinstance(token, bool) or not 0 <= token < V:
        raise ValueError(f"{what}={token!r} must be a token id in 0..{V - 1}")
    return int(token)


def check_batch_size(batch_size: object) -> None:
    """How many copies of a sequence a batched analysis runs at once: an integer in 1..MAX_BATCH."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or not 1 <= batch_size <= MAX_BATCH:
        raise ValueError(f"batch_size={batch_size!r} must be an integer in 1..{MAX_BATCH}")
