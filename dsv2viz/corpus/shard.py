"""Routing one shard of documents: tokenize, batch, prefill with the router's hook points, write the rows.

Batching never changes a document's routing. Documents are sorted by length and padded on the right, and
attention is causal from position 0, so no real token ever sees a pad token or another document (routing
is per token, and nothing in inference mixes tokens otherwise). What a batch can change is float
rounding: BLAS picks kernels by matrix shape, so a document's router probabilities alone and in a batch
agree to about 1e-7 rather than bit for bit, which leaves the chosen experts the same unless two
probabilities tie to that precision. Batching inside a shard is deterministic (it depends on the shard's
documents only), so a shard comes out bit-identical wherever it runs, given the same dtype, device type
and number of threads.

Files of shard ``NNNNN`` (each written whole or not at all, see dsv2viz.files; the summary last, so a shard
whose summary exists is complete):

    rows/part-NNNNN.parquet           one row per (token, MoE layer), see ROW_SCHEMA
    shards/NNNNN.safetensors          its RoutingStats; shards/NNNNN.token_experts.parquet
    shards/NNNNN.json                 summary: documents (index, id, tokens), skipped documents and why, seconds
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..analysis._common import entropy
from ..analysis.routing import router_margin
from ..files import atomic_path, atomic_write
from ..model import DeepseekV2ForCausalLM
from .documents import CollectError, Document, InputFile, ShardSpec, read_shard
from .stats import RoutingStats


@dataclass(frozen=True)
class CollectSettings:
    """What decides a collection's output; a resumed run must use the same."""

    text_field: str = "text"  # JSONL key / Parquet column holding the text
    id_field: str = "id"  # JSONL key / Parquet column naming the document (optional in the data)
    docs_per_shard: int = 256  # records per shard: the unit of work, output and resumption
    batch_tokens: int = 8192  # padded tokens per forward pass (a longer document runs alone)
    max_tokens: int | None = None  # longer documents are skipped and reported; None: min(context, 4096)
    near_tie_threshold: float | None = None  # absolute margin; None: 2**-8 of the K-th probability (bf16 rounding)
    add_bos: bool | None = None  # None: the tokenizer's add_bos_token

    def __post_init__(self) -> None:
        for name in ("docs_per_shard", "batch_tokens", "max_tokens"):
            value = getattr(self, name)
            if not (value is None and name == "max_tokens") and not (_is_int(value) and value >= 1):
                raise CollectError(f"{name}={value!r} must be a whole number of at least 1")
        t = self.near_tie_threshold
        if t is not None and not (isinstance(t, (int, float)) and not isinstance(t, bool) and 0 <= t < math.inf):
            raise CollectError(f"near_tie_threshold={t!r} must be a finite number >= 0")

    def token_limit(self, model: DeepseekV2ForCausalLM) -> int:
        ctx = model.config.max_position_embeddings
        return min(ctx, 4096) if self.max_tokens is None else self.max_tokens


ROW_SCHEMA = pa.schema(
    [
        ("doc_index", pa.int64()),  # the document's index in the corpus (record order over the inputs)
        ("doc_id", pa.dictionary(pa.int32(), pa.string())),  # the input's id field, else path:line / path:row
        ("position", pa.int32()),  # token position in the document (BOS is position 0 when added)
        ("token_id", pa.int32()),
        ("layer", pa.int16()),  # model layer index (MoE layers only)
        ("experts", pa.list_(pa.int16())),  # the K routed experts, in the router's order (best first)
        ("weights", pa.list_(pa.float32())),  # their routing weights (after normalisation and scaling)
        ("entropy", pa.float32()),  # entropy of the full router distribution, nats
        ("margin", pa.float32()),  # K-th minus (K+1)-th largest router probability
        ("kth_expert", pa.int16()),  # the expert with the K-th largest probability
        ("next_expert", pa.int16()),  # the runner-up: the (K+1)-th
        ("near_tie", pa.bool_()),  # margin below the collection's near-tie threshold
    ]
)


def rows_table(arrays: dict[str, np.ndarray]) -> pa.Table:
    """Row arrays (``experts``/``weights`` as (N, K)) as a table of ROW_SCHEMA, without a Python object per row."""
    columns = {}
    for f in ROW_SCHEMA:
        values = arrays[f.name]
        if pa.types.is_list(f.type):
            n, k = values.shape
            offsets = pa.array(np.arange(0, n * k + 1, max(k, 1))[: n + 1], pa.int32())
            columns[f.name] = pa.ListArray.from_arrays(offsets, pa.array(values.ravel(), f.type.value_type))
        elif pa.types.is_dictionary(f.type):
            columns[f.name] = pa.array(values.tolist(), pa.string()).dictionary_encode()
        else:
            columns[f.name] = pa.array(values, f.type)
    return pa.Table.from_pydict(columns, schema=ROW_SCHEMA)


def row_arrays(table: pa.Table) -> dict[str, np.ndarray]:
    """A rows table as numpy arrays, ``experts``/``weights`` as (N, K)."""
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_list(col.type):
            n = len(col)
            flat = col.flatten().to_numpy(zero_copy_only=False)
            out[name] = flat.reshape(n, -1) if n else flat.reshape(0, 0)
        elif pa.types.is_dictionary(col.type):
            out[name] = np.asarray(col.to_pylist(), dtype=object)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


class ShardRunner:
    """Runs shards of a planned corpus through one loaded model and writes their files under `out`."""

    def __init__(
        self,
        model: DeepseekV2ForCausalLM,
        files: Sequence[InputFile],
        settings: CollectSettings,
        out: Path,
        on_tokens: Callable[[int], None] | None = None,
    ) -> None:
        if model.tokenizer is None:
            raise CollectError("this model has no tokenizer (no tokenizer.json in its folder); collect needs one")
        self.model, self.files, self.settings, self.out = model, list(files), settings, Path(out)
        self.on_tokens = on_tokens  # called after each batch with the number of document tokens it routed
        self.limit = settings.token_limit(model)
        # a text of more bytes has more than `limit` tokens: skipped unread, never tokenized
        longest = model.tokenizer.max_token_bytes
        self.max_text_bytes = None if longest is None else self.limit * longest

    def run(self, spec: ShardSpec) -> dict:
        """Route every readable document of `spec`, write the shard's files, return its summary."""
        start = time.perf_counter()
        docs, ids, skipped = [], [], []
        for doc in read_shard(self.files, spec, self.settings.text_field, self.settings.id_field, self.max_text_bytes):
            reason, tokens = self._tokenize(doc)
            if reason:
                skipped.append({"doc_index": doc.index, "doc_id": doc.doc_id, "reason": reason})
            else:
                docs.append(doc)
                ids.append(tokens)
        arrays = self._route(docs, ids)
        config = self.model.config
        stats = RoutingStats.from_rows(
            config.moe_layers, config.n_routed_experts, config.num_experts_per_tok, arrays, len(docs)
        )
        table = rows_table(arrays)
        rows_dir, shard_dir = self.out / "rows", self.out / "shards"
        rows_dir.mkdir(exist_ok=True)
        shard_dir.mkdir(exist_ok=True)
        with atomic_path(rows_dir / f"part-{spec.name}.parquet") as tmp:
            pq.write_table(table, tmp)
        stats.save(shard_dir, spec.name)
        summary = {
            "shard": spec.index,
            "documents": [{"doc_index": d.index, "doc_id": d.doc_id, "tokens": len(t)} for d, t in zip(docs, ids)],
            "skipped": skipped,
            "tokens": sum(map(len, ids)),
            "seconds": round(time.perf_counter() - start, 3),
        }
        atomic_write(shard_dir / f"{spec.name}.json", json.dumps(summary))  # the shard's commit point
        return summary

    def _tokenize(self, doc: Document) -> tuple[str | None, list[int]]:
        """(why the document is skipped or None, its token ids)."""
        if doc.error:
            return doc.error, []
        if not doc.text.strip():
            return "empty text", []
        tokens = self.model.tokenizer.encode(doc.text, add_bos=self.settings.add_bos)
        if len(tokens) > self.limit:
            ctx = self.model.config.max_position_embeddings
            return (
                f"{len(tokens)} tokens, over the limit of {self.limit} (--max-tokens; the model's context is {ctx}): "
                "raise the limit or split the document; it was not truncated"
            ), []
        return None, tokens

    def _batches(self, ids: list[list[int]]) -> list[list[int]]:
        """Indices into `ids` grouped into batches: longest first, at most batch_tokens padded tokens each."""
        order = sorted(range(len(ids)), key=lambda i: (-len(ids[i]), i))
        batches: list[list[int]] = []
        for i in order:
            if batches and len(ids[batches[-1][0]]) * (len(batches[-1]) + 1) <= self.settings.batch_tokens:
                batches[-1].append(i)
            else:
                batches.append([i])
        return batches

    @torch.inference_mode()
    def _route(self, docs: list[Document], ids: list[list[int]]) -> dict[str, np.ndarray]:
        """Per-token routing rows of the documents, sorted by (doc_index, position, layer)."""
        config, model = self.model.config, self.model
        K, layers = config.num_experts_per_tok, config.moe_layers
        names = [f"model.layers.{m}.mlp.gate.hook_{w}" for m in layers for w in ("probs", "topk_idx", "topk_weights")]
        parts: list[dict[str, np.ndarray]] = []
        for batch in self._batches(ids):
            T = len(ids[batch[0]])
            x = torch.tensor(
                [ids[i] + [0] * (T - len(ids[i])) for i in batch], device=model.device
            )  # (B, T) right-padded
            seen: dict[str, torch.Tensor] = {}

            def keep(value: torch.Tensor, hook, seen: dict[str, torch.Tensor] = seen) -> None:
                seen[hook.name] = value.detach()

            model.run_with_hooks(x, fwd_hooks=[(names, keep)], last_only=True)
            for layer in layers:
                gate = f"model.layers.{layer}.mlp.gate.hook_"
                probs = seen[gate + "probs"].float()  # (B, T, E)
                m = router_margin(probs, K)  # (B, T) each
                per_token = {
                    "experts": seen[gate + "topk_idx"],
                    "weights": seen[gate + "topk_weights"].float(),
                    "entropy": entropy(probs).float(),
                    "margin": m.margin,
                    "kth_expert": m.kth_expert,
                    "next_expert": m.next_expert,
                    "near_tie": m.near_tie(self.settings.near_tie_threshold),
                }
                per_token = {k: v.cpu().numpy() for k, v in per_token.items()}
                for b, i in enumerate(batch):
                    n = len(ids[i])
                    parts.append(
                        {
                            "doc_index": np.full(n, docs[i].index, np.int64),
                            "doc_id": np.full(n, docs[i].doc_id, object),
                            "position": np.arange(n, dtype=np.int32),
                            "token_id": np.asarray(ids[i], np.int32),
                            "layer": np.full(n, layer, np.int16),
                            **{k: v[b, :n] for k, v in per_token.items()},
                        }
                    )
            if self.on_tokens:
                self.on_tokens(sum(len(ids[i]) for i in batch))
        if not parts:
            return {f.name: np.empty((0, K) if pa.types.is_list(f.type) else 0) for f in ROW_SCHEMA}
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.lexsort((arrays["layer"], arrays["position"], arrays["doc_index"]))
        return {k: v[order] for k, v in arrays.items()}


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
