"""The fast decoding path: one fixed-shape step per generated token, compiled once and reused.

Which path runs. ``model.generate`` decodes a token through this path when the only hooks in play are the
generation's own: its :class:`~dsv2viz.traces.Recording`, and built-in interventions
(:mod:`dsv2viz.interventions`, applied from their specs). It decodes through the eager model, hook points
and all (the reference), for any step during which a model-wide hook (``model.add_hook``) or a hook in
scope around the generation (``with model.hooks(...)``) is attached; and for the whole generation when an
intervention is a hook function without a spec (or a built-in one moved to another hook point), when two
force/patch/steer interventions act on one layer, when a latent patch's value does not fit one position,
in training mode or while the experts' weights require gradients, or under ``set_attention_impl("naive")``. The prompt is read by the eager model either
way (one pass; fused attention, the MoE as grouped GEMMs). ``Generation.decode_path`` says which path the
latest step took, and why not the fast one.

The step, gpt-fast's recipe. The latent cache is preallocated to the generation's final length, and one
position tensor drives the rope angles, the cache write (``index_copy_`` at that position) and the causal
mask (keys 0..pos of the whole cache), so every step has the same shapes. The routed experts of the
step's token: compiled, the stacked expert weights (:meth:`~dsv2viz.model.MoE.stacked_experts`) are indexed
by the top-k ids and batch-multiplied (gpt-fast's Mixtral MoE; inductor fuses the gather into the
matrix-vector products, so the chosen experts' weights are read in place); uncompiled, where that gather
would copy them, see :func:`few_token_experts`. Nothing in the compiled step waits for the host. What the Recording
asks is written, inside the step, into the Recorder's buffers at the step's position (latents are read
from the cache afterwards, not copied), and built-in interventions come in as tables of tensors over the
layers: changing what is recorded or intervened on changes arguments, not code. Each generation has its
own cache, buffers and tables, so generations in two threads share nothing mutable.

Compilation. ``torch.compile`` of the layer steps (inductor with its C++ wrapper on a CPU;
``mode="reduce-overhead"``, CUDA graphs, on a GPU): one compiled function per kind of layer (dense, MoE)
and :class:`LayerPlan`, shared by every layer of that kind and reused by later generations of any length
(the cache length is a dynamic dimension). The first generation of a plan pays the compile
(``Generation.compile_seconds``, also logged). It is on by default on a GPU and off on a CPU;
``dsv2viz.load(..., compile=True/False)``, ``model.compile_decode = True/False`` or the environment
variable ``DSV2VIZ_COMPILE=1/0`` decide otherwise (uncompiled, the same step runs as plain PyTorch). A
compile that fails (no C++ compiler, say) warns once and the step runs uncompiled.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
import warnings
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .hooks import _SCOPE
from .interventions import InterventionSpec, forced_routing
from .model import (
    MoE,
    NonFiniteError,
    _non_finite_message,
    all_finite,
    expert_weights,
    grouped_experts,
    grouped_mm_supported,
    looped_routed_sum,
    routed_sum,
    top_experts,
)
from .traces.recorder import token_norms

if TYPE_CHECKING:
    from .kv_cache import LatentKVCache
    from .model import MLA, Block, DeepseekV2ForCausalLM
    from .traces.recorder import Recorder

log = logging.getLogger("dsv2viz")

#: 1 (true, yes, on) compiles the fast path's step, 0 (false, no, off) runs it uncompiled; unset: on a GPU only.
COMPILE_ENV = "DSV2VIZ_COMPILE"


def compile_by_default(device: torch.device) -> bool:
    """Whether a model not told (``compile_decode`` None) compiles its decoding step: as ``DSV2VIZ_COMPILE`` says,
    else on a GPU only. On a GPU compiling (CUDA graphs) is what makes batch-1 decoding bandwidth-bound
    instead of launch-bound; on a CPU it costs 20-60 s once for a few milliseconds per token, which pays off
    only over long generations of mid-sized models, so it is asked for there (``load(..., compile=True)``)."""
    value = os.environ.get(COMPILE_ENV, "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    return device.type == "cuda"


def compiling(model: DeepseekV2ForCausalLM) -> bool:
    """Whether `model`'s generations compile their decoding step now."""
    return compile_by_default(model.device) if model.compile_decode is None else model.compile_decode


@dataclass(frozen=True)
class LayerPlan:
    """What one layer's decoding step computes besides its output; compiled once per plan and kind of layer.

    Routing, residual and MoE norms are always written (a few values per token, into scratch buffers when
    the Recording does not keep them), so the default Recording and Recording.off() share one compiled step.
    """

    router_probs: bool = False  # MoE layers: the full router distribution recorded
    queries: bool = False  # this layer's queries recorded
    patterns: bool = False  # and its attention rows
    interventions: tuple[str, ...] = ()  # the kinds of intervention the generation applies, sorted


# ----- which path ----------------------------------------------------------------------------------------
def hooks_in_play(model: DeepseekV2ForCausalLM) -> bool:
    """Whether a hook other than a generation's own could act on a forward pass run here, now."""
    return bool(_SCOPE.get()) or model.has_model_wide_hooks()


def unavailable(model: DeepseekV2ForCausalLM, interventions: list[tuple]) -> str | None:
    """Why a generation with these interventions cannot decode through the fast path (None: it can)."""
    if model.training:
        return "the model is in training mode"
    if any(
        p.requires_grad for b in model.model.layers if isinstance(b.mlp, MoE) for p in b.mlp.experts[0].parameters()
    ):
        return "the experts' weights require gradients (stacking them would replace the parameters being trained)"
    if any(block.self_attn.impl == "naive" for block in model.model.layers):
        return "set_attention_impl('naive') is set"
    seen = set()
    for filter, fn in interventions:
        spec = getattr(fn, "spec", None)
        if not isinstance(spec, InterventionSpec):
            return f"intervention {getattr(fn, '__qualname__', fn)!r} is a custom hook function"
        if model.hook_names(filter) != [spec.hook]:
            return f"a built-in {spec.kind} is attached at {filter!r} rather than {spec.hook}"
        if spec.kind in ("force_experts", "patch_latent", "steer"):
            if (spec.kind, spec.layer) in seen:
                return f"two {spec.kind} interventions at layer {spec.layer}"
            seen.add((spec.kind, spec.layer))
        if spec.kind in ("ablate_experts", "ablate_heads") and spec.positions is not None:
            return f"{spec.kind} at chosen positions runs through the eager model"
        if spec.kind == "patch_latent" and not _fits_one_position(spec, model.config.kv_lora_rank):
            return f"patch_latent's value of shape {tuple(spec.value.shape)} does not fit one position"
    return None


def _fits_one_position(spec: InterventionSpec, rank: int) -> bool:
    """Whether a patch's value broadcasts to the (1, dims) slice of one decoded position."""
    shape = (1, len(spec.indices) or rank)
    try:
        return torch.broadcast_shapes(spec.value.shape, shape) == shape
    except RuntimeError:
        return False


def intervention_tables(
    model: DeepseekV2ForCausalLM, specs: list[InterventionSpec], positions: int
) -> dict[str, torch.Tensor]:
    """The interventions as tensors over layers (only the kinds present), for a cache of `positions`."""
    c, device, dtype = model.config, model.device, model.dtype
    kinds = {s.kind for s in specs}
    M, L, K = len(c.moe_layers), c.num_hidden_layers, c.num_experts_per_tok
    t: dict[str, torch.Tensor] = {}
    if "ablate_experts" in kinds:
        t["ablate"] = torch.zeros(M, c.n_routed_experts, dtype=torch.bool)  # True: probability set to 0
    if "force_experts" in kinds:
        t["force"], t["force_n"] = torch.full((M, K), -1), torch.zeros(M, dtype=torch.int64)
    if "ablate_heads" in kinds:
        t["heads"] = torch.zeros(L, c.num_attention_heads, dtype=torch.bool)  # True: the head's z set to 0
    if "patch_latent" in kinds:
        t["patch_dims"] = torch.zeros(L, c.kv_lora_rank, dtype=torch.bool)
        t["patch_pos"] = torch.zeros(L, positions, dtype=torch.bool)
        t["patch_value"] = torch.zeros(L, c.kv_lora_rank, dtype=dtype)
    if "steer" in kinds:
        t["steer"] = torch.zeros(L, c.hidden_size, dtype=dtype)
    for s in specs:
        if s.kind == "ablate_experts":
            t["ablate"][c.moe_layers.index(s.layer), list(s.indices)] = True
        elif s.kind == "force_experts":
            m = c.moe_layers.index(s.layer)
            t["force"][m, : len(s.indices)], t["force_n"][m] = torch.tensor(s.indices), len(s.indices)
        elif s.kind == "ablate_heads":
            t["heads"][s.layer, list(s.indices)] = True
        elif s.kind == "patch_latent":
            dims = list(s.indices) or list(range(c.kv_lora_rank))
            t["patch_dims"][s.layer, dims] = True
            t["patch_value"][s.layer, dims] = s.value.to(dtype).broadcast_to(1, len(dims))[0]
            kept = [p for p in s.positions if p < positions] if s.positions is not None else range(positions)
            t["patch_pos"][s.layer, list(kept)] = True
        elif s.kind == "steer":  # the eager hook adds scale * vector in the model's dtype: the same rounding
            t["steer"][s.layer] = s.scale * s.value.to(dtype)
    return {k: v.to(device) for k, v in t.items()}


# ----- the step --------------------------------------------------------------------------------------------
def dense_layer_step(
    block: Block,
    plan: LayerPlan,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    row: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    rec: dict[str, torch.Tensor],
    iv: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense layer for the new token x (B, 1, D) at position pos (1,); see :func:`layer_step`."""
    return layer_step(block, plan, x, cos, sin, pos, row, cache, None, rec, iv)


def moe_layer_step(
    block: Block,
    plan: LayerPlan,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    row: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    stacked: tuple[torch.Tensor, torch.Tensor],
    rec: dict[str, torch.Tensor],
    iv: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """An MoE layer for the new token x (B, 1, D) at position pos (1,); see :func:`layer_step`."""
    return layer_step(block, plan, x, cos, sin, pos, row, cache, stacked, rec, iv)


def layer_step(
    block: Block,
    plan: LayerPlan,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    row: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    stacked: tuple[torch.Tensor, torch.Tensor] | None,
    rec: dict[str, torch.Tensor],
    iv: dict[str, torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    """One decoder layer for the new token x (B, 1, D) at the absolute position pos (1,).

    `cache` is this layer's (c_kv (B, S, R), k_pe (B, S, dr)), written at pos; `stacked` its experts'
    stacked weights (MoE layers); `rec` this layer's recording buffers (indexed by position, attention
    rows by `row`) and `iv` its rows of the intervention tables. Returns the layer's output and whether
    it is finite, on the device. Dense and MoE layers are compiled as two functions, each reused by
    every layer of its kind.
    """
    _one_length(cache, rec, iv)
    x = x + _attention(block.self_attn, block.input_layernorm(x), cos, sin, pos, row, cache, plan, rec, iv)
    h = block.post_attention_layernorm(x)
    x = x + (block.mlp.swiglu(h) if stacked is None else _moe(block.mlp, h, stacked, pos, plan, rec, iv))
    if "steer" in plan.interventions:
        x = x + iv["steer"]
    rec["resid_norms"].index_copy_(0, pos, token_norms(x))
    return x, all_finite(x)


def _one_length(cache: tuple[torch.Tensor, torch.Tensor], rec: dict[str, torch.Tensor], iv: dict[str, torch.Tensor]):
    """Tell the compiler that every buffer indexed by position has the cache's length S, so the compiled step takes
    one size, not one per buffer (each size costs its call a conversion to a tensor, about 7 us on a CPU)."""
    S = cache[0].shape[1]
    sized = [cache[1].shape[1], *(t.shape[0] for n, t in rec.items() if n not in ("heads", "attention"))]
    if "attention" in rec:
        sized.append(rec["attention"].shape[2])
    if "patch_pos" in iv:
        sized.append(iv["patch_pos"].shape[0])
    for size in sized:
        torch._check(size == S)


def _attention(
    attn: MLA,
    x: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    pos: torch.Tensor,
    row: torch.Tensor,
    cache: tuple[torch.Tensor, torch.Tensor],
    plan: LayerPlan,
    rec: dict[str, torch.Tensor],
    iv: dict[str, torch.Tensor],
) -> torch.Tensor:
    """Latent ("absorb") attention of the new token over the whole preallocated cache, keys past pos masked."""
    q_nope, q_pe, c_kv, k_pe = attn.project(x, cos, sin)  # (B, 1, H, dn), (B, 1, H, dr), (B, 1, R), (B, 1, dr)
    if "patch_latent" in plan.interventions:
        here = iv["patch_dims"] & iv["patch_pos"].index_select(0, pos)  # (R,)
        c_kv = torch.where(here, iv["patch_value"], c_kv)
    c_kv_all, k_pe_all = cache  # (B, S, R), (B, S, dr)
    c_kv_all.index_copy_(1, pos, c_kv)
    k_pe_all.index_copy_(1, pos, k_pe)
    if plan.queries:
        rec["q_nope"].index_copy_(0, pos, q_nope[0][:, rec["heads"]])
        rec["q_pe"].index_copy_(0, pos, q_pe[0][:, rec["heads"]])
    scores = attn.latent_scores_nope(q_nope, c_kv_all) + attn.scores_rope(q_pe, k_pe_all)  # (B, H, 1, S)
    unseen = torch.arange(c_kv_all.shape[1], device=pos.device) > pos  # (S,) keys after this position
    pattern = scores.masked_fill(unseen, float("-inf")).softmax(dim=-1, dtype=torch.float32).to(x.dtype)
    if plan.patterns:
        rec["attention"].index_copy_(1, row, pattern[0][rec["heads"]])
    z = attn.latent_output(pattern, c_kv_all)  # (B, 1, H, dv)
    if "ablate_heads" in plan.interventions:
        z = z.masked_fill(iv["heads"][:, None], 0.0)
    return attn.o_proj(z.reshape(x.shape[0], 1, -1))


def _moe(
    moe: MoE,
    x: torch.Tensor,
    stacked: tuple[torch.Tensor, torch.Tensor],
    pos: torch.Tensor,
    plan: LayerPlan,
    rec: dict[str, torch.Tensor],
    iv: dict[str, torch.Tensor],
) -> torch.Tensor:
    """An MoE layer for x (B, 1, D): router, routed experts, shared experts."""
    c = moe.config
    B, T, D = x.shape
    probs = moe.gate.logits(x).softmax(dim=-1)  # (B, 1, E) fp32
    if "ablate_experts" in plan.interventions:
        probs = probs.masked_fill(iv["ablate"], 0.0)
    if plan.router_probs:
        rec["router_probs"].index_copy_(0, pos, probs[0])
    idx = top_experts(probs, c)  # (B, 1, K)
    if "force_experts" in plan.interventions:
        idx = forced_routing(idx, iv["force"], iv["force_n"])
    weights = expert_weights(probs, idx, c)
    rec["topk_idx"].index_copy_(0, pos, idx[0])
    rec["topk_weights"].index_copy_(0, pos, weights[0])
    K = idx.shape[-1]
    routed = few_token_experts(x.view(-1, D), idx.view(-1, K), weights.view(-1, K), *stacked)
    routed = routed.view(B, T, D).to(x.dtype)
    rec["routed_norms"].index_copy_(0, pos, token_norms(routed))
    if not c.n_shared_experts:
        return routed
    shared = moe.shared_experts.swiglu(x)
    rec["shared_norms"].index_copy_(0, pos, token_norms(shared))
    return routed + shared


def few_token_experts(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """(N, D) fp32 weighted sum of each row's K chosen experts, x (N, D), idx and weights (N, K), for a few rows.

    Compiled: gpt-fast's gather, which inductor fuses into the products (the chosen experts' weights are read
    in place, not copied). Uncompiled, where a gather would copy them: on a CPU expert by expert over views of
    the stack (:func:`~dsv2viz.model.looped_routed_sum`), on a GPU the eager MoE's grouped GEMMs where they run.
    """
    if torch.compiler.is_compiling():
        return gathered_routed_sum(x, idx, weights, w13, w2)
    if x.device.type == "cpu":
        return looped_routed_sum(x, idx, weights, w13, w2)
    if grouped_mm_supported(x, w13.shape[2], w13.shape[1] // 2):
        return routed_sum(x, idx, weights, functools.partial(grouped_experts, w13=w13, w2=w2))
    return gathered_routed_sum(x, idx, weights, w13, w2)


def gathered_routed_sum(
    x: torch.Tensor, idx: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """gpt-fast's Mixtral MoE: index the stacked weights with the top-k ids and batch-multiply (N, D) fp32."""
    inter = w13.shape[1] // 2
    h = torch.einsum("nd,nkod->nko", x, w13[idx])  # (N, K, 2I)
    gate, up = h.split(inter, dim=-1)
    out = torch.einsum("nki,nkdi->nkd", F.silu(gate) * up, w2[idx])  # (N, K, D)
    return (out.float() * weights[..., None]).sum(dim=1)


# ----- compiling and running -----------------------------------------------------------------------------
#: Written by every step whatever the Recording keeps (see LayerPlan).
ALWAYS_WRITTEN = ("topk_idx", "topk_weights", "routed_norms", "shared_norms", "resid_norms")
_COMPILED: dict[tuple[str | None, bool], object] = {}  # (compile mode, MoE layer) -> the compiled layer step
_COMPILED_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> plans it has compiled
_PLANS: dict[LayerPlan, LayerPlan] = {}  # one object per distinct plan, so the compiled code's guards match
_LOCK = threading.Lock()


def _compiled(device: torch.device, moe: bool):
    """The compiled layer step for this device: CUDA graphs on a GPU; on a CPU inductor's C++ wrapper, which calls
    the kernels without a Python line per kernel (about twice the decoding speed of the Python wrapper here)."""
    mode, options = ("reduce-overhead", None) if device.type == "cuda" else (None, {"cpp_wrapper": True})
    with _LOCK:
        if (mode, moe) not in _COMPILED:
            step = moe_layer_step if moe else dense_layer_step
            _COMPILED[mode, moe] = torch.compile(step, mode=mode, fullgraph=True, options=options)
        return _COMPILED[mode, moe]


def _interned(plan: LayerPlan) -> LayerPlan:
    with _LOCK:
        return _PLANS.setdefault(plan, plan)


class FastDecoder:
    """One generation's decoding steps through the fast path: its step inputs, buffer views and tables."""

    def __init__(
        self, model: DeepseekV2ForCausalLM, recorder: Recorder, specs: list[InterventionSpec], cache: LatentKVCache
    ) -> None:
        self.model, self.cache, self.recorder = model, cache, recorder
        c, device = model.config, model.device
        shapes = recorder.shapes(everything=True)
        buffers = {  # scratch for what every step writes and the Recording does not keep
            n: torch.zeros(shapes[n][0], dtype=shapes[n][1], device=device)
            for n in ALWAYS_WRITTEN
            if n in shapes and n not in recorder.buffers
        }
        buffers.update(recorder.buffers)
        self.resid_norms = buffers["resid_norms"]
        kinds = tuple(sorted({s.kind for s in specs}))
        tables = intervention_tables(model, specs, cache.capacity)
        heads = torch.tensor(recorder.heads, device=device)
        self.ids = torch.zeros(1, 1, dtype=torch.int64, device=device)
        self.pos = torch.zeros(1, dtype=torch.int64, device=device)
        self.row = torch.zeros(1, dtype=torch.int64, device=device)
        self.layers: list[tuple] = []  # per layer: (block, plan, cache views, stacked experts or None, rec, iv)
        for layer, block in enumerate(model.model.layers):
            m = c.moe_layers.index(layer) if isinstance(block.mlp, MoE) else None
            rec = {
                n: buffers[n][m] for n in ("topk_idx", "topk_weights", "router_probs") if n in buffers and m is not None
            }
            rec.update((n, buffers[n][m]) for n in ("routed_norms", "shared_norms") if n in buffers and m is not None)
            rec["resid_norms"] = buffers["resid_norms"][layer + 1]
            if layer in recorder.att_layers:
                rec.update(q_nope=buffers[f"q_nope.{layer}"], q_pe=buffers[f"q_pe.{layer}"], heads=heads)
                if f"attention.{layer}" in buffers:
                    rec["attention"] = buffers[f"attention.{layer}"]
            per_moe = ("ablate", "force", "force_n")
            iv = {
                k: (t[m] if k in per_moe else t[layer]) for k, t in tables.items() if m is not None or k not in per_moe
            }
            plan = LayerPlan(
                router_probs="router_probs" in rec,
                queries="q_nope" in rec,
                patterns="attention" in rec,
                interventions=kinds,
            )
            stacked = block.mlp.stacked_experts() if m is not None else None
            self.layers.append((block, _interned(plan), (cache.c_kv[layer], cache.k_pe[layer]), stacked, rec, iv))
        self.compile_seconds: float | None = None  # set when this generation compiled a layer step
        self._mark_inputs(device)

    def _mark_inputs(self, device: torch.device) -> None:
        """The cache length is a dynamic dimension, so one compiled step serves every generation length; under
        CUDA graphs the step's inputs are static addresses (the same tensors every step)."""
        mark = torch._dynamo.mark_dynamic
        static = [self.ids, self.pos, self.row]
        for _, _, cache, stacked, rec, iv in self.layers:
            for t in cache:
                mark(t, 1)
            for name, t in rec.items():
                if name == "attention":
                    mark(t, 1)
                    mark(t, 2)
                elif name != "heads":
                    mark(t, 0)
            if "patch_pos" in iv:
                mark(iv["patch_pos"], 0)
            static += [*cache, *(stacked or ()), *rec.values(), *iv.values()]
        if device.type == "cuda":
            for t in static:
                torch._dynamo.mark_static_address(t, guard=False)

    def step(self, token: int) -> torch.Tensor:
        """Read `token` at the cache's next position; the next-token logits (V,) fp32. Raises NonFiniteError
        (naming the first layer at fault) and leaves the cache's length as it was when they are not finite."""
        model, position = self.model, self.cache.length
        self.cache.check_room(1)
        self.ids.fill_(token)
        self.pos.fill_(position)
        self.row.fill_(max(0, position - self.recorder.first_row))
        if model.device.type == "cuda":  # a new step: CUDA graph trees may reuse the last step's outputs' memory
            torch.compiler.cudagraph_mark_step_begin()
        with torch.no_grad():
            x = model.model.embed_tokens(self.ids)  # (1, 1, D)
            self.resid_norms[0].index_copy_(0, self.pos, token_norms(x))
            cos, sin = model.model.rope.cos_sin(self.pos)
            finite = []
            for block, plan, cache, stacked, rec, iv in self.layers:
                args = (block, plan, x, cos, sin, self.pos, self.row, cache, *([stacked] if stacked else []), rec, iv)
                x, ok = self._layer(stacked is not None, args)
                finite.append(ok)
            x = model.model.norm(x)
            finite.append(all_finite(x))
            if not bool(finite[-1]):
                raise NonFiniteError(_non_finite_message(torch.stack(finite[:-1]).tolist()))
            logits = model.lm_head(x)[0, -1].float()
        self.cache.advance(1)
        return logits

    def _layer(self, moe: bool, args: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        eager = moe_layer_step if moe else dense_layer_step
        if not compiling(self.model):
            return eager(*args)
        with _LOCK:
            plans = _COMPILED_PLANS.setdefault(self.model, set())
            first = (moe, args[1]) not in plans
            plans.add((moe, args[1]))
        start = time.perf_counter()
        try:
            out = _compiled(self.model.device, moe)(*args)
        except Exception as e:  # a compiler that cannot run here: the same step, uncompiled
            self.model.compile_decode = False
            warnings.warn(
                f"dsv2viz: compiling the decoding step failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); "
                f"decoding uncompiled. {COMPILE_ENV}=0 or load(..., compile=False) skips the attempt.",
                RuntimeWarning,
                stacklevel=5,
            )
            return eager(*args)
        if first:
            seconds = time.perf_counter() - start
            self.compile_seconds = (self.compile_seconds or 0.0) + seconds
            log.info(
                "dsv2viz: compiled the decoding step of %s layers for %s in %.1f s",
                "MoE" if moe else "dense",
                args[1],
                seconds,
            )
        return out
