"""A collected corpus, opened for analysis: merged statistics in memory, per-token rows read on demand.

The analyses in :mod:`dsv2viz.analysis.routing` accept a Corpus wherever they accept traces, so the
plots and the routing notebook work on a million collected tokens as on one generation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from ..config import DeepseekV2Config
from .documents import CollectError
from .shard import row_arrays
from .stats import RoutingStats

FORMAT = "dsv2viz-collection"
VERSION = 1


class Corpus:
    """The output folder of :func:`dsv2viz.corpus.collect`."""

    def __init__(self, folder: Path, manifest: dict, stats: RoutingStats) -> None:
        self.folder, self.manifest, self.stats = folder, manifest, stats
        self.config = DeepseekV2Config.from_dict(manifest["model"]["config"])

    @classmethod
    def open(cls, folder: str | os.PathLike) -> Corpus:
        """Open a finished collection; an unfinished one says to rerun the collect command to finish it."""
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.exists():
            raise CollectError(f"{folder}: no manifest.json; this is not a folder written by dsv2viz collect")
        manifest = json.loads(path.read_text())
        if manifest.get("format") != FORMAT:
            raise CollectError(f"{folder}: manifest.json is not a dsv2viz collection's")
        if not manifest.get("complete"):
            raise CollectError(f"{folder}: the collection is unfinished; rerun the same collect command to finish it")
        return cls(folder, manifest, RoutingStats.load(folder, "stats"))

    @property
    def moe_layers(self) -> list[int]:
        return self.config.moe_layers

    @property
    def tokens(self) -> int:
        """Tokens routed (documents' tokens, BOS included)."""
        return self.stats.tokens

    def documents(self) -> pd.DataFrame:
        """(doc_index, doc_id, tokens) of every routed document, in corpus order."""
        return pd.read_parquet(self.folder / "documents.parquet")

    def skipped(self) -> pd.DataFrame:
        """(doc_index, doc_id, reason) of every skipped document."""
        lines = (self.folder / "skipped.jsonl").read_text().splitlines()
        return pd.DataFrame([json.loads(x) for x in lines], columns=["doc_index", "doc_id", "reason"])

    def rows(self, columns: Sequence[str] | None = None, *, layers: Sequence[int] | None = None) -> pd.DataFrame:
        """Per-token routing rows (see dsv2viz.corpus.shard.ROW_SCHEMA), optionally only some columns and
        layers, sorted by (doc_index, position, layer). ``experts``/``weights`` hold arrays of K."""
        return self.table(columns, layers=layers).to_pandas()

    def table(self, columns: Sequence[str] | None = None, *, layers: Sequence[int] | None = None):
        """:meth:`rows` as a pyarrow Table (no copy into pandas objects)."""
        dataset = pads.dataset(self.folder / "rows", format="parquet")
        filter = pads.field("layer").isin(list(layers)) if layers is not None else None
        return dataset.to_table(columns=list(columns) if columns else None, filter=filter)

    def token_text(self, token_ids: Sequence[int]) -> list[str]:
        """Text of token ids that occur in the corpus (from the tokenizer, recorded at collection)."""
        te = self.stats.token_experts
        if "token" not in te.columns:
            return [f"<{i}>" for i in token_ids]
        texts = dict(zip(te["token_id"].tolist(), te["token"].tolist()))
        return [texts.get(int(i), f"<{int(i)}>") for i in token_ids]

    def per_layer(self, column: str) -> np.ndarray:
        """(M, N) one scalar column of the rows, one row per MoE layer, tokens in corpus order."""
        arrays = row_arrays(self.table([column, "layer"]))
        return np.stack([arrays[column][arrays["layer"] == layer] for layer in self.moe_layers])

    def __repr__(self) -> str:
        t = self.manifest.get("totals", {})
        return f"Corpus({str(self.folder)!r}, documents={t.get('documents')}, tokens={self.tokens}, skipped={t.get('skipped')})"
