"""Interventions: hook functions that change what the model computes, to see what a part of it does.

Each function here returns a list of (hook name, function) pairs. Use them in one forward pass
(``model.run_with_hooks(ids, fwd_hooks=...)``), for a block (``with model.hooks(...)``) or for one
generation (``model.generate(..., interventions=...)``); they compose by concatenating the lists, and
act only on the runs they were given to. Layers are model layer indices.

Every index is checked against the model when the hooks are attached (each function carries a
``validate(model)``): a layer that is not an MoE layer, an expert, head or latent dimension past the
model's count, or a negative index (which would silently count from the end) is refused with one line
before any forward pass.

Each function also carries a ``spec`` (:class:`InterventionSpec`): what it does, as data. The fast
decoding path (dsv2viz.fast_decode) applies built-in interventions from their specs, as tensors handed to
its compiled step, so a generation with them keeps that path (a hook function without a spec, or one
attached somewhere other than its spec's hook point, sends the generation to the eager path).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from .hooks import HookPoint, current_positions

if TYPE_CHECKING:
    from .model import DeepseekV2ForCausalLM

Hooks = list[tuple[str, Callable]]
ExpertSpec = Mapping[int, Iterable[int]]  # layer -> experts


@dataclass(frozen=True, eq=False)
class InterventionSpec:
    """What one built-in intervention hook does, as data (its function's ``spec`` attribute)."""

    kind: Literal["ablate_experts", "force_experts", "ablate_heads", "patch_latent", "steer"]
    hook: str  # the hook point it acts at
    layer: int
    # experts (ablated; forced, in slot order), heads, or latent dims (patch_latent; () means all of them)
    indices: tuple[int, ...] = ()
    positions: tuple[int, ...] | None = None  # absolute positions it acts at (None: all)
    value: torch.Tensor | None = None  # patch_latent: the value written; steer: the vector added
    scale: float = 1.0  # steer: added as scale x value


def _indices(values: Iterable[int], what: str, *, ordered: bool = False) -> list[int]:
    """Distinct non-negative integers, sorted (or in the given order); negative ones are refused (no
    wrap-around from the end)."""
    out = []
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool):
            raise ValueError(f"{what} must be integers; got {v!r}")
        if v < 0:
            raise ValueError(f"{what} {v} is negative; indices count from 0 (no counting from the end)")
        out.append(v)
    return list(dict.fromkeys(out)) if ordered else sorted(set(out))


def _layer(layer: object) -> int:
    return _indices([layer], "layer")[0]


def _hook(
    fn: Callable, description: str, validate: Callable[[DeepseekV2ForCausalLM], None], spec: InterventionSpec
) -> Callable:
    fn.description = description  # shown in a trace's metadata
    fn.validate = validate  # called when attached: indices checked before any forward pass
    fn.spec = spec  # what it does, for the fast decoding path
    return fn


def _check_below(indices: list[int], limit: int, what: str, where: str) -> None:
    bad = [i for i in indices if i >= limit]
    if bad:
        raise ValueError(f"{what} {bad} out of range: {where} has {limit} (0..{limit - 1})")


def _positions(positions: Iterable[int] | None) -> list[int] | None:
    """Absolute positions to act on (None: all of them), checked like every other index."""
    return None if positions is None else _indices(positions, "positions")


def _check_positions(model: DeepseekV2ForCausalLM, where: list[int] | None) -> None:
    if where is not None:
        _check_below(where, model.config.max_position_embeddings, "positions", "the context")


def _rows(where: list[int] | None) -> slice | list[int] | None:
    """Rows of the T axis that hold the positions `where` in the forward pass now running: all of them
    (a slice) when `where` is None, None when this pass reads none of them (a decoding step past them)."""
    if where is None:
        return slice(None)
    now = current_positions()
    return [p - now.start for p in where if p in now] or None


def _at(where: list[int] | None) -> str:
    return "" if where is None else f" at positions {where}"


def _check_moe_layer(model: DeepseekV2ForCausalLM, layer: int, experts: list[int]) -> None:
    c = model.config
    if layer not in c.moe_layers:
        raise ValueError(f"layer {layer} is not an MoE layer; the MoE layers are {c.moe_layers}")
    _check_below(experts, c.n_routed_experts, "experts", f"layer {layer}")


def ablate_experts(experts: ExpertSpec, *, positions: Iterable[int] | None = None) -> Hooks:
    """Remove experts from routing: no token is routed to them; each token takes its next-best experts instead.

    Their router probabilities are set to zero before the top-k choice, so the remaining experts keep the
    weights the router gave them (nothing is renormalized that the model would not renormalize itself).
    At least K experts must remain in each layer. `positions` (absolute positions in the sequence; all
    when None) limits the ablation to those tokens, e.g. ``positions=[7]`` reroutes token 7 only.
    """
    where = _positions(positions)
    hooks: Hooks = []
    for layer, chosen in experts.items():
        layer, banned = _layer(layer), _indices(chosen, "experts")

        def validate(model: DeepseekV2ForCausalLM, layer: int = layer, banned: list[int] = banned) -> None:
            _check_moe_layer(model, layer, banned)
            _check_positions(model, where)
            c = model.config
            if c.n_routed_experts - len(banned) < c.num_experts_per_tok:
                raise ValueError(
                    f"cannot ablate {len(banned)} of {c.n_routed_experts} experts at layer {layer}: "
                    f"each token needs {c.num_experts_per_tok}"
                )

        def zero(probs: torch.Tensor, hook: HookPoint, banned: list[int] = banned) -> torch.Tensor:  # (B, T, E)
            rows = _rows(where)
            if rows is None:
                return probs
            probs = probs.clone()
            ablated = probs[:, rows]  # (B, T', E)
            ablated[..., banned] = 0.0
            probs[:, rows] = ablated
            return probs

        description = f"ablate experts {banned}{_at(where)}"
        name = f"model.layers.{layer}.mlp.gate.hook_probs"
        spec = InterventionSpec("ablate_experts", name, layer, tuple(banned), None if where is None else tuple(where))
        hooks.append((name, _hook(zero, description, validate, spec)))
    return hooks


def force_experts(experts: ExpertSpec) -> Hooks:
    """Route every token to these experts (they take the first slots; the best others fill the rest).

    Weights are the router's own probabilities for whichever experts end up chosen. At most K experts
    can be forced per layer.
    """
    hooks: Hooks = []
    for layer, chosen in experts.items():
        layer = _layer(layer)
        forced = _indices(chosen, "experts", ordered=True)  # the first forced expert takes the first slot

        def validate(model: DeepseekV2ForCausalLM, layer: int = layer, forced: list[int] = forced) -> None:
            _check_moe_layer(model, layer, forced)
            k = model.config.num_experts_per_tok
            if len(forced) > k:
                raise ValueError(f"cannot force {len(forced)} experts at layer {layer} into top-{k} routing")

        def force(idx: torch.Tensor, hook: HookPoint, forced: list[int] = forced) -> torch.Tensor:  # (B, T, K)
            padded = forced + [-1] * (idx.shape[-1] - len(forced))
            n = torch.tensor(len(forced), device=idx.device)
            return forced_routing(idx, torch.tensor(padded, device=idx.device, dtype=idx.dtype), n)

        name = f"model.layers.{layer}.mlp.gate.hook_topk_idx"
        spec = InterventionSpec("force_experts", name, layer, tuple(forced))
        hooks.append((name, _hook(force, f"force experts {forced}", validate, spec)))
    return hooks


def forced_routing(idx: torch.Tensor, forced: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """idx (..., K) with the first `n` (a 0-d tensor) entries of `forced` (K,) in the first slots, and the
    token's own choices, minus the forced ones and still best first, in the others. `forced` is padded
    with -1 (never an expert) past `n`, so the shapes do not depend on how many experts are forced."""
    K = idx.shape[-1]
    is_forced = (idx[..., :, None] == forced).any(dim=-1)  # (..., K)
    own_first = idx.gather(-1, torch.argsort(is_forced.to(torch.int8), dim=-1, stable=True))
    slot = torch.arange(K, device=idx.device)
    rest = own_first.gather(-1, (slot - n).clamp(min=0).expand_as(idx))  # slot j >= n: own choice j - n
    return torch.where(slot < n, forced.expand_as(idx), rest)


def ablate_heads(heads: Mapping[int, Iterable[int]], *, positions: Iterable[int] | None = None) -> Hooks:
    """Zero the output of attention heads (their z, before o_proj), layer -> heads; at `positions` only
    (absolute positions in the sequence) when given, else at every position."""
    where = _positions(positions)
    hooks: Hooks = []
    for layer, chosen in heads.items():
        layer, hs = _layer(layer), _indices(chosen, "heads")

        def validate(model: DeepseekV2ForCausalLM, layer: int = layer, hs: list[int] = hs) -> None:
            _check_below([layer], model.config.num_hidden_layers, "layer", "the model")
            _check_below(hs, model.config.num_attention_heads, "heads", f"layer {layer}")
            _check_positions(model, where)

        def zero(z: torch.Tensor, hook: HookPoint, hs: list[int] = hs) -> torch.Tensor:  # (B, T, H, dv)
            rows = _rows(where)
            if rows is None:
                return z
            z = z.clone()
            ablated = z[:, rows]  # (B, T', H, dv)
            ablated[:, :, hs] = 0.0
            z[:, rows] = ablated
            return z

        description = f"ablate heads {hs}{_at(where)}"
        name = f"model.layers.{layer}.self_attn.hook_z"
        spec = InterventionSpec("ablate_heads", name, layer, tuple(hs), None if where is None else tuple(where))
        hooks.append((name, _hook(zero, description, validate, spec)))
    return hooks


def patch_latent(
    layer: int,
    dims: Iterable[int] | None = None,
    value: torch.Tensor | float = 0.0,
    *,
    positions: Iterable[int] | None = None,
) -> Hooks:
    """Overwrite latent dimensions of c_kv at one layer with `value`, at some positions or all of them.

    `dims` are latent dimensions (all when None); `positions` are absolute positions in the sequence
    (all when None), e.g. ``positions=[7]`` patches only what the cache holds for token 7. The patched
    latent is what the cache keeps, so later tokens attend to it too. `value` is a finite number or a
    tensor broadcastable to the patched slice (positions, dims), e.g. a latent taken from another trace.
    """
    layer = _layer(layer)
    sel = slice(None) if dims is None else _indices(dims, "dims")
    where = _positions(positions)
    value = torch.as_tensor(value)
    if not bool(torch.isfinite(value).all()):
        raise ValueError("patch_latent: value must be finite")

    def validate(model: DeepseekV2ForCausalLM) -> None:
        c = model.config
        _check_below([layer], c.num_hidden_layers, "layer", "the model")
        if dims is not None:
            _check_below(sel, c.kv_lora_rank, "dims", "the latent c_kv")
        _check_positions(model, where)

    def patch(c_kv: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # (B, T, R)
        rows = _rows(where)
        if rows is None:
            return c_kv
        c_kv = c_kv.clone()
        patched = c_kv[:, rows]  # (B, T', R)
        patched[..., sel] = value.to(dtype=c_kv.dtype, device=c_kv.device)
        c_kv[:, rows] = patched
        return c_kv

    what = ("all dims" if dims is None else f"dims {sel}") + _at(where)
    name = f"model.layers.{layer}.self_attn.hook_c_kv"
    spec = InterventionSpec(
        "patch_latent", name, layer, () if dims is None else tuple(sel), None if where is None else tuple(where), value
    )
    return [(name, _hook(patch, f"patch latent {what}", validate, spec))]


def steer(layer: int, vector: torch.Tensor, scale: float = 1.0) -> Hooks:
    """Add `scale * vector` (D,) to the residual stream after `layer`, at every position."""
    layer = _layer(layer)
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(f"steer: scale={scale!r} must be a finite number")
    if not isinstance(vector, torch.Tensor) or vector.dim() != 1 or not bool(torch.isfinite(vector).all()):
        raise ValueError("steer: vector must be a finite 1-dimensional tensor of the model's hidden size")

    def validate(model: DeepseekV2ForCausalLM) -> None:
        _check_below([layer], model.config.num_hidden_layers, "layer", "the model")
        if vector.shape[0] != model.config.hidden_size:
            raise ValueError(
                f"steer: vector has {vector.shape[0]} values; the residual stream has {model.config.hidden_size}"
            )

    def add(resid: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # (B, T, D)
        return resid + scale * vector.to(device=resid.device, dtype=resid.dtype)

    name = f"model.layers.{layer}.hook_resid_post"
    spec = InterventionSpec("steer", name, layer, value=vector, scale=scale)
    return [(name, _hook(add, f"steer by {scale:g} x vector", validate, spec))]
