"""Throughput of `dsv2viz collect`: in-process against 1 and 2 Ray workers, on the same corpus in one run.

The corpus is the Python standard library's sources (what the bundled demo model was trained on), one
document per file, cut at --max-tokens. Each configuration collects it into a fresh folder; tokens/s is
routed tokens over the collect() call's wall time, model loading and (for Ray) starting the local Ray
instance and its actors included, because that is what a user waits for. Ray start-up is also timed on
its own so the steady-state rate can be read off. Ratios are against in-process with all cores.

    python benchmarks/bench_collect.py [--docs 300] [--max-tokens 2048] [--model PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

from dsv2viz.corpus import collect


def corpus(folder: Path, docs: int) -> Path:
    """A JSONL of `docs` stdlib modules (sorted by path, tests excluded)."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in sorted(lib.rglob("*.py")) if "test" not in p.parts and "site-packages" not in p.parts]
    path = folder / "stdlib.jsonl"
    with open(path, "w") as f:
        for p in files[:docs]:
            f.write(json.dumps({"id": str(p.relative_to(lib)), "text": p.read_text(errors="replace")}) + "\n")
    return path


def timed(label: str, inputs: list[Path], out: Path, **kw) -> tuple[str, float, int]:
    start = time.perf_counter()
    c = collect(inputs, out, progress=False, **kw)
    seconds = time.perf_counter() - start
    return label, seconds, c.tokens


def ray_startup() -> float:
    import ray

    start = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    ray.shutdown()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--docs", type=int, default=300)
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--docs-per-shard", type=int, default=25)
    ap.add_argument("--model", help="checkpoint folder (default: the bundled demo model)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-collect-"))
    inputs = [corpus(tmp, args.docs)]
    common = dict(model=args.model, max_tokens=args.max_tokens, docs_per_shard=args.docs_per_shard)
    cores = os.cpu_count()
    runs = [
        timed(f"in-process, {torch.get_num_threads()} threads", inputs, tmp / "a", **common),
        timed("in-process, 1 thread", inputs, tmp / "b", threads=1, **common),
        timed("Ray, 1 worker x 1 CPU", inputs, tmp / "c", ray=True, workers=1, **common),
        timed("Ray, 2 workers x 1 CPU", inputs, tmp / "d", ray=True, workers=2, **common),
    ]
    startup = ray_startup()
    base = runs[0][2] / runs[0][1]
    print(f"$ python {' '.join(shlex.quote(a) for a in sys.argv)}")
    print(f"torch {torch.__version__}, {cores} CPU cores; {runs[0][2]:,} tokens in {args.docs} documents "
          f"(max {args.max_tokens} tokens, {args.docs_per_shard} per shard); Ray start-up alone {startup:.1f} s\n")
    print(f"| {'configuration':<26} | {'seconds':>7} | {'tokens/s':>8} | {'vs in-process':>13} |")
    print(f"|{'-' * 28}|{'-' * 9}:|{'-' * 10}:|{'-' * 15}:|")
    for label, seconds, tokens in runs:
        assert tokens == runs[0][2], "every configuration routes the same tokens"
        rate = tokens / seconds
        print(f"| {label:<26} | {seconds:>7.1f} | {rate:>8,.0f} | {rate / base:>12.2f}x |")


if __name__ == "__main__":
    main()
