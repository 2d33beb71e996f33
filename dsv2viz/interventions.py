"""Interventions: hook functions that change what the model computes, to see what a part of it does.

Each function here returns a list of (hook name, function) pairs. Use them in one forward pass
(``model.run_with_hooks(ids, fwd_hooks=...)``), for a block (``with model.hooks(...)``) or for one
generation (``model.generate(..., interventions=...)``); they compose by concatenating the lists, and
are removed when the pass, block or generation ends. Layers are model layer indices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

from .hooks import HookPoint

Hooks = list[tuple[str, Callable]]
ExpertSpec = Mapping[int, Iterable[int]]  # layer -> experts


def _described(fn: Callable, description: str) -> Callable:
    fn.description = description  # shown in a trace's metadata
    return fn


def ablate_experts(experts: ExpertSpec) -> Hooks:
    """Remove experts from routing: no token is routed to them; each token takes its next-best experts instead.

    Their router probabilities are set to zero before the top-k choice, so the remaining experts keep the
    weights the router gave them (nothing is renormalized that the model would not renormalize itself).
    """
    hooks: Hooks = []
    for layer, banned in experts.items():
        banned = sorted(set(banned))

        def zero(probs: torch.Tensor, hook: HookPoint, banned: list[int] = banned) -> torch.Tensor:
            probs = probs.clone()
            probs[..., banned] = 0.0
            return probs

        hooks.append((f"model.layers.{layer}.mlp.gate.hook_probs", _described(zero, f"ablate experts {banned}")))
    return hooks


def force_experts(experts: ExpertSpec) -> Hooks:
    """Route every token to these experts (they take the first slots; the best others fill the rest).

    Weights are the router's own probabilities for whichever experts end up chosen.
    """
    hooks: Hooks = []
    for layer, forced in experts.items():
        forced = list(dict.fromkeys(forced))

        def force(idx: torch.Tensor, hook: HookPoint, forced: list[int] = forced) -> torch.Tensor:  # (B, T, K)
            k, f = idx.shape[-1], len(forced)
            if f > k:
                raise ValueError(f"cannot force {f} experts into top-{k} routing")
            forced_t = torch.tensor(forced, device=idx.device, dtype=idx.dtype)
            # the token's own choices minus the forced ones, still best first, fill the remaining slots
            own_first = torch.argsort(torch.isin(idx, forced_t).to(torch.int8), dim=-1, stable=True)
            rest = idx.gather(-1, own_first)[..., : k - f]
            return torch.cat([forced_t.expand(*idx.shape[:-1], f), rest], dim=-1)

        hooks.append((f"model.layers.{layer}.mlp.gate.hook_topk_idx", _described(force, f"force experts {forced}")))
    return hooks


def ablate_heads(heads: Mapping[int, Iterable[int]]) -> Hooks:
    """Zero the output of attention heads (their z, before o_proj), layer -> heads."""
    hooks: Hooks = []
    for layer, hs in heads.items():
        hs = sorted(set(hs))

        def zero(z: torch.Tensor, hook: HookPoint, hs: list[int] = hs) -> torch.Tensor:  # (B, T, H, dv)
            z = z.clone()
            z[:, :, hs] = 0.0
            return z

        hooks.append((f"model.layers.{layer}.self_attn.hook_z", _described(zero, f"ablate heads {hs}")))
    return hooks


def patch_latent(layer: int, dims: Iterable[int] | None = None, value: torch.Tensor | float = 0.0) -> Hooks:
    """Overwrite latent dimensions of c_kv at one layer (all dims when `dims` is None) with `value`.

    The patched latent is what the cache keeps, so later tokens attend to it too. `value` is a number or
    a tensor broadcastable to the patched slice, e.g. a latent taken from another trace.
    """
    sel = slice(None) if dims is None else sorted(set(dims))

    def patch(c_kv: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # (B, T, R)
        c_kv = c_kv.clone()
        c_kv[..., sel] = torch.as_tensor(value, dtype=c_kv.dtype, device=c_kv.device)
        return c_kv

    what = "all dims" if dims is None else f"dims {sel}"
    return [(f"model.layers.{layer}.self_attn.hook_c_kv", _described(patch, f"patch latent {what}"))]


def steer(layer: int, vector: torch.Tensor, scale: float = 1.0) -> Hooks:
    """Add `scale * vector` (D,) to the residual stream after `layer`, at every position."""

    def add(resid: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # (B, T, D)
        return resid + scale * vector.to(device=resid.device, dtype=resid.dtype)

    return [(f"model.layers.{layer}.hook_resid_post", _described(add, f"steer by {scale:g} x vector"))]
