"""A saved trace is checked whole against its own config before anything uses it: every tampering is one line.

Each case below damages a copy of one saved trace in one way (its JSON, its tensors, or the files themselves);
``Trace.load`` must raise TraceError with one line naming what is wrong, and ``dsv2viz report`` on the folder
must print that one line and exit 1, with no traceback and no large allocation (run under a memory limit).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from dsv2viz.files import MAX_JSON_BYTES
from dsv2viz.model import DeepseekV2ForCausalLM
from dsv2viz.traces import Recording, Trace, TraceError

REPO = Path(__file__).resolve().parents[1]
S, P, V, E = 24, 20, 320, 8  # tokens, prompt tokens, vocabulary and routed experts of the trace below
#: Address space for the report subprocesses: importing torch and plotly takes about 0.9 GiB, the report of
#: this trace a few MB; an allocation sized by a tampered config (GBs) fails under it.
MEMORY_LIMIT = 2 * 2**30


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A trace with every kind of tensor (attention, queries, router probabilities, full logits, text bytes)."""
    model = DeepseekV2ForCausalLM(tiny_config()).init_weights(std=0.15, seed=0).eval()
    record = Recording(attention="full", queries=True, router_probs=True, full_logits=True)
    trace = model.generate(list(range(3, 3 + P)), S - P, record=record, temperature=0.9, seed=0).run()
    data = [t.encode("utf-8") for t in trace.token_texts]
    trace.tensors["token_bytes"] = torch.tensor(list(b"".join(data)), dtype=torch.uint8)
    trace.tensors["token_offsets"] = torch.tensor([0, *torch.tensor([len(d) for d in data]).cumsum(0).tolist()])
    assert len(trace) == S and trace.prompt_len == P and trace.config.vocab_size == V
    return trace.save(tmp_path_factory.mktemp("saved") / "trace")


def tensors_file(folder: Path) -> Path:
    (path,) = folder.glob("tensors-*.safetensors")
    return path


def edit_header(change):
    def tamper(folder: Path) -> None:
        header = json.loads((folder / "trace.json").read_text())
        change(header)
        (folder / "trace.json").write_text(json.dumps(header))

    return tamper


def edit_tensors(change):
    """Rewrite the tensors in place, keeping the file's id, and list the new names in trace.json (as a careful
    tamperer would, so that the checks behind the listing are the ones tested)."""

    def tamper(folder: Path) -> None:
        path = tensors_file(folder)
        with safe_open(path, "pt") as f:
            metadata = f.metadata()
        tensors = load_file(path)
        change(tensors)
        save_file(tensors, path, metadata=metadata)
        edit_header(lambda h: h.update(tensors=sorted(tensors)))(folder)

    return tamper


def setitem(key, value):
    return lambda d: d.__setitem__(key, value)


def in_config(key, value):
    return edit_header(lambda h: h["config"].__setitem__(key, value))


def in_recording(key, value):
    return edit_header(lambda h: h["recording"].__setitem__(key, value))


def put(name, index, value):
    return edit_tensors(lambda t: t[name].__setitem__(index, value))


def write(name: str, data: bytes | str):
    return lambda folder: (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)


def sparse_header(folder: Path) -> None:
    with open(folder / "trace.json", "r+b") as f:
        f.truncate(MAX_JSON_BYTES + 1)  # a huge file that costs no disk: only its size may be read


def other_save(folder: Path) -> None:
    """The tensors of another save of the same trace under this save's name: same content, another id."""
    other = Trace.load(folder).save(folder.parent / "other")
    shutil.copy(tensors_file(other), tensors_file(folder))


def truncate(folder: Path) -> None:
    path = tensors_file(folder)
    path.write_bytes(path.read_bytes()[:-100])


CASES = {
    # the header's fields
    "version from the future": (edit_header(setitem("version", 99)), r"trace format version 99"),
    "another format": (edit_header(setitem("format", "other-tool")), r"not a dsv2viz trace"),
    "JSON list": (write("trace.json", "[1, 2]"), r"not a dsv2viz trace"),
    "id naming another folder": (edit_header(setitem("id", "../../etc/x")), r"id '../../etc/x' is not 16 hex digits"),
    "prompt_len negative": (edit_header(setitem("prompt_len", -1)), r"prompt_len=-1 must be a whole number from 1"),
    "prompt_len past the end": (edit_header(setitem("prompt_len", S + 1)), rf"prompt_len={S + 1} .* the {S} tokens"),
    "prompt_len a string": (edit_header(setitem("prompt_len", "3")), r"prompt_len='3' must be a whole number"),
    "prompt_len a bool": (edit_header(setitem("prompt_len", True)), r"prompt_len=True must be a whole number"),
    "token_texts short": (
        edit_header(lambda h: h["token_texts"].pop()),
        rf"token_texts has {S - 1} texts but token_ids {S} ids",
    ),
    "token_texts not strings": (
        edit_header(lambda h: h["token_texts"].__setitem__(5, 7)),
        r"token_texts\[5\] is int, not a string",
    ),
    "token_texts a string": (edit_header(setitem("token_texts", "abc")), r"token_texts must be a non-empty list"),
    "config missing": (edit_header(lambda h: h.pop("config")), r"config must be a JSON object, found NoneType"),
    "config field of a wrong type": (in_config("num_experts_per_tok", "3"), r"config: "),
    "config with 40000 experts": (
        in_config("n_routed_experts", 40000),
        r"config: n_routed_experts=40000 is out of range: expected 1\.\.4096",
    ),
    "config with 4000 experts": (  # within the config's bounds, but not what the tensors hold
        in_config("n_routed_experts", 4000),
        rf"tensor 'router_probs' has shape \(2, {S}, {E}\), expected \(2, {S}, 4000\)",
    ),
    "config with more layers": (
        in_config("num_hidden_layers", 300),
        rf"tensor 'topk_idx' has shape \(2, {S}, 3\), expected \(299, {S}, 3\)",
    ),
    "config with fewer heads": (
        edit_header(lambda h: h["config"].update(num_attention_heads=2, num_key_value_heads=2)),
        rf"tensor 'q_nope.0' has shape \({S}, 4, 16\), expected \({S}, 2, 16\)",
    ),
    "recording with an unknown key": (in_recording("bogus", 1), r"recording has unknown fields \['bogus'\]"),
    "recording flag a string": (in_recording("routing", "yes"), r"recording.routing='yes' is not a bool"),
    "recording layers a string": (in_recording("attention_layers", "all"), r"recording.attention_layers='all'"),
    "recording mode unknown": (in_recording("attention", "sometimes"), r"recording: attention='sometimes'"),
    "recording head out of range": (in_recording("attention_heads", [99]), r"attention_heads \[99\] out of range"),
    "recording says router_probs were not kept": (
        in_recording("router_probs", False),
        r"tensors \['router_probs'\] are not what this trace's config and recording record",
    ),
    "meta not an object": (edit_header(setitem("meta", [1])), r"meta must be a JSON object, found list"),
    "tensor listing differs": (
        edit_header(lambda h: h["tensors"].pop()),
        r"trace.json lists tensors .* the tensors file holds",
    ),
    # the tensors
    "unknown tensor": (
        edit_tensors(setitem("extra", torch.zeros(3))),
        r"tensors \['extra'\] are not what this trace's config and recording record",
    ),
    "missing tensor": (edit_tensors(lambda t: t.pop("router_probs")), r"tensors \['router_probs'\] are missing"),
    "token ids as floats": (
        edit_tensors(lambda t: t.__setitem__("token_ids", t["token_ids"].float())),
        r"tensor 'token_ids' is torch.float32, expected torch.int64",
    ),
    "top-k of another width": (
        edit_tensors(lambda t: t.__setitem__("topk_idx", t["topk_idx"][..., :2].contiguous())),
        rf"tensor 'topk_idx' has shape \(2, {S}, 2\), expected \(2, {S}, 3\)",
    ),
    "token id past the vocabulary": (put("token_ids", 4, V), rf"'token_ids' holds ids outside \[0, {V}\)"),
    "negative expert": (put("topk_idx", (0, 3, 1), -1), rf"'topk_idx' holds ids outside \[0, {E}\): -1"),
    "expert past the experts": (put("topk_idx", (1, 3, 0), E), rf"'topk_idx' holds ids outside \[0, {E}\)"),
    "top id past the vocabulary": (put("top_ids", (0, 0), V + 5), rf"'top_ids' holds ids outside \[0, {V}\)"),
    "query position past the trace": (
        put("attention.1.query_pos", -1, S),
        rf"'attention.1.query_pos' holds positions outside \[0, {S}\)",
    ),
    "query positions out of order": (put("attention.2.query_pos", 0, 5), r"query positions must increase"),
    "NaN routing weight": (put("topk_weights", (0, 2, 0), float("nan")), r"'topk_weights' holds NaN or infinite"),
    "infinite latent": (put("c_kv", (1, 2, 3), float("inf")), r"'c_kv' holds NaN or infinite"),
    "NaN log-probability": (put("logprobs", (0, 7), float("nan")), r"'logprobs' holds NaN or infinite"),
    "text offsets past the bytes": (put("token_offsets", -1, 10**6), r"'token_offsets' must rise from 0"),
    "text bytes without offsets": (
        edit_tensors(lambda t: t.pop("token_offsets")),
        r"token_bytes and token_offsets come together",
    ),
    # the files
    "JSON nested too deeply": (write("trace.json", "[" * 100_000 + "]" * 100_000), r"nested too deeply"),
    "huge JSON": (sparse_header, rf"over the {MAX_JSON_BYTES:,} a JSON file may have"),
    "JSON not UTF-8": (write("trace.json", b'{"format": "\xff\xfe"}'), r"not UTF-8"),
    "JSON broken": (write("trace.json", '{"format": '), r"not valid JSON"),
    "tensors from another save": (other_save, r"written by another save"),
    "tensors file missing": (lambda f: tensors_file(f).unlink(), r"missing; trace.json names it"),
    "tensors file truncated": (truncate, r"damaged, not a whole safetensors file"),
    "tensors file not safetensors": (
        lambda f: tensors_file(f).write_bytes(b"\x10" + b"\0" * 7 + b"not json at all"),
        r"damaged, not a whole safetensors file",
    ),
}


@pytest.fixture(scope="module")
def tampered(saved, tmp_path_factory) -> dict[str, Path]:
    """A damaged copy of the saved trace per case."""
    root = tmp_path_factory.mktemp("tampered")
    out = {}
    for i, (name, (tamper, _)) in enumerate(CASES.items()):
        folder = root / f"case{i:02d}" / "trace"
        shutil.copytree(saved, folder)
        tamper(folder)
        out[name] = folder
    return out


def test_the_untampered_trace_loads(saved):
    trace = Trace.load(saved)
    assert len(trace) == S and "router_probs" in trace.tensors and "token_offsets" in trace.tensors
    assert len(CASES) >= 24


@pytest.mark.parametrize("case", list(CASES))
def test_each_tampering_is_one_line_naming_it(tampered, case):
    with pytest.raises(TraceError) as error:
        Trace.load(tampered[case])
    message = str(error.value)
    assert "\n" not in message
    assert str(tampered[case]) in message  # the folder or its file
    assert re.search(CASES[case][1], message), message


def limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def test_report_on_each_tampered_trace_is_one_line_under_a_memory_limit(tampered, tmp_path):
    """All cases through the CLI's main() in one subprocess (one torch import), capped at MEMORY_LIMIT."""
    script = textwrap.dedent(
        """
        import contextlib, io, json, sys, traceback
        from dsv2viz.cli import main
        results = {}
        for name, folder, out in json.load(sys.stdin):
            err = io.StringIO()
            try:
                with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                    code = main(["report", folder, "-o", out])
                results[name] = [code, err.getvalue()]
            except BaseException:
                results[name] = ["raised", traceback.format_exc()]
        print(json.dumps(results))
        """
    )
    cases = [[name, str(folder), str(tmp_path / f"{i}.html")] for i, (name, folder) in enumerate(tampered.items())]
    run = subprocess.run(
        [sys.executable, "-c", script],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_memory,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 0, run.stderr
    results = json.loads(run.stdout)
    for name, (code, err) in results.items():
        assert code == 1, f"{name}: {err}"
        assert err.count("\n") == 1 and err.startswith("dsv2viz report: error: "), f"{name}: {err}"
    assert not list(tmp_path.glob("*.html"))


def test_the_report_command_itself(tampered, tmp_path):
    """The issue's case: a trace whose config claims 40000 experts made `report` allocate 12.8 GB."""
    folder = tampered["config with 40000 experts"]
    run = subprocess.run(
        [sys.executable, "-m", "dsv2viz", "report", str(folder), "-o", str(tmp_path / "r.html")],
        capture_output=True,
        text=True,
        timeout=60,
        preexec_fn=limit_memory,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.count("\n") == 1 and run.stderr.startswith("dsv2viz report: error: "), run.stderr
    assert not (tmp_path / "r.html").exists()


def test_save_checks_the_trace_first_and_writes_nothing_it_could_not_load(tmp_path):
    model = DeepseekV2ForCausalLM(tiny_config()).init_weights(std=0.15, seed=0).eval()
    record = Recording(attention="last_row", attention_layers=[1], attention_heads=[0, 2])
    trace = model.generate(list(range(3, 13)), 3, record=record).run()
    trace.validate()  # a trace in memory gets the same checks (its recording holds tuples, not JSON lists)
    assert Trace.load(trace.save(tmp_path / "ok")) == trace
    nan = trace.tensors["c_kv"].clone()
    nan[0, 0, 0] = float("nan")
    with pytest.raises(TraceError, match="tensor 'c_kv' holds NaN or infinite values"):
        Trace(trace.config, trace.prompt_len, trace.token_texts, {**trace.tensors, "c_kv": nan}, record).save(
            tmp_path / "nan"
        )
    with pytest.raises(TraceError, match="meta cannot be saved as JSON"):
        Trace(trace.config, trace.prompt_len, trace.token_texts, trace.tensors, record, {"x": object()}).save(
            tmp_path / "meta"
        )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok"]
