"""Writes that cannot be half done: a writer killed at any point leaves the old state or the new one, never a mix.

Each test runs a writer in a forked child that SIGKILLs itself at its n-th write boundary, for n = 1, 2, ...
until the writer finishes before reaching n. The boundaries are every file write (the child writes half of
the data, then dies: a torn write), every rename and every unlink. fsync is not one: a killed process
(unlike a power cut) loses nothing fsync would have saved, so the state at an fsync is the state at the
rename that follows it. After each kill the destination must hold exactly the old state or exactly the new
one, and running the writer again must give the new state with no temporary file left behind.
"""

from __future__ import annotations

import builtins
import io
import itertools
import os
import re
import shutil
import signal
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_config

import dsv2viz
from dsv2viz.corpus import CollectError, Corpus, collect
from dsv2viz.files import is_temporary
from dsv2viz.html_report import report
from dsv2viz.model import DeepseekV2ForCausalLM
from dsv2viz.random_checkpoint import write_random_checkpoint
from dsv2viz.traces import Recording, Trace

CHILD_TIMEOUT_S = 60


class TornFile:
    """A file opened for writing whose write at the fatal boundary writes half its data, then kills the process."""

    def __init__(self, file, boundary: Callable[[], bool]) -> None:
        self._file, self._boundary = file, boundary

    def write(self, data):
        if self._boundary():
            self._file.write(data[: len(data) // 2])
            self._file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        return self._file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._file, name)


def arm(n: int) -> None:
    """In the child: count write boundaries from here on and die at the n-th."""
    count = itertools.count(1)

    def fatal() -> bool:
        return next(count) == n

    def killing(real):
        def call(*args, **kwargs):
            if fatal():
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return call

    for name in ("replace", "rename", "unlink", "remove", "rmdir"):
        setattr(os, name, killing(getattr(os, name)))
    real_open = io.open

    def open_(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        return TornFile(f, fatal) if set(mode) & set("wax+") else f

    io.open = builtins.open = open_


def killed_at(n: int, write: Callable[[], object]) -> bool:
    """Run `write` in a forked child that dies at its n-th write boundary: True if it died, False if it finished."""
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            torch.set_num_threads(1)  # no thread pool inherited across the fork
            arm(n)
            write()
        except BaseException:
            traceback.print_exc()
            code = 3
        os._exit(code)
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not (done := os.waitpid(pid, os.WNOHANG))[0]:
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the writer to be killed at boundary {n} hung")
        time.sleep(0.005)
    status = done[1]
    if os.WIFSIGNALED(status):
        assert os.WTERMSIG(status) == signal.SIGKILL
        return True
    assert os.WEXITSTATUS(status) == 0, f"the writer failed at boundary {n} (its traceback is above)"
    return False


def every_kill(setup: Callable[[], None], write: Callable[[], object], check: Callable[[], None], folder: Path) -> int:
    """For each boundary n: `setup` the old state, kill `write` at n, `check` the state, then write again whole
    and `check` that it is new, with no temporary file left in `folder`; returns how many boundaries the write has."""
    for n in itertools.count(1):
        setup()
        if not killed_at(n, write):
            return n - 1
        check()
        write()
        check()
        assert not temporaries(folder), n


def temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob("*") if is_temporary(p.name)]


def tiny_trace(new_tokens: int, record: Recording | None = None) -> Trace:
    model = DeepseekV2ForCausalLM(tiny_config()).init_weights(std=0.15, seed=0).eval()
    return model.generate(list(range(3, 13)), new_tokens, temperature=0.8, seed=new_tokens, record=record).run()


def test_trace_save_over_a_trace(tmp_path):
    old, new = tiny_trace(2), tiny_trace(5)
    template, folder = tmp_path / "template", tmp_path / "trace"
    old.save(template)

    def setup():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(template, folder)

    def check():
        loaded = Trace.load(folder)  # whatever was killed, a trace loads ...
        assert loaded == old or loaded == new  # ... and it is one of the two, whole

    def save():
        new.save(folder)
        assert Trace.load(folder) == new and len(list(folder.glob("tensors-*.safetensors"))) == 1

    boundaries = every_kill(setup, save, check, folder)
    assert boundaries >= 4  # tensors renamed into place, trace.json written and renamed, the old tensors removed


def test_report_over_a_report(tmp_path):
    trace = tiny_trace(3, Recording.off())  # one figure: the file is still whole plotly.js and HTML, made fast
    path = tmp_path / "report.html"
    report(trace, tmp_path / "old.html", title="OLD")
    old = (tmp_path / "old.html").read_bytes()
    new = report(trace, tmp_path / "new.html", title="NEW").read_text(encoding="utf-8")

    def without_ids(text: str) -> str:  # plotly gives each figure a random div id
        return re.sub(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", "ID", text)

    def check():
        data = path.read_bytes()
        assert data == old or without_ids(data.decode("utf-8")) == without_ids(new)

    def write():
        report(trace, path, title="NEW")
        assert without_ids(path.read_text(encoding="utf-8")) == without_ids(new)

    boundaries = every_kill(lambda: shutil.copy(tmp_path / "old.html", path), write, check, tmp_path)
    assert boundaries >= 2


def test_demo_checkpoint_over_its_previous_output(tmp_path):
    old, new, folder = tmp_path / "old", tmp_path / "new", tmp_path / "ckpt"
    write_random_checkpoint(old, seed=0)
    write_random_checkpoint(new, seed=1)

    def files(f: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in f.iterdir() if not is_temporary(p.name)}

    assert files(old)["model.safetensors"] != files(new)["model.safetensors"]

    def setup():
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(old, folder)

    def check():
        assert files(folder) in (files(old), files(new))

    def write():
        write_random_checkpoint(folder, seed=1)
        assert files(folder) == files(new)

    boundaries = every_kill(setup, write, check, folder)
    assert boundaries >= 6


def test_collect_killed_in_a_shard_or_the_merge(tmp_path):
    model = dsv2viz.load(progress=False)
    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "def f(x):\\n    return x + 1\\n"}\n{"text": "Hello, world. 你好"}\n')
    # one thread everywhere: the child's shards and the parent's merge must add up bit for bit
    whole = collect([docs], tmp_path / "whole", model=model, threads=1, progress=False)
    out = tmp_path / "out"

    def check():
        try:
            corpus = Corpus.open(out)
        except CollectError as e:  # the old state: no finished collection
            assert re.search(r"unfinished; rerun the same collect command|no manifest.json", str(e)), e
            return
        assert corpus.stats == whole.stats and corpus.manifest["totals"] == whole.manifest["totals"]
        assert corpus.rows().equals(whole.rows()) and corpus.documents().equals(whole.documents())

    def write():
        corpus = collect([docs], out, model=model, threads=1, progress=False)
        assert corpus.stats == whole.stats and corpus.rows().equals(whole.rows())

    boundaries = every_kill(lambda: shutil.rmtree(out, ignore_errors=True), write, check, out)
    assert boundaries >= 10
