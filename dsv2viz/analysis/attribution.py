"""Direct logit attribution: which parts of the model wrote a token's logit, exactly.

The residual stream the final norm reads is a sum of what every part of the model wrote into it: the
token's embedding, each attention head of each layer (its slice of o_proj applied to its z), each routed
expert the token was sent to (its router weight times its output), the shared experts, and the dense MLP
of the dense layers. The final RMSNorm divides that sum by its root mean square and lm_head reads it out.
Freezing 1/rms at the value the model actually computed makes the readout linear:

    logit_t = sum over parts c of (W_U[t] * norm.weight) . c / rms

so each part gets one number and the numbers add up to the model's own logit (to float rounding: within
1e-4 in fp32, which the tests assert; in bf16 the norm rounds its output, so the sum is close, not exact).
With a contrast token the direction is W_U[t] - W_U[c], and the parts add up to the logit difference.

This is the *direct* effect, through the residual stream straight to the readout: a head that changes
what a later expert does gets none of that expert's credit here. :func:`ablation_effects` measures the
total effect of removing a part by rerunning the model.

Parts are named one way across the attribution analyses, so their tables join on ``component``:
``embedding``, ``L3.H5`` (layer 3, head 5), ``L3.E17`` (routed expert 17), ``L3.shared``, ``L0.mlp``
(a dense layer's MLP) and ``L3.attn_bias`` (o_proj's bias, only in models that have one).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..tokenizer import id_labels
from ._common import Tokens, sequence_positions, token_id, token_sequence

if TYPE_CHECKING:
    from ..hooks import HookPoint
    from ..model import DeepseekV2ForCausalLM

#: Kinds of parts that write into the residual stream, in the order the forward pass writes them.
KINDS = ("embedding", "head", "bias", "expert", "shared", "dense")

#: The most memory one call of :func:`logit_attributions` may hold in per-part vectors
#: (positions x parts x hidden size x 4 bytes); more positions are refused before the model runs.
MAX_ATTRIBUTION_BYTES = 2**30

_NAMES = {
    "embedding": "embedding",
    "head": "L{layer}.H{index}",
    "bias": "L{layer}.attn_bias",
    "expert": "L{layer}.E{index}",
    "shared": "L{layer}.shared",
    "dense": "L{layer}.mlp",
}


def component_name(kind: str, layer: int, index: int = -1) -> str:
    """The name of one part: ``embedding``, ``L3.H5``, ``L3.E17``, ``L3.shared``, ``L0.mlp``, ``L3.attn_bias``."""
    return _NAMES[kind].format(layer=layer, index=index)


def default_target(ids: torch.Tensor, position: int, logits: torch.Tensor) -> int:
    """The token the model produced after `position`: the sequence's next token, or for the last position
    the model's likeliest next token (the argmax of `logits` (V,) there)."""
    return int(ids[position + 1]) if position + 1 < len(ids) else int(logits.argmax())


@dataclass
class LogitAttribution:
    """One position's logit (or logit difference) split into what each part of the model wrote.

    ``frame`` has one row per part: component (its name), kind (embedding, head, bias, expert, shared,
    dense), layer (-1 for the embedding), index (head or expert id; -1 for the others), weight (the
    router weight of an expert, NaN for the others) and contribution; sorted by |contribution|, largest
    first. The contributions sum to ``logit``.
    """

    position: int  # the token read here; its next-token logits are attributed
    token_text: str  # the token at `position`
    target: int
    target_text: str
    contrast: int | None  # with a contrast: the logit difference target - contrast
    contrast_text: str | None
    logit: float  # the model's own logit of `target` at `position` (minus that of `contrast`)
    scale: float  # the final norm's 1/rms at `position`, frozen
    frame: pd.DataFrame

    @property
    def total(self) -> float:
        """The sum of the contributions: ``logit`` up to float rounding."""
        return float(self.frame["contribution"].sum())

    def by_kind(self) -> pd.Series:
        """Contributions summed per kind, in the order of :data:`KINDS` (kinds this model lacks left out)."""
        sums = self.frame.groupby("kind")["contribution"].sum()
        return sums.reindex([k for k in KINDS if k in sums.index])

    def by_layer(self) -> pd.Series:
        """Contributions summed per layer (-1: the embedding)."""
        return self.frame.groupby("layer")["contribution"].sum().sort_index()


def logit_attribution(
    model: DeepseekV2ForCausalLM,
    tokens: Tokens,
    position: int = -1,
    *,
    target: int | None = None,
    contrast: int | None = None,
) -> LogitAttribution:
    """Split the logit of `target` after reading `position` into every part's direct contribution.

    `tokens` is a trace, a text or token ids; the model reruns over them (no cache) with no intervention of its own:
    to attribute a run with interventions (a trace generated with some), call it inside
    ``with model.hooks(interventions):``. `target` defaults to the
    token the model produced next: the sequence's token at ``position + 1``, or for the last position
    the model's likeliest next token. `contrast` makes it a logit difference, ``target - contrast``.
    """
    return logit_attributions(model, tokens, [position], target=target, contrast=contrast)[0]


def logit_attributions(
    model: DeepseekV2ForCausalLM,
    tokens: Tokens,
    positions: Sequence[int] | None = None,
    *,
    target: int | None = None,
    contrast: int | None = None,
) -> list[LogitAttribution]:
    """:func:`logit_attribution` at several positions (all by default) from one forward pass.

    A given `target` or `contrast` is the same token at every position; by default each position's
    target is its own next token. Holds every part's vector at every position asked for: more than
    :data:`MAX_ATTRIBUTION_BYTES` of them is refused before the model runs, naming how many fit.
    """
    ids, texts = token_sequence(model, tokens)
    T = len(ids)
    pos = sequence_positions(range(T) if positions is None else positions, T)
    fixed_target = None if target is None else token_id(model, target, "target")
    contrast = None if contrast is None else token_id(model, contrast, "contrast")
    if contrast is not None and contrast == fixed_target:
        raise ValueError("contrast is the target token: their logit difference is zero; pick another contrast")
    c = model.config
    per_position = _parts_per_position(model) * c.hidden_size * 4
    if len(pos) * per_position > MAX_ATTRIBUTION_BYTES:
        fit = max(1, MAX_ATTRIBUTION_BYTES // per_position)
        raise ValueError(
            f"attributing {len(pos)} positions at once holds {len(pos) * per_position / 2**20:.0f} MiB of "
            f"per-part vectors (limit {MAX_ATTRIBUTION_BYTES / 2**20:.0f} MiB); ask for at most {fit} per call"
        )

    parts = _Parts(model, pos)
    with torch.no_grad():
        model.run_with_hooks(ids[None].to(model.device), fwd_hooks=parts.hooks())
    labels, vectors = parts.assemble()  # labels: (kind, layer, index (P, n), weight (P, n)) per block

    logits = parts.logits  # (P, V) fp32
    targets = [
        fixed_target if fixed_target is not None else default_target(ids, p, logits[i]) for i, p in enumerate(pos)
    ]
    if contrast is not None and contrast in targets:
        raise ValueError(
            f"contrast {contrast} is the target at position {pos[targets.index(contrast)]}: their logit difference "
            "is zero; pick another contrast"
        )
    W_U = model.lm_head.weight  # (V, D): only the rows read are copied to float64
    direction = W_U[torch.tensor(targets, device=W_U.device)].double()  # (P, D)
    if contrast is not None:
        direction = direction - W_U[contrast].double()
    direction = (direction * model.model.norm.weight.double()).cpu()
    x_last = parts.final.double()  # (P, D), the residual stream the final norm reads
    scale = torch.rsqrt(x_last.pow(2).mean(-1) + model.model.norm.eps)  # (P,)
    contributions = torch.einsum("pnd,pd->pn", vectors.double(), direction) * scale[:, None]  # (P, n)
    own = logits[torch.arange(len(pos)), torch.tensor(targets)].double()
    if contrast is not None:
        own = own - logits[:, contrast].double()

    shown = sorted({*targets} | ({contrast} if contrast is not None else set()))
    text_of = dict(zip(shown, id_labels(model.tokenizer, shown)))
    out = []
    for i, p in enumerate(pos):
        frame = _frame(labels, i, contributions[i])
        out.append(
            LogitAttribution(
                position=p,
                token_text=texts[p],
                target=targets[i],
                target_text=text_of[targets[i]],
                contrast=contrast,
                contrast_text=None if contrast is None else text_of[contrast],
                logit=float(own[i]),
                scale=float(scale[i]),
                frame=frame,
            )
        )
    return out


def _parts_per_position(model: DeepseekV2ForCausalLM) -> int:
    """How many parts write into the residual stream at one position."""
    c = model.config
    M = len(c.moe_layers)
    heads = c.num_attention_heads * c.num_hidden_layers
    bias = c.num_hidden_layers if c.attention_bias else 0
    routed = M * (c.num_experts_per_tok or 0)
    shared = M if c.n_shared_experts else 0
    return 1 + heads + bias + routed + shared + (c.num_hidden_layers - M)


Block = tuple[str, int, torch.Tensor, torch.Tensor]  # kind, layer, index (P, n), weight (P, n)


class _Parts:
    """Hooks that collect, at the chosen positions, each part's vector written into the residual stream."""

    def __init__(self, model: DeepseekV2ForCausalLM, positions: list[int]) -> None:
        self.model, self.positions = model, positions
        self.rows = torch.tensor(positions, device=model.device)
        self.blocks: list[tuple[Block, torch.Tensor]] = []  # label, vectors (P, n, D) fp32
        self.routing: dict[int, torch.Tensor] = {}  # layer -> (T, K) the experts every token used
        self.weights: dict[int, torch.Tensor] = {}  # layer -> (P, K) their router weights at the positions
        self.expert_out: dict[tuple[int, int], dict[int, torch.Tensor]] = {}  # (layer, expert) -> position -> (D,)
        self.final: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def _add(self, kind: str, layer: int, vectors: torch.Tensor, index: torch.Tensor | None = None) -> None:
        P, n = vectors.shape[:2]
        index = torch.full((P, n), -1) if index is None else index.expand(P, n)
        self.blocks.append(((kind, layer, index, torch.full((P, n), math.nan)), vectors.float().cpu()))

    def hooks(self) -> list[tuple[str, Callable]]:
        c, model = self.model.config, self.model
        hooks: list[tuple[str, Callable]] = [("model.hook_embed", self._embed)]
        for layer, block in enumerate(model.model.layers):
            hooks.append((f"model.layers.{layer}.self_attn.hook_z", self._heads(layer, block.self_attn.o_proj)))
            if c.is_moe_layer(layer):
                prefix = f"model.layers.{layer}.mlp"
                hooks += [
                    (f"{prefix}.gate.hook_topk_idx", self._routing(layer)),
                    (f"{prefix}.gate.hook_topk_weights", self._weights(layer)),
                    (f"{prefix}.experts.*.hook_out", self._expert),
                ]
                if c.n_shared_experts:
                    hooks.append((f"{prefix}.shared_experts.hook_out", self._whole("shared", layer)))
            else:
                hooks.append((f"model.layers.{layer}.mlp.hook_out", self._whole("dense", layer)))
        hooks.append((f"model.layers.{c.num_hidden_layers - 1}.hook_resid_post", self._final))
        hooks.append(("hook_logits", self._logits))
        return hooks

    def _embed(self, x: torch.Tensor, hook: HookPoint) -> None:  # (1, T, D)
        self._add("embedding", -1, x[0, self.rows, None])

    def _heads(self, layer: int, o_proj: torch.nn.Linear):
        H, dv = self.model.config.num_attention_heads, self.model.config.v_head_dim

        def collect(z: torch.Tensor, hook: HookPoint) -> None:  # (1, T, H, dv)
            w_o = o_proj.weight.float().view(-1, H, dv)  # (D, H, dv): head h's slice of o_proj
            per_head = torch.einsum("phv,dhv->phd", z[0, self.rows].float(), w_o)  # (P, H, D)
            self._add("head", layer, per_head, torch.arange(H))
            if o_proj.bias is not None:
                self._add("bias", layer, o_proj.bias.float().expand(len(self.positions), 1, -1))

        return collect

    def _routing(self, layer: int):
        def collect(idx: torch.Tensor, hook: HookPoint) -> None:  # (1, T, K)
            self.routing[layer] = idx[0]

        return collect

    def _weights(self, layer: int):
        def collect(weights: torch.Tensor, hook: HookPoint) -> None:  # (1, T, K)
            self.weights[layer] = weights[0, self.rows].float()

        return collect

    def _expert(self, out: torch.Tensor, hook: HookPoint) -> None:  # (N, D): its tokens in position order
        layer, expert = (int(n) for n in re.findall(r"\d+", hook.name))
        tokens = (self.routing[layer] == expert).any(-1).nonzero()[:, 0]  # (N,) the positions it served
        kept = torch.isin(tokens, self.rows)
        self.expert_out[(layer, expert)] = dict(zip(tokens[kept].tolist(), out[kept].float().cpu()))

    def _whole(self, kind: str, layer: int):
        def collect(x: torch.Tensor, hook: HookPoint) -> None:  # (1, T, D)
            self._add(kind, layer, x[0, self.rows, None])

        return collect

    def _final(self, x: torch.Tensor, hook: HookPoint) -> None:
        self.final = x[0, self.rows].float().cpu()

    def _logits(self, logits: torch.Tensor, hook: HookPoint) -> None:
        self.logits = logits[0, self.rows].float().cpu()

    def assemble(self) -> tuple[list[Block], torch.Tensor]:
        """(labels, vectors (P, parts, D)): the routed experts' blocks built from their outputs and weights."""
        for layer, idx in self.routing.items():
            experts = idx[self.rows].cpu()  # (P, K)
            weights = self.weights[layer].cpu()
            vectors = torch.empty(*experts.shape, self.model.config.hidden_size)
            for i, p in enumerate(self.positions):
                for k, e in enumerate(experts[i].tolist()):
                    seen = self.expert_out.get((layer, e), {})
                    if p not in seen:
                        raise RuntimeError(
                            f"expert {e} of layer {layer} ran without reporting its output for position {p} through "
                            f"model.layers.{layer}.mlp.experts.{e}.hook_out; attribution reads the experts there"
                        )
                    vectors[i, k] = seen[p] * weights[i, k]
            self.blocks.append((("expert", layer, experts, weights.double()), vectors))
        order = sorted(range(len(self.blocks)), key=lambda b: (self.blocks[b][0][1], KINDS.index(self.blocks[b][0][0])))
        blocks = [self.blocks[b] for b in order]
        return [label for label, _ in blocks], torch.cat([v for _, v in blocks], dim=1)


def largest_first(frame: pd.DataFrame, column: str, *, within: list[str] = ()) -> pd.DataFrame:
    """`frame` sorted by |column|, largest first (inside each group of the `within` columns, in their
    order); ties broken by component name, so the order is deterministic."""
    keys = frame.assign(_size=-frame[column].abs())
    return keys.sort_values([*within, "_size", "component"], ignore_index=True).drop(columns="_size")


def _frame(labels: list[Block], row: int, contributions: torch.Tensor) -> pd.DataFrame:
    """One position's table of parts, largest |contribution| first."""
    kinds, layers, index, weight = [], [], [], []
    for kind, layer, idx, w in labels:
        n = idx.shape[1]
        kinds += [kind] * n
        layers += [layer] * n
        index += idx[row].tolist()
        weight += w[row].tolist()
    frame = pd.DataFrame(
        {
            "component": [component_name(k, la, i) for k, la, i in zip(kinds, layers, index)],
            "kind": kinds,
            "layer": np.asarray(layers, dtype=np.int64),
            "index": np.asarray(index, dtype=np.int64),
            "weight": np.asarray(weight, dtype=np.float64),
            "contribution": contributions.numpy(),
        }
    )
    return largest_first(frame, "contribution")
