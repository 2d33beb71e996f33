"""Hook points: names, firing in prefill and decoding, reading and replacing, laziness, and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dsv2viz import HookError

ATTN = ["q_nope", "q_pe", "c_kv", "k_pe", "k_nope", "v", "scores_nope", "scores_rope", "scores", "pattern", "z", "out"]
GATE = ["logits", "probs", "topk_idx", "topk_weights"]


def test_names_follow_module_paths_and_cover_every_quantity(tiny_model):
    model = tiny_model()  # 3 layers, layer 0 dense, 8 experts
    names = set(model.hook_names())
    for layer in range(3):
        p = f"model.layers.{layer}."
        assert {p + h for h in ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "mlp.hook_out")} <= names
        assert {p + "self_attn.hook_" + a for a in ATTN} <= names
    for layer in (1, 2):
        p = f"model.layers.{layer}.mlp."
        assert {p + "gate.hook_" + g for g in GATE} <= names
        assert {p + f"experts.{e}.hook_out" for e in range(8)} <= names
        assert {p + "shared_experts.hook_out", p + "hook_routed_out"} <= names
    assert {"model.hook_embed", "model.hook_norm_out", "hook_logits"} <= names
    assert "model.layers.0.mlp.gate.hook_probs" not in names  # the dense layer has no router
    # exact count: per layer 3 resid + 12 attention + mlp out; per MoE layer 4 gate + 8 experts + shared + routed
    assert len(names) == 3 * (3 + 12 + 1) + 2 * (4 + 8 + 1 + 1) + 3
    # each name is a module path: its parent holds the checkpoint's weights
    params = set(dict(model.named_parameters()))
    assert "model.layers.1.mlp.experts.5.up_proj.weight" in params
    assert "model.layers.2.self_attn.kv_b_proj.weight" in params


def test_glob_selection_and_unknown_names(tiny_model):
    model = tiny_model()
    assert model.hook_names("*.gate.hook_topk_idx") == [
        "model.layers.1.mlp.gate.hook_topk_idx",
        "model.layers.2.mlp.gate.hook_topk_idx",
    ]
    assert len(model.hook_names("model.layers.1.mlp.experts.*.hook_out")) == 8
    assert model.hook_names(lambda n: n.endswith("hook_c_kv")) == [
        f"model.layers.{i}.self_attn.hook_c_kv" for i in range(3)
    ]
    with pytest.raises(KeyError, match=r"Did you mean.*hook_pattern"):
        model.hook_names("model.layers.1.self_attn.hook_patern")


def test_every_hook_fires_in_prefill_and_in_decoding(tiny_model):
    model = tiny_model()
    cache = model.new_cache()
    ids = torch.randint(0, 320, (1, 10))
    _, prefill = model.run_with_cache(ids, cache)
    _, decode = model.run_with_cache(ids[:, :1], cache)
    fired_every_time = set(model.hook_names()) - set(model.hook_names("*.experts.*.hook_out"))
    assert fired_every_time <= set(prefill) and fired_every_time <= set(decode)
    # in decoding, per-position tensors cover the one new token; keys and values cover all 11 positions
    assert decode["model.layers.1.self_attn.hook_c_kv"].shape == (1, 1, 32)
    assert decode["model.layers.1.self_attn.hook_v"].shape == (1, 11, 4, 12)
    assert decode["model.layers.1.self_attn.hook_pattern"].shape == (1, 4, 1, 11)
    # an expert's hook fires when it has tokens: exactly the experts the router chose
    for layer in (1, 2):
        chosen = set(prefill[f"model.layers.{layer}.mlp.gate.hook_topk_idx"].flatten().tolist())
        fired = {int(n.split(".")[5]) for n in prefill if n.startswith(f"model.layers.{layer}.mlp.experts.")}
        assert fired == chosen


@pytest.mark.parametrize("impl", ["naive", "absorb"])
def test_attention_hooks_are_consistent(tiny_model, impl):
    model = tiny_model()
    model.set_attention_impl(impl)
    ids = torch.randint(0, 320, (2, 9))
    _, a = model.run_with_cache(ids, names_filter="model.layers.1.*")
    p = "model.layers.1.self_attn."
    scores = a[p + "hook_scores"]
    torch.testing.assert_close(a[p + "hook_scores_nope"] + a[p + "hook_scores_rope"], scores, atol=0, rtol=0)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    expected = scores.masked_fill(~causal, float("-inf")).softmax(-1)
    torch.testing.assert_close(a[p + "hook_pattern"], expected, atol=1e-6, rtol=0)
    assert torch.all(a[p + "hook_pattern"].masked_select(~causal) == 0)
    # the rope part is q_pe . k_pe: recompute it from the roped hooks
    rope = torch.einsum("bthd,bsd->bhts", a[p + "hook_q_pe"], a[p + "hook_k_pe"]) * model.config.softmax_scale
    torch.testing.assert_close(a[p + "hook_scores_rope"], rope, atol=1e-6, rtol=0)
    # z is the pattern applied to v, head by head
    z = torch.einsum("bhts,bshv->bthv", a[p + "hook_pattern"], a[p + "hook_v"])
    torch.testing.assert_close(a[p + "hook_z"], z, atol=1e-5, rtol=0)
    # residual bookkeeping
    torch.testing.assert_close(
        a["model.layers.1.hook_resid_mid"], a["model.layers.1.hook_resid_pre"] + a[p + "hook_out"]
    )
    torch.testing.assert_close(
        a["model.layers.1.hook_resid_post"], a["model.layers.1.hook_resid_mid"] + a["model.layers.1.mlp.hook_out"]
    )


def test_both_paths_expose_the_same_per_head_tensors(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 320, (1, 12))
    names = ["*.hook_k_nope", "*.hook_v", "*.hook_pattern", "*.hook_scores_nope"]
    caches = {}
    for impl in ("naive", "absorb"):
        model.set_attention_impl(impl)
        _, caches[impl] = model.run_with_cache(ids, names_filter=names)
    assert set(caches["naive"]) == set(caches["absorb"])
    for name in caches["naive"]:
        torch.testing.assert_close(caches["naive"][name], caches["absorb"][name], atol=1e-5, rtol=0)


def test_moe_hooks_add_up(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 320, (2, 7))
    _, a = model.run_with_cache(ids, names_filter="model.layers.2.mlp.*")
    p = "model.layers.2.mlp."
    probs, idx, w = a[p + "gate.hook_probs"], a[p + "gate.hook_topk_idx"], a[p + "gate.hook_topk_weights"]
    torch.testing.assert_close(probs, a[p + "gate.hook_logits"].softmax(-1))
    assert torch.equal(idx, probs.topk(3, dim=-1).indices)  # greedy top-3, best first
    torch.testing.assert_close(w, probs.gather(-1, idx))  # routed_scaling_factor 1, no renormalization
    # the routed output is the weighted sum of each chosen expert's own output
    flat_idx, flat_w = idx.flatten(0, 1), w.flatten(0, 1)
    routed = torch.zeros(14, 64)
    for e in range(8):
        rows = (flat_idx == e).nonzero()  # (token, slot) pairs in token order
        if len(rows):
            out = a[p + f"experts.{e}.hook_out"]
            assert out.shape == (len(rows), 64)
            routed[rows[:, 0]] += out * flat_w[rows[:, 0], rows[:, 1], None]
    torch.testing.assert_close(a[p + "hook_routed_out"].flatten(0, 1), routed, atol=1e-6, rtol=0)
    torch.testing.assert_close(a[p + "hook_out"], a[p + "hook_routed_out"] + a[p + "shared_experts.hook_out"])


def test_replacing_topk_forces_routing(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 320, (1, 6))

    def force(idx, hook):
        return torch.tensor([5, 0, 7]).expand_as(idx)

    with model.hooks([("model.layers.1.mlp.gate.hook_topk_idx", force)]):
        _, a = model.run_with_cache(ids, names_filter="model.layers.1.mlp.*")
    fired = {int(n.split(".")[5]) for n in a if ".experts." in n}
    assert fired == {0, 5, 7}
    assert all(a[f"model.layers.1.mlp.experts.{e}.hook_out"].shape[0] == 6 for e in fired)
    torch.testing.assert_close(
        a["model.layers.1.mlp.gate.hook_topk_weights"][0, :, 0], a["model.layers.1.mlp.gate.hook_probs"][0, :, 5]
    )


def test_replaced_latent_is_what_the_cache_keeps_and_changes_the_output(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 320, (1, 8))
    cache = model.new_cache()
    with torch.no_grad():
        clean = model(ids)
        patched = model.run_with_hooks(
            ids, cache, fwd_hooks=[("model.layers.1.self_attn.hook_c_kv", lambda x, h: torch.zeros_like(x))]
        )
    assert torch.all(cache.c_kv[1, :, :8] == 0) and torch.any(cache.c_kv[2, :, :8] != 0)
    assert not torch.allclose(clean, patched)
    assert not any(h.active for h in model.hook_points.values())


def count_calls(module):
    calls = []
    handle = module.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


def test_per_head_keys_are_built_only_when_asked(tiny_model):
    """Latent decoding never decompresses keys and values unless a hook wants them."""
    model = tiny_model()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.randint(0, 320, (1, 5)), cache)
        calls, handle = count_calls(model.model.layers[1].self_attn.kv_b_proj)
        model(torch.tensor([[3]]), cache)
        assert calls == []
        model.run_with_hooks(
            torch.tensor([[4]]), cache, fwd_hooks=[("model.layers.1.self_attn.hook_v", lambda x, h: None)]
        )
        assert calls == [1]
        handle.remove()


def test_fused_attention_is_used_unless_the_pattern_is_asked_for(tiny_model, monkeypatch):
    model = tiny_model()
    calls = []
    real = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = torch.randint(0, 320, (1, 6))
    with torch.no_grad():
        plain = model(ids)
        assert len(calls) == 3
        calls.clear()
        with_pattern, _ = model.run_with_cache(ids, names_filter="*.hook_pattern")
        assert calls == []
    torch.testing.assert_close(plain, with_pattern, atol=1e-5, rtol=0)


def test_bad_replacement_and_failing_hook_leave_the_model_clean(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 320, (1, 5))
    with torch.no_grad():
        before = model(ids)
        with pytest.raises(
            HookError,
            match=r"returned shape \(1, 5\) float32 on cpu; a replacement must match the input, shape \(1, 5, 64\)",
        ):
            model.run_with_hooks(ids, fwd_hooks=[("model.layers.0.hook_resid_pre", lambda x, h: x[..., 0])])
        with pytest.raises(HookError, match=r"returned shape \(1, 5, 3\) int64 on cpu; .* shape \(1, 5, 3\) float32"):
            model.run_with_hooks(ids, fwd_hooks=[("model.layers.1.mlp.gate.hook_topk_weights", lambda x, h: x.long())])
        with pytest.raises(HookError, match="ZeroDivisionError"), model.hooks([("*.hook_z", lambda x, h: 1 / 0)]):
            model(ids)
        assert not any(h.active for h in model.hook_points.values())
        assert torch.equal(model(ids), before)


def test_activation_cache_selects_by_pattern_in_forward_order(tiny_model):
    model = tiny_model()
    _, acts = model.run_with_cache(torch.randint(0, 320, (1, 4)), names_filter=["*.hook_resid_post", "*.hook_c_kv"])
    assert len(acts) == 6
    assert list(acts.select("*.hook_resid_post")) == [f"model.layers.{i}.hook_resid_post" for i in range(3)]
    with pytest.raises(KeyError, match="was not captured; did you mean"):
        acts["model.layers.1.hook_resid_pre"]


def test_balance_loss_in_training_only_and_by_hand(tiny_model):
    from dsv2viz.model import balance_loss

    model = tiny_model().train().requires_grad_(True)
    ids = torch.randint(0, 320, (2, 9))
    _, acts = model.run_with_cache(ids, names_filter=["*.gate.hook_probs", "*.gate.hook_topk_idx"])
    total = 0.0
    for layer in (1, 2):
        probs = acts[f"model.layers.{layer}.mlp.gate.hook_probs"]
        idx = acts[f"model.layers.{layer}.mlp.gate.hook_topk_idx"]
        for b in range(2):  # by hand, sequence by sequence: f_i = share of the 9 x 3 choices x E / K
            f = torch.bincount(idx[b].flatten(), minlength=8).float() / (9 * 3) * 8
            total += 0.001 * float((f * probs[b].mean(0)).sum()) / 2
    loss = model.aux_loss()
    assert loss is not None and abs(loss.item() - total) < 1e-6
    loss.backward()
    assert model.model.layers[1].mlp.gate.weight.grad.abs().sum() > 0
    # even routing gives f = 1 for every expert and a loss of alpha; all tokens on K experts gives more
    even = torch.full((1, 8, 8), 1 / 8)
    assert float(balance_loss(even, torch.arange(8).view(1, 8, 1).expand(1, 8, 1), 1.0)) == pytest.approx(1.0)
    skewed = torch.tensor([[0.5, 0.5] + [0.0] * 6]).expand(1, 8, 8)
    assert float(balance_loss(skewed, torch.tensor([0, 1]).expand(1, 8, 2), 1.0)) == pytest.approx(4.0)
    model.eval()
    model(ids)
    assert model.aux_loss() is None
