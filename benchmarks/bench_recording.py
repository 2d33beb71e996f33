"""What recording a trace costs during decoding, as ratios against decoding with no recording.

Generates greedily from one prompt four ways, alternating them every repeat (the machines are noisy)
and taking medians of decode tokens/s (the prompt's prefill is excluded):
  stripped   Recording.off() with every hook point replaced by a bare identity: what idle hooks cost
  none       Recording.off(): tokens only
  default    Recording(): routing, latent KV, logits summary, residual and MoE norms
  attention  the default plus the full attention pattern and queries of one layer
Target: the default recording costs at most 15% over none.

    python benchmarks/bench_recording.py [--size small|medium] [--prompt-len 128] [--new-tokens 64]
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import statistics
import sys
import time

import torch
from shapes import COMMON, SIZES

from dsv2viz import DeepseekV2Config, DeepseekV2ForCausalLM, HookPoint
from dsv2viz.traces import Recording

TARGET_DEFAULT_OVERHEAD = 0.15


@contextlib.contextmanager
def hook_points_stripped():
    """Every HookPoint becomes a bare identity, as if the model had none."""
    call = HookPoint.__call__
    HookPoint.__call__ = lambda self, x: x
    try:
        yield
    finally:
        HookPoint.__call__ = call


def decode_rate(model: DeepseekV2ForCausalLM, prompt: list[int], new_tokens: int, record: Recording | None) -> float:
    """Decode tokens/s: time from the first yielded step to the last, over the steps in between.

    `record` None means Recording.off() with the hook points stripped.
    """
    with hook_points_stripped() if record is None else contextlib.nullcontext():
        steps = model.generate(prompt, new_tokens, record=record or Recording.off(), stop_tokens=())
        stamps = [time.perf_counter() for _ in steps]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    config = DeepseekV2Config.from_dict({**COMMON, **SIZES[args.size]})
    model = DeepseekV2ForCausalLM(config).init_weights(std=0.02).eval().requires_grad_(False)
    prompt = torch.randint(
        0, config.vocab_size, (args.prompt_len,), generator=torch.Generator().manual_seed(0)
    ).tolist()
    ways = {
        "stripped": None,
        "none": Recording.off(),
        "default": Recording(),
        "attention": Recording(attention="full", queries=True, attention_layers=[config.num_hidden_layers - 1]),
    }
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.size}: hidden {config.hidden_size}, "
        f"{config.num_hidden_layers} layers, {config.n_routed_experts} experts top-{config.num_experts_per_tok}"
    )
    print(f"command: {shlex.join([sys.executable.rsplit('/', 1)[-1], *sys.argv])}")
    for record in ways.values():  # warm-up
        decode_rate(model, prompt, 4, record)
    rates: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.repeats):
        for name, record in ways.items():
            rates[name].append(decode_rate(model, prompt, args.new_tokens, record))
    base = statistics.median(rates["none"])
    print(f"\n{'recording':<12}{'decode tok/s':>14}{'vs none':>10}{'overhead':>10}")
    for name in ways:
        r = statistics.median(rates[name])
        print(f"{name:<12}{r:>14.1f}{r / base:>10.3f}{base / r - 1:>+10.1%}")
    overhead = base / statistics.median(rates["default"]) - 1
    verdict = "PASS" if overhead <= TARGET_DEFAULT_OVERHEAD else "MISS"
    print(f"\ndefault recording overhead {overhead:+.1%} (target <= {TARGET_DEFAULT_OVERHEAD:.0%}): {verdict}")


if __name__ == "__main__":
    main()
