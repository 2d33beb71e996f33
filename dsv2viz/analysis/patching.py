"""Activation patching between two prompts: where does what tells them apart live, layer by layer?

Run a clean prompt and a corrupted one of the same length (the same function with another variable
name, say) and read the logit difference ``target - contrast`` after the readout position in both. Then
rerun the corrupted prompt with one activation taken from the clean run, at one (layer, position), and
read it again. As in TransformerLens's patching module, the table holds

    recovered = (patched - corrupted) / (clean - corrupted)

1 where that one activation carries everything that makes the clean prediction differ, 0 where it
carries none of it. Three kinds of activation can be patched:

* ``resid_pre``: the residual stream entering layer l at position p (``model.layers.{l}.hook_resid_pre``);
* ``c_kv``: the latent layer l computes for position p (``self_attn.hook_c_kv``), i.e. what every query
  at layer l, p's own included, reads of position p (its keys and values);
* ``routing``: the routing decision of MoE layer l at position p: the clean run's top-k expert ids are
  forced into the corrupted run (``mlp.gate.hook_topk_idx``) and weighted by the corrupted run's own router
  probabilities for them (as :func:`dsv2viz.interventions.force_experts` weights forced experts). It asks
  whether *which* experts ran matters, apart from what the token's hidden state was.

Each cell is one row of a batch: copies of the corrupted prompt, each with its own patch, in chunks of
`batch_size` copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..tokenizer import id_labels
from ._common import Tokens, check_batch_size, sequence_positions, token_id, token_sequence

if TYPE_CHECKING:
    from ..hooks import HookPoint
    from ..model import DeepseekV2ForCausalLM

#: Where each kind of patch writes, by layer.
PATCH_HOOKS = {
    "resid_pre": "model.layers.{}.hook_resid_pre",
    "c_kv": "model.layers.{}.self_attn.hook_c_kv",
    "routing": "model.layers.{}.mlp.gate.hook_topk_idx",
}

Cell = tuple[int, int]  # (layer, position)


@dataclass
class ActivationPatching:
    """A layers x positions table of how much of the clean logit difference one patched activation recovers."""

    kind: str  # resid_pre, c_kv or routing
    layers: list[int]  # the rows: model layer indices
    positions: list[int]  # the columns: positions in the prompts
    recovered: torch.Tensor  # (layers, positions) float64: (patched - corrupted) / (clean - corrupted)
    patched: torch.Tensor  # (layers, positions) float64: the patched run's logit difference
    clean: float  # logit difference target - contrast of the clean run
    corrupted: float  # ... and of the corrupted run
    readout: int  # the position whose next-token logits are read
    target: int
    target_text: str
    contrast: int
    contrast_text: str
    clean_texts: list[str]  # token texts of the two prompts
    corrupted_texts: list[str]

    def to_frame(self) -> pd.DataFrame:
        """One row per cell: layer, position, clean_token, corrupted_token, patched, recovered."""
        L, P = self.recovered.shape
        return pd.DataFrame(
            {
                "layer": np.repeat(self.layers, P),
                "position": np.tile(self.positions, L),
                "clean_token": [self.clean_texts[p] for p in self.positions] * L,
                "corrupted_token": [self.corrupted_texts[p] for p in self.positions] * L,
                "patched": self.patched.flatten().numpy(),
                "recovered": self.recovered.flatten().numpy(),
            }
        )


def activation_patching(
    model: DeepseekV2ForCausalLM,
    clean: Tokens,
    corrupted: Tokens,
    *,
    kind: str = "resid_pre",
    layers: Sequence[int] | None = None,
    positions: Sequence[int] | None = None,
    readout: int = -1,
    target: int | None = None,
    contrast: int | None = None,
    batch_size: int = 16,
) -> ActivationPatching:
    """Patch `kind` from the clean run into the corrupted one at each (layer, position), one cell at a time.

    `layers` default to every layer (every MoE layer for ``routing``), `positions` to every position up to
    `readout` (later ones cannot change the prediction read there). `target` defaults to the clean run's
    likeliest next token after `readout`, `contrast` to the corrupted run's; pass both when the two runs
    agree on their likeliest token.
    """
    check_batch_size(batch_size)
    pair = _Pair(model, clean, corrupted, kind, layers, readout, target, contrast)
    rows, cols = pair.patched_layers, pair.positions(positions)
    if not rows:
        raise ValueError("layers=[]: give at least one layer to patch")
    cells = [[(layer, p)] for layer in rows for p in cols]
    patched = pair.metrics(cells, batch_size).view(len(rows), len(cols))
    return ActivationPatching(
        kind,
        rows,
        cols,
        pair.recovered(patched),
        patched,
        pair.clean,
        pair.corrupted,
        pair.readout,
        pair.target,
        pair.text(pair.target),
        pair.contrast,
        pair.text(pair.contrast),
        pair.clean_texts,
        pair.corrupted_texts,
    )


def patch_recovery(
    model: DeepseekV2ForCausalLM,
    clean: Tokens,
    corrupted: Tokens,
    cells: Iterable[Cell],
    *,
    kind: str = "resid_pre",
    readout: int = -1,
    target: int | None = None,
    contrast: int | None = None,
) -> float:
    """The recovered fraction when all `cells` ((layer, position) pairs) are patched together in one run.

    For example the residual stream at every position of one layer, or the routing of one token at every
    MoE layer. No cells gives 0 up to float rounding (the corrupted run itself).
    """
    group = list(cells)
    for cell in group:
        if not (isinstance(cell, tuple) and len(cell) == 2):
            raise ValueError(f"cells are (layer, position) pairs; got {cell!r}")
    pair = _Pair(model, clean, corrupted, kind, [layer for layer, _ in group], readout, target, contrast)
    group = [(layer, pair.positions([p])[0]) for layer, p in group]
    return float(pair.recovered(pair.metrics([group], 1))[0])


class _Pair:
    """A clean and a corrupted prompt read once each: the clean activations to patch in and the two metrics."""

    def __init__(
        self,
        model: DeepseekV2ForCausalLM,
        clean: Tokens,
        corrupted: Tokens,
        kind: str,
        layers: Sequence[int] | None,
        readout: int,
        target: int | None,
        contrast: int | None,
    ) -> None:
        if kind not in PATCH_HOOKS:
            raise ValueError(f"kind={kind!r}: patch one of {sorted(PATCH_HOOKS)}")
        self.model, self.kind = model, kind
        self.patched_layers = self._layers(layers)
        clean_ids, self.clean_texts = token_sequence(model, clean)
        corrupted_ids, self.corrupted_texts = token_sequence(model, corrupted)
        if len(clean_ids) != len(corrupted_ids):
            raise ValueError(
                f"the clean prompt has {len(clean_ids)} tokens and the corrupted one {len(corrupted_ids)}: "
                "patching pairs positions, so give prompts of the same length"
            )
        self.readout = sequence_positions(readout, len(clean_ids))[0]
        target = None if target is None else token_id(model, target, "target")
        contrast = None if contrast is None else token_id(model, contrast, "contrast")
        stop = self.readout + 1  # later tokens cannot change the prediction read at `readout`
        self.ids = corrupted_ids[None, :stop].to(model.device)
        names = [PATCH_HOOKS[kind].format(layer) for layer in self.patched_layers]
        with torch.no_grad():
            clean_logits, cache = model.run_with_cache(
                clean_ids[None, :stop].to(model.device), names_filter=names, last_only=True
            )
            corrupted_logits = model(self.ids, last_only=True)
        self.values = {name: cache[name][0] for name in names}  # (T, ...) each, the clean run's
        clean_logits, corrupted_logits = clean_logits[0, -1].float(), corrupted_logits[0, -1].float()
        self.target = int(clean_logits.argmax()) if target is None else target
        self.contrast = int(corrupted_logits.argmax()) if contrast is None else contrast
        if self.target == self.contrast:
            raise ValueError(
                f"target and contrast are both token {self.target} ({self.text(self.target)!r}); the clean and "
                "corrupted runs agree on their likeliest token, so pass target= and contrast= to tell them apart"
            )
        self.clean, self.corrupted = float(self._diff(clean_logits[None])), float(self._diff(corrupted_logits[None]))
        if abs(self.clean - self.corrupted) < 1e-6 * max(1.0, abs(self.clean)):
            raise ValueError(
                f"the clean and corrupted runs give the same logit difference ({self.clean:.6g}): nothing to "
                "recover; pick prompts, or a target and contrast, that the model tells apart"
            )

    def _layers(self, layers: Sequence[int] | None) -> list[int]:
        """The layers to patch, checked: every layer by default, the MoE layers for routing."""
        c = self.model.config
        allowed = c.moe_layers if self.kind == "routing" else list(range(c.num_hidden_layers))
        if layers is None:
            return allowed
        out = list(dict.fromkeys(layers))
        bad = [la for la in out if la not in allowed]
        if bad:
            what = "MoE layers" if self.kind == "routing" else "layers"
            raise ValueError(f"layers {bad} cannot be patched with kind={self.kind!r}; the {what} are {allowed}")
        return out

    def positions(self, positions: Sequence[int] | None) -> list[int]:
        if positions is None:
            return list(range(self.readout + 1))
        out = sequence_positions(positions, len(self.clean_texts))
        late = [p for p in out if p > self.readout]
        if late:
            raise ValueError(f"positions {late} come after the readout position {self.readout}: they cannot change it")
        return out

    def text(self, token: int) -> str:
        return id_labels(self.model.tokenizer, [token])[0]

    def _diff(self, logits: torch.Tensor) -> torch.Tensor:
        """(B,) logit difference target - contrast of next-token logits (B, V), in float64."""
        return logits[:, self.target].double() - logits[:, self.contrast].double()

    def metrics(self, groups: list[list[Cell]], batch_size: int) -> torch.Tensor:
        """(len(groups),) the corrupted run's logit difference with each group of cells patched in (one row each)."""
        out = []
        for start in range(0, len(groups), batch_size):
            chunk = groups[start : start + batch_size]
            with torch.no_grad():
                logits = self.model.run_with_hooks(
                    self.ids.expand(len(chunk), -1), fwd_hooks=self._hooks(chunk), last_only=True
                )
            out.append(self._diff(logits[:, -1].float()).cpu())
        return torch.cat(out)

    def recovered(self, patched: torch.Tensor) -> torch.Tensor:
        return (patched - self.corrupted) / (self.clean - self.corrupted)

    def _hooks(self, chunk: list[list[Cell]]) -> list[tuple[str, Callable]]:
        by_layer: dict[int, tuple[list[int], list[int]]] = {}
        for row, group in enumerate(chunk):
            for layer, position in group:
                rows, positions = by_layer.setdefault(layer, ([], []))
                rows.append(row)
                positions.append(position)
        hooks = []
        for layer, (rows, positions) in by_layer.items():
            name = PATCH_HOOKS[self.kind].format(layer)
            hooks.append((name, _patch(self.values[name], rows, positions)))
        return hooks


def _patch(clean: torch.Tensor, rows: list[int], positions: list[int]) -> Callable:
    """A hook writing the clean value of each position into its row: value[row, p] = clean[p]."""
    rows_t, positions_t = torch.tensor(rows), torch.tensor(positions)

    def patch(x: torch.Tensor, hook: HookPoint) -> torch.Tensor:  # (B, T, ...)
        x = x.clone()
        r, p = rows_t.to(x.device), positions_t.to(x.device)
        x[r, p] = clean[p].to(x.dtype)
        return x

    return patch
