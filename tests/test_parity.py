"""Parity with transformers' DeepseekV2ForCausalLM (5.24+), the reference implementation.

Each case saves a random tiny reference model with `save_pretrained`, loads the folder with
`dsv2viz.load`, and compares fp32 logits (atol 1e-4) and the top-k expert set of every token in every
MoE layer. Prompts are 100 tokens, past the 64-token original context, so YaRN's interpolated
frequencies are exercised.
"""

from __future__ import annotations

import pytest
import torch
from conftest import rewrite_config_in_deepseek_format

import dsv2viz

ATOL = 1e-4

CASES = {
    "lite_like": {},
    "q_lora": {"q_lora_rank": 24},
    "group_limited": {
        "topk_method": "group_limited_greedy",
        "n_group": 4,
        "topk_group": 2,
        "routed_scaling_factor": 2.5,
    },
    "two_dense_layers": {"first_k_dense_replace": 2, "num_hidden_layers": 4, "routed_scaling_factor": 0.7},
}


def reference_topk(hf_model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """Reference logits and, per MoE layer, the sorted expert indices its router chose (B*T, K)."""
    chosen: dict[int, torch.Tensor] = {}
    handles = []
    for i, layer in enumerate(hf_model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if gate is not None and hasattr(gate, "topk_method"):
            handles.append(
                gate.register_forward_hook(lambda m, a, out, i=i: chosen.__setitem__(i, out[2].sort(-1).values))
            )
    try:
        with torch.no_grad():
            logits = hf_model(ids).logits
    finally:
        for h in handles:
            h.remove()
    return logits, chosen


def ours_topk(model, ids: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    logits, cache = model.run_with_cache(ids, names_filter="*.mlp.gate.hook_topk_idx")
    chosen = {int(name.split(".")[2]): t.flatten(0, 1).sort(-1).values for name, t in cache.items()}
    return logits, chosen


@pytest.mark.parametrize("case", list(CASES))
def test_logits_and_routing_match_transformers(hf_checkpoint, case):
    hf_model, folder = hf_checkpoint(seed=1, **CASES[case])
    model = dsv2viz.load(folder, device="cpu", dtype=torch.float32, progress=False)
    ids = torch.randint(0, hf_model.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))

    ref_logits, ref_chosen = reference_topk(hf_model, ids)
    logits, chosen = ours_topk(model, ids)

    assert logits.shape == ref_logits.shape
    torch.testing.assert_close(logits, ref_logits, atol=ATOL, rtol=0)
    assert sorted(chosen) == sorted(ref_chosen) == model.config.moe_layers
    for layer in chosen:
        assert torch.equal(chosen[layer], ref_chosen[layer]), f"layer {layer} routes differently"


def test_both_attention_paths_match_reference(hf_checkpoint):
    """The fused (naive) and latent (absorb) paths each reproduce the reference on a full prompt."""
    hf_model, folder = hf_checkpoint(seed=2, q_lora_rank=24)
    model = dsv2viz.load(folder, device="cpu", dtype=torch.float32, progress=False)
    ids = torch.randint(0, hf_model.config.vocab_size, (1, 80), generator=torch.Generator().manual_seed(1))
    ref, _ = reference_topk(hf_model, ids)
    for impl in ("naive", "absorb"):
        model.set_attention_impl(impl)
        with torch.no_grad():
            out = model(ids)
        assert (out - ref).abs().max() < ATOL, impl


def test_deepseek_config_spelling_gives_same_logits(hf_checkpoint):
    """The same weights with config.json in DeepSeek's original spelling load and give the same logits."""
    _, folder = hf_checkpoint(seed=3, topk_method="group_limited_greedy", n_group=2, topk_group=1)
    ids = torch.randint(0, 320, (1, 90), generator=torch.Generator().manual_seed(2))
    before = dsv2viz.load(folder, device="cpu", dtype=torch.float32, progress=False)
    rewrite_config_in_deepseek_format(folder)
    after = dsv2viz.load(folder, device="cpu", dtype=torch.float32, progress=False)
    assert "rope_parameters" not in (folder / "config.json").read_text()
    assert after.config == before.config
    with torch.no_grad():
        assert torch.equal(before(ids), after(ids))


def test_bf16_on_cpu_stays_close_to_fp32_reference(hf_checkpoint):
    """bf16 works on CPU; its logits stay within bf16's resolution of the fp32 reference."""
    hf_model, folder = hf_checkpoint(seed=4)
    model = dsv2viz.load(folder, device="cpu", dtype=torch.bfloat16, progress=False)
    assert model.dtype == torch.bfloat16
    ids = torch.randint(0, 320, (1, 40), generator=torch.Generator().manual_seed(3))
    ref, _ = reference_topk(hf_model, ids)
    with torch.no_grad():
        out = model(ids).float()
    err = (out - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item(), err
