"""Routing: which experts the router picks, how evenly, how confidently, and what it picks them for.

DeepSeekMoE sends every token to K of E routed experts (besides the always-on shared experts). These
functions read the routing a trace recorded (``Recording(routing=True)``, the default; the full router
distribution needs ``router_probs=True``), or the routing a collection wrote (a
:class:`~dsv2viz.corpus.Corpus`, for all but :func:`moe_contributions` and :func:`compare`), and answer the usual questions about a mixture of experts: is
the load balanced (:func:`expert_utilization`), which experts work together (:func:`coactivation`), how
sure is the router (:func:`routing_entropy`, :func:`topk_margin`, :func:`near_ties`), what does each
expert specialise in (:func:`top_tokens_per_expert`), how much do the routed experts add next to the
shared ones (:func:`moe_contributions`), and what did an intervention change (:func:`compare`).

Layers are model layer indices; tensors with an M axis follow ``trace.moe_layers`` in order.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..traces import Trace, TraceError
from ._common import Routed, Traces, as_traces, concat_positions, entropy, frame_per_trace, is_corpus

#: bf16 unit roundoff: rounding one value to bf16 (8 significant bits) moves it by up to 2**-8 of itself.
BF16_ROUNDOFF = 2.0**-8


@dataclass
class ExpertUtilization:
    """How many tokens each routed expert received, per MoE layer, and how even that load is."""

    counts: torch.Tensor  # (M, E) int64: tokens routed to each expert, summed over the K slots
    fractions: torch.Tensor  # (M, E) counts / tokens: each row sums to K
    cv: torch.Tensor  # (M,) coefficient of variation of counts (population std / mean): 0 is perfect balance
    max_over_mean: torch.Tensor  # (M,) the busiest expert's load over the mean load
    layers: list[int]  # the model layers of the M rows
    tokens: int  # tokens counted

    def to_frame(self) -> pd.DataFrame:
        """One row per (layer, expert): count and fraction."""
        M, E = self.counts.shape
        return pd.DataFrame(
            {
                "layer": np.repeat(self.layers, E),
                "expert": np.tile(np.arange(E), M),
                "count": self.counts.flatten().numpy(),
                "fraction": self.fractions.flatten().numpy(),
            }
        )


def expert_utilization(traces: Routed, *, generated_only: bool = False) -> ExpertUtilization:
    """Tokens per expert and layer over a trace or corpus; `generated_only` skips the prompts.

    Load balance is what the auxiliary loss trained for: a high `cv` or `max_over_mean` on some text
    shows experts that are idle or overloaded on it, i.e. specialised to (or against) that kind of text.
    """
    if is_corpus(traces):
        if generated_only:
            raise ValueError("a collected corpus was read, not generated: it has no generated tokens")
        return _utilization(traces.stats.counts.clone(), traces.tokens, traces.moe_layers)
    traces = as_traces(traces)
    config = traces[0].config
    layers, E = config.moe_layers, config.n_routed_experts
    counts = torch.zeros(len(layers), E, dtype=torch.int64)
    tokens = 0
    for t in traces:
        start = t.prompt_len if generated_only else 0
        for row, layer in enumerate(layers):
            counts[row] += t.routing(layer)[0][start:].flatten().bincount(minlength=E)
        tokens += len(t) - start
    return _utilization(counts, tokens, layers)


def _utilization(counts: torch.Tensor, tokens: int, layers: list[int]) -> ExpertUtilization:
    load = counts.double()
    mean = load.mean(dim=1)
    return ExpertUtilization(
        counts=counts,
        fractions=load / tokens,
        cv=load.std(dim=1, correction=0) / mean,
        max_over_mean=load.amax(dim=1) / mean,
        layers=list(layers),
        tokens=tokens,
    )


def coactivation(traces: Routed, layer: int) -> torch.Tensor:
    """(E, E) int64: how many tokens had both expert i and expert j among their top-k at `layer`.

    The diagonal is each expert's token count. Pairs chosen together far more often than their counts
    predict are experts that work as a team (or split one job between them).
    """
    if is_corpus(traces):
        return traces.stats.coactivation[_corpus_row(traces, layer)].clone()
    traces = as_traces(traces)
    E = traces[0].config.n_routed_experts
    out = torch.zeros(E, E, dtype=torch.int64)
    for t in traces:
        experts = t.routing(layer)[0]  # (S, K)
        chosen = torch.zeros(len(experts), E, dtype=torch.int64).scatter_(1, experts, 1)  # (S, E) 0/1
        out += chosen.T @ chosen
    return out


def routing_entropy(traces: Routed) -> torch.Tensor:
    """(M, S) entropy in nats of the full router distribution of each token (at most log E).

    Low entropy: the router is sure which experts a token needs; high: it spreads its probability and
    the top-k choice rests on small differences. Needs ``Recording(router_probs=True)`` (raises
    TraceError otherwise); :func:`topk_weight_entropy` works on default recordings. A corpus gives the
    entropies its collection computed (in float32), tokens in corpus order.
    """
    if is_corpus(traces):
        return torch.from_numpy(traces.per_layer("entropy")).double()
    return concat_positions(traces, lambda t: torch.stack([entropy(t.router_probs(m)) for m in t.moe_layers]))


def topk_weight_entropy(traces: Routed) -> torch.Tensor:
    """(M, S) entropy in nats of each token's top-k weights, normalised to sum to one (at most log K).

    Says how evenly a token leans on the experts it was sent to: log K when they weigh the same, near 0
    when one expert carries it. Works on default recordings (only the top-k weights are needed).
    """
    if is_corpus(traces):
        weights = torch.from_numpy(traces.per_layer("weights")).double()  # (M, S, K)
        return entropy(weights / weights.sum(-1, keepdim=True))

    def one(t: Trace) -> torch.Tensor:
        weights = torch.stack([t.routing(m)[1] for m in t.moe_layers]).double()  # (M, S, K)
        return entropy(weights / weights.sum(-1, keepdim=True))

    return concat_positions(traces, one)


@dataclass
class RouterMargin:
    """Top-k margins of router distributions: each token's K-th and (K+1)-th likeliest experts and their gap."""

    margin: torch.Tensor  # (...) probability of the K-th minus that of the (K+1)-th
    kth_prob: torch.Tensor  # (...)
    kth_expert: torch.Tensor  # (...)
    next_expert: torch.Tensor  # (...)

    def near_tie(self, threshold: float | None = None) -> torch.Tensor:
        """(...) bool: margin below `threshold`, or by default below 2**-8 of the K-th probability (see near_ties)."""
        return self.margin < (self.kth_prob * BF16_ROUNDOFF if threshold is None else threshold)


def router_margin(probs: torch.Tensor, k: int) -> RouterMargin:
    """The top-`k` margins of router distributions `probs` (..., E); shared by traces and collected corpora."""
    best = probs.topk(k + 1, dim=-1)
    p, e = best.values, best.indices
    return RouterMargin(p[..., k - 1] - p[..., k], p[..., k - 1], e[..., k - 1], e[..., k])


def _margin(t: Trace, layer: int) -> RouterMargin:
    return router_margin(t.router_probs(layer), t.config.num_experts_per_tok)


def topk_margin(traces: Routed) -> torch.Tensor:
    """(M, S) the K-th minus the (K+1)-th largest router probability of each token (>= 0).

    How close the token came to a different expert set: a margin near zero means a tiny change in the
    hidden state (a prompt edit, another dtype) would swap its last expert. Needs
    ``Recording(router_probs=True)``. Ranks are those of the plain router distribution (V2-Lite's greedy
    top-k; with group-limited routing the chosen set may differ from them).
    """
    if is_corpus(traces):
        return torch.from_numpy(traces.per_layer("margin")).double()
    return concat_positions(traces, lambda t: torch.stack([_margin(t, m).margin for m in t.moe_layers]))


def near_ties(traces: Routed, threshold: float | None = None) -> pd.DataFrame:
    """Tokens whose top-k margin is below `threshold`: (trace, position, layer, token, kth_expert, next_expert, margin).

    `kth_expert` is the token's K-th choice and `next_expert` the runner-up it nearly took instead. A
    given `threshold` is an absolute probability. The default is relative: 2**-8 times the K-th
    probability, the bf16 unit roundoff. The released weights and the hidden states are bf16, so one
    rounding step of the inputs of either probability (another kernel, GPU or batch size; fp32 against
    bf16 inference) can move it by about that much; below it the choice of expert is an accident of
    rounding rather than something the model decided, and a study of routing should not read meaning
    into it. Needs ``Recording(router_probs=True)``.

    On a corpus, rows are (doc_index, doc_id, position, layer, token, kth_expert, next_expert, margin): the
    tokens the collection flagged with its own threshold, or with `threshold` given, those below it.
    """
    if is_corpus(traces):
        return _corpus_near_ties(traces, threshold)

    def one(t: Trace) -> pd.DataFrame:
        rows = []
        for layer in t.moe_layers:
            m = _margin(t, layer)
            for pos in m.near_tie(threshold).nonzero().flatten().tolist():
                expert, runner_up = int(m.kth_expert[pos]), int(m.next_expert[pos])
                rows.append((pos, layer, t.token_texts[pos], expert, runner_up, float(m.margin[pos])))
        columns = ["position", "layer", "token", "kth_expert", "next_expert", "margin"]
        return pd.DataFrame(rows, columns=columns).sort_values(["position", "layer"], ignore_index=True)

    return frame_per_trace(traces, one)


def top_tokens_per_expert(traces: Routed, layer: int, *, n: int = 10) -> pd.DataFrame:
    """Each expert's `n` most frequent tokens at `layer`: (expert, token, count, share).

    `share` is the token's part of everything routed to that expert. This is the first look at what an
    expert specialises in (digits, punctuation, one language, code). Tokens are grouped by their label
    shown alone (`dsv2viz.text.label`, the same wherever the id occurs); ties in count are broken by
    label, so the table is deterministic.
    """
    if is_corpus(traces):
        _corpus_row(traces, layer)
        te = traces.stats.token_experts
        te = te[te["layer"] == layer]
        df = (
            te.assign(token=traces.token_text(te["token_id"].tolist()))
            .groupby(["expert", "token"], as_index=False)["count"]
            .sum()
        )
        df["expert"] = df["expert"].astype(np.int64)
    else:
        pairs: Counter[tuple[int, str]] = Counter()
        for t in as_traces(traces):
            experts = t.routing(layer)[0]
            for text, chosen in zip(t.id_labels, experts.tolist()):
                pairs.update((e, text) for e in chosen)
        df = pd.DataFrame([(e, text, c) for (e, text), c in pairs.items()], columns=["expert", "token", "count"])
    df["share"] = df["count"] / df.groupby("expert")["count"].transform("sum")
    df = df.sort_values(["expert", "count", "token"], ascending=[True, False, True])
    return df.groupby("expert").head(n).reset_index(drop=True)


def _corpus_row(corpus, layer: int) -> int:
    if layer not in corpus.moe_layers:
        raise ValueError(f"layer {layer} is not an MoE layer; MoE layers are {corpus.moe_layers}")
    return corpus.moe_layers.index(layer)


def _corpus_near_ties(corpus, threshold: float | None) -> pd.DataFrame:
    columns = ["doc_index", "doc_id", "position", "layer", "token_id", "kth_expert", "next_expert", "margin"]
    rows = corpus.rows(columns + ["near_tie"])
    rows = rows[rows["near_tie"] if threshold is None else rows["margin"] < threshold]
    rows = rows.assign(token=corpus.token_text(rows["token_id"].tolist()), doc_id=rows["doc_id"].astype(str))
    out = rows[["doc_index", "doc_id", "position", "layer", "token", "kth_expert", "next_expert", "margin"]]
    return out.astype(
        {"layer": np.int64, "kth_expert": np.int64, "next_expert": np.int64, "margin": np.float64}
    ).reset_index(drop=True)


def moe_contributions(traces: Traces) -> pd.DataFrame:
    """Per MoE layer and token: norms of the routed and shared experts' outputs and the routed share.

    Columns (trace, layer, position, routed_norm, shared_norm, routed_share), with routed_share =
    routed_norm / (routed_norm + shared_norm). DeepSeekMoE's shared experts see every token; this shows
    where the routed experts add much beside them and where they barely matter. Needs
    ``Recording(moe_norms=True)`` (the default).
    """

    def one(t: Trace) -> pd.DataFrame:
        if not t.moe_layers:
            raise ValueError("this model has no MoE layers: it has no routed or shared experts to measure")
        norms = [t.moe_norms(layer) for layer in t.moe_layers]
        routed = torch.stack([r for r, _ in norms]).double()  # (M, S)
        shared = torch.stack([s for _, s in norms]).double()  # (M, S), zeros without shared experts
        M, S = routed.shape
        return pd.DataFrame(
            {
                "layer": np.repeat(t.moe_layers, S),
                "position": np.tile(np.arange(S), M),
                "routed_norm": routed.flatten().numpy(),
                "shared_norm": shared.flatten().numpy(),
                "routed_share": (routed / (routed + shared)).flatten().numpy(),
            }
        )

    return frame_per_trace(traces, one)


@dataclass
class TraceComparison:
    """What differs between two traces of the same model: tokens, routing and next-token distributions."""

    routing_changed: torch.Tensor  # (M,) fraction of the shared-prefix positions whose top-k expert set differs
    first_divergence: int | None  # first position where the tokens differ; None when one trace prefixes the other
    kl: (
        torch.Tensor
    )  # (G,) per step g of `a`: KL(a || b) of the distributions step g was drawn from; NaN: not comparable
    kl_exact: bool  # True: over the full vocabulary; False: over the recorded top tokens plus one "other" bucket
    layers: list[int]  # the model layers of routing_changed


def compare(a: Trace, b: Trace) -> TraceComparison:
    """Compare trace `b` against trace `a`, typically the same prompt without and with an intervention.

    Routing is compared on the shared prefix (positions 0 up to the first differing token), where both
    traces read the same tokens, so any change there is the intervention's doing. `kl[i]` is for the
    distribution `a` drew its i-th new token from, against `b`'s distribution for the same position; it
    is comparable only when both were conditioned on the same tokens, i.e. for steps up to and including
    the one that produced the first differing token, and NaN after (or where `b` has no such step).

    With ``full_logits=True`` in both traces the KL is exact. Otherwise it is the KL of the two
    distributions coarse-grained to the tokens both traces' top lists recorded plus one bucket holding
    the rest of each distribution's mass. The union of the top lists cannot be used, because a token in
    one list but not the other has no recorded probability in the other; the intersection is exactly
    known in both, and by the data-processing inequality the coarse KL is a lower bound of the true one.
    """
    n = min(len(a), len(b))
    differ = (a.token_ids[:n] != b.token_ids[:n]).nonzero()
    first = int(differ[0]) if len(differ) else None
    shared = n if first is None else first
    changed = []
    for layer in a.moe_layers:
        set_a = a.routing(layer)[0][:shared].sort(dim=-1).values
        set_b = b.routing(layer)[0][:shared].sort(dim=-1).values
        changed.append(float((set_a != set_b).any(dim=-1).double().mean()))  # NaN with no shared prefix
    exact = a.has("full_logits") and b.has("full_logits")
    if not exact and not (a.has("candidates") and b.has("candidates")):
        raise TraceError(
            "compare needs the next-token distributions of both traces: record them with "
            "Recording(top_logits=10), or Recording(full_logits=True) in both traces"
        )
    G = len(a) - a.prompt_len
    kl = torch.full((G,), math.nan, dtype=torch.float64)
    for i in range(G):
        pos = a.prompt_len + i  # the position this step's distribution predicts
        j = pos - b.prompt_len  # b's step predicting the same position
        if pos <= shared and 0 <= j < len(b) - b.prompt_len:
            kl[i] = (_kl_full if exact else _kl_top)(a, b, pos - 1)  # the distributions after reading pos - 1
    return TraceComparison(torch.tensor(changed, dtype=torch.float64), first, kl, exact, list(a.moe_layers))


def _kl_full(a: Trace, b: Trace, position: int) -> float:
    """KL(a || b) of the next-token distributions after reading `position`, over the whole vocabulary."""
    log_a, log_b = a.logprobs(position).double(), b.logprobs(position).double()
    p = log_a.exp()
    return float(torch.where(p > 0, p * (log_a - log_b), 0.0).sum())


def _kl_top(a: Trace, b: Trace, position: int) -> float:
    """KL of the next-token distributions after reading `position`, coarse-grained to the tokens both
    recorded plus an "other" bucket."""
    ids_a, probs_a = (x.tolist() for x in a.candidates(position))
    b_prob = dict(zip(*(x.tolist() for x in b.candidates(position))))
    both = [(p, b_prob[t]) for t, p in zip(ids_a, probs_a) if t in b_prob]
    p = torch.tensor([pa for pa, _ in both], dtype=torch.float64)
    q = torch.tensor([pb for _, pb in both], dtype=torch.float64)
    p = torch.cat([p, (1 - p.sum()).clamp(min=0)[None]])
    q = torch.cat([q, (1 - q.sum()).clamp(min=0)[None]])
    return float(torch.where(p > 0, p * (p.log() - q.log()), 0.0).sum())
