"""DeepSeek-V2 in plain PyTorch, with a named hook point on every quantity worth studying.

Dimension legend (used in the shape comments):
    B  batch                     T   new tokens in this call       S   all key positions (cached + new)
    D  hidden_size (2048)        V   vocab_size (102400)           L   layers (27)
    H  attention heads (16)      dn  qk_nope_head_dim (128)        dr  qk_rope_head_dim (64)
    dv v_head_dim (128)          R   kv_lora_rank (512)            E   routed experts (64)
    K  experts per token (6)     N   routed (token, slot) pairs of one expert

Module and parameter names are the checkpoint's own keys (``model.layers.3.mlp.experts.17.up_proj.weight``),
so the official safetensors load with no renaming table. Hook point names are the module path plus
``hook_*`` (``model.layers.3.self_attn.hook_c_kv``); ``model.hook_names()`` lists them.

Attention has two paths that check each other (tests compare them):
- "naive": decompress per-head keys and values from the latent, then torch's fused
  scaled_dot_product_attention; used for a prompt when no hook needs the scores or the pattern.
- "absorb": attend in latent space, folding W_UK into the query and applying W_UV after the weighted
  sum, as DeepSeek-V3's inference code does; used when decoding against a cache.
Either path computes scores explicitly, split into their content (nope) and position (rope) parts,
whenever a hook asks for them.
"""

from __future__ import annotations

import functools
import math
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .config import DeepseekV2Config
from .hooks import HookedModule, HookPoint, reading_positions
from .kv_cache import LatentKVCache

if TYPE_CHECKING:  # the model runs without them; generation builds on the model, not the other way round
    from .generation import Generation, Intervention, Prompt
    from .tokenizer import Tokenizer
    from .traces import Recording

AttentionImpl = Literal["auto", "naive", "absorb"]


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32, cast back before the weight as the reference does."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class RotaryEmbedding:
    """YaRN rotary embedding over the rope dims, which the checkpoint stores as interleaved pairs (2i, 2i+1).

    Holds no parameters or buffers (so the model can be built on the meta device); the inverse
    frequencies are computed once per device on first use.
    """

    def __init__(self, config: DeepseekV2Config) -> None:
        self.config = config
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        if device not in self._inv_freq:
            self._inv_freq[device] = yarn_inv_freq(self.config).to(device)
        return self._inv_freq[device]

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of position x frequency, times YaRN's amplitude: each (T, dr/2), fp32."""
        freqs = torch.outer(positions.float(), self.inv_freq(positions.device))
        amp = self.config.rope_amplitude
        return freqs.cos() * amp, freqs.sin() * amp


def yarn_inv_freq(config: DeepseekV2Config) -> torch.Tensor:
    """Per-pair inverse frequencies: trained ones kept for fast pairs, divided by `factor` for slow ones."""
    d, base = config.qk_rope_head_dim, config.rope_theta
    extrapolated = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.float32) / d))  # (dr/2,)
    y = config.rope_scaling
    if y is None:
        return extrapolated

    def correction_dim(rotations: float) -> float:
        return d * math.log(y.original_max_position_embeddings / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(y.beta_fast)), 0)
    high = min(math.ceil(correction_dim(y.beta_slow)), d - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero
    ramp = ((torch.arange(d // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 where the trained frequency is kept
    return extrapolated / y.factor * (1 - keep) + extrapolated * keep


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs of the last dim of x (..., T, [H,] dr) by position; computed in fp32."""
    if x.dim() == 4:  # (B, T, H, dr): broadcast over heads
        cos, sin = cos[:, None], sin[:, None]
    pairs = x.float().unflatten(-1, (-1, 2))  # (..., dr/2, 2)
    x0, x1 = pairs[..., 0], pairs[..., 1]
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return out.flatten(-2).to(x.dtype)


class MLA(nn.Module):
    """Multi-head Latent Attention: keys and values come from one shared per-token latent."""

    def __init__(self, config: DeepseekV2Config, layer: int) -> None:
        super().__init__()
        c = config
        self.config, self.layer = c, layer
        self.impl: AttentionImpl = "auto"
        H, dq = c.num_attention_heads, c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, H * dq, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank)
            self.q_b_proj = nn.Linear(c.q_lora_rank, H * dq, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_cache_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        self.o_proj = nn.Linear(H * c.v_head_dim, c.hidden_size, bias=c.attention_bias)

        self.hook_q_nope = HookPoint("(B, T, H, dn)")
        self.hook_q_pe = HookPoint("(B, T, H, dr) roped")
        self.hook_c_kv = HookPoint("(B, T, R) normalized latent of the new tokens; what the cache stores")
        self.hook_k_pe = HookPoint("(B, T, dr) roped key shared by all heads; what the cache stores")
        self.hook_k_nope = HookPoint("(B, S, H, dn) per-head content keys of all positions")
        self.hook_v = HookPoint("(B, S, H, dv) per-head values of all positions")
        self.hook_scores_nope = HookPoint("(B, H, T, S) q_nope.k_nope x scale, before the causal mask")
        self.hook_scores_rope = HookPoint("(B, H, T, S) q_pe.k_pe x scale, before the causal mask")
        self.hook_scores = HookPoint("(B, H, T, S) nope + rope, before the causal mask")
        self.hook_pattern = HookPoint("(B, H, T, S) softmax over keys")
        self.hook_z = HookPoint("(B, T, H, dv) per-head output before o_proj")
        self.hook_out = HookPoint("(B, T, D)")

    def _needs_scores(self) -> bool:
        return any(
            h.active for h in (self.hook_scores_nope, self.hook_scores_rope, self.hook_scores, self.hook_pattern)
        )

    def _kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split into W_UK (H, dn, R) and W_UV (H, dv, R)."""
        c = self.config
        w = self.kv_b_proj.weight.view(c.num_attention_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        return w[:, : c.qk_nope_head_dim], w[:, c.qk_nope_head_dim :]

    def project(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The new tokens' queries and latent: q_nope (B, T, H, dn), roped q_pe (B, T, H, dr), normalized
        c_kv (B, T, R) and roped k_pe (B, T, dr)."""
        c = self.config
        B, T, _ = x.shape
        q = self.q_proj(x) if c.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, c.num_attention_heads, -1).split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        return q_nope, apply_rope(q_pe, cos, sin), self.kv_a_layernorm(c_kv), apply_rope(k_pe, cos, sin)

    def latent_scores_nope(self, q_nope: torch.Tensor, c_kv: torch.Tensor) -> torch.Tensor:
        """(B, H, T, S) q_nope.k_nope x scale computed in latent space: (q_nope W_UK).c_kv."""
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, self._kv_b()[0])  # (B, T, H, R)
        return torch.einsum("bthr,bsr->bhts", q_lat, c_kv) * self.config.softmax_scale

    def scores_rope(self, q_pe: torch.Tensor, k_pe: torch.Tensor) -> torch.Tensor:
        """(B, H, T, S) q_pe.k_pe x scale."""
        return torch.einsum("bthd,bsd->bhts", q_pe, k_pe) * self.config.softmax_scale

    def latent_output(self, pattern: torch.Tensor, c_kv: torch.Tensor) -> torch.Tensor:
        """(B, T, H, dv) per-head output: the pattern (B, H, T, S) weights the latents, then W_UV per head."""
        o_lat = torch.einsum("bhts,bsr->bthr", pattern, c_kv)  # (B, T, H, R)
        return torch.einsum("bthr,hvr->bthv", o_lat, self._kv_b()[1])

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentKVCache | None
    ) -> torch.Tensor:
        c = self.config
        B, T, _ = x.shape
        H, dn, dr = c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim

        q_nope, q_pe, c_kv, k_pe = self.project(x, cos, sin)
        q_nope, q_pe = self.hook_q_nope(q_nope), self.hook_q_pe(q_pe)
        c_kv, k_pe = self.hook_c_kv(c_kv), self.hook_k_pe(k_pe)
        past = 0
        if cache is not None:
            past = cache.length
            c_kv, k_pe = cache.write(self.layer, c_kv, k_pe)  # (B, S, R), (B, S, dr)
        S = c_kv.shape[1]

        impl = self.impl if self.impl != "auto" else ("absorb" if past > 0 else "naive")
        if impl == "naive" or self.hook_k_nope.active or self.hook_v.active:
            k_nope, v = self.kv_b_proj(c_kv).view(B, S, H, dn + c.v_head_dim).split([dn, c.v_head_dim], dim=-1)
            k_nope, v = self.hook_k_nope(k_nope), self.hook_v(v)  # (B, S, H, dn), (B, S, H, dv)

        fused = impl == "naive" and not self._needs_scores()
        # (T, S) True where allowed; a fused kernel reading a prompt from position 0 masks by itself
        mask = None if T == 1 or (fused and past == 0) else _causal_mask(T, S, past, x.device)
        if fused:
            qh = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, dn + dr)
            kh = torch.cat([k_nope, k_pe[:, :, None].expand(B, S, H, dr)], dim=-1).transpose(1, 2)
            # values zero-padded to the query width: fused (flash) kernels need one head width, else torch
            # falls back to its unfused math (5x slower on a CPU); the padded output columns are dropped
            vh = F.pad(v, (0, dn + dr - c.v_head_dim)).transpose(1, 2)  # (B, H, S, dn + dr)
            z = F.scaled_dot_product_attention(
                qh,
                kh,
                vh,
                attn_mask=mask,
                is_causal=past == 0 and T > 1,
                scale=c.softmax_scale,
            ).transpose(1, 2)[..., : c.v_head_dim]  # (B, T, H, dv)
        else:
            if impl == "naive":
                scores_nope = torch.einsum("bthd,bshd->bhts", q_nope, k_nope) * c.softmax_scale
            else:  # fold W_UK into the query: q_nope.k_nope == (q_nope W_UK).c_kv
                scores_nope = self.latent_scores_nope(q_nope, c_kv)
            scores_nope = self.hook_scores_nope(scores_nope)
            scores_rope = self.hook_scores_rope(self.scores_rope(q_pe, k_pe))
            scores = self.hook_scores(scores_nope + scores_rope)  # (B, H, T, S)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            pattern = self.hook_pattern(scores.softmax(dim=-1, dtype=torch.float32).to(x.dtype))
            naive = impl == "naive"  # else weight the latents, then apply W_UV per head
            z = torch.einsum("bhts,bshv->bthv", pattern, v) if naive else self.latent_output(pattern, c_kv)
        z = self.hook_z(z)  # (B, T, H, dv)
        return self.hook_out(self.o_proj(z.reshape(B, T, -1)))


def _causal_mask(T: int, S: int, past: int, device: torch.device) -> torch.Tensor:
    """(T, S) bool: query i (absolute position past + i) sees keys 0 .. past + i."""
    return torch.arange(S, device=device)[None, :] <= torch.arange(past, past + T, device=device)[:, None]


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). The dense layers, each routed expert and the shared experts."""

    def __init__(self, dim: int, inter_dim: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)
        self.hook_out = HookPoint(
            "(..., D) for a routed expert: (N, D), its tokens in (batch, position) order, unweighted"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hook_out(self.swiglu(x))

    def swiglu(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP without its hook point."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """The router: fp32 softmax over expert logits, then (group-limited) greedy top-k."""

    def __init__(self, config: DeepseekV2Config) -> None:
        super().__init__()
        self.config = config
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.hook_logits = HookPoint("(B, T, E) fp32")
        self.hook_probs = HookPoint("(B, T, E) fp32 softmax of the logits")
        self.hook_topk_idx = HookPoint("(B, T, K) int64 chosen experts, best first; replace to force routing")
        self.hook_topk_weights = HookPoint("(B, T, K) fp32 weights of the chosen experts")
        self.aux_loss: torch.Tensor | None = None  # set by each forward in training mode, see balance_loss

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(..., E) fp32 router logits: x and the weight in fp32, whatever the model's dtype."""
        return F.linear(x.float(), self.weight.float())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = self.config
        logits = self.hook_logits(self.logits(x))
        probs = self.hook_probs(logits.softmax(dim=-1))
        idx = self.hook_topk_idx(top_experts(probs, c))
        self.aux_loss = balance_loss(probs, idx, c.aux_loss_alpha) if self.training and c.aux_loss_alpha > 0 else None
        return idx, self.hook_topk_weights(expert_weights(probs, idx, c))


def top_experts(probs: torch.Tensor, config: DeepseekV2Config) -> torch.Tensor:
    """(..., K) int64 the K experts of highest probability, best first (within the best groups when group-limited)."""
    c = config
    if c.topk_method == "group_limited_greedy":
        grouped = probs.unflatten(-1, (c.n_group, -1))  # (B, T, groups, E / groups)
        best_groups = grouped.amax(dim=-1).topk(c.topk_group, dim=-1).indices
        keep = torch.zeros_like(grouped[..., 0], dtype=torch.bool).scatter_(-1, best_groups, True)
        probs = grouped.masked_fill(~keep[..., None], 0.0).flatten(-2)
    return probs.topk(c.num_experts_per_tok, dim=-1).indices


def expert_weights(probs: torch.Tensor, idx: torch.Tensor, config: DeepseekV2Config) -> torch.Tensor:
    """(..., K) fp32 weights of the chosen experts: their probabilities, renormalized or scaled as configured."""
    weights = probs.gather(-1, idx)
    if config.num_experts_per_tok > 1 and config.norm_topk_prob:
        return weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * config.routed_scaling_factor


def balance_loss(probs: torch.Tensor, idx: torch.Tensor, alpha: float) -> torch.Tensor:
    """DeepSeek-V2's sequence-level expert balance loss: alpha * mean over sequences of sum_i f_i * P_i.

    f_i is expert i's share of the sequence's (token, slot) choices times E / K (1 for every expert when
    the load is even), P_i its mean router probability over the sequence; training against it keeps
    every expert in use. probs (B, T, E), idx (B, T, K).
    """
    B, T, E = probs.shape
    K = idx.shape[-1]
    counts = torch.zeros(B, E, device=probs.device).scatter_add_(
        1, idx.reshape(B, -1), torch.ones(B, T * K, device=probs.device)
    )
    f = counts / (T * K / E)  # (B, E)
    return (f * probs.mean(dim=1)).sum(dim=1).mean() * alpha


class MoE(nn.Module):
    """DeepSeekMoE: each token goes to K of E routed experts, weighted by the router, plus shared experts.

    The routed experts run as two grouped GEMMs over the (token, slot) pairs sorted by expert
    (:func:`grouped_experts`), reading each chosen expert's weights once and with no host synchronisation;
    on a CPU, fewer pairs than experts (a decoding step, a few-token prompt) go row by row over views of the
    stack instead (:func:`looped_routed_sum`), since the CPU grouped GEMM visits every expert. Their weights are stacked (:meth:`stacked_experts`; each expert's parameters are views into the stack,
    so they are held once). One expert at a time, through each expert's own module, runs only when a
    per-expert hook point (``experts.{e}.hook_out``) is active, when gradients flow into the weights or
    the input, or where the device cannot run grouped GEMMs in this dtype.
    """

    def __init__(self, config: DeepseekV2Config) -> None:
        super().__init__()
        self.config = config
        self.gate = Gate(config)
        self.experts = nn.ModuleList(
            MLP(config.hidden_size, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        if config.n_shared_experts:
            self.shared_experts = MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
        self.hook_routed_out = HookPoint("(B, T, D) weighted sum of the chosen experts")
        self.hook_out = HookPoint("(B, T, D) routed + shared")
        self._stack: tuple[torch.Tensor, torch.Tensor] | None = None  # (w13, w2), see stacked_experts
        self._stack_ptrs: list[int] = []  # where each expert parameter must point while the stack is current

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        idx, weights = self.gate(x)  # (B, T, K) each
        rows = (x.reshape(-1, D), idx.reshape(B * T, -1), weights.reshape(B * T, -1))  # (N, D), (N, K), (N, K)
        if self._one_expert_at_a_time(x):
            routed = routed_sum(*rows, self._each_expert)
        elif few_rows_on_cpu(x, B * T * idx.shape[-1], len(self.experts)):
            routed = looped_routed_sum(*rows, *self.stacked_experts())
        else:
            w13, w2 = self.stacked_experts()
            routed = routed_sum(*rows, functools.partial(grouped_experts, w13=w13, w2=w2))
        routed = self.hook_routed_out(routed.view(B, T, D).to(x.dtype))
        shared = self.shared_experts(x) if self.config.n_shared_experts else 0
        return self.hook_out(routed + shared)

    def _one_expert_at_a_time(self, x: torch.Tensor) -> bool:
        if self.experts[0].gate_proj.weight.requires_grad or (torch.is_grad_enabled() and x.requires_grad):
            return True  # autograd through each expert's own parameters; training keeps its parameter objects
        if not grouped_mm_supported(x, self.config.hidden_size, self.config.moe_intermediate_size):
            return True
        return any(expert.hook_out.active for expert in self.experts)

    def _each_expert(self, x: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """Rows of x (N, D) sorted by expert, each group through its expert's own module (and hook point)."""
        counts = torch.bincount(expert_ids, minlength=len(self.experts)).tolist()
        return torch.cat([self.experts[e](rows) for e, rows in enumerate(x.split(counts)) if len(rows)])

    def stacked_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The routed experts' weights stacked: w13 (E, 2I, D), gate_proj then up_proj rows, and w2 (E, D, I).

        Each expert's ``gate_proj``/``up_proj``/``down_proj`` weight is a view into these, so the experts are
        held once and an in-place edit of one expert's weight is seen by both. ``dsv2viz.load`` reads the
        checkpoint's experts straight into the stacks. When the parameters no longer point into the stack
        (a model built in code, moved with ``.to()``, or a weight replaced), they are restacked here, one
        layer at a time, which replaces the expert parameter objects.
        """
        if not self._stack_is_current():
            with _STACK_LOCK:
                if not self._stack_is_current():
                    self._restack()
        assert self._stack is not None
        return self._stack

    def stack_view(self, expert: int, proj: str, like: torch.Tensor) -> torch.Tensor:
        """The view of the stack that holds `expert`'s `proj` ("gate_proj", "up_proj" or "down_proj") weight,
        allocating the stack (on `like`'s device and dtype) if there is none of that kind yet."""
        if self._stack is None or (self._stack[0].dtype, self._stack[0].device) != (like.dtype, like.device):
            c = self.config
            E, inter, dim = c.n_routed_experts, c.moe_intermediate_size, c.hidden_size
            kind = dict(dtype=like.dtype, device=like.device)
            self._set_stack(torch.empty(E, 2 * inter, dim, **kind), torch.empty(E, dim, inter, **kind))
        return self._views(expert)[("gate_proj", "up_proj", "down_proj").index(proj)]

    def _views(self, e: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        w13, w2 = self._stack
        inter = w13.shape[1] // 2
        return w13[e, :inter], w13[e, inter:], w2[e]

    def _set_stack(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        self._stack = (w13, w2)
        self._stack_ptrs = [v.data_ptr() for e in range(len(self.experts)) for v in self._views(e)]

    def _apply(self, fn, recurse=True):  # .to(), .float(), to_empty(): the parameters get new storage
        self._stack, self._stack_ptrs = None, []
        return super()._apply(fn, recurse)

    def _expert_weights(self) -> list[torch.Tensor]:
        return [p for e in self.experts for p in (e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight)]

    def _stack_is_current(self) -> bool:
        return self._stack is not None and [p.data_ptr() for p in self._expert_weights()] == self._stack_ptrs

    @torch.no_grad()
    def _restack(self) -> None:
        first = self.experts[0].gate_proj.weight
        (inter, dim), E = first.shape, len(self.experts)
        w13 = torch.empty(E, 2 * inter, dim, dtype=first.dtype, device=first.device)
        w2 = torch.empty(E, dim, inter, dtype=first.dtype, device=first.device)
        self._set_stack(w13, w2)
        for e, expert in enumerate(self.experts):  # the old tensors are freed expert by expert
            for linear, view in zip((expert.gate_proj, expert.up_proj, expert.down_proj), self._views(e)):
                view.copy_(linear.weight)
                linear.weight = nn.Parameter(view, requires_grad=linear.weight.requires_grad)


#: Applies each row of x (N, D), sorted by expert, to its expert (expert ids (N,), sorted): (N, D).
SortedExperts = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def routed_sum(x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, experts: SortedExperts) -> torch.Tensor:
    """(N, D) fp32: for each row of x (N, D), the sum over its K chosen experts idx (N, K) of weight x expert(row).

    The (row, slot) pairs are sorted by expert (stably, so rows keep their order within an expert) and
    handed to `experts` in that order; the weighted outputs are added back in the same order.
    """
    order = idx.reshape(-1).argsort(stable=True)  # (N*K,)
    tokens = order // idx.shape[-1]
    out = experts(x[tokens], idx.reshape(-1)[order])  # (N*K, D)
    routed = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float32, device=x.device)
    return routed.index_add_(0, tokens, out.float() * weights.reshape(-1)[order, None])


#: Restacking replaces parameters: two threads reaching the same layer first must not both do it.
_STACK_LOCK = threading.Lock()


def grouped_mm_supported(x: torch.Tensor, hidden: int, inter: int) -> bool:
    """Whether torch's grouped GEMM runs for these experts here: any float dtype on CPU; on CUDA bf16 on
    compute capability 8.0+ with 16-byte aligned rows (widths a multiple of 8)."""
    if x.device.type == "cpu":
        return True
    return (
        x.device.type == "cuda"
        and x.dtype == torch.bfloat16
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
        and hidden % 8 == 0
        and inter % 8 == 0
    )


def grouped_experts(x: torch.Tensor, expert_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """SwiGLU of each row of x (N, D) through its own expert, rows sorted by expert_ids (N,): (N, D).

    Two grouped GEMMs (gate and up fused, then down) over the stacked weights (see
    :meth:`MoE.stacked_experts`); group boundaries come from a search of the sorted ids, on the device.
    """
    E, inter = w13.shape[0], w13.shape[1] // 2
    offs = torch.searchsorted(expert_ids, torch.arange(E, device=x.device), right=True).to(torch.int32)  # (E,)
    gate, up = F.grouped_mm(x, w13.transpose(1, 2), offs=offs).split(inter, dim=-1)  # (N, I) each
    return F.grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)


def few_rows_on_cpu(x: torch.Tensor, pairs: int, experts: int) -> bool:
    """Whether (row, expert) `pairs` are better run by :func:`looped_routed_sum`: on a CPU, fewer pairs than experts
    (a decoding step, a short prompt), since torch's CPU grouped GEMM visits every expert, used or not."""
    return x.device.type == "cpu" and pairs < experts


def looped_routed_sum(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """(N, D) fp32 :func:`routed_sum` for a few rows: row by row, each chosen expert's SwiGLU on views of the stack,
    added with its weight. No sort, gather or copy of weights; reading the ids and weights as Python numbers
    synchronises nothing on a CPU, where this runs."""
    inter = w13.shape[1] // 2
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for row, acc, ids, row_weights in zip(x, out, idx.tolist(), weights.tolist()):
        for e, weight in zip(ids, row_weights):
            gate, up = F.linear(row, w13[e]).split(inter)
            acc.add_(F.linear(F.silu(gate) * up, w2[e]), alpha=weight)
    return out


class Block(nn.Module):
    """One decoder layer: pre-norm MLA and pre-norm MLP (dense or MoE), each added to the residual stream."""

    def __init__(self, config: DeepseekV2Config, layer: int) -> None:
        super().__init__()
        self.self_attn = MLA(config, layer)
        if config.is_moe_layer(layer):
            self.mlp: nn.Module = MoE(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hook_resid_pre = HookPoint("(B, T, D) residual stream entering the layer")
        self.hook_resid_mid = HookPoint("(B, T, D) after attention is added")
        self.hook_resid_post = HookPoint("(B, T, D) after the MLP is added")

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LatentKVCache | None
    ) -> torch.Tensor:
        x = self.hook_resid_pre(x)
        x = self.hook_resid_mid(x + self.self_attn(self.input_layernorm(x), cos, sin, cache))
        return self.hook_resid_post(x + self.mlp(self.post_attention_layernorm(x)))


#: A routed expert's weight in the checkpoint: layer, expert, projection.
_EXPERT_KEY = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


class NonFiniteError(FloatingPointError):
    """The logits hold NaN or infinity; the message names the first layer whose output was not finite."""


class DeepseekV2Model(nn.Module):
    """Embedding, decoder layers and final norm: the checkpoint's ``model.*`` keys.

    ``forward(input_ids, cache)`` returns the final norm's output (B, T, D), the input of lm_head.
    """

    def __init__(self, config: DeepseekV2Config) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rope = RotaryEmbedding(config)
        self.hook_embed = HookPoint("(B, T, D)")
        self.hook_norm_out = HookPoint("(B, T, D) final-norm output, the input of lm_head")

    def forward(
        self, input_ids: torch.Tensor, cache: LatentKVCache | None = None, *, last_only: bool = False
    ) -> torch.Tensor:
        """Final hidden states (B, T, D) for `input_ids` (B, T), continuing the tokens in `cache` if given.

        The cache's length sets the positions of the new tokens, their rope angles and the causal mask;
        the cache only commits the new tokens once every layer has run and the output is finite, so a
        forward pass that raises leaves it as it was. `last_only` keeps the last position only (B, 1, D).
        """
        T = input_ids.shape[1]
        past = 0
        if cache is not None:
            cache.check_room(T)
            past = cache.length
        elif T > self.config.max_position_embeddings:
            raise ValueError(
                f"{T} tokens exceed the context of {self.config.max_position_embeddings} positions "
                "(max_position_embeddings); shorten the input"
            )
        cos, sin = self.rope.cos_sin(torch.arange(past, past + T, device=input_ids.device))
        finite = []  # per layer, on the device: no synchronisation unless the output turns out non-finite
        with reading_positions(past, T):
            x = self.hook_embed(self.embed_tokens(input_ids))
            for block in self.layers:
                x = block(x, cos, sin, cache)
                finite.append(all_finite(x))
        if last_only:
            x = x[:, -1:]
        with reading_positions(*_output_positions(past, T, last_only)):
            x = self.hook_norm_out(self.norm(x))
        if not bool(all_finite(x)):
            raise NonFiniteError(_non_finite_message(torch.stack(finite).tolist()))
        if cache is not None:
            cache.advance(T)
        return x


def all_finite(x: torch.Tensor) -> torch.Tensor:
    """0-d bool on x's device: no NaN or infinity in x. Its smallest and largest values carry both (NaN
    propagates through min and max), and one reduction is many times faster than isfinite(x).all()."""
    return torch.isfinite(torch.stack(torch.aminmax(x))).all()


def _output_positions(past: int, T: int, last_only: bool) -> tuple[int, int]:
    """(start, length) of the positions the output rows stand for: all new tokens, or the last one."""
    return (past + T - 1, 1) if last_only else (past, T)


def _non_finite_message(finite_per_layer: list[bool]) -> str:
    bad = finite_per_layer.index(False) if False in finite_per_layer else None
    where = "the final norm" if bad is None else f"layer {bad} (model.layers.{bad}.hook_resid_post)"
    return (
        f"the model's output is not finite (NaN or infinity); the first non-finite values came out of {where}. "
        "A hook or intervention that writes huge or NaN values, or weights that overflow in this dtype, cause this"
    )


class DeepseekV2ForCausalLM(HookedModule):
    """The whole language model. ``forward(input_ids, cache)`` returns logits (B, T, V)."""

    def __init__(self, config: DeepseekV2Config) -> None:
        super().__init__()
        self.config = config
        self.model = DeepseekV2Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.hook_logits = HookPoint("(B, T, V)")
        self.tokenizer: Tokenizer | None = None  # set by dsv2viz.load when the folder has one
        # whether generations compile their decoding step (dsv2viz.fast_decode); None: DSV2VIZ_COMPILE, else GPU only
        self.compile_decode: bool | None = None
        self.setup_hook_names()

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @torch.no_grad()
    def init_weights(self, std: float = 0.02, seed: int = 0) -> DeepseekV2ForCausalLM:
        """Random normal(0, std) weights and unit norms, deterministic in `seed`: for tests and training."""
        gen = torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):  # input_layernorm, kv_a_layernorm, model.norm, ...
                p.fill_(1.0)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * std)
        return self

    def aux_loss(self) -> torch.Tensor | None:
        """The balance losses of the last training-mode forward pass, summed over MoE layers (None in eval)."""
        losses = [
            b.mlp.gate.aux_loss for b in self.model.layers if isinstance(b.mlp, MoE) and b.mlp.gate.aux_loss is not None
        ]
        return torch.stack(losses).sum() if losses else None

    def stack_experts(self) -> None:
        """Stack every MoE layer's expert weights now, if they are not (see :meth:`MoE.stacked_experts`)."""
        for block in self.model.layers:
            if isinstance(block.mlp, MoE):
                block.mlp.stacked_experts()

    def into_expert_stacks(self, items: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        """Pass a checkpoint's (key, tensor) pairs through, copying each routed expert weight into its layer's
        stack as it arrives and yielding the stack's view in its place, so the loaded tensor is freed at once
        and the experts are never held twice. Load the result with ``load_state_dict(..., assign=True)``."""
        for key, tensor in items:
            m = _EXPERT_KEY.fullmatch(key)
            mlp = self.model.layers[int(m[1])].mlp if m and int(m[1]) < len(self.model.layers) else None
            if not isinstance(mlp, MoE) or int(m[2]) >= len(mlp.experts):
                yield key, tensor
                continue
            with torch.no_grad():
                view = mlp.stack_view(int(m[2]), m[3], like=tensor)
                yield key, view.copy_(tensor)

    def set_attention_impl(self, impl: AttentionImpl) -> None:
        """Choose the attention path for every layer: "auto" (default), "naive" or "absorb"."""
        if impl not in ("auto", "naive", "absorb"):
            raise ValueError(f"attention impl {impl!r}: use 'auto', 'naive' or 'absorb'")
        for block in self.model.layers:
            block.self_attn.impl = impl

    def generate(
        self,
        prompt: Prompt,
        max_new_tokens: int = 64,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        stop_tokens: tuple[int, ...] | None = None,
        chat: bool = False,
        record: Recording | None = None,
        interventions: list[Intervention] = (),
    ) -> Generation:
        """Start a streaming generation: iterate it for steps, or call ``.run()`` for the finished Trace.

        `prompt` is text, token ids, or chat messages ([{"role": "user", "content": ...}]); `chat=True`
        formats a text prompt as one user turn. `record` says what the trace keeps (default:
        ``Recording()``, routing + latents + logits summary); `interventions` are (hook name, function)
        pairs, e.g. from ``dsv2viz.interventions``, attached only while this generation runs.
        """
        from .generation import Generation, Sampling  # generation builds on the model: imported when used
        from .traces import Recording

        sampling = Sampling(max_new_tokens, temperature, top_k, top_p, seed, stop_tokens)
        return Generation(self, prompt, sampling, record or Recording(), interventions, chat)

    def new_cache(self, batch_size: int = 1, capacity: int = 256) -> LatentKVCache:
        """An empty latent KV cache on this model's device and dtype."""
        return LatentKVCache(self.config, batch_size, capacity, device=self.device, dtype=self.dtype)

    def forward(
        self, input_ids: torch.Tensor, cache: LatentKVCache | None = None, *, last_only: bool = False
    ) -> torch.Tensor:
        """Logits for `input_ids` (B, T), which continue the tokens in `cache` when one is given.

        The cache's length sets the positions of the new tokens, their rope angles and the causal mask.
        `last_only` computes logits for the last position only (B, 1, V): what decoding needs. Raises
        NonFiniteError, naming the first layer at fault, when the output is NaN or infinite.
        """
        past = 0 if cache is None else cache.length
        hidden = self.model(input_ids, cache, last_only=last_only)
        with reading_positions(*_output_positions(past, input_ids.shape[1], last_only)):
            return self.hook_logits(self.lm_head(hidden))
