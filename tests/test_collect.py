"""dsv2viz collect: corpus routing on the bundled demo model, in-process and on Ray, resumable, batch-independent."""

from __future__ import annotations

import json
import subprocess
import sys
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import dsv2viz
from dsv2viz import analysis, plots
from dsv2viz.corpus import CollectError, CollectSettings, Corpus, collect
from dsv2viz.corpus.documents import plan_shards
from dsv2viz.corpus.shard import ShardRunner
from dsv2viz.files import temporary_name

STDLIB = Path(sysconfig.get_paths()["stdlib"])
SOURCES = [
    "json/decoder.py",
    "json/encoder.py",
    "textwrap.py",
    "bisect.py",
    "colorsys.py",
    "keyword.py",
    "fnmatch.py",
    "glob.py",
]


@pytest.fixture(scope="module")
def model():
    return dsv2viz.load(progress=False)


def texts() -> list[str]:
    """Python sources cut to different lengths (about 40 to 900 tokens): documents of many lengths."""
    out = []
    for i, name in enumerate(SOURCES):
        text = (STDLIB / name).read_text()
        out.append(text[: 150 + 450 * i])
    return out


@pytest.fixture
def corpus_files(tmp_path):
    """A JSONL file with good and bad lines, a Parquet file with ids, and a plain text file."""
    docs = texts()
    jsonl = tmp_path / "in" / "docs.jsonl"
    jsonl.parent.mkdir()
    lines = [json.dumps({"id": f"doc{i}", "text": t}) for i, t in enumerate(docs[:5])]
    lines.insert(2, "{this is not json")  # line 3
    lines.insert(4, json.dumps({"title": "no text field"}))  # line 5
    lines.append(json.dumps({"id": "long", "text": "x = 1\n" * 2000}))  # thousands of tokens: over the limit
    lines.append(json.dumps({"id": "blank", "text": "   "}))
    jsonl.write_text("\n".join(lines) + "\n\n")  # a trailing blank line is not a record
    parquet = tmp_path / "in" / "more.parquet"
    pq.write_table(pa.table({"text": docs[5:7], "id": ["p0", "p1"]}), parquet, row_group_size=1)
    text = tmp_path / "in" / "glob.txt"
    text.write_text(docs[7])
    return [jsonl, parquet, text]


def rows_equal(a: pd.DataFrame, b: pd.DataFrame) -> bool:
    key = ["doc_index", "position", "layer"]
    a, b = a.sort_values(key, ignore_index=True), b.sort_values(key, ignore_index=True)
    scalar = [c for c in a.columns if c not in ("experts", "weights")]
    return (
        a[scalar].astype({"doc_id": str}).equals(b[scalar].astype({"doc_id": str}))
        and np.array_equal(np.stack(a["experts"]), np.stack(b["experts"]))
        and np.array_equal(np.stack(a["weights"]), np.stack(b["weights"]))
    )


def hand_paths(rows: pd.DataFrame, layers: list[int], top: int) -> dict:
    """Routing paths recounted token by token from the rows, document by document (independent of RoutingPaths)."""
    transitions, repeats, counts, pairs, tokens = Counter(), Counter(), Counter(), 0, 0
    for _, doc in rows.groupby("doc_index"):
        chosen = {}  # (position, layer) -> the token's first `top` experts
        for position, layer, experts in zip(doc["position"], doc["layer"], doc["experts"]):
            chosen[(int(position), int(layer))] = set(experts[:top].tolist())
        n = int(doc["position"].max()) + 1
        assert len(chosen) == n * len(layers)
        for p in range(n):
            for m, layer in enumerate(layers):
                counts.update((m, e) for e in chosen[(p, layer)])
                if p > 0:
                    repeats[m] += len(chosen[(p, layer)] & chosen[(p - 1, layer)])
                if m + 1 < len(layers):
                    transitions.update((m, i, j) for i in chosen[(p, layer)] for j in chosen[(p, layers[m + 1])])
        pairs += n - 1
        tokens += n
    repeats = {m: n for m, n in repeats.items() if n}
    return {"transitions": transitions, "repeats": repeats, "counts": counts, "pairs": pairs, "tokens": tokens}


def as_counts(paths) -> dict:
    """A RoutingPaths in hand_paths's form."""
    nonzero = lambda t: {k: int(v) for k, v in np.ndenumerate(t.numpy()) if v}  # noqa: E731
    repeats = {k[0]: v for k, v in nonzero(paths.repeats).items()}
    return {
        "transitions": nonzero(paths.transitions),
        "repeats": repeats,
        "counts": nonzero(paths.counts),
        "pairs": paths.pairs,
        "tokens": paths.tokens,
    }


def test_bad_documents_are_reported_and_skipped_never_truncated(model, corpus_files, tmp_path, capsys):
    corpus = collect(
        corpus_files, tmp_path / "out", model=model, docs_per_shard=1, max_tokens=2048
    )  # shards of one bad record too
    skipped = corpus.skipped()
    reasons = dict(zip(skipped["doc_id"], skipped["reason"]))
    jsonl = str(corpus_files[0])
    assert set(reasons) == {f"{jsonl}:3", f"{jsonl}:5", "long", "blank"}
    assert reasons[f"{jsonl}:3"].startswith("not valid JSON")
    assert reasons[f"{jsonl}:5"] == "field 'text' is missing"
    n_long = len(model.tokenizer.encode("x = 1\n" * 2000))
    assert reasons["long"].startswith(f"{n_long} tokens, over the limit of 2048") and "not truncated" in reasons["long"]
    assert reasons["blank"] == "empty text"
    assert f"skipped {jsonl}:3: not valid JSON" in capsys.readouterr().err
    # every other document was routed whole: one row per (token, MoE layer), positions 0..n-1
    docs = corpus.documents()
    assert list(docs["doc_id"]) == ["doc0", "doc1", "doc2", "doc3", "doc4", "p0", "p1", str(corpus_files[2])]
    want = [len(model.tokenizer.encode(t)) for t in texts()]
    assert list(docs["tokens"]) == want
    rows = corpus.rows(["doc_id", "position", "layer"])
    M = len(model.config.moe_layers)
    for doc_id, n in zip(docs["doc_id"], want):
        mine = rows[rows["doc_id"] == doc_id]
        assert len(mine) == n * M and mine["position"].max() == n - 1
    assert corpus.tokens == sum(want) and corpus.manifest["totals"] == {
        "documents": 8,
        "skipped": 4,
        "tokens": sum(want),
    }


def test_statistics_equal_a_recount_of_the_rows(model, corpus_files, tmp_path):
    corpus = collect(corpus_files, tmp_path / "out", model=model, docs_per_shard=2, progress=False)
    rows = corpus.rows()
    cfg = model.config
    E, layers = cfg.n_routed_experts, cfg.moe_layers
    stats = corpus.stats
    assert stats.tokens == len(rows) // len(layers) and stats.documents == 8
    slots = rows[["layer", "token_id", "experts", "weights"]].explode(["experts", "weights"])
    for m, layer in enumerate(layers):
        mine = slots[slots["layer"] == layer]
        counts = mine["experts"].astype(int).value_counts().reindex(range(E), fill_value=0).to_numpy()
        assert np.array_equal(stats.counts[m].numpy(), counts)
        weights = (
            mine["weights"]
            .astype(np.float64)
            .groupby(mine["experts"].astype(int))
            .sum()
            .reindex(range(E), fill_value=0.0)
        )
        np.testing.assert_allclose(stats.weight_sums[m].numpy(), weights.to_numpy(dtype=float), rtol=1e-9)
        co = np.zeros((E, E), dtype=np.int64)
        for experts in rows.loc[rows["layer"] == layer, "experts"]:
            co[np.ix_(experts, experts)] += 1
        assert np.array_equal(stats.coactivation[m].numpy(), co)
        entropy = rows.loc[rows["layer"] == layer, "entropy"].to_numpy(dtype=float)
        assert stats.entropy_sum[m].item() == pytest.approx(entropy.sum(), rel=1e-9)
        assert stats.entropy_hist[m].sum() == stats.tokens
        assert stats.near_ties[m] == rows.loc[rows["layer"] == layer, "near_tie"].sum()
    recount = slots.groupby(["layer", slots["token_id"], slots["experts"].astype(int)]).size()
    te = stats.token_experts.set_index(["layer", "token_id", "expert"])["count"]
    assert dict(recount) == dict(te)
    # routing paths, for the first expert and all K: transitions, neighbours' shared experts, marginals
    K = cfg.num_experts_per_tok
    assert sorted(stats.paths) == [1, K]
    for top in (1, K):
        recounted = hand_paths(rows, layers, top)
        assert recounted["pairs"] == stats.tokens - stats.documents and recounted["transitions"]
        assert as_counts(stats.paths[top]) == recounted
        assert analysis.routing_paths(corpus, top=top) is stats.paths[top]  # read, not recounted from the rows
    assert torch.equal(stats.paths[K].counts, stats.counts)  # all K experts: the tokens per expert
    # the per-shard statistics merge to the same numbers as one shard holding everything
    whole = collect(corpus_files, tmp_path / "whole", model=model, docs_per_shard=100, progress=False).stats
    assert len(list((tmp_path / "whole" / "shards").glob("*.json"))) == 1  # one shard: nothing merged
    for name in ("counts", "coactivation", "entropy_hist", "near_ties"):
        assert torch.equal(getattr(whole, name), getattr(stats, name)), name
    assert torch.allclose(whole.entropy_sum, stats.entropy_sum, rtol=1e-6)
    assert whole.token_experts.drop(columns="token").equals(stats.token_experts.drop(columns="token"))
    assert whole.paths == stats.paths


def test_near_tie_flags_follow_the_bf16_rule(model, corpus_files, tmp_path):
    corpus = collect(corpus_files, tmp_path / "out", model=model, progress=False)
    ties = analysis.near_ties(corpus)
    assert len(ties) == int(corpus.stats.near_ties.sum()) > 0
    rows = corpus.rows()
    # recompute the rule from the router: margin below 2**-8 of the K-th probability
    doc = texts()[0]
    ids = torch.tensor([model.tokenizer.encode(doc)])
    _, acts = model.run_with_cache(ids, names_filter="*.mlp.gate.hook_probs")
    K = model.config.num_experts_per_tok
    for layer in model.config.moe_layers:
        top = acts[f"model.layers.{layer}.mlp.gate.hook_probs"][0].topk(K + 1).values
        flagged = (top[:, K - 1] - top[:, K]) < top[:, K - 1] * analysis.BF16_ROUNDOFF
        mine = rows[(rows["doc_index"] == 0) & (rows["layer"] == layer)]
        assert np.array_equal(mine["near_tie"].to_numpy(), flagged.numpy())
    absolute = analysis.near_ties(corpus, threshold=1e-3)
    assert len(absolute) == (rows["margin"] < 1e-3).sum() and (absolute["margin"] < 1e-3).all()


def test_a_documents_routing_does_not_depend_on_its_batch(model):
    """One document routed alone and as the shortest of a batch of documents of other lengths (right-padded).

    Expert choices must be identical; weights agree to fp32 rounding (BLAS picks kernels by matrix shape,
    and the grouped expert GEMMs group more rows per expert in a batch, so bit equality across batch
    shapes is not on offer: differences of about 1e-6 relative were seen). A pad token that leaked into
    the document's attention would change its hidden states by far more than that.
    """
    runner = ShardRunner(model, [], CollectSettings(batch_tokens=1 << 20), Path("unused"))
    docs = [dsv2viz.corpus.documents.Document(i, f"d{i}", t) for i, t in enumerate(texts())]
    ids = [model.tokenizer.encode(d.text) for d in docs]
    assert runner._batches(ids) == [sorted(range(len(ids)), key=lambda i: -len(ids[i]))]  # one batch, padded
    assert len({len(i) for i in ids}) == len(ids)
    batched = runner._route(docs, ids)
    for d, i in zip(docs, ids):
        alone = runner._route([d], [i])
        mine = batched["doc_index"] == d.index
        assert np.array_equal(batched["experts"][mine], alone["experts"])
        assert np.array_equal(batched["near_tie"][mine], alone["near_tie"])
        assert np.array_equal(batched["kth_expert"][mine], alone["kth_expert"])
        np.testing.assert_allclose(batched["weights"][mine], alone["weights"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(batched["entropy"][mine], alone["entropy"], atol=1e-5, rtol=0)


def test_a_resumed_run_equals_an_uninterrupted_one(model, corpus_files, tmp_path, monkeypatch):
    whole = collect(corpus_files, tmp_path / "whole", model=model, docs_per_shard=2, progress=False)
    n_shards = len(whole.manifest["shards"])
    out = tmp_path / "resumed"
    real_run, calls = ShardRunner.run, []

    def dies_in_shard_3(self, spec):
        calls.append(spec.index)
        if spec.index == 3:  # as if killed while writing: half a temporary file, no summary
            temporary_name(out / "rows" / "part-00003.parquet").write_bytes(b"PAR1 half written")
            raise KeyboardInterrupt
        return real_run(self, spec)

    monkeypatch.setattr(ShardRunner, "run", dies_in_shard_3)
    with pytest.raises(KeyboardInterrupt):
        collect(corpus_files, out, model=model, docs_per_shard=2, progress=False)
    with pytest.raises(CollectError, match="unfinished; rerun the same collect command"):
        Corpus.open(out)
    monkeypatch.setattr(ShardRunner, "run", lambda self, spec: calls.append(spec.index) or real_run(self, spec))
    calls.clear()
    resumed = collect(corpus_files, out, model=model, docs_per_shard=2, progress=False)
    assert calls == list(range(3, n_shards))  # finished shards were not redone
    assert not list(out.rglob(".*.tmp"))
    assert resumed.stats == whole.stats
    assert rows_equal(resumed.rows(), whole.rows())
    assert resumed.documents().equals(whole.documents()) and resumed.skipped().equals(whole.skipped())
    manifest = lambda c: {k: v for k, v in c.manifest.items() if k != "model"}  # noqa: E731 (paths differ)
    assert manifest(resumed) == manifest(whole)


def test_in_process_and_two_ray_workers_give_identical_output(corpus_files, tmp_path):
    pytest.importorskip("ray", reason="Ray is the optional extra dsv2viz[ray]; .ci/run installs it")
    local = collect(corpus_files, tmp_path / "local", docs_per_shard=2, threads=1, progress=False)
    on_ray = collect(corpus_files, tmp_path / "ray", docs_per_shard=2, ray=True, workers=2, progress=False)
    assert on_ray.manifest["totals"] == local.manifest["totals"] and local.manifest["totals"]["documents"] == 8
    assert on_ray.stats == local.stats  # counts, co-activation, token-expert counts, float sums: all bit-equal
    K = local.config.num_experts_per_tok
    assert sorted(on_ray.stats.paths) == [1, K] and on_ray.stats.paths == local.stats.paths  # routing paths too
    assert on_ray.stats.paths[K].transitions.sum() > 0
    assert rows_equal(on_ray.rows(), local.rows())
    assert on_ray.skipped().equals(local.skipped())


def test_corpus_analyses_equal_the_same_documents_as_traces(model, tmp_path):
    docs = texts()[:4]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    corpus = collect([path], tmp_path / "out", model=model, progress=False)
    traces = [model.generate(t, 0, record=dsv2viz.traces.Recording(router_probs=True)).run() for t in docs]
    a, b = analysis.expert_utilization(corpus), analysis.expert_utilization(traces)
    assert torch.equal(a.counts, b.counts) and a.tokens == b.tokens and torch.allclose(a.cv, b.cv)
    for layer in model.config.moe_layers:
        assert torch.equal(analysis.coactivation(corpus, layer), analysis.coactivation(traces, layer))
        pd.testing.assert_frame_equal(
            analysis.top_tokens_per_expert(corpus, layer), analysis.top_tokens_per_expert(traces, layer)
        )
    assert torch.allclose(analysis.routing_entropy(corpus), analysis.routing_entropy(traces), atol=1e-5)
    assert torch.allclose(analysis.topk_margin(corpus), analysis.topk_margin(traces).double(), atol=1e-6)
    assert torch.allclose(analysis.topk_weight_entropy(corpus), analysis.topk_weight_entropy(traces), atol=1e-5)
    # plots take the corpus analyses as they take the traces'
    fig = plots.utilization_heatmap(a)
    assert np.array_equal(np.asarray(fig.data[0].z, dtype=np.int64), corpus.stats.counts.numpy())
    with pytest.raises(ValueError, match="no generated tokens"):
        analysis.expert_utilization(corpus, generated_only=True)
    with pytest.raises(ValueError, match="not an MoE layer"):
        analysis.coactivation(corpus, 0)


def test_inputs_and_outputs_that_cannot_work_fail_before_any_work(model, corpus_files, tmp_path):
    with pytest.raises(CollectError, match=r"nope.jsonl: no such file"):
        collect([tmp_path / "nope.jsonl"], tmp_path / "o1", model=model)
    bad = tmp_path / "t.parquet"
    pq.write_table(pa.table({"body": ["x"]}), bad)
    with pytest.raises(CollectError, match=r"no column 'text' \(columns: \['body'\]\); pass --text-field"):
        collect([bad], tmp_path / "o2", model=model)
    with pytest.raises(CollectError, match=r"unknown input type '.csv'"):
        (tmp_path / "a.csv").write_text("x")
        collect([tmp_path / "a.csv"], tmp_path / "o3", model=model)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("keep me")
    with pytest.raises(CollectError, match=r"is not empty \(thesis.tex\) and holds no collection"):
        collect(corpus_files, busy, model=model)
    assert (busy / "thesis.tex").read_text() == "keep me" and len(list(busy.iterdir())) == 1
    collect(corpus_files, tmp_path / "o4", model=model, docs_per_shard=4, progress=False)
    with pytest.raises(CollectError, match="made with other settings, shards"):
        collect(corpus_files, tmp_path / "o4", model=model, docs_per_shard=3, progress=False)
    assert len(Corpus.open(tmp_path / "o4").manifest["shards"]) == 3  # untouched


def test_plan_cuts_records_into_shards_across_files(corpus_files):
    files, shards = plan_shards(corpus_files, 4, "text")
    assert [f.records for f in files] == [9, 2, 1]  # jsonl: 9 non-blank lines (bad ones included)
    spans = [[(s.file, s.start, s.stop) for s in spec.segments] for spec in shards]
    assert spans == [[(0, 0, 4)], [(0, 4, 8)], [(0, 8, 9), (1, 0, 2), (2, 0, 1)]]
    assert [s.first_doc for s in shards] == [0, 4, 8]


def test_cli_collect_then_resume(corpus_files, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "dsv2viz",
        "collect",
        "--input",
        *map(str, corpus_files),
        "--out",
        str(tmp_path / "out"),
        "--docs-per-shard",
        "4",
        "--quiet",
    ]
    first = subprocess.run(cmd, capture_output=True, text=True)
    assert first.returncode == 0, first.stderr
    corpus = Corpus.open(tmp_path / "out")
    assert (
        f"{corpus.manifest['totals']['documents']} documents, {corpus.tokens:,} tokens routed, 4 skipped"
        in first.stdout
    )
    util = analysis.expert_utilization(corpus)
    for layer, cv in zip(corpus.moe_layers, util.cv):
        assert any(line.split()[:2] == [str(layer), f"{float(cv):.3f}"] for line in first.stdout.splitlines())
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 0 and "skipped" not in again.stderr  # nothing rerun, nothing re-reported
    assert Corpus.open(tmp_path / "out").stats == corpus.stats
    other = subprocess.run(cmd[:-1] + ["--max-tokens", "100", "--quiet"], capture_output=True, text=True)
    assert (
        other.returncode == 1 and other.stderr.startswith("dsv2viz collect: error:") and "Traceback" not in other.stderr
    )


def test_a_selection_of_documents_has_the_statistics_of_collecting_them_alone(model, corpus_files, tmp_path):
    """Code against prose, one source against another: select() recomputes everything from the chosen rows."""
    corpus = collect(corpus_files, tmp_path / "all", model=model, progress=False)
    docs = corpus.documents()
    chosen = docs[docs["doc_id"].isin(["doc1", "doc3", "p1"])]
    part = corpus.select(chosen["doc_index"])
    alone_file = tmp_path / "alone.jsonl"
    alone_file.write_text("".join(json.dumps({"text": texts()[i]}) + "\n" for i in (1, 3, 6)))
    alone = collect([alone_file], tmp_path / "alone", model=model, progress=False)
    assert part.stats.documents == 3 and part.tokens == alone.tokens == chosen["tokens"].sum()
    for name in ("counts", "coactivation", "near_ties", "entropy_hist"):
        assert torch.equal(getattr(part.stats, name), getattr(alone.stats, name)), name
    assert torch.allclose(part.stats.entropy_sum, alone.stats.entropy_sum, rtol=1e-6)
    assert part.stats.token_experts.equals(alone.stats.token_experts)
    assert part.stats.paths == alone.stats.paths  # documents 1, 3, 6 never pair across the gaps between them
    assert torch.equal(analysis.expert_utilization(part).counts, analysis.expert_utilization(alone).counts)
    assert set(part.rows(["doc_index"])["doc_index"]) == set(chosen["doc_index"])
    assert list(part.documents()["doc_id"]) == ["doc1", "doc3", "p1"]
    assert analysis.routing_entropy(part).shape == (len(model.config.moe_layers), part.tokens)
    with pytest.raises(CollectError, match=r"documents \[2\] are not among"):
        corpus.select([2])  # the bad JSON line: skipped, so never routed


def test_ray_missing_is_said_before_anything_is_written(corpus_files, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError, as without the extra
    with pytest.raises(CollectError, match=r"Ray is not installed: pip install 'dsv2viz\[ray\]'"):
        collect(corpus_files, tmp_path / "out", ray=True)
    assert not (tmp_path / "out").exists()


@pytest.fixture
def small_corpus(tmp_path):
    path = tmp_path / "in" / "docs.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"text": t[:300]}) + "\n" for t in texts()[:3]))
    return [path]


def test_a_resume_with_other_weights_of_the_same_config_is_refused(small_corpus, tmp_path, monkeypatch):
    from dsv2viz.random_checkpoint import write_random_checkpoint

    a = write_random_checkpoint(tmp_path / "a", seed=0)
    b = write_random_checkpoint(tmp_path / "b", seed=1)
    assert (a / "config.json").read_bytes() == (b / "config.json").read_bytes()
    out = tmp_path / "out"
    first = collect(small_corpus, out, model=a, docs_per_shard=1, progress=False)
    manifest = (out / "manifest.json").read_bytes()
    with pytest.raises(CollectError, match=rf"{out} was collected with other weights \(fingerprint [0-9a-f]{{12}}"):
        collect(small_corpus, out, model=b, docs_per_shard=1, progress=False)
    # the same checkpoint replaced in place, at the same path
    write_random_checkpoint(a, seed=1)
    with pytest.raises(CollectError, match="was collected with other weights"):
        collect(small_corpus, out, model=a, docs_per_shard=1, progress=False)
    assert (out / "manifest.json").read_bytes() == manifest
    # the first weights moved to another folder are the same job: nothing reruns
    moved = write_random_checkpoint(tmp_path / "moved", seed=0)
    monkeypatch.setattr(ShardRunner, "run", lambda self, spec: pytest.fail("a finished shard was rerun"))
    assert collect(small_corpus, out, model=moved, docs_per_shard=1, progress=False).stats == first.stats


def test_an_output_folder_inside_an_input_folder_is_refused(small_corpus, tmp_path, model):
    inputs = small_corpus[0].parent
    for out in (inputs / "out", inputs):
        with pytest.raises(CollectError, match=rf"the output folder {out} is inside the input folder {inputs}"):
            collect([inputs], out, model=model)
    with pytest.raises(CollectError, match=rf"the input {small_corpus[0]} is inside the output folder {inputs}"):
        collect(small_corpus, inputs, model=model)
    assert sorted(p.name for p in inputs.iterdir()) == ["docs.jsonl"]  # nothing written


def test_rerunning_a_finished_collection_rewrites_nothing(model, small_corpus, tmp_path, monkeypatch):
    out = tmp_path / "out"
    collect(small_corpus, out, model=model, progress=False)
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()}
    monkeypatch.setattr(ShardRunner, "run", lambda self, spec: pytest.fail("a finished shard was rerun"))
    again = collect(small_corpus, out, model=model, progress=False)
    assert {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()} == before
    assert again.manifest["complete"] and again.stats == Corpus.open(out).stats


def test_a_collection_written_before_routing_paths_opens_and_says_how_to_get_them(model, small_corpus, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    out = tmp_path / "old"
    collect(small_corpus, out, model=model, progress=False)
    for path in [out / "stats.safetensors", *(out / "shards").glob("*.safetensors")]:  # as version 2 wrote them
        with safe_open(path, "pt") as f:
            meta = {k: v for k, v in f.metadata().items() if not k.startswith("paths.")}
        save_file({k: v for k, v in load_file(path).items() if not k.startswith("paths.")}, path, metadata=meta)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "version": 2}))

    old = Corpus.open(out)
    assert old.stats.paths is None and old.tokens > 0
    assert torch.equal(analysis.expert_utilization(old).counts, old.stats.counts)  # the rest works as before
    with pytest.raises(
        ValueError,
        match=rf"^{out} was collected by an older dsv2viz that did not count routing "
        "paths; run the same dsv2viz collect command again with a new --out folder to get them$",
    ):
        analysis.routing_paths(old)
    with pytest.raises(CollectError, match=r"collected by another version of dsv2viz .*collect into a new folder"):
        collect(small_corpus, out, model=model, progress=False)  # its shards cannot be merged with new ones
    new = collect(small_corpus, tmp_path / "new", model=model, progress=False)
    assert as_counts(analysis.routing_paths(new)) == hand_paths(new.rows(), new.moe_layers, 1)
    with pytest.raises(ValueError, match=r"a collection counts routing paths for top=1 and top=2; top=3 is not"):
        analysis.routing_paths(new, top=3)
