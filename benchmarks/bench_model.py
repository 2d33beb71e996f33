"""Benchmark dsv2viz's DeepseekV2ForCausalLM against transformers' on CPU: speed and KV-cache size.

Measures prefill tokens/s (one prompt, full logits), greedy decode tokens/s (one token at a time against
the cache) and KV-cache bytes per token, for a random model with DeepSeek-V2-Lite's proportions scaled
down to run in about a minute on two cores. Both implementations load the same saved weights and are checked
to give the same logits before anything is timed. Because shared CPUs are noisy, speed is reported as
a ratio against transformers measured in the same run, alternating the two implementations every
repeat and taking medians, rather than as absolute numbers or timed tests.

Decoding against a long cache is where latent attention pays: transformers re-expands every cached
token's keys and values at each step, dsv2viz attends in latent space. So the script measures at
several prompt lengths (default 256 and 2048 tokens) and reports each.

    python benchmarks/bench_model.py [--size small|medium] [--prompt-lens 256 2048] [--decode-steps 32]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers
from transformers import DeepseekV2Config as HFConfig
from transformers import DeepseekV2ForCausalLM as HFModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # measure this checkout, installed or not
from shapes import COMMON, SIZES

import dsv2viz

TARGETS = {"prefill": 1.5, "decode": 2.0}  # minimum speed-up over transformers


def build_reference(size: str) -> HFModel:
    """A random fp32 transformers model: normal(0, 0.02) weights, unit norms, wider router weights."""
    cfg = HFConfig(**COMMON, **SIZES[size], num_key_value_heads=SIZES[size]["num_attention_heads"])
    model = HFModel._from_config(cfg, attn_implementation="eager", dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.fill_(1.0)
            else:  # router logits of std ~3 spread tokens over the experts
                p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if name.endswith("gate.weight") else 0.02))
    return model


def check_parity(ref: HFModel, ours: dsv2viz.DeepseekV2ForCausalLM, vocab: int) -> float:
    """Max |logit difference| over a 32-token prompt and one cached decode step; asserts it is < 1e-3."""
    ids = torch.randint(0, vocab, (1, 33), generator=torch.Generator().manual_seed(1))
    out = ref(ids[:, :32], use_cache=True)
    ref_step = ref(ids[:, 32:], cache=out.cache, use_cache=True).logits
    cache = ours.new_cache(1, 33)
    diff = max(
        (ours(ids[:, :32], cache) - out.logits).abs().max().item(),
        (ours(ids[:, 32:], cache, last_only=True) - ref_step).abs().max().item(),
    )
    assert diff < 1e-3, f"dsv2viz and transformers disagree: max |logit diff| {diff:.2e}"
    return diff


def run_ours(model: dsv2viz.DeepseekV2ForCausalLM, ids: torch.Tensor, steps: int) -> tuple[float, float, int]:
    """(prefill seconds, decode seconds, cache bytes/token) for one prompt and `steps` greedy tokens."""
    t0 = time.perf_counter()
    cache = model.new_cache(1, ids.shape[1] + steps)
    logits = model(ids, cache)
    t1 = time.perf_counter()
    next_id = logits[:, -1:].argmax(-1)
    for _ in range(steps):
        next_id = model(next_id, cache, last_only=True)[:, -1:].argmax(-1)
    return t1 - t0, time.perf_counter() - t1, cache.bytes_per_token


def run_reference(model: HFModel, ids: torch.Tensor, steps: int) -> tuple[float, float, int]:
    """The same for transformers; cache bytes/token summed over every tensor its DynamicCache holds."""
    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    t1 = time.perf_counter()
    cache = out.cache
    nbytes = sum(t.nbytes for layer in cache.layers for t in (layer.keys, layer.values))
    next_id = out.logits[:, -1:].argmax(-1)
    for _ in range(steps):
        out = model(next_id, cache=cache, use_cache=True)
        next_id = out.logits[:, -1:].argmax(-1)
    return t1 - t0, time.perf_counter() - t1, nbytes // ids.shape[1]


def verdict(ratio: float, target: float) -> str:
    return f"target >= {target:.1f}x  {'PASS' if ratio >= target else 'MISS'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-lens", type=int, nargs="+", default=[256, 2048])
    parser.add_argument("--decode-steps", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--size", choices=sorted(SIZES), default="medium")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    transformers.utils.logging.disable_progress_bar()

    print(f"command: {shlex.join([sys.executable, *sys.argv])}")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads")
    ref = build_reference(args.size)
    c = ref.config
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        ours = dsv2viz.load(folder, device="cpu", dtype=torch.float32, progress=False)
    n_params = sum(p.numel() for p in ours.parameters())
    print(
        f"model ({args.size}): {n_params / 1e6:.1f}M params fp32, vocab {c.vocab_size}, hidden {c.hidden_size}, "
        f"{c.num_hidden_layers} layers ({c.first_k_dense_replace} dense), {c.num_attention_heads} heads, "
        f"kv_lora {c.kv_lora_rank}, qk {c.qk_nope_head_dim}+{c.qk_rope_head_dim}, v {c.v_head_dim}, "
        f"{c.n_routed_experts} experts top-{c.num_experts_per_tok} + {c.n_shared_experts} shared "
        f"(moe {c.moe_intermediate_size}, dense {c.intermediate_size}), YaRN x{c.rope_parameters['factor']:g}"
    )
    print(f"transformers: attn {c._attn_implementation}, experts {c._experts_implementation}")
    print(f"{args.decode_steps} decode steps, {args.repeats} repeats, batch 1")
    with torch.inference_mode():
        print(f"parity: max |logit diff| {check_parity(ref, ours, c.vocab_size):.1e} (< 1e-3)")
    mha = c.num_attention_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * c.num_hidden_layers * 4
    header = ("prompt", "metric (median)", "dsv2viz", "transformers", "standard MHA", "ours vs transformers")
    rows = []
    for prompt_len in args.prompt_lens:
        prefill, decode, kv = measure(ours, ref, prompt_len, args.decode_steps, args.repeats)
        p_ratio, d_ratio = prefill["ours"] / prefill["transformers"], decode["ours"] / decode["transformers"]
        rows += [
            (
                str(prompt_len),
                "prefill tok/s",
                f"{prefill['ours']:.1f}",
                f"{prefill['transformers']:.1f}",
                "",
                f"{p_ratio:.2f}x  {verdict(p_ratio, TARGETS['prefill'])}",
            ),
            (
                "",
                "decode tok/s",
                f"{decode['ours']:.2f}",
                f"{decode['transformers']:.2f}",
                "",
                f"{d_ratio:.2f}x  {verdict(d_ratio, TARGETS['decode'])}",
            ),
            (
                "",
                "KV bytes/token",
                f"{kv['ours']:,}",
                f"{kv['transformers']:,}",
                f"{mha:,}",
                f"{mha / kv['ours']:.1f}x smaller than standard MHA",
            ),
        ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


def measure(ours: dsv2viz.DeepseekV2ForCausalLM, ref: HFModel, prompt_len: int, steps: int, repeats: int):
    """Median prefill and decode tokens/s and KV bytes/token of both, alternating them every repeat."""
    ids = torch.randint(0, ref.config.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
    runners: dict[str, Callable[[], tuple[float, float, int]]] = {
        "ours": lambda: run_ours(ours, ids, steps),
        "transformers": lambda: run_reference(ref, ids, steps),
    }
    with torch.inference_mode():
        for run in runners.values():  # warm-up
            run()
        times: dict[str, list[tuple[float, float, int]]] = {name: [] for name in runners}
        for r in range(repeats):  # alternate which goes first, so both share the machine's drift
            for name in sorted(runners, reverse=r % 2 == 1):
                times[name].append(runners[name]())

    def rate(name: str, phase: int, tokens: int) -> float:
        return tokens / statistics.median(t[phase] for t in times[name])

    prefill = {n: rate(n, 0, prompt_len) for n in runners}
    decode = {n: rate(n, 1, steps) for n in runners}
    return prefill, decode, {n: times[n][0][2] for n in runners}


if __name__ == "__main__":
    main()
