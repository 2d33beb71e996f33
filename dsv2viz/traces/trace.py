"""The Trace: everything recorded while a model read a prompt and generated from it, position by position.

Tensors live in one dict keyed by name (a trace is saved as one safetensors file plus one JSON file, no
pickle); the accessors give them meaning:

    token_ids (S,)              prompt then generated tokens; S = len(trace)
    token_bytes (N,) uint8, token_offsets (S + 1,) int64
                                every token's exact bytes, concatenated: token i is token_bytes[offsets[i]:offsets[i + 1]]
    topk_idx (M, S, K) int64    routed experts per MoE layer and position, best first (M = MoE layers)
    topk_weights (M, S, K)      their weights
    router_probs (M, S, E)      the full router distribution (when recorded)
    c_kv (L, S, R), k_pe (L, S, dr)           the latent KV (what the cache held)
    attention.{l} (h, Q, S)     patterns of layer l for the recorded heads, rows at attention.{l}.query_pos (Q,)
    q_nope.{l} (S, h, dn), q_pe.{l} (S, h, dr), w_uk.{l} (h, dn, R)   queries, to rebuild any pattern
    top_ids, top_probs (G, k)   per generated token: the k likeliest tokens of the distribution it was drawn from
    logprobs (G, V)             that whole distribution (when recorded)
    resid_norms (L + 1, S)      residual-stream norm after the embedding and after each layer
    routed_norms, shared_norms (M, S)   norms of the routed and the shared experts' outputs

Steps and positions, the one convention everywhere (``Step.index``, ``routing_df``'s ``step`` column,
``analysis.compare``'s ``kl``, per-step tensors, the dashboard): generated token g (counted from 0) is
**step g**. It sits at **position** ``prompt_len + g`` and was drawn from the distribution the model
computed after reading position ``prompt_len + g - 1`` (the prompt's last token, for step 0); row g of
``top_ids``, ``top_probs`` and ``logprobs`` is that distribution. Prompt positions were read in the
prefill and have no step (``step_of`` returns None; ``routing_df`` writes -1).

Text follows `dsv2viz.text`'s rule and is exact without the model or its tokenizer, from the recorded
bytes: ``trace.text`` (and ``prompt_text``, ``generated_text``) is the bytes decoded, never labels joined.
``trace.token_texts`` holds each token's label in the sequence, what every view shows: the characters the
token completes, then the bytes it holds of a character it does not complete in hex (``⟨e6 97⟩``).
``trace.id_labels`` shows each token as if alone, the same for every occurrence of an id (for tables
that group by token). A trace recorded without a tokenizer has no bytes (its tokens show as ``<id>``),
and one saved before the bytes were recorded keeps the token texts it was saved with; both fall back
to those texts.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .. import text as textlib
from ..config import ConfigError, DeepseekV2Config
from .recording import Recording

FORMAT = "dsv2viz-trace"
VERSION = 1


_ATTENTION_HOW = "attention='full' or 'last_row', or queries=True with latents=True"
#: view -> (the tensor that records it, the Recording setting that records that tensor)
_RECORDED_BY = {
    "routing": ("topk_idx", "routing=True"),
    "router_probs": ("router_probs", "router_probs=True"),
    "latents": ("c_kv", "latents=True"),
    "candidates": ("top_ids", "top_logits=10"),
    "full_logits": ("logprobs", "full_logits=True"),
    "residual_norms": ("resid_norms", "residual_norms=True"),
    "moe_norms": ("routed_norms", "moe_norms=True"),
}
_HOW = {view: how for view, (_, how) in _RECORDED_BY.items()}
_MOE_VIEWS = ("routing", "router_probs", "moe_norms")  # nothing to record on a model without MoE layers


class TraceError(ValueError):
    """A trace folder that is not one, is damaged, or lacks what was asked of it."""


@dataclass
class AttentionView:
    """One head's attention in one layer: rows are queries, columns keys (positions in the trace)."""

    layer: int
    head: int
    query_pos: torch.Tensor  # (Q,)
    pattern: torch.Tensor  # (Q, S) softmax over keys, zero above the diagonal
    scores_nope: torch.Tensor | None  # (Q, S) content part of the pre-softmax scores (None if not rebuildable)
    scores_rope: torch.Tensor | None  # (Q, S) position part; nope + rope = the scores


@dataclass
class Trace:
    """A recorded generation. Build one with ``model.generate(...)``; reopen a saved one with ``Trace.load``."""

    config: DeepseekV2Config
    prompt_len: int
    token_texts: list[str]  # each token's label in the sequence (see the module docstring)
    tensors: dict[str, torch.Tensor]
    recording: Recording = field(default_factory=Recording)
    meta: dict[str, Any] = field(default_factory=dict)  # sampling settings, interventions, model name, ...

    # ----- tokens -------------------------------------------------------------------------------------
    @property
    def token_ids(self) -> torch.Tensor:
        return self.tensors["token_ids"]

    def __len__(self) -> int:
        return len(self.token_texts)

    @property
    def generated_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :].tolist()

    @property
    def token_chunks(self) -> list[bytes] | None:
        """Each token's exact bytes, or None for a trace without them (no tokenizer, or saved before they were recorded)."""
        if "token_bytes" not in self.tensors:
            return None
        data = self.tensors["token_bytes"].numpy().tobytes()
        offsets = self.tensors["token_offsets"].tolist()
        return [data[a:b] for a, b in itertools.pairwise(offsets)]

    @property
    def text_pieces(self) -> list[str]:
        """Each token's part of `text`: the characters it completes (`dsv2viz.text.pieces`); they join to `text`."""
        chunks = self.token_chunks
        return list(self.token_texts) if chunks is None else textlib.pieces(chunks)

    @property
    def text(self) -> str:
        """Prompt and generated text: all the tokens' bytes decoded as one UTF-8 text."""
        if "token_bytes" not in self.tensors:
            return "".join(self.token_texts)
        return textlib.decode(self.tensors["token_bytes"].numpy().tobytes())

    @property
    def prompt_text(self) -> str:
        """The prompt's part of `text`: the characters its tokens complete."""
        return "".join(self.text_pieces[: self.prompt_len])

    @property
    def generated_text(self) -> str:
        """The generated part of `text`: the characters the new tokens complete; ``prompt_text + generated_text == text``."""
        return "".join(self.text_pieces[self.prompt_len :])

    @property
    def id_labels(self) -> list[str]:
        """Each token shown alone (`dsv2viz.text.label`): the same for every occurrence of an id."""
        chunks = self.token_chunks
        return list(self.token_texts) if chunks is None else [textlib.label(c) for c in chunks]

    @property
    def moe_layers(self) -> list[int]:
        return self.config.moe_layers

    def step_of(self, position: int) -> int | None:
        """The step of the token at `position` (g for the g-th generated token, from 0); None for the prompt."""
        if not -len(self) <= position < len(self):
            raise TraceError(f"position {position} is outside this trace of {len(self)} tokens")
        position %= len(self)
        return position - self.prompt_len if position >= self.prompt_len else None

    # ----- routing ------------------------------------------------------------------------------------
    def require(self, name: str, how: str) -> torch.Tensor:
        """The tensor `name`, or a TraceError saying which Recording setting (`how`) records it."""
        try:
            return self.tensors[name]
        except KeyError:
            raise TraceError(f"this trace has no {name!r}: record it with Recording({how})") from None

    def _moe_row(self, layer: int) -> int:
        if layer not in self.moe_layers:
            raise TraceError(f"layer {layer} is not an MoE layer; MoE layers are {self.moe_layers}")
        return self.moe_layers.index(layer)

    def routing(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts (S, K), weights (S, K)) of one MoE layer, best expert first."""
        row = self._moe_row(layer)
        return self.require("topk_idx", _HOW["routing"])[row], self.require("topk_weights", _HOW["routing"])[row]

    def router_probs(self, layer: int) -> torch.Tensor:
        """(S, E) full router distribution of one MoE layer."""
        return self.require("router_probs", _HOW["router_probs"])[self._moe_row(layer)]

    def routing_df(self):
        """Tidy routing table: one row per (position, layer, rank) with step (-1 for the prompt), expert,
        weight and token."""
        import pandas as pd

        idx, w = self.require("topk_idx", _HOW["routing"]), self.require("topk_weights", _HOW["routing"])
        M, S, K = idx.shape
        pos = torch.arange(S)[None, :, None].expand(M, S, K)
        layer = torch.tensor(self.moe_layers)[:, None, None].expand(M, S, K)
        rank = torch.arange(K)[None, None, :].expand(M, S, K)
        df = pd.DataFrame(
            {
                "position": pos.flatten().numpy(),
                "layer": layer.flatten().numpy(),
                "rank": rank.flatten().numpy(),
                "expert": idx.flatten().numpy(),
                "weight": w.float().flatten().numpy(),
            }
        )
        df.insert(0, "step", (df["position"] - self.prompt_len).clip(lower=-1))  # -1: prompt (prefill)
        df["token"] = [self.token_texts[p] for p in df["position"]]
        return df.sort_values(["position", "layer", "rank"], ignore_index=True)

    # ----- latents and attention ----------------------------------------------------------------------
    def latent(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_kv (S, R), k_pe (S, dr)) of one layer."""
        return self.require("c_kv", _HOW["latents"])[layer], self.require("k_pe", _HOW["latents"])[layer]

    # ----- what this trace can show -----------------------------------------------------------------
    def missing(self, view: str) -> str | None:
        """None when this trace can show `view`; else the ``Recording(...)`` setting that would record it.

        Views: ``routing``, ``router_probs``, ``latents``, ``attention`` (some layer's pattern, stored or
        rebuildable), ``attention_parts`` (nope/rope split of some layer), ``candidates`` (next-token
        candidates), ``full_logits``, ``residual_norms``, ``moe_norms``. Widgets and the report ask this
        instead of reading tensor names, and show the returned setting where a view would be. A model
        without MoE layers has no routing to record: its MoE views are never missing, and never shown.
        """
        if view == "attention":
            if self.attention_layers():
                return None
            queries_only = self._queries_recorded() and not self._latents_recorded()
            return f"Recording({'latents=True' if queries_only else _ATTENTION_HOW})"
        if view == "attention_parts":
            if self.attention_parts_layers():
                return None
            lacking = [
                f"{name}=True"
                for name, ok in (("queries", self._queries_recorded()), ("latents", self._latents_recorded()))
                if not ok
            ]
            return f"Recording({', '.join(lacking)})"
        if view not in _RECORDED_BY:
            raise ValueError(
                f"unknown view {view!r}; views are {sorted([*_RECORDED_BY, 'attention', 'attention_parts'])}"
            )
        name, how = _RECORDED_BY[view]
        recorded = name in self.tensors or (view in _MOE_VIEWS and not self.moe_layers)
        return None if recorded else f"Recording({how})"

    def has(self, view: str) -> bool:
        """Whether this trace can show `view` (see :meth:`missing` for the views and what records them).

        False for MoE views of a model without MoE layers, though nothing is missing there either.
        """
        return self.missing(view) is None and not (view in _MOE_VIEWS and not self.moe_layers)

    def attention_layers(self) -> list[int]:
        """Layers whose attention this trace can show: patterns stored, or rebuildable from queries and latents."""
        return [layer for layer in range(self.config.num_hidden_layers) if self._attention_source(layer)]

    def attention_parts_layers(self) -> list[int]:
        """Layers whose scores split into content (nope) and position (rope) parts: queries and latents recorded."""
        return [layer for layer in range(self.config.num_hidden_layers) if self._rebuildable(layer)]

    def attention_heads(self) -> list[int]:
        """The heads whose attention this trace can show (the recorded ``attention_heads``); [] without attention."""
        return self.recording.heads(self.config) if self.attention_layers() else []

    def _queries_recorded(self) -> bool:
        return any(f"q_nope.{layer}" in self.tensors for layer in range(self.config.num_hidden_layers))

    def _latents_recorded(self) -> bool:
        return "c_kv" in self.tensors

    def _rebuildable(self, layer: int) -> bool:
        return f"q_nope.{layer}" in self.tensors and self._latents_recorded()

    def _attention_source(self, layer: int) -> str | None:
        if f"attention.{layer}" in self.tensors:
            return "stored"
        return "rebuilt" if self._rebuildable(layer) else None

    # ----- next-token distributions and norms --------------------------------------------------------
    def candidates(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (k,), probs (k,)): the likeliest next tokens after reading `position`, best first.

        That is the distribution the token at ``position + 1`` was drawn from (its step's row of
        ``top_ids``), recorded for positions ``prompt_len - 1`` up to ``len - 2``.
        """
        ids = self.require("top_ids", _HOW["candidates"])
        step = self._next_step(position, len(ids))
        return ids[step], self.tensors["top_probs"][step]

    def logprobs(self, position: int) -> torch.Tensor:
        """(V,) log-probabilities of the whole next-token distribution after reading `position`.

        The same distribution as :meth:`candidates` (``candidates(p)`` is its top k), over the whole
        vocabulary; recorded with ``Recording(full_logits=True)``.
        """
        rows = self.require("logprobs", _HOW["full_logits"])
        return rows[self._next_step(position, len(rows))]

    def _next_step(self, position: int, recorded: int) -> int:
        """The step whose token was drawn after reading `position`: the row of the per-step tensors."""
        if not -len(self) <= position < len(self):
            raise TraceError(f"position {position} is outside this trace of {len(self)} tokens")
        step = position % len(self) + 1 - self.prompt_len
        if not 0 <= step < recorded:
            raise TraceError(
                f"no next-token distribution after position {position % len(self)}: it is recorded while "
                f"generating, after positions {self.prompt_len - 1}..{self.prompt_len + recorded - 2}"
            )
        return step

    def moe_norms(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(routed (S,), shared (S,)): norms of one MoE layer's routed and shared experts' outputs per token.

        A model without shared experts gives zeros for them (they add nothing to the residual stream).
        """
        routed = self.require("routed_norms", _HOW["moe_norms"])[self._moe_row(layer)]
        shared = self.tensors.get("shared_norms")
        return routed, torch.zeros_like(routed) if shared is None else shared[self._moe_row(layer)]

    def residual_norms(self) -> torch.Tensor:
        """(L + 1, S) the residual stream's norm per token, after the embedding (row 0) and after each layer."""
        return self.require("resid_norms", _HOW["residual_norms"])

    def attention(self, layer: int, head: int, *, queries: Sequence[int] | None = None) -> AttentionView:
        """One head's pattern with its nope and rope parts, rebuilt from queries and latents when recorded.

        Stored patterns are returned as recorded (their parts rebuilt when queries were recorded); with
        queries but no stored pattern, the rows are rebuilt, so no pattern ever has to be stored.
        `queries` picks query positions (negative ones count from the end): a live view of the newest
        token asks for ``queries=[-1]`` and costs one row, not S x S.
        """
        stored = self.tensors.get(f"attention.{layer}")
        head_row = self._head_row(head, "attention_heads")
        rebuildable = self._rebuildable(layer)
        if stored is None and not rebuildable:
            how = (
                "latents=True too"
                if f"q_nope.{layer}" in self.tensors
                else f"{_ATTENTION_HOW}, with attention_layers including {layer}"
            )
            raise TraceError(f"layer {layer}'s attention cannot be shown: record it with Recording({how})")
        wanted = None if queries is None else [q % len(self) for q in queries]
        if stored is None:
            query_pos = torch.arange(len(self)) if wanted is None else torch.tensor(wanted)
            return AttentionView(layer, head, query_pos, *self._rebuild(layer, head_row, query_pos))
        recorded = self.tensors[f"attention.{layer}.query_pos"]
        rows = torch.arange(len(recorded))
        if wanted is not None:
            missing = sorted(set(wanted) - set(recorded.tolist()))
            if missing:
                raise TraceError(
                    f"query positions {missing} of layer {layer} were not recorded (rows at {recorded.tolist()})"
                )
            rows = torch.tensor([int((recorded == q).nonzero()[0]) for q in wanted])
        query_pos = recorded[rows]
        nope = rope = None
        if rebuildable:
            _, nope, rope = self._rebuild(layer, head_row, query_pos)
        return AttentionView(layer, head, query_pos, stored[head_row][rows], nope, rope)

    def _head_row(self, head: int, what: str) -> int:
        heads = self.recording.heads(self.config)
        if head not in heads:
            raise TraceError(f"head {head} was not recorded; {what} were {heads}")
        return heads.index(head)

    def _rebuild(
        self, layer: int, head_row: int, query_pos: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(pattern, scores_nope, scores_rope), each (Q, S), for the query positions, from queries and latents."""
        c_kv, k_pe = (t.float() for t in self.latent(layer))
        q_nope = self.tensors[f"q_nope.{layer}"][query_pos, head_row].float()  # (Q, dn)
        q_pe = self.tensors[f"q_pe.{layer}"][query_pos, head_row].float()  # (Q, dr)
        w_uk = self.tensors[f"w_uk.{layer}"][head_row].float()  # (dn, R)
        scale = self.config.softmax_scale
        nope = (q_nope @ w_uk) @ c_kv.T * scale
        rope = q_pe @ k_pe.T * scale
        causal = torch.arange(len(self))[None, :] <= query_pos[:, None]  # (Q, S)
        pattern = (nope + rope).masked_fill(~causal, float("-inf")).softmax(dim=-1)
        return pattern, nope, rope

    # ----- saving -------------------------------------------------------------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``trace.json`` and ``tensors.safetensors`` into `folder` (created if needed)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, folder / "tensors.safetensors")
        header = {
            "format": FORMAT,
            "version": VERSION,
            "prompt_len": self.prompt_len,
            "token_texts": self.token_texts,
            "config": self.config.to_dict(),
            "recording": dataclasses.asdict(self.recording),
            "meta": self.meta,
            "tensors": sorted(self.tensors),
        }
        (folder / "trace.json").write_text(json.dumps(header, ensure_ascii=False, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Trace:
        """Reopen a saved trace; a folder that is not a dsv2viz trace, or a damaged one, raises TraceError."""
        folder = Path(folder)
        head_path, data_path = folder / "trace.json", folder / "tensors.safetensors"
        if not head_path.is_file():
            raise TraceError(f"{folder}: no trace.json; not a trace folder (Trace.save writes one)")
        try:
            header = json.loads(head_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise TraceError(f"{head_path}: damaged, not valid JSON ({e})") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise TraceError(f"{head_path}: not a dsv2viz trace (no format: {FORMAT!r} marker)")
        if header.get("version") != VERSION:
            raise TraceError(f"{head_path}: trace format version {header.get('version')}, this dsv2viz reads {VERSION}")
        if not data_path.is_file():
            raise TraceError(f"{folder}: tensors.safetensors is missing")
        try:
            tensors = load_file(data_path)
        except (SafetensorError, OSError) as e:
            raise TraceError(f"{data_path}: damaged ({e})") from None
        if sorted(tensors) != header.get("tensors"):
            missing = sorted(set(header.get("tensors", [])) - set(tensors))
            raise TraceError(f"{data_path}: does not match trace.json (missing {missing[:5]})")
        try:
            config = DeepseekV2Config.from_dict(header["config"])
            recording = Recording(**header["recording"])
            trace = cls(config, header["prompt_len"], header["token_texts"], tensors, recording, header["meta"])
        except (KeyError, TypeError, ConfigError) as e:
            raise TraceError(f"{head_path}: damaged ({type(e).__name__}: {e})") from None
        if len(trace.token_ids) != len(trace):
            raise TraceError(f"{folder}: {len(trace.token_ids)} token ids but {len(trace)} token texts")
        return trace

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Trace):
            return NotImplemented
        same_tensors = self.tensors.keys() == other.tensors.keys() and all(
            self.tensors[k].dtype == other.tensors[k].dtype and torch.equal(self.tensors[k], other.tensors[k])
            for k in self.tensors
        )
        return (
            same_tensors
            and (self.config, self.prompt_len, self.token_texts) == (other.config, other.prompt_len, other.token_texts)
            and dataclasses.asdict(self.recording) == dataclasses.asdict(other.recording)
            and self.meta == other.meta
        )

    def __repr__(self) -> str:
        return f"Trace({len(self)} tokens, prompt {self.prompt_len}, tensors {sorted(self.tensors)})"


def token_byte_tensors(chunks: Sequence[bytes] | None) -> dict[str, torch.Tensor]:
    """The ``token_bytes`` and ``token_offsets`` tensors of each token's bytes; none when the bytes are unknown."""
    if chunks is None:
        return {}
    data = b"".join(chunks)
    lengths = torch.tensor([0, *map(len, chunks)], dtype=torch.int64)
    return {
        "token_bytes": torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.zeros(0, dtype=torch.uint8),
        "token_offsets": lengths.cumsum(0),
    }
