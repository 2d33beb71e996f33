"""What the live dashboard's widget updates cost per generated token, beside the model's own time per token.

Writes the tiny random checkpoint (write_random_checkpoint), loads it with its tokenizer, and lets a
GenerationDashboard generate greedily (EOS ignored, so every run has --new-tokens). The worker times only its flushes (every widget update: strip,
utilization, latent norms, attention split, final inspect panel), so the model's forward is excluded;
the model's time is the rest of the same run. Target: at most 5 ms of updates per token, amortized.

    python benchmarks/bench_dashboard.py [--new-tokens 200] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile

import dsv2viz
from dsv2viz.random_checkpoint import write_random_checkpoint
from dsv2viz.widgets import GenerationDashboard

TARGET_MS_PER_TOKEN = 5.0
PROMPT = "def fibonacci(n):\n    if n < 2:\n        return n\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        model = dsv2viz.load(write_random_checkpoint(folder), progress=False)
    dash = GenerationDashboard(model)
    dash.max_new_tokens.value = args.new_tokens
    dash.stop_at_eos.value = False  # always the full number of tokens
    update_ms, model_ms, runs = [], [], []
    for _ in range(args.repeats):
        streamer = dash.run(PROMPT, wait=True)
        tokens = len(dash.trace) - dash.trace.prompt_len
        update_ms.append(1e3 * streamer.flush_seconds / tokens)
        model_ms.append(1e3 * (streamer.wall_seconds - streamer.flush_seconds) / tokens)
        runs.append((tokens, streamer.flushes))
    update, forward = statistics.median(update_ms), statistics.median(model_ms)
    verdict = "PASS" if update <= TARGET_MS_PER_TOKEN else "FAIL"
    print(
        f"dashboard updates, tiny random checkpoint, {len(model.tokenizer.encode(PROMPT))}-token prompt, median of {args.repeats}"
    )
    print(f"  runs (tokens, flushes): {runs}")
    print(f"  widget updates: {update:.3f} ms/token (target <= {TARGET_MS_PER_TOKEN} ms) {verdict}")
    print(f"  model (recording queries, routing, latents): {forward:.3f} ms/token")
    print(f"  updates / model time: {update / forward:.3f}")


if __name__ == "__main__":
    main()
