"""Hostile inputs to every CLI entry point: bad configs, checkpoint folders, arguments, corpora, chat
templates and devices. Each must end in one clear line (``dsv2viz <command>: error: ...``, exit status 1),
never a traceback, a hang or a multi-GB allocation: every case runs under a time and memory limit.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
import tokenizers
import torch
from hostile import REPO, assert_one_line_error, run_cli
from safetensors.torch import load_file, save_file

from dsv2viz.random_checkpoint import write_random_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """One small valid checkpoint; each case edits a copy."""
    return write_random_checkpoint(tmp_path_factory.mktemp("hostile") / "tiny")


def copy_of(tiny: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "m"
    shutil.copytree(tiny, folder)
    return folder


# ----- edits that make a checkpoint folder hostile ------------------------------------------------------------
def config(**changes) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        raw = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**raw, **changes}))

    return edit


def write(name: str, data: bytes) -> Callable[[Path], None]:
    return lambda folder: (folder / name).write_bytes(data)


def deep_json(depth: int = 100_000) -> bytes:
    return b"[" * depth + b"]" * depth


def deep_header(folder: Path) -> None:
    header = deep_json(50_000)
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)


def deep_index(folder: Path) -> None:
    (folder / "model.safetensors.index.json").write_bytes(deep_json())


def integer_weight(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    state["model.norm.weight"] = state["model.norm.weight"].to(torch.int16)
    save_file(state, folder / "model.safetensors")


def token_past_vocab(folder: Path) -> None:
    tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.add_special_tokens(["<extra>"])  # id 258; the embedding has 258 rows
    tok.save(str(folder / "tokenizer.json"))


def truncated_weights(folder: Path) -> None:
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-1000])


def chat_template(template: str) -> Callable[[Path], None]:
    def edit(folder: Path) -> None:
        path = folder / "tokenizer_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "chat_template": template}))

    return edit


GENERATE = ["generate", "--model", "{m}", "--prompt", "hi", "--max-new-tokens", "2", "--quiet"]
CHAT = [*GENERATE, "--chat"]
COLLECT = ["collect", "--input", "{m}/config.json", "--out", "{tmp}/out", "--quiet"]

#: (id, edit of the checkpoint copy or None, arguments with {m} the folder and {tmp} a scratch folder, fragment)
CASES = [
    # config.json: types, values and shapes
    ("layers-huge", config(num_hidden_layers=10**7), ["info", "{m}"], "num_hidden_layers=10000000 is out of range"),
    ("experts-huge", config(n_routed_experts=10**9), ["info", "{m}"], "n_routed_experts=1000000000 is out of range"),
    ("vocab-string", config(vocab_size="258"), ["info", "{m}"], "vocab_size='258' has the wrong type"),
    ("vocab-float", config(vocab_size=258.0), GENERATE, "vocab_size=258.0 has the wrong type"),
    ("vocab-bool", config(vocab_size=True), ["info", "{m}"], "vocab_size=true has the wrong type"),
    ("hidden-null", config(hidden_size=None), ["info", "{m}"], "hidden_size=null is not allowed"),
    ("eps-nan", config(rms_norm_eps=float("nan")), GENERATE, "rms_norm_eps=nan is not allowed"),
    ("theta-inf", config(rope_theta=float("inf")), ["info", "{m}"], "rope_theta=inf is not allowed"),
    ("tie-string", config(tie_word_embeddings="no"), ["info", "{m}"], "tie_word_embeddings='no' has the wrong type"),
    ("yarn-factor", config(rope_scaling={"type": "yarn", "factor": -1}), ["info", "{m}"], "rope_scaling.factor=-1"),
    ("rope-string", config(rope_scaling="yarn"), ["info", "{m}"], "rope_scaling='yarn' has the wrong type"),
    ("bos-past-vocab", config(bos_token_id=1000), GENERATE, "bos_token_id=1000 is out of range"),
    ("topk-zero", config(num_experts_per_tok=0), ["info", "{m}"], "num_experts_per_tok=0 is out of range"),
    (
        "expert-count",
        config(n_routed_experts=4096, num_hidden_layers=1024, num_experts_per_tok=1),
        GENERATE,
        "over the 65,536 this loader builds",
    ),
    ("shapes-1TB", config(vocab_size=2**21, hidden_size=2**16), GENERATE, "free; use a device with more memory"),
    # checkpoint folders and files
    ("folder-missing", None, ["info", "{tmp}/nowhere"], "no such folder"),
    ("folder-is-file", None, ["info", "{m}/config.json"], "is a file, not a folder"),
    ("model-is-file", None, [*GENERATE[:2], "{m}/config.json", *GENERATE[3:]], "is a file, not a folder"),
    (
        "config-is-folder",
        lambda f: ((f / "config.json").unlink(), (f / "config.json").mkdir()),
        ["info", "{m}"],
        "is not a file",
    ),
    ("config-deep", write("config.json", deep_json()), ["info", "{m}"], "nested too deeply"),
    ("config-huge", write("config.json", b"{}" + b" " * 2**21), ["info", "{m}"], "bytes, over the 1,048,576"),
    ("config-not-utf8", write("config.json", b'{"hidden_act": "\xff"}'), ["info", "{m}"], "not UTF-8"),
    ("config-not-json", write("config.json", b"{vocab_size: 1"), GENERATE, "not valid JSON"),
    ("header-deep", deep_header, ["info", "{m}"], "nested too deeply"),
    ("index-deep", deep_index, ["info", "{m}"], "nested too deeply"),
    ("tokenizer-deep", write("tokenizer.json", deep_json()), GENERATE, "nested too deeply"),
    ("tokenizer-config-deep", write("tokenizer_config.json", deep_json()), GENERATE, "nested too deeply"),
    ("integer-weights", integer_weight, GENERATE, "'model.norm.weight' is stored as int16"),
    ("token-past-vocab", token_past_vocab, GENERATE, "token ids up to 258, but config.json's vocab_size is 258"),
    ("truncated-weights", truncated_weights, GENERATE, "truncated"),
    # arguments
    ("no-command", None, [], "the following arguments are required: command"),
    ("unknown-command", None, ["bogus"], "invalid choice: 'bogus'"),
    ("info-no-path", None, ["info"], "the following arguments are required: path"),
    ("temperature-nan", None, [*GENERATE, "--temperature", "nan"], "argument --temperature"),
    ("temperature-inf", None, [*GENERATE, "--temperature", "inf"], "argument --temperature"),
    ("temperature-negative", None, [*GENERATE, "--temperature", "-1"], "argument --temperature"),
    ("top-p-zero", None, [*GENERATE, "--top-p", "0"], "argument --top-p"),
    ("top-p-above-1", None, [*GENERATE, "--top-p", "1.5"], "argument --top-p"),
    ("top-k-zero", None, [*GENERATE, "--top-k", "0"], "argument --top-k"),
    ("max-new-tokens-negative", None, [*GENERATE, "--max-new-tokens", "-1"], "argument --max-new-tokens"),
    ("max-new-tokens-text", None, [*GENERATE, "--max-new-tokens", "many"], "argument --max-new-tokens"),
    ("memory-budget-inf", None, [*GENERATE, "--memory-budget", "inf"], "argument --memory-budget"),
    ("memory-budget-nan", None, [*GENERATE, "--memory-budget", "nan"], "argument --memory-budget"),
    ("memory-budget-negative", None, [*GENERATE, "--memory-budget", "-2"], "argument --memory-budget"),
    ("seed-negative", None, [*GENERATE, "--seed", "-1"], "argument --seed"),
    ("layers-negative", None, [*GENERATE, "--attention-layers", "1,-1"], "argument --attention-layers"),
    ("layers-past-model", None, [*GENERATE, "--attention-layers", "99"], "attention_layers [99] out of range"),
    ("threads-negative", None, [*COLLECT, "--threads", "-1"], "argument --threads"),
    ("workers-zero", None, [*COLLECT, "--workers", "0"], "argument --workers"),
    ("batch-tokens-zero", None, [*COLLECT, "--batch-tokens", "0"], "argument --batch-tokens"),
    ("docs-per-shard-negative", None, [*COLLECT, "--docs-per-shard", "-5"], "argument --docs-per-shard"),
    ("max-tokens-zero", None, [*COLLECT, "--max-tokens", "0"], "argument --max-tokens"),
    ("near-tie-nan", None, [*COLLECT, "--near-tie-threshold", "nan"], "argument --near-tie-threshold"),
    ("demo-tokens-negative", None, ["demo", "--tokens", "-3"], "argument --tokens"),
    # corpora that cannot be collected at all (bad records inside a good input are skipped: see below)
    ("input-missing", None, ["collect", "--input", "{tmp}/none.jsonl", "--out", "{tmp}/out"], "no such file"),
    ("input-unknown-type", None, [*COLLECT[:2], "{m}/model.safetensors", *COLLECT[3:]], "unknown input type"),
    (
        "input-bad-parquet",
        write("x.parquet", b"PAR1 nonsense"),
        [*COLLECT[:2], "{m}/x.parquet", *COLLECT[3:]],
        "Parquet",
    ),
    # chat templates (checkpoint code, rendered with limits)
    ("template-repeat", chat_template("{{ 'a' * 10**9 }}"), CHAT, "repetition (*) would hold 1,000,000,000"),
    ("template-power", chat_template("{{ 7 ** (10**9) }}"), CHAT, "a power (**)"),
    (
        "template-nested-loops",
        chat_template("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}"),
        CHAT,
        "steps",
    ),
    ("template-huge-range", chat_template("{% for i in range(10**10) %}{% endfor %}"), CHAT, "Range too big"),
    (
        "template-doubling",
        chat_template(
            "{% set ns = namespace(s='ab') %}{% for i in range(60) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
        ),
        CHAT,
        "concatenation (~)",
    ),
    ("template-recursion", chat_template("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(0) }}"), CHAT, "Recursion"),
    (
        "template-output",
        chat_template("{% for i in range(99999) %}{{ 'x' * 99999 }}{% endfor %}"),
        CHAT,
        "rendered text",
    ),
    # devices
    ("device-unknown", None, [*GENERATE, "--device", "tpu"], "device 'tpu' is not a device"),
    ("device-missing-gpu", None, [*GENERATE, "--device", "cuda:99"], "device 'cuda:99'"),
]


@pytest.mark.parametrize("edit, args, fragment", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_error(tiny, tmp_path, edit, args, fragment):
    folder = copy_of(tiny, tmp_path)
    if edit is not None:
        edit(folder)
    result = run_cli([a.format(m=folder, tmp=tmp_path) for a in args], timeout=20)
    command = args[0] if args and args[0] in ("info", "generate", "report", "demo", "collect") else ""
    assert_one_line_error(result, command, fragment)


def test_cuda_without_a_gpu_is_one_line_error(tiny, tmp_path):
    result = run_cli(
        [a.format(m=tiny) for a in GENERATE] + ["--device", "cuda"], env={"CUDA_VISIBLE_DEVICES": ""}, timeout=20
    )
    assert_one_line_error(result, "generate", "device 'cuda' is not available")


def test_unreadable_config_is_one_line_error(tiny):
    # root reads anything: the command then runs as nobody, so its folder must be one nobody can enter
    scratch = Path(tempfile.mkdtemp())
    try:
        scratch.chmod(0o755)
        folder = copy_of(tiny, scratch)
        folder.chmod(0o755)
        (folder / "config.json").chmod(0)
        result = run_cli(["info", folder], as_nobody=True, timeout=20)
        assert_one_line_error(result, "info", f"{folder / 'config.json'}: Permission denied")
    finally:
        shutil.rmtree(scratch)


def test_null_chat_template_falls_back_to_deepseeks(tiny, tmp_path):
    folder = copy_of(tiny, tmp_path)
    chat_template(None)(folder)
    result = run_cli([a.format(m=folder) for a in CHAT], timeout=20)
    assert result.code == 0 and "Traceback" not in result.stderr, result.stderr
    assert result.stdout.startswith("<｜begin▁of▁sentence｜>User: hi\n\nAssistant:")


def huge_record(path: Path) -> None:
    with open(path, "w") as f:
        f.write(json.dumps({"id": "huge", "text": "word " * 2_500_000}) + "\n")  # 12.5 MB on one line
        f.write(json.dumps({"id": "fine", "text": "def f(x):\n    return x\n"}) + "\n")


def odd_records(path: Path) -> None:
    with open(path, "wb") as f:
        f.write(b'{"id": "deep", "text": ' + deep_json(5000) + b"}\n")
        f.write(b'{"id": "latin1", "text": "caf\xe9"}\n')
        f.write(b'{"id": "surrogate", "text": "\\ud800"}\n')
        f.write(b'{"id": "fine", "text": "def f(x):\\n    return x\\n"}\n')


@pytest.mark.parametrize(
    "make, reasons",
    [
        (huge_record, {"/docs.jsonl:1": "skipped unread"}),
        (
            odd_records,
            {"/docs.jsonl:1": "nested too deeply", "/docs.jsonl:2": "not UTF-8", "surrogate": "not valid Unicode"},
        ),
    ],
    ids=["huge-record", "deep-not-utf8-surrogate"],
)
def test_bad_records_are_skipped_and_the_job_goes_on(tmp_path, make, reasons):
    docs = tmp_path / "docs.jsonl"
    make(docs)
    out = tmp_path / "out"
    result = run_cli(["collect", "--input", docs, "--out", out, "--quiet", "--max-tokens", "256"], timeout=60)
    assert result.code == 0 and "Traceback" not in result.stderr, result.stderr
    skipped = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == len(reasons)
    for (want_id, want_reason), got in zip(reasons.items(), skipped):
        assert got["doc_id"].endswith(want_id) and want_reason in got["reason"], got
    assert json.loads((out / "manifest.json").read_text())["totals"]["documents"] == 1  # "fine" was routed


def test_the_runner_behaves_like_a_fresh_python_m_dsv2viz_cli():
    fresh = subprocess.run(
        [sys.executable, "-m", "dsv2viz.cli", "bogus"],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    forked = run_cli(["bogus"])
    assert (fresh.returncode, fresh.stdout, fresh.stderr) == (forked.code, forked.stdout, forked.stderr)
    assert_one_line_error(forked, "", "invalid choice: 'bogus'")
