"""Throughput of `dsv2viz collect`: in-process against 1 and 2 Ray workers, on the same corpus in one run.

The corpus is the Python standard library's sources (what the bundled demo model was trained on), cut
at line boundaries into documents of at most --doc-chars characters. Each configuration collects it into a fresh folder; tokens/s is
routed tokens over the collect() call's wall time, model loading and (for Ray) starting the local Ray
instance and its actors included, because that is what a user waits for. Ray start-up is also timed on
its own and subtracted in the "after start-up" column. The configurations alternate, --repeats times,
and each figure is the median over the repeats (the machines are noisy). Ratios are against in-process
with all cores.

    python benchmarks/bench_collect.py [--docs 200] [--doc-chars 3000] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from dsv2viz.corpus import collect


def corpus(folder: Path, docs: int, doc_chars: int) -> Path:
    """A JSONL of `docs` pieces of stdlib modules (sorted by path, tests excluded), cut at line ends."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(lib.rglob("*.py")) if "test" not in p.parts and "site-packages" not in p.parts]
    path, written = folder / "stdlib.jsonl", 0
    with open(path, "w") as f:
        for p in files:
            piece, pieces = "", []
            for line in p.read_text(errors="replace").splitlines(keepends=True):
                if len(piece) + len(line) > doc_chars and piece:
                    pieces.append(piece)
                    piece = ""
                piece += line[:doc_chars]
            for i, text in enumerate(pieces + [piece] if piece.strip() else pieces):
                if written == docs:
                    return path
                f.write(json.dumps({"id": f"{p.relative_to(lib)}#{i}", "text": text}) + "\n")
                written += 1
    return path


def timed(inputs: list[Path], out: Path, **kw) -> tuple[float, int]:
    """(seconds, tokens routed) of one collect() call into a fresh folder."""
    start = time.perf_counter()
    c = collect(inputs, out, progress=False, **kw)
    return time.perf_counter() - start, c.tokens


def ray_startup() -> float:
    import ray

    start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray.shutdown()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=200)
    ap.add_argument("--doc-chars", type=int, default=3000)
    ap.add_argument("--docs-per-shard", type=int, default=25)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--model", help="checkpoint folder (default: the bundled demo model)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    inputs = [corpus(tmp, args.docs, args.doc_chars)]
    common = dict(model=args.model, docs_per_shard=args.docs_per_shard)
    cores = os.cpu_count()
    configs = {
        f"in-process, {torch.get_num_threads()} threads": {},
        "in-process, 1 thread": {"threads": 1},
        "Ray, 1 worker x 1 CPU": {"ray": True, "workers": 1},
        "Ray, 2 workers x 1 CPU": {"ray": True, "workers": 2},
    }
    seconds: dict[str, list[float]] = {label: [] for label in configs}
    startups, tokens = [], set()
    for r in range(args.repeats):
        for i, (label, kw) in enumerate(configs.items()):
            t, n = timed(inputs, tmp / f"r{r}-{i}", **common, **kw)
            seconds[label].append(t)
            tokens.add(n)
        startups.append(ray_startup())
    assert len(tokens) == 1, "every configuration routes the same tokens"
    n_tokens, startup = tokens.pop(), statistics.median(startups)
    runs = [(label, statistics.median(ts), n_tokens) for label, ts in seconds.items()]
    base = n_tokens / runs[0][1]
    print(f"$ python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(
        f"torch {torch.__version__}, {cores} CPU cores; {runs[0][2]:,} tokens in {args.docs} documents "
        f"(at most {args.doc_chars} characters, {args.docs_per_shard} per shard); medians of {args.repeats} repeats; "
        f"Ray start-up alone {startup:.1f} s\n"
    )
    print(
        f"| {'configuration':<26} | {'seconds':>7} | {'tokens/s':>8} | {'vs in-process':>13} | {'after start-up':>14} |"
    )
    print(f"|{'-' * 28}|{'-' * 9}:|{'-' * 10}:|{'-' * 15}:|{'-' * 16}:|")
    for label, secs, tokens in runs:
        rate = tokens / secs
        steady = tokens / (secs - startup) / base if label.startswith("Ray") else rate / base
        print(f"| {label:<26} | {secs:>7.1f} | {rate:>8,.0f} | {rate / base:>12.2f}x | {steady:>13.2f}x |")


if __name__ == "__main__":
    main()
