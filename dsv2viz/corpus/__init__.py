"""Corpus-scale routing statistics: run a model over many documents, keep per-token routing as Parquet
and mergeable statistics per layer; in-process or on Ray (see :func:`collect`)."""

from .corpus import Corpus
from .documents import CollectError
from .job import collect
from .shard import ROW_SCHEMA, CollectSettings
from .stats import RoutingStats

__all__ = ["ROW_SCHEMA", "CollectError", "CollectSettings", "Corpus", "RoutingStats", "collect"]
