"""Decode and prefill against this machine's limit, and against transformers on the same weights, in one run.

The limit is measured in the same run, with the same threads: a plain read (sum of a large tensor), a
decode-shaped matrix-vector product ((1, D) x (D, V) linear over weights far larger than the caches) and a
GEMM ((T, D) x (D, O)). Batch-1 decoding reads every active weight once per token (the non-expert
weights, K/E of the routed experts, one row of the embedding) plus the latent cache, so its limit is the
GEMV bandwidth over those bytes; prefill is compute-bound, so its limit is the GEMM rate over
2 x active parameters + attention FLOPs per token.

For each cache length it alternates, every repeat, dsv2viz's generate with Recording.off(), dsv2viz's
generate with the default Recording() and transformers' greedy loop on the same weights (medians):
decode tokens/s over the steps after the first (the prefill excluded), and prefill tokens/s of one prompt
(full logits) through each model's forward. dsv2viz decodes through its fast path (compiled unless
--no-compile); the first generation's compile time is reported. --profile prints where the time of a
decoding step and of a prefill goes (torch.profiler, top operators by self CPU time).

    python benchmarks/bench_roofline.py [--size medium] [--cache-lens 256 2048] [--decode-steps 32] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from bench_model import build_reference, check_parity

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, installed or not
import dsv2viz
from dsv2viz.model import MoE
from dsv2viz.traces import Recording

TARGETS = {
    "decode_roofline_256": 0.80,  # decode, default Recording, fraction of the GEMV roofline at a 256-token cache
    "decode_vs_hf_256": 2.0,
    "decode_vs_hf_2048": 3.0,
    "prefill_vs_hf_2048": 1.3,
    "prefill_roofline_2048": 0.50,  # fraction of the measured GEMM FLOP rate
    "recording_overhead": 0.05,  # default Recording against Recording.off() on the fast path
    "compile_seconds": 60.0,
}


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def machine_limits(dim: int, repeats: int) -> dict[str, float]:
    """Read bandwidth, decode-shaped GEMV bandwidth (bytes/s) and GEMM rate (FLOP/s), fp32, this process's threads."""
    return {"read": _read_bandwidth(repeats), "gemv": _gemv_bandwidth(dim, repeats), "gemm": _gemm_rate(dim, repeats)}


def _read_bandwidth(repeats: int) -> float:
    big = torch.randn(64 * 2**20)  # 256 MiB
    return big.nbytes / median_seconds(big.sum, repeats)


def _gemv_bandwidth(dim: int, repeats: int) -> float:
    """(1, D) x (D, V) products over four 64 MiB weight matrices in turn, so none finds its weights in a cache."""
    weights = [torch.randn(16 * 2**20 // dim, dim) for _ in range(4)]
    x = torch.randn(1, dim)
    return 4 * weights[0].nbytes / median_seconds(lambda: [F.linear(x, w) for w in weights], repeats)


def model_gemv_rate(model: dsv2viz.DeepseekV2ForCausalLM, repeats: int) -> float:
    """Tokens/s if a decoded token cost nothing but its matrix-vector products: F.linear over each weight matrix
    it reads (K routed experts per MoE layer), at the model's own shapes, one after the other."""
    c, weights = model.config, [model.lm_head.weight]
    for block in model.model.layers:
        weights += [p for name, p in block.named_parameters() if p.dim() == 2 and ".experts." not in name]
        if isinstance(block.mlp, MoE):
            for expert in list(block.mlp.experts)[: c.num_experts_per_tok]:
                weights += [expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight]
    xs = {w.shape[1]: torch.randn(1, w.shape[1]) for w in weights}
    with torch.no_grad():
        return 1 / median_seconds(lambda: [F.linear(xs[w.shape[1]], w) for w in weights], repeats)


def _gemm_rate(dim: int, repeats: int) -> float:
    a, w = torch.randn(2048, dim), torch.randn(4 * dim, dim)
    return 2 * a.shape[0] * dim * w.shape[0] / median_seconds(lambda: F.linear(a, w), repeats)


def active_per_token(model: dsv2viz.DeepseekV2ForCausalLM) -> tuple[int, int]:
    """(bytes of weights one decoded token reads, weight parameters one token multiplies by)."""
    c = model.config
    routed = sum(p.numel() for b in model.model.layers if isinstance(b.mlp, MoE) for p in b.mlp.experts.parameters())
    embedding = model.model.embed_tokens.weight.numel()
    total = sum(p.numel() for p in model.parameters())
    params = total - embedding - routed + routed * c.num_experts_per_tok // c.n_routed_experts
    return (params + c.hidden_size) * model.dtype.itemsize, params


def attention_flops(config, tokens: int) -> float:
    """Attention score and weighting FLOPs per token of a causal prompt of `tokens` (keys seen: (T+1)/2 on average)."""
    c = config
    per_key = c.num_attention_heads * (c.qk_head_dim + c.v_head_dim)
    return 2 * per_key * c.num_hidden_layers * (tokens + 1) / 2


def decode_ours(model, ids: list[int], steps: int, record: Recording) -> float:
    """Decode tokens/s through model.generate: the steps after the first, timed as they are yielded."""
    stamps = [time.perf_counter() for _ in model.generate(ids, steps, record=record, stop_tokens=())]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def decode_reference(ref, ids: torch.Tensor, steps: int) -> float:
    with torch.no_grad():
        out = ref(ids, use_cache=True)
        cache, next_id = out.cache, out.logits[:, -1:].argmax(-1)
        stamps = []
        for _ in range(steps):
            out = ref(next_id, cache=cache, use_cache=True)
            next_id = out.logits[:, -1:].argmax(-1)
            stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def prefill(fn: Callable[[], object], tokens: int) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        fn()
    return tokens / (time.perf_counter() - start)


def profile(model, ids: list[int], steps: int) -> None:
    from torch.profiler import profile as torch_profile

    gen = iter(model.generate(ids, steps + 1, record=Recording(), stop_tokens=()))
    next(gen)
    with torch_profile() as prof:
        for _ in gen:
            pass
    print(f"\nprofile: {steps} decoding steps, default Recording, cache {len(ids)} (top operators by self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    with torch_profile() as prof, torch.no_grad():
        model(torch.tensor([ids]), model.new_cache(1, len(ids)))
    print(f"\nprofile: prefill of {len(ids)} tokens (top operators by self CPU time)")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", default="medium")
    parser.add_argument("--cache-lens", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-compile", action="store_true", help="run dsv2viz's fast path uncompiled")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--warm-cache", action="store_true", help="keep inductor's disk cache (default: a fresh one)")
    args = parser.parse_args()
    if not args.warm_cache:  # report a first compile, not one served by inductor's disk cache
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_roofline_inductor_")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()
    load_before = os.getloadavg()
    print(f"command: {shlex.join(['python', *sys.argv])}")
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs; load average {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}"
    )

    ref = build_reference(args.size)
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours = dsv2viz.load(folder, device="cpu", dtype=torch.float32, progress=False, compile=not args.no_compile)
    c = ours.config
    with torch.inference_mode():
        print(f"parity with transformers: max |logit diff| {check_parity(ref, ours, c.vocab_size):.1e}")

    limits = machine_limits(c.hidden_size, max(5, args.repeats))
    weight_bytes, params = active_per_token(ours)
    cache_bytes = c.kv_cache_bytes_per_token(ours.dtype.itemsize)
    print(
        f"machine: read {limits['read'] / 1e9:.1f} GB/s, decode-shaped GEMV {limits['gemv'] / 1e9:.1f} GB/s, "
        f"GEMM {limits['gemm'] / 1e9:.1f} GFLOP/s (fp32)"
    )
    print(
        f"model ({args.size}): {sum(p.numel() for p in ours.parameters()) / 1e6:.1f}M parameters, "
        f"{params / 1e6:.1f}M active per token = {weight_bytes / 1e6:.1f} MB read per decoded token "
        f"+ {cache_bytes:,} cache bytes per cached token"
    )

    gemv_only = model_gemv_rate(ours, max(5, args.repeats))
    print(
        f"the model's own matrix-vector products alone: {gemv_only:.1f} tok/s "
        f"({gemv_only * weight_bytes / 1e9:.1f} GB/s, {gemv_only * weight_bytes / limits['gemv']:.0%} of the GEMV roofline)"
    )

    warm = list(range(1, 9))
    start = time.perf_counter()
    gen = ours.generate(warm, 2, record=Recording.off(), stop_tokens=())
    gen.run()
    gen_default = ours.generate(warm, 2, record=Recording(), stop_tokens=())
    gen_default.run()
    compile_s = (gen.compile_seconds or 0) + (gen_default.compile_seconds or 0)
    print(
        f"fast path: {'compiled' if ours.compile_decode else 'uncompiled'}; first generations "
        f"{time.perf_counter() - start:.1f} s, of which compiling {compile_s:.1f} s (off and default plans)"
    )

    rows, results = [], {}
    for S in args.cache_lens:
        ids = torch.randint(0, c.vocab_size, (1, S), generator=torch.Generator().manual_seed(S))
        runs: dict[str, Callable[[], tuple[float, float]]] = {
            "off": lambda ids=ids, S=S: (
                prefill(lambda: ours(ids, ours.new_cache(1, S)), S),
                decode_ours(ours, ids[0].tolist(), args.decode_steps, Recording.off()),
            ),
            "default": lambda ids=ids: (
                float("nan"),
                decode_ours(ours, ids[0].tolist(), args.decode_steps, Recording()),
            ),
            "transformers": lambda ids=ids, S=S: (
                prefill(lambda: ref(ids), S),
                decode_reference(ref, ids, args.decode_steps),
            ),
        }
        for run in runs.values():  # warm-up
            run()
        got: dict[str, list[tuple[float, float]]] = {n: [] for n in runs}
        for r in range(args.repeats):
            for name in sorted(runs, reverse=r % 2 == 1):  # alternate the order: all share the machine's drift
                got[name].append(runs[name]())
        med = {n: (statistics.median(p for p, _ in v), statistics.median(d for _, d in v)) for n, v in got.items()}
        results[S] = med
        decode_limit = limits["gemv"] / (weight_bytes + cache_bytes * (S + args.decode_steps // 2))
        prefill_limit = limits["gemm"] / (2 * params + attention_flops(c, S))
        hf_p, hf_d = med["transformers"]
        for name, label in (("off", "Recording.off()"), ("default", "Recording()")):
            rows.append(
                (
                    str(S),
                    "decode",
                    label,
                    med[name][1],
                    hf_d,
                    med[name][1] / hf_d,
                    decode_limit,
                    med[name][1] / decode_limit,
                )
            )
        rows.append(
            (
                str(S),
                "prefill",
                "(forward)",
                med["off"][0],
                hf_p,
                med["off"][0] / hf_p,
                prefill_limit,
                med["off"][0] / prefill_limit,
            )
        )
        rows.append((str(S), "decode", "transformers", hf_d, hf_d, 1.0, decode_limit, hf_d / decode_limit))

    load_after = os.getloadavg()
    print(f"\nload average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(
        "\n| cache | phase | recording | dsv2viz tok/s | transformers tok/s | vs transformers | limit tok/s | of limit |"
    )
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for S, phase, label, ours_rate, hf_rate, ratio, limit, frac in rows:
        if label == "transformers":
            print(f"| {S} | {phase} | transformers | {hf_rate:.1f} | | | {limit:.1f} | {frac:.0%} |")
            continue
        print(
            f"| {S} | {phase} | {label} | {ours_rate:.1f} | {hf_rate:.1f} | {ratio:.2f}x | {limit:.1f} | {frac:.0%} |"
        )

    print("\ntargets")
    checks = []
    if 256 in results:
        d = results[256]["default"][1]
        limit = limits["gemv"] / (weight_bytes + cache_bytes * (256 + args.decode_steps // 2))
        checks.append(
            (
                f"decode, default Recording, cache 256: {d / limit:.0%} of the GEMV roofline (>= 80%)",
                d / limit >= TARGETS["decode_roofline_256"],
            )
        )
        ratio = d / results[256]["transformers"][1]
        checks.append(
            (
                f"decode, default Recording, cache 256: {ratio:.2f}x transformers (>= 2x)",
                ratio >= TARGETS["decode_vs_hf_256"],
            )
        )
    if 2048 in results:
        ratio = results[2048]["default"][1] / results[2048]["transformers"][1]
        checks.append(
            (
                f"decode, default Recording, cache 2048: {ratio:.2f}x transformers (>= 3x)",
                ratio >= TARGETS["decode_vs_hf_2048"],
            )
        )
        p_ratio = results[2048]["off"][0] / results[2048]["transformers"][0]
        checks.append(
            (f"prefill 2048: {p_ratio:.2f}x transformers (>= 1.3x)", p_ratio >= TARGETS["prefill_vs_hf_2048"])
        )
        frac = results[2048]["off"][0] / (limits["gemm"] / (2 * params + attention_flops(c, 2048)))
        checks.append(
            (f"prefill 2048: {frac:.0%} of the GEMM FLOP rate (>= 50%)", frac >= TARGETS["prefill_roofline_2048"])
        )
    for S, med in results.items():
        overhead = med["off"][1] / med["default"][1] - 1
        checks.append(
            (
                f"default Recording overhead on the fast path, cache {S}: {overhead:+.1%} (<= 5%)",
                overhead <= TARGETS["recording_overhead"],
            )
        )
    if ours.compile_decode:
        checks.append((f"compile time: {compile_s:.1f} s (<= 60 s)", compile_s <= TARGETS["compile_seconds"]))
    for text, ok in checks:
        print(f"  {verdict(ok)}  {text}")

    if args.profile:
        profile(ours, torch.randint(0, c.vocab_size, (256,)).tolist(), 16)


if __name__ == "__main__":
    main()
