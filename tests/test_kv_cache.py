"""The latent KV cache: incremental decoding equals one full forward pass, and the cache holds 576-style latents only."""

from __future__ import annotations

import pytest
import torch

from dsv2viz import DEEPSEEK_V2_LITE, HookError

ATOL = 1e-4


def decode_in_steps(model, ids: torch.Tensor, chunks: list[int]) -> torch.Tensor:
    """Feed ids through a cache in the given chunk sizes; concatenated logits (B, T, V)."""
    cache = model.new_cache(batch_size=ids.shape[0], capacity=4)  # small: forces the cache to grow
    outs, start = [], 0
    for n in chunks:
        outs.append(model(ids[:, start : start + n], cache))
        start += n
    assert start == ids.shape[1] and cache.length == start
    return torch.cat(outs, dim=1)


@pytest.mark.parametrize("impl", ["auto", "naive", "absorb"])
@pytest.mark.parametrize("q_lora", [None, 24])
def test_incremental_decoding_equals_full_forward(tiny_model, impl, q_lora):
    model = tiny_model(seed=1, q_lora_rank=q_lora)
    ids = torch.randint(0, 320, (2, 90), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        model.set_attention_impl(impl)
        steps = decode_in_steps(model, ids, [70] + [1] * 13 + [7])  # prefill past 64, single tokens, a chunk
    torch.testing.assert_close(steps, full, atol=ATOL, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cache_holds_exactly_latent_plus_rope_key(tiny_model, dtype):
    model = tiny_model().to(dtype)
    cfg = model.config
    cache = model.new_cache(batch_size=3, capacity=1)
    with torch.no_grad():
        model(torch.randint(0, 320, (3, 17)), cache)
    itemsize = torch.tensor([], dtype=dtype).element_size()
    expected = (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * itemsize
    assert cache.bytes_per_token == expected == cfg.kv_cache_bytes_per_token(itemsize)
    assert cache.nbytes == expected * 17 * 3
    # nothing else is stored: the cache's tensors are exactly these two, one row per position
    assert cache.c_kv.shape[-1] + cache.k_pe.shape[-1] == 32 + 8
    assert cache.c_kv.dtype == cache.k_pe.dtype == dtype


def test_v2_lite_cache_is_576_values_and_8_9x_smaller_than_mha():
    cfg = DEEPSEEK_V2_LITE
    assert cfg.kv_cache_dim == 512 + 64
    assert cfg.kv_cache_bytes_per_token(2) == 576 * 27 * 2 == 31_104
    assert cfg.mha_cache_bytes_per_token(2) == 16 * (192 + 128) * 27 * 2
    assert round(cfg.mha_cache_bytes_per_token() / cfg.kv_cache_bytes_per_token(), 1) == 8.9


def test_cache_stores_what_the_latent_hooks_see(tiny_model):
    model = tiny_model()
    cache = model.new_cache()
    ids = torch.randint(0, 320, (1, 12))
    _, acts = model.run_with_cache(ids, cache, names_filter=["*.hook_c_kv", "*.hook_k_pe"])
    for layer in range(model.config.num_hidden_layers):
        assert torch.equal(cache.c_kv[layer, :, :12], acts[f"model.layers.{layer}.self_attn.hook_c_kv"])
        assert torch.equal(cache.k_pe[layer, :, :12], acts[f"model.layers.{layer}.self_attn.hook_k_pe"])


def test_prompt_longer_than_context_is_refused_before_any_work(tiny_model):
    model = tiny_model(max_position_embeddings=64, rope_parameters=None)
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, 60, dtype=torch.long), cache)
        with pytest.raises(ValueError, match=r"60 cached \+ 5 new tokens exceed the context of 64"):
            model(torch.zeros(1, 5, dtype=torch.long), cache)
        assert cache.length == 60
        with pytest.raises(ValueError, match="65 tokens exceed the context of 64"):
            model(torch.zeros(1, 65, dtype=torch.long))


def test_a_failing_hook_leaves_the_cache_as_it_was(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        model(ids[:, :15], cache)

        def boom(x, hook):
            raise RuntimeError("bad hook")

        with pytest.raises(HookError, match=r"model.layers.2.self_attn.hook_pattern raised RuntimeError: bad hook"):
            model.run_with_hooks(ids[:, 15:16], cache, fwd_hooks=[("model.layers.2.self_attn.hook_pattern", boom)])
        assert cache.length == 15
        assert not any(h.active for h in model.hook_points.values())
        rest = model(ids[:, 15:], cache)
    torch.testing.assert_close(rest, full[:, 15:], atol=ATOL, rtol=0)


def test_crop_rewinds_the_cache_to_rerun_from_a_point(tiny_model):
    model = tiny_model()
    ids = torch.randint(0, 320, (1, 30), generator=torch.Generator().manual_seed(9))
    other = torch.randint(0, 320, (1, 20), generator=torch.Generator().manual_seed(10))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        model(ids[:, :10], cache)
        model(other, cache)  # a different continuation ...
        cache.crop(10)  # ... forgotten
        rest = model(ids[:, 10:], cache)
    torch.testing.assert_close(rest, full[:, 10:], atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="cannot crop a cache of 30 tokens to 31"):
        cache.crop(31)
