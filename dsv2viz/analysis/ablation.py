"""Causal effects: what a token's prediction loses when one part of the model is taken away.

:func:`ablation_effects` measures it by rerunning: for one position, each routed expert the token used
is removed from routing at its layer (the next-best expert takes the slot, as
:func:`dsv2viz.interventions.ablate_experts` does, at that position only), each attention head's output
is zeroed at that position, and so are the shared experts and the dense MLP. The change in the target's
log-probability is the part's total effect: through the residual stream directly and through everything
later layers did differently. The ablations run as one batch of copies of the sequence, each copy with
its own ablation, in chunks of `batch_size` copies.

:func:`attribution_patching` estimates the same effects for every part at every position from one
forward and one backward pass (Nanda's attribution patching, gradient x change of activation), for when
exact sweeps are too slow. It is a first-order estimate: it misses saturation and the interactions a
nonlinearity introduces. Measured on the bundled demo model (tests/test_attribution.py, five positions of
one 29-token prompt, 26 parts each): the Spearman rank correlation between estimates and exact effects
is 0.70 on average per position (0.63 to 0.75); pooled within one kind of part it is 0.98 for routed
experts, 0.89 for heads and 0.85 for the shared experts. Zeroing the dense layer-0 MLP, a large nonlinear
change, had the largest exact effect at all five positions (-0.6 to -4.4 nats) and an estimate of the
wrong sign at all five. That is one small model and one prompt, not a guarantee for DeepSeek-V2-Lite:
check the estimates you rely on with :func:`ablation_effects`, large removals above all.

Parts are named as in :mod:`dsv2viz.analysis.attribution` (``L3.E17``, ``L3.H5``, ``L3.shared``,
``L0.mlp``), so these tables join the direct attribution's on ``component``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..tokenizer import id_labels
from ._common import Tokens, check_batch_size, sequence_positions, token_id, token_sequence
from .attribution import component_name, default_target, largest_first

if TYPE_CHECKING:
    from ..hooks import HookPoint
    from ..model import DeepseekV2ForCausalLM

Ablation = tuple[str, int, int]  # kind, layer, index (expert or head; -1 for shared and dense)


@dataclass
class AblationEffects:
    """The exact effect of removing each part on one position's target log-probability.

    ``frame``: component, kind (expert, head, shared, dense), layer, index (expert or head id, -1 for the
    others), weight (an expert's router weight at this position, NaN for the others), logprob (the
    target's log-probability with the part removed) and effect (logprob minus ``clean_logprob``:
    negative when the part helped the target); sorted by |effect|, largest first.
    """

    position: int
    token_text: str
    target: int
    target_text: str
    clean_logprob: float
    frame: pd.DataFrame


def ablation_effects(
    model: DeepseekV2ForCausalLM,
    tokens: Tokens,
    position: int = -1,
    *,
    target: int | None = None,
    batch_size: int = 16,
) -> AblationEffects:
    """Remove each routed expert, head, shared experts and dense MLP at `position`, one at a time, and
    measure the change in the log-probability of `target` after reading `position`.

    `target` defaults to the token the model produced next (the sequence's token at ``position + 1``, else
    the model's likeliest). Experts are the ones the token was routed to; a removed expert's slot goes to
    the next-best expert, which keeps the router's own weight. Tokens after `position` cannot change its
    prediction, so the sequence is cut there. `batch_size` copies run at once. The reruns add no
    intervention of their own; inside ``with model.hooks(interventions):`` they measure the intervened model.
    """
    ids, texts = token_sequence(model, tokens)
    position = sequence_positions(position, len(ids))[0]
    check_batch_size(batch_size)
    target = None if target is None else token_id(model, target, "target")
    prefix = ids[None, : position + 1].to(model.device)  # (1, position + 1)
    c = model.config
    names = [f"model.layers.{layer}.mlp.gate.hook_topk_{what}" for layer in c.moe_layers for what in ("idx", "weights")]
    with torch.no_grad():
        logits, cache = model.run_with_cache(prefix, names_filter=names or "hook_logits", last_only=True)
    logits = logits[0, -1].float().cpu()
    target = default_target(ids, position, logits) if target is None else target
    clean = float(logits.log_softmax(-1)[target])

    ablations: list[Ablation] = []
    weights: list[float] = []
    for layer in range(c.num_hidden_layers):
        ablations += [("head", layer, h) for h in range(c.num_attention_heads)]
        weights += [np.nan] * c.num_attention_heads
        if c.is_moe_layer(layer):
            gate = f"model.layers.{layer}.mlp.gate"
            ablations += [("expert", layer, e) for e in cache[f"{gate}.hook_topk_idx"][0, -1].tolist()]
            weights += cache[f"{gate}.hook_topk_weights"][0, -1].double().tolist()
            if c.n_shared_experts:
                ablations.append(("shared", layer, -1))
                weights.append(np.nan)
        else:
            ablations.append(("dense", layer, -1))
            weights.append(np.nan)

    logprobs = []
    for start in range(0, len(ablations), batch_size):
        chunk = ablations[start : start + batch_size]
        with torch.no_grad():
            out = model.run_with_hooks(
                prefix.expand(len(chunk), -1), fwd_hooks=_ablation_hooks(chunk, position), last_only=True
            )
        logprobs.append(out[:, -1].float().log_softmax(-1)[:, target].cpu())
    logprob = torch.cat(logprobs).double().numpy()
    frame = pd.DataFrame(
        {
            "component": [component_name(*a) for a in ablations],
            "kind": [a[0] for a in ablations],
            "layer": np.array([a[1] for a in ablations], dtype=np.int64),
            "index": np.array([a[2] for a in ablations], dtype=np.int64),
            "weight": np.array(weights, dtype=np.float64),
            "logprob": logprob,
            "effect": logprob - clean,
        }
    )
    return AblationEffects(
        position,
        texts[position],
        target,
        id_labels(model.tokenizer, [target])[0],
        clean,
        largest_first(frame, "effect"),
    )


def _ablation_hooks(chunk: list[Ablation], position: int) -> list[tuple[str, Callable]]:
    """Hooks for one batch: copy b of the sequence has ablation chunk[b] applied at `position` only."""
    where = {
        "expert": "model.layers.{}.mlp.gate.hook_probs",  # probability 0: the next-best expert takes the slot
        "head": "model.layers.{}.self_attn.hook_z",
        "shared": "model.layers.{}.mlp.shared_experts.hook_out",
        "dense": "model.layers.{}.mlp.hook_out",
    }
    groups: dict[str, tuple[list[int], list[int]]] = {}
    for row, (kind, layer, index) in enumerate(chunk):
        rows, indices = groups.setdefault(where[kind].format(layer), ([], []))
        rows.append(row)
        indices.append(index)
    return [(name, _zero_at(rows, position, indices)) for name, (rows, indices) in groups.items()]


def _zero_at(rows: list[int], position: int, indices: list[int]) -> Callable:
    """A hook zeroing value[row, position] (or value[row, position, index] when indices are >= 0) per row."""
    rows_t = torch.tensor(rows)
    index_t = torch.tensor(indices)

    def zero(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # (B, T, ...)
        x = x.clone()
        r = rows_t.to(x.device)
        if index_t[0] < 0:  # a whole output (shared experts, dense MLP)
            x[r, position] = 0
        else:  # one expert's probability or one head's z
            x[r, position, index_t.to(x.device)] = 0
        return x

    return zero


@dataclass
class AttributionPatching:
    """Gradient estimates of removing each part at each position, for one metric: the summed
    log-probability of ``targets`` after reading ``positions``.

    ``frame``: position (where the part is removed), component, kind, layer, index, weight (as in
    :class:`AblationEffects`) and estimate (the first-order change of the metric); sorted by position,
    then by |estimate|, largest first. With one metric position, its rows at that position estimate
    :func:`ablation_effects`' ``effect`` column.
    """

    positions: list[int]  # the positions whose next-token log-probabilities make the metric
    targets: list[int]
    metric: float  # the summed log-probability itself, unablated
    frame: pd.DataFrame

    def at(self, position: int) -> pd.DataFrame:
        """The estimates of removing each part at one position, largest |estimate| first."""
        return self.frame[self.frame["position"] == position].reset_index(drop=True)


def attribution_patching(
    model: DeepseekV2ForCausalLM,
    tokens: Tokens,
    positions: Sequence[int] | None = None,
    *,
    target: int | None = None,
) -> AttributionPatching:
    """Estimate, for every part at every position at once, how removing it would change the summed
    log-probability of the targets after `positions` (default: every position that has a next token, i.e.
    the log-likelihood of the sequence), from one forward and one backward pass.

    Each estimate is grad . (removed activation - activation): for a head, -grad_z . z; for the shared
    experts or a dense MLP, -grad . output; for a routed expert, grad . (the MoE output with that expert
    removed and the next-best one in its slot - the MoE output), where the router's own code picks the
    replacement and its weight (one extra router call per MoE layer, and the replacement experts run
    once on the tokens that would take them). Gradients are enabled only for the activations of this
    run, whatever the caller's grad mode; the model's weights stay frozen. `target` (one token for every
    metric position) defaults to each position's next token, or the model's likeliest after the last.
    """
    ids, _ = token_sequence(model, tokens)
    T = len(ids)
    if positions is None:
        if T < 2:
            raise ValueError("one token has no next token to score: pass positions=[0] (its likeliest next token)")
        positions = range(T - 1)
    pos = sequence_positions(positions, T)
    fixed = None if target is None else token_id(model, target, "target")
    prefix = ids[None, : max(pos) + 1].to(model.device)  # later tokens cannot change these predictions
    run = _GradientRun(model)
    with torch.enable_grad():
        logits = model.run_with_hooks(prefix, fwd_hooks=run.hooks())
        logprobs = logits[0, pos].float().log_softmax(-1)  # (P, V)
        targets = [fixed if fixed is not None else default_target(ids, p, logprobs[i]) for i, p in enumerate(pos)]
        metric = logprobs[torch.arange(len(pos)), torch.tensor(targets)].sum()
        grads = dict(zip(run.watched, torch.autograd.grad(metric, list(run.watched.values()))))
    with torch.no_grad():
        frame = run.estimates(grads)
    return AttributionPatching(
        pos, targets, float(metric.detach()), largest_first(frame, "estimate", within=["position"])
    )


class _GradientRun:
    """Hooks for attribution patching: the activations to differentiate and the ones their changes need."""

    def __init__(self, model: DeepseekV2ForCausalLM) -> None:
        self.model = model
        self.watched: dict[str, torch.Tensor] = {}  # in the autograd graph: the heads' z, each residual after a layer
        self.kept: dict[str, torch.Tensor] = {}  # detached: routing, MoE inputs, shared and dense outputs

    def hooks(self) -> list[tuple[str, Callable]]:
        c = self.model.config
        hooks: list[tuple[str, Callable]] = [("model.hook_embed", _start_graph)]
        for layer in range(c.num_hidden_layers):
            prefix = f"model.layers.{layer}"
            hooks += [(f"{prefix}.self_attn.hook_z", self._watch), (f"{prefix}.hook_resid_post", self._watch)]
            if c.is_moe_layer(layer):
                hooks += [
                    (f"{prefix}.hook_resid_mid", self._keep),
                    (f"{prefix}.mlp.gate.hook_topk_idx", self._keep),
                    (f"{prefix}.mlp.gate.hook_topk_weights", self._keep),
                ]
                if c.n_shared_experts:
                    hooks.append((f"{prefix}.mlp.shared_experts.hook_out", self._keep))
            else:
                hooks.append((f"{prefix}.mlp.hook_out", self._keep))
        return hooks

    def _watch(self, x: torch.Tensor, hook: HookPoint) -> None:
        self.watched[hook.name] = x

    def _keep(self, x: torch.Tensor, hook: HookPoint) -> None:
        self.kept[hook.name] = x.detach()

    def estimates(self, grads: dict[str, torch.Tensor]) -> pd.DataFrame:
        """One row per (position, part): the first-order change of the metric when the part is removed there."""
        c, kept = self.model.config, self.kept
        parts: list[tuple[str, int, np.ndarray, np.ndarray, np.ndarray]] = []  # kind, layer, index, weight, (T, n)
        for layer, block in enumerate(self.model.model.layers):
            prefix = f"model.layers.{layer}"
            z = self.watched[f"{prefix}.self_attn.hook_z"].detach()[0].float()  # (T, H, dv)
            heads = -(grads[f"{prefix}.self_attn.hook_z"][0].float() * z).sum(-1)  # (T, H)
            H = c.num_attention_heads
            parts.append(("head", layer, np.tile(np.arange(H), (len(z), 1)), np.full(heads.shape, np.nan), heads))
            grad = grads[f"{prefix}.hook_resid_post"][0].float()  # (T, D): d metric / d (the layer's MLP output)
            if not c.is_moe_layer(layer):
                dense = -(grad * kept[f"{prefix}.mlp.hook_out"][0].float()).sum(-1, keepdim=True)
                parts.append(("dense", layer, np.full(dense.shape, -1), np.full(dense.shape, np.nan), dense))
                continue
            idx, weights = kept[f"{prefix}.mlp.gate.hook_topk_idx"][0], kept[f"{prefix}.mlp.gate.hook_topk_weights"][0]
            x = block.post_attention_layernorm(kept[f"{prefix}.hook_resid_mid"][0])  # (T, D) the MoE's input
            experts = self._expert_removals(layer, block.mlp, x, idx, weights.float(), grad)  # (T, K)
            parts.append(("expert", layer, idx.cpu().numpy(), weights.double().cpu().numpy(), experts))
            if c.n_shared_experts:
                shared = -(grad * kept[f"{prefix}.mlp.shared_experts.hook_out"][0].float()).sum(-1, keepdim=True)
                parts.append(("shared", layer, np.full(shared.shape, -1), np.full(shared.shape, np.nan), shared))
        return _parts_frame(parts)

    def _expert_removals(
        self, layer: int, moe: torch.nn.Module, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, grad: torch.Tensor
    ) -> torch.Tensor:
        """(T, K): grad . (MoE routed output with expert idx[t, k] removed from token t's routing - as it was)."""
        T, K = idx.shape

        def remove(probs: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # (K, T, E): copy k loses slot k's expert
            return probs.scatter(-1, idx.T[..., None], 0.0)

        # the router's own choice of replacement and weights, K copies of the tokens
        with self.model.hooks([(f"model.layers.{layer}.mlp.gate.hook_probs", remove)]):
            new_idx, new_w = moe.gate(x.expand(K, T, -1))  # (K, T, K) each
        needed = torch.zeros(T, len(moe.experts), dtype=torch.bool, device=x.device)
        needed.scatter_(1, idx, True)
        needed.scatter_(1, new_idx.permute(1, 0, 2).reshape(T, -1), True)
        g_out = torch.zeros(T, len(moe.experts), device=x.device)  # grad . expert_e(x_t) where needed
        for e in needed.any(0).nonzero()[:, 0].tolist():
            tokens = needed[:, e].nonzero()[:, 0]
            g_out[tokens, e] = (moe.experts[e](x[tokens]).float() * grad[tokens]).sum(-1)
        before = (w * g_out.gather(1, idx)).sum(-1)  # (T,)
        after = (new_w.float() * g_out[None].expand(K, -1, -1).gather(2, new_idx)).sum(-1)  # (K, T)
        return after.T - before[:, None]


def _start_graph(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:
    """The embedding as a leaf that records operations, so gradients reach every activation after it."""
    return x.detach().requires_grad_(True)


def _parts_frame(parts: list[tuple[str, int, np.ndarray, np.ndarray, torch.Tensor]]) -> pd.DataFrame:
    """Rows (position, component, kind, layer, index, weight, estimate) from per-part (T, n) arrays."""
    frames = []
    for kind, layer, index, weight, values in parts:
        T, n = values.shape
        flat_index = np.asarray(index, dtype=np.int64).reshape(-1)
        frames.append(
            pd.DataFrame(
                {
                    "position": np.repeat(np.arange(T), n),
                    "component": [component_name(kind, layer, int(i)) for i in flat_index],
                    "kind": kind,
                    "layer": layer,
                    "index": flat_index,
                    "weight": np.asarray(weight, dtype=np.float64).reshape(-1),
                    "estimate": values.double().cpu().numpy().reshape(-1),
                }
            )
        )
    return pd.concat(frames, ignore_index=True)
