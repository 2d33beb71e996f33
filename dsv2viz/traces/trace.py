"""The Trace: everything recorded while a model read a prompt and generated from it, position by position.

Tensors live in one dict keyed by name (a trace is saved as one safetensors file plus one JSON file, no
pickle, see :meth:`Trace.save`); the accessors give them meaning:

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

A trace folder holds ``trace.json`` (token texts, config, recording, meta, and the id of its tensors
file) and ``tensors-<id>.safetensors``; ``trace.json`` is written last and is the commit point, so a
killed save leaves the previous trace or the new one. Version 1 folders (``tensors.safetensors``, no id)
still load. Whatever its origin, a trace is checked whole by :func:`trace_from_parts` before use.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import text as textlib
from ..checkpoint import _DTYPES as SAFETENSORS_DTYPES
from ..checkpoint import _is_int
from ..config import ConfigError, DeepseekV2Config
from ..files import atomic_path, atomic_write, foreign_entries, name_list, read_json, remove_temporaries
from .recording import Recording

FORMAT = "dsv2viz-trace"
VERSION = 2  # 2: tensors-<id>.safetensors, named by trace.json; 1 (still read): tensors.safetensors


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
    def validate(self) -> None:
        """Raise TraceError naming the first tensor or field that disagrees with the trace's own config and recording.

        The same checks as :meth:`load` (see :func:`trace_from_parts`); :meth:`save` runs them, so what it
        writes loads again.
        """
        trace_from_parts(self._header(), self.tensors)

    def _header(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "prompt_len": self.prompt_len,
            "token_texts": self.token_texts,
            "config": self.config.to_dict(),
            "recording": dataclasses.asdict(self.recording),
            "meta": self.meta,
            "tensors": sorted(self.tensors),
        }

    def save(self, folder: str | os.PathLike) -> Path:
        """Write the trace into `folder` (created if needed): ``tensors-<id>.safetensors``, then ``trace.json``.

        ``trace.json`` is written last, whole or not at all, and names the tensors file by its id (also in
        that file's metadata): a save killed at any point leaves the previous trace or the new one, never a
        mix. Saving over a trace replaces it; a non-empty folder that is not a trace folder is refused.
        """
        folder = Path(folder)
        self.validate()
        trace_id = secrets.token_hex(ID_BYTES)
        try:
            text = json.dumps({**self._header(), "id": trace_id}, ensure_ascii=False, indent=1)
        except (TypeError, ValueError) as e:
            raise TraceError(f"the trace's meta cannot be saved as JSON ({e}); keep only JSON values in it") from None
        check_trace_folder(folder)
        folder.mkdir(parents=True, exist_ok=True)
        data_name = _tensors_name(trace_id)
        with atomic_path(folder / data_name) as tmp:
            save_file(
                {k: v.contiguous() for k, v in self.tensors.items()}, tmp, metadata={"format": FORMAT, "id": trace_id}
            )
        atomic_write(folder / HEADER_NAME, text)  # the commit point
        for old in folder.iterdir():
            if _is_tensors_file(old.name) and old.name != data_name:
                old.unlink(missing_ok=True)
        remove_temporaries(folder, "tensors*.safetensors")  # left by killed saves (atomic_write cleared trace.json's)
        return folder

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Trace:
        """Reopen a saved trace, checked whole against its own config and recording before anything uses it.

        A folder that is not a dsv2viz trace, or a damaged or tampered one, raises TraceError naming the file
        and what is wrong.
        """
        folder = Path(folder)
        head_path = folder / HEADER_NAME
        if not head_path.is_file():
            raise TraceError(f"{folder}: no {HEADER_NAME}; not a trace folder (Trace.save writes one)")
        header = read_json(head_path, error=TraceError)
        try:
            data_name = _data_name(header)
        except TraceError as e:
            raise TraceError(f"{head_path}: {e}") from None
        data_path = folder / data_name
        if not data_path.is_file():
            raise TraceError(f"{data_path}: missing; {HEADER_NAME} names it, so the trace is incomplete")
        try:
            with safe_open(data_path, framework="pt") as f:
                stored_id = (f.metadata() or {}).get("id")
                if stored_id != header.get("id"):
                    raise TraceError(
                        f"{data_path}: written by another save (id {stored_id}, {HEADER_NAME} says "
                        f"{header.get('id')}); this trace folder was assembled from two saves"
                    )
                # shapes and dtypes first, from the file's header: nothing is read before they all agree
                trace_from_parts(header, {k: _meta_tensor(f.get_slice(k)) for k in f.keys()})  # noqa: SIM118
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
            return trace_from_parts(header, tensors)
        except TraceError as e:
            raise TraceError(f"{folder}: {e}") from None
        except (SafetensorError, OSError) as e:
            raise TraceError(f"{data_path}: damaged, not a whole safetensors file ({e})") from None

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


# ----- the trace folder and its checks --------------------------------------------------------------------
HEADER_NAME = "trace.json"
V1_TENSORS_NAME = "tensors.safetensors"  # version 1: one fixed name, no id
ID_BYTES = 8
_ID = re.compile(f"[0-9a-f]{{{2 * ID_BYTES}}}")

#: Largest number of elements checked at once for finite values (bounds the temporary mask).
_CHUNK = 2**24


def _tensors_name(trace_id: str) -> str:
    return f"tensors-{trace_id}.safetensors"


def _is_tensors_file(name: str) -> bool:
    return name == V1_TENSORS_NAME or (name.startswith("tensors-") and name.endswith(".safetensors"))


def is_trace_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a trace.json (a trace folder, complete or not)."""
    return (Path(folder) / HEADER_NAME).is_file()


def check_trace_folder(folder: str | os.PathLike) -> None:
    """Raise TraceError unless `folder` may receive a trace: it is missing, empty, a trace folder, or holds
    only what a killed save left."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise TraceError(f"{folder} is a file; save the trace to a folder")
    if is_trace_folder(folder):
        header = read_json(folder / HEADER_NAME, error=TraceError)
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise TraceError(
                f"{folder / HEADER_NAME} is not a dsv2viz trace's; save the trace to a new or empty folder"
            )
        return
    foreign = foreign_entries(folder, _is_tensors_file)
    if foreign:
        raise TraceError(
            f"{folder} is not empty ({name_list(foreign)}) and is not a trace folder; "
            "save the trace to a new or empty folder"
        )


def _check_format(header: Any) -> None:
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise TraceError(f"not a dsv2viz trace (no format: {FORMAT!r} marker)")
    if not _is_int(header.get("version")) or header["version"] not in (1, VERSION):
        raise TraceError(f"trace format version {header.get('version')!r}: this dsv2viz reads versions 1 to {VERSION}")


def _data_name(header: Any) -> str:
    """The tensors file a trace header names; TraceError for a header of another format or version."""
    _check_format(header)
    if header["version"] == 1:
        return V1_TENSORS_NAME
    trace_id = header.get("id")
    if not isinstance(trace_id, str) or not _ID.fullmatch(trace_id):
        raise TraceError(f"id {trace_id!r} is not {2 * ID_BYTES} hex digits")
    return _tensors_name(trace_id)


def _meta_tensor(view) -> torch.Tensor:
    """A tensor without data, with the dtype and shape of a safetensors slice (for checking before reading)."""
    dtype = SAFETENSORS_DTYPES.get(view.get_dtype())
    if dtype is None:
        raise TraceError(f"unsupported dtype {view.get_dtype()}")
    return torch.empty(view.get_shape(), dtype=dtype, device="meta")


def trace_from_parts(header: dict[str, Any], tensors: Mapping[str, torch.Tensor]) -> Trace:
    """The Trace that a header (trace.json's content) and its tensors describe, checked whole; else TraceError.

    Checked, in this order, before anything uses the trace: the header's types and ranges (prompt_len,
    token_texts, config through DeepseekV2Config.from_dict, recording field by field, meta), then every
    tensor's name, dtype and shape against what the trace's own config and recording record, then values:
    ids within the vocabulary, experts within n_routed_experts, query positions within the trace, text
    offsets increasing, floats finite. Tensors on the meta device get every check but the values', which is
    how :meth:`Trace.load` checks shapes before reading any data. The message names the field or tensor.
    """
    _check_format(header)
    S = _token_count(header.get("token_texts"))
    P = header.get("prompt_len")
    if not _is_int(P) or not 1 <= P <= S:
        raise TraceError(f"prompt_len={P!r} must be a whole number from 1 to the {S} tokens of token_texts")
    config = _config(header.get("config"))
    if config.max_position_embeddings < S:
        raise TraceError(f"{S} tokens, past the config's context of {config.max_position_embeddings} positions")
    recording = _recording(header.get("recording"), config)
    meta = header.get("meta", {})
    if not isinstance(meta, dict):
        raise TraceError(f"meta must be a JSON object, found {type(meta).__name__}")
    listed = header.get("tensors", sorted(tensors))
    if listed != sorted(tensors):
        raise TraceError(f"trace.json lists tensors {_names(listed)}, the tensors file holds {_names(sorted(tensors))}")
    _check_tensors(tensors, _expected(config, recording, S, P))
    _check_values(tensors, config, S)
    return Trace(config, P, list(header["token_texts"]), dict(tensors), recording, meta)


def _names(names: Any) -> str:
    names = list(names) if isinstance(names, (list, Mapping)) else names
    return repr(names) if not isinstance(names, list) or len(names) <= 6 else f"{names[:6]} and {len(names) - 6} more"


def _token_count(texts: Any) -> int:
    if not isinstance(texts, list) or not texts:
        raise TraceError("token_texts must be a non-empty list of strings")
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise TraceError(f"token_texts[{bad}] is {type(texts[bad]).__name__}, not a string")
    return len(texts)


def _config(raw: Any) -> DeepseekV2Config:
    if not isinstance(raw, dict):
        raise TraceError(f"config must be a JSON object, found {type(raw).__name__}")
    try:
        return DeepseekV2Config.from_dict(raw)
    except (ConfigError, TypeError, AttributeError) as e:  # TypeError/AttributeError: a field of the wrong type
        raise TraceError(f"config: {e}") from None


def _recording(raw: Any, config: DeepseekV2Config) -> Recording:
    if not isinstance(raw, dict):
        raise TraceError(f"recording must be a JSON object, found {type(raw).__name__}")
    fields = {f.name: f.type for f in dataclasses.fields(Recording)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise TraceError(f"recording has unknown fields {unknown}; known: {sorted(fields)}")
    for name, value in raw.items():
        if not _RECORDING_TYPES[fields[name]](value):
            raise TraceError(f"recording.{name}={value!r} is not a {fields[name]}")
    try:
        recording = Recording(**raw)
        if recording.attention_layers is not None:  # listed layers and heads within the config's
            recording.layers(config)
        if recording.attention_heads is not None:
            recording.heads(config)
    except ValueError as e:
        raise TraceError(f"recording: {e}") from None
    if recording.memory_budget < 0 or recording.top_logits < 0:
        raise TraceError("recording.memory_budget and recording.top_logits must not be negative")
    return recording


_RECORDING_TYPES = {  # Recording's field annotations -> the values they accept (from JSON, or in memory)
    "bool": lambda v: isinstance(v, bool),
    "int": _is_int,
    "AttentionMode": lambda v: isinstance(v, str),
    "Sequence[int] | None": lambda v: v is None or (isinstance(v, (list, tuple)) and all(map(_is_int, v))),
}

_INT = (torch.int64,)
_FLOAT = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BYTES = (torch.uint8,)
Shape = tuple[int | None, ...]  # None: any length (attention rows, text bytes)


def _expected(config: DeepseekV2Config, rec: Recording, S: int, P: int) -> dict[str, tuple[tuple, Shape, bool]]:
    """name -> (allowed dtypes, shape, required) of every tensor a trace of this config and recording may hold."""
    c, G = config, S - P  # G generated tokens
    M, L, K, E = len(c.moe_layers), c.num_hidden_layers, c.num_experts_per_tok, c.n_routed_experts
    R, dr, dn = c.kv_lora_rank, c.qk_rope_head_dim, c.qk_nope_head_dim
    out: dict[str, tuple[tuple, Shape, bool]] = {"token_ids": (_INT, (S,), True)}
    if M and rec.routing:
        out["topk_idx"], out["topk_weights"] = (_INT, (M, S, K), True), (_FLOAT, (M, S, K), True)
    if M and rec.router_probs:
        out["router_probs"] = (_FLOAT, (M, S, E), True)
    if M and rec.moe_norms:
        out["routed_norms"] = (_FLOAT, (M, S), True)
        if c.n_shared_experts:
            out["shared_norms"] = (_FLOAT, (M, S), True)
    if rec.latents:
        out["c_kv"], out["k_pe"] = (_FLOAT, (L, S, R), True), (_FLOAT, (L, S, dr), True)
    if rec.residual_norms:
        out["resid_norms"] = (_FLOAT, (L + 1, S), True)
    if rec.attention != "none" or rec.queries:
        h = len(rec.heads(c))
        for layer in rec.layers(c):
            out[f"q_nope.{layer}"], out[f"q_pe.{layer}"] = (_FLOAT, (S, h, dn), True), (_FLOAT, (S, h, dr), True)
            out[f"w_uk.{layer}"] = (_FLOAT, (h, dn, R), True)
            if rec.attention != "none":
                out[f"attention.{layer}"] = (_FLOAT, (h, None, S), True)
                out[f"attention.{layer}.query_pos"] = (_INT, (None,), True)
    if G and rec.top_logits:
        k = min(rec.top_logits, c.vocab_size)
        out["top_ids"], out["top_probs"] = (_INT, (G, k), True), (_FLOAT, (G, k), True)
    if G and rec.full_logits:
        out["logprobs"] = (_FLOAT, (G, c.vocab_size), True)
    out["token_bytes"], out["token_offsets"] = (_BYTES, (None,), False), (_INT, (S + 1,), False)
    return out


def _check_tensors(tensors: Mapping[str, torch.Tensor], expected: dict[str, tuple[tuple, Shape, bool]]) -> None:
    S = expected["token_ids"][1][0]
    ids = tensors.get("token_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 1 and len(ids) != S:
        raise TraceError(f"token_texts has {S} texts but token_ids {len(ids)} ids")
    unknown = sorted(set(tensors) - set(expected))
    if unknown:
        raise TraceError(f"tensors {_names(unknown)} are not what this trace's config and recording record")
    for name, (dtypes, shape, _) in expected.items():  # in the order above: the first mismatch is the telling one
        t = tensors.get(name)
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.dtype not in dtypes:
            found = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            raise TraceError(f"tensor {name!r} is {found}, expected {' or '.join(map(str, dtypes))}")
        if len(t.shape) != len(shape) or any(w is not None and d != w for d, w in zip(t.shape, shape)):
            want = "(" + ", ".join("any" if w is None else str(w) for w in shape) + ")"
            raise TraceError(f"tensor {name!r} has shape {tuple(t.shape)}, expected {want}")
    missing = [n for n, (_, _, required) in expected.items() if required and n not in tensors]
    if missing:
        raise TraceError(f"tensors {_names(missing)} are missing, though the trace's recording records them")
    if ("token_bytes" in tensors) != ("token_offsets" in tensors):
        raise TraceError("token_bytes and token_offsets come together; one of them is missing")
    for name in tensors:
        if name.endswith(".query_pos"):
            rows, keys = tensors[name].shape[0], tensors[name.removesuffix(".query_pos")].shape
            if keys[1] != rows or rows > keys[2]:
                raise TraceError(
                    f"tensor {name!r} has {rows} query positions for {keys[1]} rows of "
                    f"{name.removesuffix('.query_pos')!r} over {keys[2]} tokens"
                )


def _check_values(tensors: Mapping[str, torch.Tensor], config: DeepseekV2Config, S: int) -> None:
    if any(t.device.type == "meta" for t in tensors.values()):
        return
    bounds = {"token_ids": config.vocab_size, "top_ids": config.vocab_size, "topk_idx": config.n_routed_experts}
    for name, t in tensors.items():
        bound = S if name.endswith(".query_pos") else bounds.get(name)
        if bound is not None and t.numel() and not (int(t.min()) >= 0 and int(t.max()) < bound):
            what = "positions" if name.endswith(".query_pos") else "ids"
            raise TraceError(f"tensor {name!r} holds {what} outside [0, {bound}): {int(t.min())} to {int(t.max())}")
        if name.endswith(".query_pos") and not bool((t.diff() > 0).all()):
            raise TraceError(f"tensor {name!r}: query positions must increase")
        if t.dtype in _FLOAT:
            # the log of a zero probability is -inf, the only value not finite that may be recorded
            bad = (lambda x: x.isnan() | (x == float("inf"))) if name == "logprobs" else (lambda x: ~x.isfinite())
            flat = t.reshape(-1)
            if any(bool(bad(flat[i : i + _CHUNK]).any()) for i in range(0, flat.numel(), _CHUNK)):
                raise TraceError(f"tensor {name!r} holds NaN or infinite values")
    if "token_offsets" in tensors:
        offsets, n = tensors["token_offsets"], len(tensors["token_bytes"])
        if int(offsets[0]) != 0 or int(offsets[-1]) != n or not bool((offsets.diff() >= 0).all()):
            raise TraceError(
                f"tensor 'token_offsets' must rise from 0 to the {n} bytes of 'token_bytes' "
                f"(found {int(offsets[0])} to {int(offsets[-1])})"
            )
