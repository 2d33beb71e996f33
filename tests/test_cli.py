"""The command line: `info` reports what the files hold, `demo` streams a generation, errors are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dsv2viz import DEEPSEEK_V2_LITE
from dsv2viz.cli import main, parameter_counts
from dsv2viz.random_checkpoint import write_random_checkpoint


def test_parameter_counts_of_v2_lite():
    counts = parameter_counts(DEEPSEEK_V2_LITE)
    assert counts["total"] == 15_706_484_224
    parts = {k: v for k, v in counts.items() if not k.startswith(("total", "active"))}
    assert sum(parts.values()) == counts["total"]
    assert counts["routed experts"] == 26 * 64 * 3 * 1408 * 2048
    # 6 of 64 routed experts per token: the published "2.4B active" excludes the embedding
    assert counts["active per token"] == counts["total"] - counts["routed experts"] * 58 // 64
    assert 2.4e9 < counts["active per token, less embedding"] < 2.5e9


def test_info_reports_what_the_files_hold(tmp_path, capsys):
    folder = write_random_checkpoint(tmp_path / "m")
    assert main(["info", str(folder)]) == 0
    out = capsys.readouterr().out
    total = sum(t.numel() for t in load_file(folder / "model.safetensors").values())
    assert f"{total:,}" in out
    assert "1 files, " + str(len(load_file(folder / "model.safetensors"))) + " tensors" in out
    assert "(bfloat16)" in out
    assert f"{(64 + 16) * 4 * 2:,} bytes/token" in out  # (latent 64 + rope key 16) x 4 layers x 2 bytes


@pytest.mark.parametrize(
    "args, message",
    [
        (["info", "{tmp}/missing"], "no such folder"),
        (["report", "{tmp}", "-o", "{tmp}/r.html"], "no trace.json; not a trace folder"),
        (
            ["generate", "--model", "{model}", "--prompt", "x", "--max-new-tokens", "5000"],
            "exceeds the context of 4096",
        ),
        (
            ["generate", "--model", "{model}", "--prompt", "x", "--attention", "full", "--memory-budget", "0.000001"],
            "over its budget",
        ),
    ],
)
def test_errors_are_one_line_and_exit_1(tmp_path, args, message):
    model = write_random_checkpoint(tmp_path / "m")
    argv = [a.format(tmp=tmp_path, model=model) for a in args]
    result = subprocess.run(
        [sys.executable, "-m", "dsv2viz", *argv, *(["--quiet"] if argv[0] == "generate" else [])],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert message in result.stderr


def test_demo_streams_and_saves_a_trace(tmp_path, capsys):
    from dsv2viz import Trace

    assert main(["demo", "--out", str(tmp_path / "m"), "--tokens", "5", "--trace", str(tmp_path / "t")]) == 0
    out = capsys.readouterr().out
    trace = Trace.load(tmp_path / "t")
    assert len(trace.generated_ids) == 5
    rows = [line for line in out.splitlines() if line.strip()[:2].isdigit()]
    assert len(rows) == 5
    first_row_experts = [int(x) for x in rows[0].split()[-4:-1]]
    assert (
        first_row_experts == trace.routing_df().query(f"position == {trace.prompt_len} and rank == 0").expert.tolist()
    )
    assert trace.text.startswith("<｜begin▁of▁sentence｜>def fibonacci(n):")


def one_error_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"dsv2viz {command}: error: "), err
    return err


def test_demo_refuses_a_folder_that_is_not_an_earlier_demos(tmp_path, capsys):
    from dsv2viz.model import DeepseekV2ForCausalLM
    from dsv2viz.random_checkpoint import TINY_CONFIG, write_checkpoint
    from dsv2viz.tokenizer import DEEPSEEK_BOS, DEEPSEEK_EOS, byte_level_bpe

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "thesis.tex").write_text("keep me")
    assert main(["demo", "--out", str(busy), "--tokens", "1"]) == 1
    assert "is not empty (thesis.tex) and holds no random checkpoint" in one_error_line(capsys, "demo")
    assert [p.name for p in busy.iterdir()] == ["thesis.tex"]
    # a checkpoint dsv2viz did not write at random, with exactly the files a demo writes: its weights stay
    real = tmp_path / "real"
    tokenizer = byte_level_bpe(None, vocab_size=258, bos_token=DEEPSEEK_BOS, eos_token=DEEPSEEK_EOS)
    write_checkpoint(real, DeepseekV2ForCausalLM(TINY_CONFIG).init_weights(seed=3), tokenizer, dtype=torch.bfloat16)
    before = {p.name: p.read_bytes() for p in real.iterdir()}
    assert main(["demo", "--out", str(real), "--tokens", "1"]) == 1
    assert "is not a dsv2viz random checkpoint; it is never overwritten" in one_error_line(capsys, "demo")
    assert {p.name: p.read_bytes() for p in real.iterdir()} == before
    # an earlier demo's folder is rewritten with the same files
    demo = tmp_path / "demo"
    assert main(["demo", "--out", str(demo), "--tokens", "1"]) == 0
    first = {p.name: p.read_bytes() for p in demo.iterdir()}
    assert main(["demo", "--out", str(demo), "--tokens", "1"]) == 0
    assert {p.name: p.read_bytes() for p in demo.iterdir()} == first
    assert sorted(first) == ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"]


def test_report_refuses_a_path_inside_a_trace_folder(tmp_path, capsys):
    from dsv2viz import Trace

    assert main(["demo", "--out", str(tmp_path / "m"), "--tokens", "2", "--trace", str(tmp_path / "t")]) == 0
    capsys.readouterr()
    saved = {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir()}
    for target in ("trace.json", "report.html"):
        assert main(["report", str(tmp_path / "t"), "-o", str(tmp_path / "t" / target)]) == 1
        message = one_error_line(capsys, "report")
        assert f"is inside the trace folder {tmp_path / 't'}; write the report outside it" in message
    assert main(["report", str(tmp_path / "t"), "-o", str(tmp_path)]) == 1
    assert "is a folder; name the .html file to write" in one_error_line(capsys, "report")
    assert {p.name: p.read_bytes() for p in (tmp_path / "t").iterdir()} == saved
    Trace.load(tmp_path / "t")
    assert main(["report", str(tmp_path / "t"), "-o", str(tmp_path / "t.html")]) == 0
    assert (tmp_path / "t.html").read_text(encoding="utf-8").endswith("</html>\n")


def test_ctrl_c_is_one_line_and_status_130(tmp_path, capsys, monkeypatch):
    from dsv2viz import cli

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "cmd_info", interrupted)
    assert main(["info", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "dsv2viz info: interrupted"


def test_user_errors_are_described_in_one_line():
    from dsv2viz.cli import describe

    assert describe(PermissionError(13, "Permission denied", "/m/config.json")) == "/m/config.json: Permission denied"
    assert describe(IsADirectoryError(21, "Is a directory")) == "Is a directory"
    assert describe(ValueError("first line\n  second line\n")) == "first line second line"
    assert describe(MemoryError()) == "out of memory"
