"""The buffers that fill a trace while the model runs, and the hook functions that write them.

When its generation starts, a :class:`Recorder` preallocates one buffer per recorded quantity, on the
model's device, for every position the generation can reach (the size was checked against the
recording's budget before any work). Buffers are indexed by absolute position, and two writers fill them:

- the hook functions of :meth:`Recorder.hooks`, in the eager forward passes (each writes its tensor at
  :func:`dsv2viz.hooks.current_positions`, with no synchronisation);
- the fast decoding path (:mod:`dsv2viz.fast_decode`), whose step writes the same values into the same
  buffers at the step's position, inside the step.

What the latent cache holds is not kept twice: the trace's c_kv and k_pe are read from the cache. A
position becomes part of the trace when the generation commits it (:meth:`Recorder.commit`), after the
forward pass that wrote it has finished; a pass that raises leaves its positions uncommitted, so a trace
always holds whole passes. :meth:`Recorder.tensors` copies the committed positions to the CPU.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ..hooks import current_positions
from .recording import Recording

if TYPE_CHECKING:
    from ..kv_cache import LatentKVCache
    from ..model import DeepseekV2ForCausalLM

#: Quantities of every MoE layer, stacked as (M, S, ...), and the residual norms (L + 1, S).
PER_LAYER = ("topk_idx", "topk_weights", "router_probs", "routed_norms", "shared_norms", "resid_norms")


class Recorder:
    """Collects what `recording` asks for from a generation of batch size 1 over `positions` positions."""

    def __init__(self, model: DeepseekV2ForCausalLM, recording: Recording, prompt_len: int, positions: int) -> None:
        self.model, self.recording = model, recording
        config = model.config
        self.att_layers = recording.layers(config) if recording.attention != "none" or recording.queries else []
        self.heads = recording.heads(config)
        self.positions = positions
        # attention rows are kept from this position on: all of them, or the prompt's last one then one per step
        self.first_row = 0 if recording.attention == "full" else prompt_len - 1
        self.buffers: dict[str, torch.Tensor] = {}  # allocated by start()
        self.cache: LatentKVCache | None = None
        self.length = 0  # positions committed

    def shapes(self, everything: bool = False) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype) of every buffer the recording needs (`everything`: as if it recorded routing,
        router probabilities and residual and MoE norms)."""
        c, S = self.model.config, self.positions
        rec = Recording(router_probs=True, moe_norms=True) if everything else self.recording
        M, L, K, E = len(c.moe_layers), c.num_hidden_layers, c.num_experts_per_tok, c.n_routed_experts
        h, dtype, f32 = len(self.heads), self.model.dtype, torch.float32
        out: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        if M and rec.routing:
            out["topk_idx"], out["topk_weights"] = ((M, S, K), torch.int64), ((M, S, K), f32)
        if M and rec.router_probs:
            out["router_probs"] = ((M, S, E), f32)
        if M and rec.moe_norms:
            out["routed_norms"] = ((M, S), f32)
            if c.n_shared_experts:
                out["shared_norms"] = ((M, S), f32)
        if rec.residual_norms:
            out["resid_norms"] = ((L + 1, S), f32)
        for layer in self.att_layers:
            out[f"q_nope.{layer}"] = ((S, h, c.qk_nope_head_dim), dtype)
            out[f"q_pe.{layer}"] = ((S, h, c.qk_rope_head_dim), dtype)
            if rec.attention != "none":
                out[f"attention.{layer}"] = ((h, S - self.first_row, S), dtype)
        return out

    def start(self, cache: LatentKVCache) -> None:
        """Allocate the buffers (zeros: attention rows read zero past their keys) and read latents from `cache`."""
        device = self.model.device
        self.buffers = {n: torch.zeros(shape, dtype=dt, device=device) for n, (shape, dt) in self.shapes().items()}
        self.cache = cache

    def hooks(self) -> list[tuple[str, Callable]]:
        """(hook name, function) pairs that record the eager forward passes of a generation."""
        rec, c, out = self.recording, self.model.config, []

        def at_positions(key: str, row: int | None = None, pick: Callable = lambda x: x[0]) -> Callable:
            def fn(x: torch.Tensor, hook) -> None:
                p, buf = current_positions(), self.buffers[key]
                (buf if row is None else buf[row])[p.start : p.stop] = pick(x.detach())

            return fn

        for m, layer in enumerate(c.moe_layers):
            gate, mlp = f"model.layers.{layer}.mlp.gate.", f"model.layers.{layer}.mlp."
            if rec.routing:
                out += [
                    (gate + "hook_topk_idx", at_positions("topk_idx", m)),
                    (gate + "hook_topk_weights", at_positions("topk_weights", m)),
                ]
            if rec.router_probs:
                out.append((gate + "hook_probs", at_positions("router_probs", m)))
            if rec.moe_norms:
                out.append((mlp + "hook_routed_out", at_positions("routed_norms", m, token_norms)))
                if c.n_shared_experts:
                    out.append((mlp + "shared_experts.hook_out", at_positions("shared_norms", m, token_norms)))
        heads = torch.tensor(self.heads)
        for layer in self.att_layers:
            attn = f"model.layers.{layer}.self_attn."
            out += [
                (attn + "hook_q_nope", at_positions(f"q_nope.{layer}", pick=lambda x: x[0][:, heads])),
                (attn + "hook_q_pe", at_positions(f"q_pe.{layer}", pick=lambda x: x[0][:, heads])),
            ]
            if rec.attention != "none":
                out.append((attn + "hook_pattern", self._pattern_hook(layer, heads)))
        if rec.residual_norms:
            out.append(("model.hook_embed", at_positions("resid_norms", 0, token_norms)))
            out += [
                (f"model.layers.{layer}.hook_resid_post", at_positions("resid_norms", layer + 1, token_norms))
                for layer in range(c.num_hidden_layers)
            ]
        return out

    def _pattern_hook(self, layer: int, heads: torch.Tensor) -> Callable:
        def fn(x: torch.Tensor, hook) -> None:  # x: (1, H, T, S); its T query rows are current_positions()
            p = current_positions()
            lo = max(p.start, self.first_row)  # the first row kept
            if lo < p.stop:
                rows = x[0][heads][:, lo - p.start :].detach()  # (h, T', S)
                buf = self.buffers[f"attention.{layer}"]
                buf[:, lo - self.first_row : p.stop - self.first_row, : rows.shape[-1]] = rows

        return fn

    def commit(self, length: int) -> None:
        """Positions [0, length) hold whole forward passes: they are now part of the trace."""
        self.length = length

    def tensors(self) -> dict[str, torch.Tensor]:
        """The committed positions of what is recorded, as a trace's tensors (copies, on the CPU)."""
        n, b, out = self.length, self.buffers, {}
        if n == 0:
            return out
        for name in PER_LAYER:
            if name in b:
                out[name] = _to_cpu(b[name][:, :n])
        if self.recording.latents and self.cache is not None:
            out["c_kv"], out["k_pe"] = _to_cpu(self.cache.c_kv[:, 0, :n]), _to_cpu(self.cache.k_pe[:, 0, :n])
        rows = max(0, n - self.first_row)
        for layer in self.att_layers:
            out[f"q_nope.{layer}"], out[f"q_pe.{layer}"] = (
                _to_cpu(b[f"q_nope.{layer}"][:n]),
                _to_cpu(b[f"q_pe.{layer}"][:n]),
            )
            w_uk, _ = self.model.model.layers[layer].self_attn._kv_b()
            out[f"w_uk.{layer}"] = _to_cpu(w_uk[self.heads].detach())
            if f"attention.{layer}" in b and rows:
                out[f"attention.{layer}"] = _to_cpu(b[f"attention.{layer}"][:, :rows, :n])
                out[f"attention.{layer}.query_pos"] = torch.arange(self.first_row, self.first_row + rows)
        return out

    def record_at(self, pos: int) -> dict[str, torch.Tensor]:
        """One committed position's slice of what is recorded (small; copied to the CPU), for a Step."""
        b, out = self.buffers, {}
        if "topk_idx" in b:
            out["experts"], out["weights"] = _to_cpu(b["topk_idx"][:, pos]), _to_cpu(b["topk_weights"][:, pos])
        if self.recording.latents and self.cache is not None:
            out["latent_norms"] = _to_cpu(self.cache.c_kv[:, 0, pos].float().norm(dim=-1))
        if "resid_norms" in b:
            out["resid_norms"] = _to_cpu(b["resid_norms"][:, pos])
        for layer in self.att_layers:
            if f"attention.{layer}" in b:
                out[f"attention.{layer}"] = _to_cpu(b[f"attention.{layer}"][:, pos - self.first_row, : pos + 1])
        return out


def token_norms(x: torch.Tensor) -> torch.Tensor:
    """(T,) fp32 norm of each token's vector in x (1, T, ...)."""
    return x[0].float().norm(dim=-1)


def _to_cpu(t: torch.Tensor) -> torch.Tensor:
    """A CPU copy that shares nothing with the buffers (which later steps keep writing)."""
    return t.to("cpu", copy=True)
