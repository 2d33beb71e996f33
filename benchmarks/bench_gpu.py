"""Full-size DeepSeek-V2-Lite shapes on one GPU, random bf16 weights: memory, prefill and decode speed.

The real checkpoint cannot be downloaded here, so this builds the V2-Lite preset on the meta device,
materializes it on the GPU with random normal weights (the same 15.7B parameters, 29.3 GiB in bf16)
and measures what the weights do not change: peak GPU memory, prefill tokens/s, batch-1 decode
tokens/s at several cache lengths, the latent cache's bytes per token, and the cost of the default
trace recording during decoding (the "+recording" column: how much slower decoding is with
``Recording()`` than with ``Recording.off()``). Random weights route arbitrarily but spread tokens over experts, so
the MoE dispatch does realistic work.

    python benchmarks/bench_gpu.py                      # on a GPU machine (prints one table)
    python benchmarks/bench_gpu.py --tiny --device cpu  # a dry run of the script on a small config
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dsv2viz import DEEPSEEK_V2_LITE, DeepseekV2ForCausalLM
from dsv2viz.random_checkpoint import TINY_CONFIG
from dsv2viz.traces import Recording


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def materialize(config, device: torch.device, dtype: torch.dtype) -> DeepseekV2ForCausalLM:
    """The model built on meta, then given random weights directly on `device` (no host copy)."""
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config)
    model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.1 if name.endswith("gate.weight") else 0.02, generator=gen)
    return model.to(dtype).eval().requires_grad_(False)


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of `fn()` over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the small random-checkpoint config, for a dry run")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    config = TINY_CONFIG if args.tiny else DEEPSEEK_V2_LITE
    dtype = torch.bfloat16

    model = materialize(config, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}; {params:,} parameters in {dtype}")
    if device.type == "cuda":
        print(f"weights on GPU: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB")
    vocab = config.vocab_size
    print(
        f"\n{'context':>8}{'prefill tok/s':>15}{'decode tok/s':>14}{'+recording':>12}{'peak GiB':>10}{'cache MiB':>11}"
    )
    for S in args.contexts:
        if S + args.decode_steps > config.max_position_embeddings:
            continue
        ids = torch.randint(0, vocab, (1, S), device=device, generator=torch.Generator(device=device).manual_seed(S))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def prefill(ids: torch.Tensor = ids, S: int = S) -> None:
            model(ids, model.new_cache(1, S + args.decode_steps), last_only=True)

        prefill_s = timed(prefill, device, args.repeats)

        def decode(record: Recording, ids: torch.Tensor = ids) -> float:
            """Greedy decode tokens/s through model.generate after a prefill of S tokens (prefill excluded)."""
            stamps = []
            for _ in model.generate(ids[0].tolist(), args.decode_steps, record=record, stop_tokens=()):
                sync(device)
                stamps.append(time.perf_counter())
            return (len(stamps) - 1) / (stamps[-1] - stamps[0])

        plain = statistics.median(decode(Recording.off()) for _ in range(args.repeats))
        recorded = statistics.median(decode(Recording()) for _ in range(args.repeats))
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        cache_mib = config.kv_cache_bytes_per_token(2) * (S + args.decode_steps) / 2**20
        print(
            f"{S:>8}{S / prefill_s:>15.0f}{plain:>14.1f}{plain / recorded - 1:>+12.1%}{peak:>10.2f}{cache_mib:>11.1f}"
        )
    print(
        f"\nlatent cache: {config.kv_cache_bytes_per_token(2):,} bytes/token in bf16 "
        f"({config.mha_cache_bytes_per_token(2) / config.kv_cache_bytes_per_token(2):.1f}x less than a standard cache)"
    )


if __name__ == "__main__":
    main()
