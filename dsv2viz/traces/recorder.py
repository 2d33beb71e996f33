"""The hooks that fill a trace while the model runs.

A :class:`Recorder` attaches one small function per recorded hook point. Each keeps the tensor it sees
(on the model's device, no synchronisation per hook) as pending until the generation commits the forward
pass (:meth:`Recorder.commit`), then in a list of chunks, one chunk per forward pass; a pass that raises is
discarded, so the chunks always hold whole passes. :meth:`Recorder.tensors` concatenates them into the
trace's tensors, on the CPU.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .recording import Recording

if TYPE_CHECKING:
    from ..model import DeepseekV2ForCausalLM

Chunks = dict[str, list[torch.Tensor]]


class Recorder:
    """Collects what `recording` asks for from the hook points of `model` (batch size 1)."""

    def __init__(self, model: DeepseekV2ForCausalLM, recording: Recording) -> None:
        self.model, self.recording = model, recording
        config = model.config
        self.att_layers = recording.layers(config) if recording.attention != "none" or recording.queries else []
        self.heads = recording.heads(config)
        self.chunks: Chunks = defaultdict(list)  # committed: whole forward passes only
        self.pending: Chunks = defaultdict(list)  # written by the hooks during the current forward pass
        self.want_rows = True  # last_row mode: the generation turns this off for all but the last prompt chunk

    def hooks(self) -> list[tuple[str, Callable]]:
        """(hook name, function) pairs to attach for the duration of a generation."""
        rec, out = self.recording, []

        def keep(key: str, pick: Callable[[torch.Tensor], torch.Tensor] = lambda x: x[0]) -> Callable:
            def fn(x: torch.Tensor, hook) -> None:
                self.pending[key].append(pick(x.detach()))

            return fn

        for layer in self.model.config.moe_layers:
            gate = f"model.layers.{layer}.mlp.gate."
            if rec.routing:
                out += [
                    (gate + "hook_topk_idx", keep(f"topk_idx.{layer}")),
                    (gate + "hook_topk_weights", keep(f"topk_weights.{layer}")),
                ]
            if rec.router_probs:
                out.append((gate + "hook_probs", keep(f"router_probs.{layer}")))
            if rec.moe_norms:
                mlp = f"model.layers.{layer}.mlp."
                out += [(mlp + "hook_routed_out", keep(f"routed_norms.{layer}", _norms))]
                if self.model.config.n_shared_experts:
                    out += [(mlp + "shared_experts.hook_out", keep(f"shared_norms.{layer}", _norms))]
        heads = torch.tensor(self.heads)
        for layer in range(self.model.config.num_hidden_layers):
            attn = f"model.layers.{layer}.self_attn."
            if rec.latents:
                out += [(attn + "hook_c_kv", keep(f"c_kv.{layer}")), (attn + "hook_k_pe", keep(f"k_pe.{layer}"))]
            if rec.residual_norms:
                out.append((f"model.layers.{layer}.hook_resid_post", keep(f"resid_norms.{layer + 1}", _norms)))
            if layer in self.att_layers:
                out += [
                    (attn + "hook_q_nope", keep(f"q_nope.{layer}", lambda x: x[0][:, heads])),
                    (attn + "hook_q_pe", keep(f"q_pe.{layer}", lambda x: x[0][:, heads])),
                ]
                if rec.attention != "none":
                    out.append((attn + "hook_pattern", self._pattern_hook(layer, heads)))
        if rec.residual_norms:
            out.append(("model.hook_embed", keep("resid_norms.0", _norms)))
        return out

    def _pattern_hook(self, layer: int, heads: torch.Tensor) -> Callable:
        last_row_only = self.recording.attention == "last_row"

        def fn(x: torch.Tensor, hook) -> None:  # x: (1, H, T, S); its T queries are the newest positions
            rows = x[0][heads].detach()  # (h, T, S)
            if last_row_only:
                if not self.want_rows:
                    return
                rows = rows[:, -1:]
            S = rows.shape[-1]
            self.pending[f"attention.{layer}"].append(rows)
            self.pending[f"attention.{layer}.query_pos"].append(torch.arange(S - rows.shape[1], S))

        return fn

    def commit(self) -> None:
        """Keep what the last forward pass recorded."""
        for key, values in self.pending.items():
            self.chunks[key] += values
        self.pending.clear()

    def discard(self) -> None:
        """Forget what a forward pass that raised had recorded."""
        self.pending.clear()

    def tensors(self) -> dict[str, torch.Tensor]:
        """What has been recorded so far, as a trace's tensors on the CPU."""
        config, c, out = self.model.config, self.chunks, {}

        def cat(key: str) -> torch.Tensor:
            return torch.cat(c[key]).cpu()

        moe = config.moe_layers
        for name in ("topk_idx", "topk_weights", "router_probs", "routed_norms", "shared_norms"):
            if moe and c.get(f"{name}.{moe[0]}"):
                out[name] = torch.stack([cat(f"{name}.{layer}") for layer in moe])
        L = config.num_hidden_layers
        for name in ("c_kv", "k_pe"):
            if c.get(f"{name}.0"):
                out[name] = torch.stack([cat(f"{name}.{layer}") for layer in range(L)])
        if c.get("resid_norms.0"):
            out["resid_norms"] = torch.stack([cat(f"resid_norms.{i}") for i in range(L + 1)])
        for layer in self.att_layers:
            if c.get(f"q_nope.{layer}"):
                out[f"q_nope.{layer}"], out[f"q_pe.{layer}"] = cat(f"q_nope.{layer}"), cat(f"q_pe.{layer}")
                w_uk, _ = self.model.model.layers[layer].self_attn._kv_b()
                out[f"w_uk.{layer}"] = w_uk[self.heads].detach().cpu().clone()
            if c.get(f"attention.{layer}"):
                out[f"attention.{layer}"] = _pad_rows(c[f"attention.{layer}"])
                out[f"attention.{layer}.query_pos"] = cat(f"attention.{layer}.query_pos")
        return out


def _norms(x: torch.Tensor) -> torch.Tensor:
    return x[0].float().norm(dim=-1)  # (T,)


def _pad_rows(chunks: list[torch.Tensor]) -> torch.Tensor:
    """Chunks of rows (h, T_i, S_i) with growing S_i, as one (h, sum T_i, max S_i) tensor, zero past each row's keys."""
    S = max(t.shape[-1] for t in chunks)
    return torch.cat([torch.nn.functional.pad(t, (0, S - t.shape[-1])) for t in chunks], dim=1).cpu()
