"""Write a small DeepSeek-V2 checkpoint with random weights, in the official checkpoint's layout.

It exercises the same loading path as the real model (config.json in DeepSeek's spelling,
model.safetensors, tokenizer.json, tokenizer_config.json), so the command line, the tests and the
benchmarks run anywhere without downloading 31 GB. Random weights route and attend meaninglessly: use
it to check the machinery, not to study the model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import tokenizers
import torch
from safetensors.torch import save_file

from .config import DeepseekV2Config, YarnRope
from .model import DeepseekV2ForCausalLM
from .tokenizer import DEEPSEEK_BOS, DEEPSEEK_EOS, byte_level_bpe, write_tokenizer_files

#: V2-Lite's architecture at toy widths: MLA with a latent narrower than the heads it feeds, YaRN, one
#: dense layer, then MoE layers with 2 shared and 16 routed experts of which 4 serve each token.
TINY_CONFIG = DeepseekV2Config(
    vocab_size=258,  # 256 byte tokens + BOS + EOS
    hidden_size=128,
    intermediate_size=344,
    moe_intermediate_size=48,
    num_hidden_layers=4,
    num_attention_heads=4,
    kv_lora_rank=64,
    qk_nope_head_dim=32,
    qk_rope_head_dim=16,
    v_head_dim=32,
    n_routed_experts=16,
    n_shared_experts=2,
    num_experts_per_tok=4,
    max_position_embeddings=4096,
    rope_scaling=YarnRope(factor=8.0, original_max_position_embeddings=512, mscale=0.707, mscale_all_dim=0.707),
    bos_token_id=256,
    eos_token_id=257,
)


def write_random_checkpoint(
    folder: str | os.PathLike,
    config: DeepseekV2Config = TINY_CONFIG,
    *,
    seed: int = 0,
    std: float = 0.1,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Write config.json, model.safetensors and a byte-level tokenizer into `folder`; returns the folder.

    The tokenizer has the 256 byte tokens then BOS and EOS, so `config` must have vocab_size >= 258
    and bos/eos ids 256/257 (TINY_CONFIG does).
    """
    if (config.bos_token_id, config.eos_token_id) != (256, 257) or config.vocab_size < 258:
        raise ValueError("a random checkpoint's byte-level tokenizer needs vocab_size >= 258 and bos/eos ids 256/257")
    model = DeepseekV2ForCausalLM(config).init_weights(std=std, seed=seed)
    tokenizer = byte_level_bpe(None, vocab_size=258, bos_token=DEEPSEEK_BOS, eos_token=DEEPSEEK_EOS)
    return write_checkpoint(folder, model, tokenizer, dtype=dtype)


def _alone(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy when it is a view into a larger tensor (stacked experts): safetensors stores no shared memory."""
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


def write_checkpoint(
    folder: str | os.PathLike, model: DeepseekV2ForCausalLM, tokenizer: tokenizers.Tokenizer, *, dtype: torch.dtype
) -> Path:
    """Save `model` and `tokenizer` in the official checkpoint's layout, weights in `dtype`; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: _alone(v.detach().to(dtype).contiguous()) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(model.config.to_dict(), indent=2) + "\n")
    write_tokenizer_files(folder, tokenizer, bos_token=DEEPSEEK_BOS, eos_token=DEEPSEEK_EOS)
    return folder
