"""collect reads each record only as far as it must: a document whose bytes already prove it has more than
max_tokens tokens is skipped unread (never loaded whole, never tokenized), and the job goes on."""

from __future__ import annotations

import json
import random
import tracemalloc

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import dsv2viz
from dsv2viz.corpus import CollectError, CollectSettings, collect
from dsv2viz.corpus import documents as documents_module
from dsv2viz.corpus.documents import plan_shards, read_shard
from dsv2viz.tokenizer import DEEPSEEK_BOS


def read(paths, max_text_bytes):
    files, specs = plan_shards(paths, 1000, "text")
    return [doc for spec in specs for doc in read_shard(files, spec, max_text_bytes=max_text_bytes)]


@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
def test_line_starts_equal_a_line_by_line_scan(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(documents_module, "_CHUNK", chunk)
    rng = random.Random(chunk)
    for trial in range(100):
        data = b"".join(rng.choice([b"\n", b" ", b"{}", b"\t", b"\r\n", b"x"]) for _ in range(rng.randint(0, 40)))
        path = tmp_path / f"{trial}.jsonl"
        path.write_bytes(data)
        expected, pos = [], 0
        for number, line in enumerate(data.splitlines(keepends=True), 1):
            if line.strip():
                expected.append((pos, number))
            pos += len(line)
        assert documents_module._jsonl_line_starts(path) == expected, data


def test_a_huge_record_is_skipped_unread_in_bounded_memory(tmp_path):
    path = tmp_path / "docs.jsonl"
    huge = json.dumps({"id": "huge", "text": "word " * 4_000_000})  # 20 MB on one line
    path.write_text(
        "\n".join([json.dumps({"id": "a", "text": "first"}), huge, json.dumps({"id": "b", "text": "é" * 500})])
    )
    tracemalloc.start()
    try:
        docs = read([path], max_text_bytes=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"reading held {peak / 2**20:.1f} MiB"  # the line is 20 MiB
    assert [d.text for d in docs] == ["first", None, "é" * 500]  # 1,000 bytes: read whole
    assert docs[1].doc_id == f"{path}:2" and docs[1].error.startswith(
        f"a JSON line of {len(huge) + 1:,} bytes, over the {1000 * 6 + 2**16:,}"  # its newline included
    )
    assert "skipped unread, not truncated" in docs[1].error


def test_the_byte_bound_is_exact_in_every_input_kind(tmp_path):
    limit = 300
    at, over = "é" * 150, "é" * 150 + "!"  # 300 and 301 UTF-8 bytes
    escaped = "\x01" * limit  # JSON spells each of these bytes in six: the longest line a fitting text makes
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in (at, over, escaped)) + "\n")
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"text": [at, over]}), parquet)
    (tmp_path / "at.txt").write_text(at)
    (tmp_path / "over.txt").write_text(over)
    docs = read([jsonl, parquet, tmp_path / "at.txt", tmp_path / "over.txt"], max_text_bytes=limit)
    assert [d.text for d in docs] == [at, None, escaped, at, None, at, None]
    assert all(f"a text of 301 bytes, over the {limit}" in docs[i].error for i in (1, 4, 6))


def test_a_huge_blank_line_is_not_a_record(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "a"}) + "\n" + " " * 2**21 + "\n" + json.dumps({"text": "b"}) + "\n")
    docs = read([path], max_text_bytes=10)  # the planner and the reader agree: two records
    assert [(d.index, d.text) for d in docs] == [(0, "a"), (1, "b")]


def test_collect_skips_provably_long_documents_unread_and_routes_the_rest_whole(tmp_path):
    model = dsv2viz.load(progress=False)
    longest = model.tokenizer.max_token_bytes
    limit = 8
    under = DEEPSEEK_BOS * limit  # 8 tokens of 29 bytes: 232 bytes, within 8 x longest, routed whole
    texts = {"under": under, "unread": "a" * (limit * longest + 1), "tokenized": "b" * 40, "short": "def f():"}
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": k, "text": t}) + "\n" for k, t in texts.items()))
    corpus = collect([path], tmp_path / "out", model=model, max_tokens=limit, progress=False)
    docs = corpus.documents()
    assert list(docs["doc_id"]) == ["under", "short"]
    assert list(docs["tokens"]) == [limit, len(model.tokenizer.encode("def f():"))]
    reasons = dict(zip(corpus.skipped()["doc_id"], corpus.skipped()["reason"]))
    assert reasons["unread"].startswith(f"a text of {limit * longest + 1:,} bytes, over the {limit * longest:,}")
    n = len(model.tokenizer.encode("b" * 40))
    assert reasons["tokenized"].startswith(f"{n} tokens, over the limit of {limit}")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"max_tokens": 0}, "max_tokens=0 must be a whole number of at least 1"),
        ({"batch_tokens": -8}, "batch_tokens=-8 must be"),
        ({"docs_per_shard": 2.5}, "docs_per_shard=2.5 must be"),
        ({"near_tie_threshold": float("nan")}, "near_tie_threshold=nan must be a finite number >= 0"),
    ],
)
def test_collect_settings_are_checked(change, message):
    with pytest.raises(CollectError, match=message):
        CollectSettings(**change)
