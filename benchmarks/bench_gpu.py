"""Full-size DeepSeek-V2-Lite shapes on one GPU, random bf16 weights: prefill, decode speed and its share of HBM bandwidth.

The real checkpoint cannot be downloaded here, so this builds the V2-Lite preset on the meta device and
materializes it on the GPU in bf16 with random normal weights (the same 15.7B parameters, 29.3 GiB; the
routed experts stacked as ``dsv2viz.load`` stacks them). It measures, per cache length: prefill tokens/s,
batch-1 greedy decode tokens/s through ``model.generate`` on the fast path (compiled: CUDA graphs) with
routing recorded (the default ``Recording()``) and with nothing recorded, the eager path for comparison,
and decode as a fraction of the HBM bandwidth measured in the same run (bytes a decoded token must read,
active weights plus the latent cache, times tokens/s, over the bandwidth of a plain read). Random weights
route arbitrarily but spread tokens over experts, so the MoE does realistic work.

    python benchmarks/bench_gpu.py                      # on a GPU machine (prints one table)
    python benchmarks/bench_gpu.py --tiny --device cpu  # a dry run of the script on a small config
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, installed or not
from dsv2viz import DEEPSEEK_V2_LITE, DeepseekV2ForCausalLM
from dsv2viz.model import MoE
from dsv2viz.random_checkpoint import TINY_CONFIG
from dsv2viz.traces import Recording


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def materialize(config, device: torch.device, dtype: torch.dtype) -> DeepseekV2ForCausalLM:
    """The model built on meta, allocated on `device` in `dtype` (no fp32 or host copy), experts stacked, then
    given random weights in place."""
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config)
    model = model.to(dtype).to_empty(device=device).eval().requires_grad_(False)
    model.stack_experts()
    gen = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.normal_(0.0, 0.1 if name.endswith("gate.weight") else 0.02, generator=gen)
    return model


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


def read_bandwidth(device: torch.device, repeats: int, nbytes: int) -> float:
    """Bytes/s of a plain read (a sum) of a `nbytes` tensor on the device."""
    big = torch.ones(nbytes // 2, dtype=torch.bfloat16, device=device)
    return big.nbytes / timed(lambda: big.sum(), device, repeats)


def bytes_per_token(model: DeepseekV2ForCausalLM, context: int) -> int:
    """Bytes one decoded token reads: every non-expert weight (one embedding row), K/E of the routed experts,
    and the latent cache of `context` tokens."""
    c = model.config
    routed = sum(p.numel() for b in model.model.layers if isinstance(b.mlp, MoE) for p in b.mlp.experts.parameters())
    embedding = model.model.embed_tokens.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    active = total - embedding + c.hidden_size - routed + routed * c.num_experts_per_tok // c.n_routed_experts
    return active * model.dtype.itemsize + c.kv_cache_bytes_per_token(model.dtype.itemsize) * context


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="the small random-checkpoint config, for a dry run")
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 4096, 16384])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    config = TINY_CONFIG if args.tiny else DEEPSEEK_V2_LITE
    dtype = torch.bfloat16

    model = materialize(config, device, dtype)
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    hbm = read_bandwidth(device, args.repeats, 2**30 if not args.tiny else 2**26)
    print(f"{name}, torch {torch.__version__}; {params:,} parameters in {dtype}")
    if device.type == "cuda":
        print(f"weights on GPU: {torch.cuda.memory_allocated(device) / 2**30:.2f} GiB")
    print(f"measured read bandwidth: {hbm / 1e9:.0f} GB/s")

    start = time.perf_counter()
    warm = model.generate(list(range(8)), 3, record=Recording(), stop_tokens=())
    warm.run()
    warm_off = model.generate(list(range(8)), 3, record=Recording.off(), stop_tokens=())
    warm_off.run()
    compiled = (warm.compile_seconds or 0) + (warm_off.compile_seconds or 0)
    print(
        f"fast path {warm.decode_path}; first generations {time.perf_counter() - start:.1f} s, "
        f"of which compiling {compiled:.1f} s"
    )

    vocab = config.vocab_size
    header = ("context", "prefill tok/s", "decode tok/s", "of HBM", "no recording", "eager", "peak GiB", "cache MiB")
    print("\n" + "".join(f"{h:>14}" for h in header))
    for S in args.contexts:
        if S + args.decode_steps > config.max_position_embeddings:
            continue
        ids = torch.randint(0, vocab, (1, S), device=device, generator=torch.Generator(device=device).manual_seed(S))
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        def prefill(ids: torch.Tensor = ids, S: int = S) -> None:
            with torch.no_grad():
                model(ids, model.new_cache(1, S + args.decode_steps), last_only=True)

        prefill_s = timed(prefill, device, args.repeats)

        def decode(record: Recording, eager: bool = False, ids: torch.Tensor = ids) -> float:
            """Greedy decode tokens/s through model.generate after a prefill of S tokens (prefill excluded)."""
            stamps = []
            with model.hooks([("model.hook_embed", lambda x, h: None)]) if eager else contextlib.nullcontext():
                for _ in model.generate(ids[0].tolist(), args.decode_steps, record=record, stop_tokens=()):
                    sync(device)
                    stamps.append(time.perf_counter())
            return (len(stamps) - 1) / (stamps[-1] - stamps[0])

        recorded = statistics.median(decode(Recording()) for _ in range(args.repeats))
        plain = statistics.median(decode(Recording.off()) for _ in range(args.repeats))
        eager = statistics.median(decode(Recording(), eager=True) for _ in range(max(1, args.repeats // 2)))
        share = recorded * bytes_per_token(model, S + args.decode_steps // 2) / hbm
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
        cache_mib = config.kv_cache_bytes_per_token(2) * (S + args.decode_steps) / 2**20
        cells = (f"{S}", f"{S / prefill_s:.0f}", f"{recorded:.1f}", f"{share:.2%}", f"{plain:.1f}")
        cells += (f"{eager:.1f}", f"{peak:.2f}", f"{cache_mib:.1f}")
        print("".join(f"{cell:>14}" for cell in cells))
    print(
        "\ndecode tok/s: fast path with the default Recording (routing, latents, norms, top logits); of HBM: its bytes"
        " per token x tok/s over the measured read bandwidth; no recording: Recording.off(); eager: the hook-point"
        " path (a hook in scope)."
    )
    print(
        f"latent cache: {config.kv_cache_bytes_per_token(2):,} bytes/token in bf16 "
        f"({config.mha_cache_bytes_per_token(2) / config.kv_cache_bytes_per_token(2):.1f}x less than a standard cache)"
    )


if __name__ == "__main__":
    main()
