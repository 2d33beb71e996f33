"""Train the bundled demo model: DeepSeek-V2's architecture at toy size, on the Python standard library.

Every machine with Python has the corpus (the stdlib's own .py sources, found through sysconfig), so
the model can be rebuilt anywhere, on 2 CPU cores within about an hour. It keeps the whole architecture
(MLA with a compressed latent and a decoupled rope key, YaRN, a dense first layer, MoE layers with
shared and routed experts, top-k routing) and trains with DeepSeek-V2's sequence-level balance loss so
that no expert dies. Files whose path hashes into the last 5% are held out for evaluation.

    python scripts/train_demo.py --out dsv2viz/demo_model --minutes 50
    python scripts/train_demo.py --out /tmp/quick --minutes 1 --steps 20   # a smoke run

The output folder has the official checkpoint's layout (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json) plus training.json with the numbers a model card needs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sysconfig
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv2viz import DeepseekV2Config, DeepseekV2ForCausalLM
from dsv2viz.config import YarnRope
from dsv2viz.random_checkpoint import write_checkpoint
from dsv2viz.tokenizer import DEEPSEEK_BOS, DEEPSEEK_EOS, byte_level_bpe

HELD_OUT = 0.05  # fraction of files, chosen by path hash so the split never changes


def corpus() -> tuple[list[str], list[str]]:
    """(training texts, held-out texts): the stdlib's .py files, tests and site-packages excluded."""
    root = Path(sysconfig.get_paths()["stdlib"])
    train, held = [], []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/")) or "/test" in rel or "/tests/" in rel:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        bucket = int(hashlib.sha256(rel.encode()).hexdigest(), 16) % 1000
        (held if bucket < HELD_OUT * 1000 else train).append(text)
    return train, held


def demo_config(vocab_size: int, bos: int, eos: int) -> DeepseekV2Config:
    """V2-Lite's architecture scaled down to ~8M parameters (about 17 MB in bf16)."""
    return DeepseekV2Config(
        vocab_size=vocab_size,
        hidden_size=256,
        intermediate_size=688,
        moe_intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        kv_lora_rank=64,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=16,
        n_shared_experts=2,
        num_experts_per_tok=2,
        first_k_dense_replace=1,
        aux_loss_alpha=0.01,
        max_position_embeddings=4096,
        rope_scaling=YarnRope(factor=4.0, original_max_position_embeddings=1024, mscale=0.707, mscale_all_dim=0.707),
        bos_token_id=bos,
        eos_token_id=eos,
    )


def stream(tokenizer, texts: list[str], eos: int) -> torch.Tensor:
    """All texts' token ids in one stream, each file followed by EOS."""
    ids: list[int] = []
    for enc in tokenizer.encode_batch(texts):
        ids += enc.ids + [eos]
    return torch.tensor(ids)


@torch.no_grad()
def evaluate(model: DeepseekV2ForCausalLM, data: torch.Tensor, seq: int, max_batches: int = 16) -> float:
    """Mean next-token cross-entropy (nats) over up to `max_batches` x 8 held-out windows."""
    model.eval()
    n = min(max_batches * 8, (len(data) - 1) // seq)
    windows = data[: n * seq + 1]
    losses = []
    for start in range(0, n, 8):
        x = torch.stack([windows[i * seq : (i + 1) * seq] for i in range(start, min(start + 8, n))])
        y = torch.stack([windows[i * seq + 1 : (i + 1) * seq + 1] for i in range(start, min(start + 8, n))])
        losses.append(F.cross_entropy(model(x).flatten(0, 1), y.flatten()).item())
    model.train()
    return sum(losses) / len(losses)


def unigram_baseline(train: torch.Tensor, held: torch.Tensor, vocab: int) -> float:
    """Cross-entropy (nats) of the held-out tokens under the training unigram distribution (add-one smoothed)."""
    counts = torch.bincount(train, minlength=vocab).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[held].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=50.0, help="training time budget")
    parser.add_argument("--steps", type=int, default=100_000, help="stop after this many steps at the latest")
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    t_start = time.time()

    train_texts, held_texts = corpus()
    tokenizer = byte_level_bpe(train_texts, args.vocab, DEEPSEEK_BOS, DEEPSEEK_EOS)
    bos, eos = tokenizer.token_to_id(DEEPSEEK_BOS), tokenizer.token_to_id(DEEPSEEK_EOS)
    train, held = stream(tokenizer, train_texts, eos), stream(tokenizer, held_texts, eos)
    vocab = tokenizer.get_vocab_size()
    config = demo_config(vocab, bos, eos)
    model = DeepseekV2ForCausalLM(config).init_weights(std=0.02, seed=args.seed).train()
    print(
        f"corpus: {len(train_texts)} files / {len(train):,} tokens for training, {len(held_texts)} / {len(held):,} held out"
    )
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, vocab {vocab}")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    budget = args.minutes * 60
    gen = torch.Generator().manual_seed(args.seed)
    curve: list[dict] = []
    step, t_train = 0, time.time()
    while step < args.steps and time.time() - t_train < budget:
        progress = (time.time() - t_train) / budget
        lr = args.lr * min(1.0, (step + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(train) - args.seq - 1, (args.batch,), generator=gen)
        x = torch.stack([train[s : s + args.seq] for s in starts])
        y = torch.stack([train[s + 1 : s + args.seq + 1] for s in starts])
        ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        aux = model.aux_loss()
        loss = ce + aux if aux is not None else ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0 or step == 1:
            curve.append({"step": step, "seconds": round(time.time() - t_train, 1), "train_ce": round(ce.item(), 4)})
            print(
                f"step {step:5d}  {time.time() - t_train:7.0f}s  ce {ce.item():.3f}  aux {(aux.item() if aux is not None else 0.0):.4f}  lr {lr:.2e}"
            )

    held_ce = evaluate(model, held, args.seq)
    baseline = unigram_baseline(train, held, vocab)
    model.eval().requires_grad_(False)
    write_checkpoint(args.out, model, tokenizer, dtype=torch.bfloat16)
    summary = {
        "steps": step,
        "train_seconds": round(time.time() - t_train, 1),
        "total_seconds": round(time.time() - t_start, 1),
        "tokens_seen": step * args.batch * args.seq,
        "train_tokens": len(train),
        "held_out_tokens": len(held),
        "held_out_ce": round(held_ce, 4),
        "unigram_ce": round(baseline, 4),
        "args": vars(args),
        "curve": curve,
    }
    (Path(args.out) / "training.json").write_text(json.dumps(summary, indent=1) + "\n")
    print(
        f"held-out cross-entropy {held_ce:.3f} nats vs unigram {baseline:.3f} ({baseline - held_ce:.3f} lower); saved to {args.out}"
    )


if __name__ == "__main__":
    main()
