"""Write MODEL_CARD.md and loss_curve.svg for a demo model trained by scripts/train_demo.py.

Reads the folder's training.json (loss curve, held-out and unigram cross-entropy), then measures on the
held-out split with dsv2viz itself: expert utilization per MoE layer (is any expert dead?) and greedy
samples from Python prompts.

    python scripts/model_card.py dsv2viz/demo_model
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_demo import corpus

import dsv2viz
from dsv2viz import analysis

PROMPTS = ["def fibonacci(n):", "class Stack:\n    def __init__(self):", "import os\n\ndef list_files(path):"]


def loss_svg(curve: list[dict], path: Path) -> None:
    """A small hand-drawn SVG line chart of training cross-entropy by step (no plotting dependency)."""
    w, h, pad = 640, 300, 48
    steps = [c["step"] for c in curve]
    ce = [c["train_ce"] for c in curve]
    lo, hi = min(ce), max(ce)

    def xy(s: float, v: float) -> str:
        x = pad + (s - steps[0]) / max(1, steps[-1] - steps[0]) * (w - 2 * pad)
        y = h - pad - (v - lo) / max(1e-9, hi - lo) * (h - 2 * pad)
        return f"{x:.1f},{y:.1f}"

    points = " ".join(xy(s, v) for s, v in zip(steps, ce))
    path.write_text(
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">'
        f'<rect width="{w}" height="{h}" fill="white"/>'
        f'<polyline points="{points}" fill="none" stroke="#1f77b4" stroke-width="2"/>'
        f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#444"/>'
        f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="#444"/>'
        f'<text x="{w / 2}" y="{h - 12}" text-anchor="middle">training step (last {steps[-1]})</text>'
        f'<text x="14" y="{h / 2}" transform="rotate(-90 14 {h / 2})" text-anchor="middle">train cross-entropy (nats)</text>'
        f'<text x="{pad + 4}" y="{pad - 6}">{hi:.2f}</text><text x="{pad + 4}" y="{h - pad - 6}">{lo:.2f}</text>'
        "</svg>\n"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    args = parser.parse_args()
    folder = Path(args.folder)
    info = json.loads((folder / "training.json").read_text())
    model = dsv2viz.load(folder, device="cpu", dtype=torch.float32, progress=False)
    c = model.config

    _, held_texts = corpus()
    ids = model.tokenizer.encode("\n".join(held_texts))[:4096]
    trace = model.generate(ids[:-1], 1, record=dsv2viz.Recording()).run()
    util = analysis.expert_utilization(trace)
    share = util.counts.double() / util.tokens  # fraction of held-out tokens routed to each expert
    samples = [model.generate(p, 60).run() for p in PROMPTS]
    loss_svg(info["curve"], folder / "loss_curve.svg")

    params = sum(p.numel() for p in model.parameters())
    gain = info["unigram_ce"] - info["held_out_ce"]
    rows = "\n".join(
        f"| {layer} | {float(share[i].min()):.1%} | {float(share[i].max()):.1%} | {float(util.cv[i]):.2f} |"
        for i, layer in enumerate(util.layers)
    )
    sample_text = "\n\n".join(f"```python\n{t.text.removeprefix(model.tokenizer.bos_token)}\n```" for t in samples)
    card = f"""# dsv2viz demo model

A {params / 1e6:.1f}M-parameter model with DeepSeek-V2-Lite's architecture, trained by
`scripts/train_demo.py` on the Python standard library's own sources, so that dsv2viz's notebooks,
dashboards and reports show experts and heads that have learned something without the 31 GB checkpoint.
It loads through the same `dsv2viz.load` path as the real model. It writes Python-looking text; it is
not a useful code model.

## Architecture

| | demo | DeepSeek-V2-Lite |
|---|---|---|
| layers (dense first) | {c.num_hidden_layers} ({c.first_k_dense_replace}) | 27 (1) |
| hidden | {c.hidden_size} | 2048 |
| heads, q_lora_rank | {c.num_attention_heads}, none | 16, none |
| latent c_kv + rope key (cached per token and layer) | {c.kv_lora_rank} + {c.qk_rope_head_dim} | 512 + 64 |
| head dims nope / rope / v | {c.qk_nope_head_dim} / {c.qk_rope_head_dim} / {c.v_head_dim} | 128 / 64 / 128 |
| routed experts, top-k, shared | {c.n_routed_experts}, {c.num_experts_per_tok}, {c.n_shared_experts} | 64, 6, 2 |
| expert width / dense width | {c.moe_intermediate_size} / {c.intermediate_size} | 1408 / 10944 |
| YaRN | factor {c.rope_scaling.factor:g} over {c.rope_scaling.original_max_position_embeddings} | factor 40 over 4096 |
| vocab (byte-level BPE trained on the corpus) | {c.vocab_size} | 102400 |

Weights are stored in bf16 ({(folder / "model.safetensors").stat().st_size / 2**20:.1f} MB).

## Training

Corpus: the `.py` files of Python's standard library (found through `sysconfig`; tests and
site-packages excluded), {info["train_tokens"]:,} training tokens; files whose path hashes into the last
5% are held out ({info["held_out_tokens"]:,} tokens). AdamW, cosine learning rate from
{info["args"]["lr"]:g}, batches of {info["args"]["batch"]} x {info["args"]["seq"]} tokens,
DeepSeek-V2's sequence-level balance loss with alpha {c.aux_loss_alpha:g}.
{info["steps"]:,} steps ({info["tokens_seen"]:,} tokens) in {info["train_seconds"] / 60:.0f} minutes
on 2 CPU cores ({info["total_seconds"] / 60:.0f} minutes with tokenizer training and evaluation).

![training loss](loss_curve.svg)

## Results

Held-out cross-entropy **{info["held_out_ce"]:.3f} nats/token** against **{info["unigram_ce"]:.3f}**
for a unigram model of the training tokens: {gain:.2f} nats lower, i.e. per held-out token the model gives on average (geometric mean)
{float(torch.tensor(gain).exp()):.1f}x the probability the unigram baseline gives.

Expert utilization on {util.tokens:,} held-out tokens (share of tokens routed to each expert; an even
load would be {c.num_experts_per_tok / c.n_routed_experts:.1%}, and no expert is dead below 1%):

| MoE layer | least-used expert | most-used expert | load CV |
|---|---|---|---|
{rows}

## Samples (greedy, 60 tokens)

{sample_text}
"""
    (folder / "MODEL_CARD.md").write_text(card)
    print(card)


if __name__ == "__main__":
    main()
