"""The bundled demo model: it loads by default, beats a unigram model, uses every expert, and writes Python-like text.

The held-out split is recomputed here from the standard library exactly as scripts/train_demo.py made
it (same path-hash rule), so these checks measure the shipped weights, not numbers the training wrote.
"""

from __future__ import annotations

import keyword
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import dsv2viz
from dsv2viz import analysis

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from train_demo import corpus

DEMO = Path(dsv2viz.__file__).parent / "demo_model"


def test_load_without_a_path_gives_the_demo_model():
    model = dsv2viz.load(device="cpu", progress=False)
    assert model.config == dsv2viz.DeepseekV2Config.from_json(DEMO)
    assert model.tokenizer is not None and model.config.moe_layers and model.config.rope_scaling is not None
    assert (DEMO / "model.safetensors").stat().st_size < 20 * 2**20


def test_held_out_loss_is_well_below_unigram_and_every_expert_works():
    model = dsv2viz.load(device="cpu", progress=False)
    train_texts, held_texts = corpus()
    tok = model.tokenizer
    held = torch.tensor(tok.encode("\n".join(held_texts), add_bos=False)[:2049])
    with torch.no_grad():
        ce = F.cross_entropy(model(held[None, :-1])[0], held[1:]).item()
    counts = torch.zeros(model.config.vocab_size, dtype=torch.float64)
    for text in train_texts:
        counts += torch.bincount(
            torch.tensor(tok.encode(text, add_bos=False), dtype=torch.long), minlength=len(counts)
        ).double()
    unigram = float(-((counts + 1) / (counts + 1).sum()).log()[held[1:]].mean())
    assert ce < unigram - 1.0, (ce, unigram)

    trace = model.generate(held[:-1].tolist(), 1, record=dsv2viz.Recording()).run()
    share = analysis.expert_utilization(trace).counts.double() / len(trace)
    assert share.shape == (len(model.config.moe_layers), model.config.n_routed_experts)
    assert float(share.min()) >= 0.01, share.min(dim=1)


def test_greedy_generation_looks_like_python():
    model = dsv2viz.load(device="cpu", progress=False)
    text = model.generate("def fibonacci(n):", 60).run().generated_text
    words = set(text.replace("(", " ").replace(":", " ").split())
    assert len(words & set(keyword.kwlist)) >= 2, text
    assert any(line.startswith("    ") and line.strip() for line in text.splitlines()[1:]), text
