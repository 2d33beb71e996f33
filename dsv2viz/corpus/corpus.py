"""A collected corpus, opened for analysis: merged statistics in memory, per-token rows read on demand.

The analyses in :mod:`dsv2viz.analysis.routing` accept a Corpus wherever they accept traces, so the
plots and the routing notebook work on a million collected tokens as on one generation.
"""

from __future__ import annotations

import functools
import json
import operator
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads

from ..config import DeepseekV2Config
from ..files import read_json
from .documents import CollectError
from .shard import row_arrays
from .stats import RoutingStats

FORMAT = "dsv2viz-collection"
# 2: the manifest holds the weights' fingerprint; 3: the statistics count routing paths. Older collections
# still open (without routing paths before 3), but do not resume: their shards lack what the merge now sums.
VERSION = 3


class Corpus:
    """The output folder of :func:`dsv2viz.corpus.collect`."""

    def __init__(self, folder: Path, manifest: dict, stats: RoutingStats, doc_index: list[int] | None = None) -> None:
        self.folder, self.manifest, self.stats = folder, manifest, stats
        self.config = DeepseekV2Config.from_dict(manifest["model"]["config"])
        self.doc_index = doc_index  # the documents this view covers; None: all of them (see select)

    @classmethod
    def open(cls, folder: str | os.PathLike) -> Corpus:
        """Open a finished collection; an unfinished one says to rerun the collect command to finish it."""
        folder = Path(folder)
        path = folder / "manifest.json"
        if not path.exists():
            raise CollectError(f"{folder}: no manifest.json; this is not a folder written by dsv2viz collect")
        manifest = read_json(path, error=CollectError)
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
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

    def select(self, doc_index: Iterable[int]) -> Corpus:
        """The corpus restricted to some documents (code against prose, one source against another), with
        its statistics recomputed from their rows; every analysis then sees only them.

        `doc_index` values come from :meth:`documents` (e.g. ``docs[docs.doc_id.str.endswith(".py")].doc_index``).
        """
        wanted = sorted({int(i) for i in doc_index})
        unknown = (
            set(wanted) - set(self.documents()["doc_index"].tolist())
            if self.doc_index is None
            else set(wanted) - set(self.doc_index)
        )
        if unknown:
            raise CollectError(
                f"documents {sorted(unknown)[:5]} are not among this corpus's routed documents (see .documents())"
            )
        view = Corpus(self.folder, self.manifest, self.stats, wanted)
        c = self.config
        stats = RoutingStats.from_rows(
            c.moe_layers, c.n_routed_experts, c.num_experts_per_tok, row_arrays(view.table()), len(wanted)
        )
        stats.token_experts = stats.token_experts.assign(
            token=self.token_text(stats.token_experts["token_id"].tolist())
        )
        view.stats = stats
        return view

    def documents(self) -> pd.DataFrame:
        """(doc_index, doc_id, tokens) of every routed document, in corpus order."""
        docs = pd.read_parquet(self.folder / "documents.parquet")
        return docs if self.doc_index is None else docs[docs["doc_index"].isin(self.doc_index)].reset_index(drop=True)

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
        conditions = []
        if layers is not None:
            conditions.append(pads.field("layer").isin(list(layers)))
        if self.doc_index is not None:
            conditions.append(pads.field("doc_index").isin(self.doc_index))
        filter = functools.reduce(operator.and_, conditions) if conditions else None
        return dataset.to_table(columns=list(columns) if columns else None, filter=filter)

    def token_text(self, token_ids: Sequence[int]) -> list[str]:
        """Labels of token ids that occur in the corpus, each shown alone (`dsv2viz.text.label`, recorded at collection)."""
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
        part = "" if self.doc_index is None else ", selected"
        return f"Corpus({str(self.folder)!r}, documents={self.stats.documents}, tokens={self.tokens}{part})"
