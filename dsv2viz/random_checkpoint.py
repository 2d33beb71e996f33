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
from .files import atomic_path, atomic_write, foreign_entries, name_list, read_json
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


#: The files of a checkpoint written here, in writing order: config.json first (a random one carries RANDOM_MARK).
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
#: In a random checkpoint's config.json: write_random_checkpoint may replace this folder's files.
RANDOM_MARK = {"dsv2viz": "random checkpoint"}


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
    and bos/eos ids 256/257 (TINY_CONFIG does). `folder` must be new, empty, or a random checkpoint of
    the same config written here before (its weights are then replaced, whole or not at all: the other
    files are the same); anything else raises FileExistsError before a file is written.
    """
    if (config.bos_token_id, config.eos_token_id) != (256, 257) or config.vocab_size < 258:
        raise ValueError("a random checkpoint's byte-level tokenizer needs vocab_size >= 258 and bos/eos ids 256/257")
    folder = Path(folder)
    check_random_checkpoint_folder(folder, config)
    model = DeepseekV2ForCausalLM(config).init_weights(std=std, seed=seed)
    tokenizer = byte_level_bpe(None, vocab_size=258, bos_token=DEEPSEEK_BOS, eos_token=DEEPSEEK_EOS)
    return write_checkpoint(folder, model, tokenizer, dtype=dtype, config_extra=RANDOM_MARK)


def check_random_checkpoint_folder(folder: Path, config: DeepseekV2Config) -> None:
    """Raise FileExistsError unless write_random_checkpoint may write `config` into `folder`."""
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file; give a folder for the checkpoint")
    foreign = foreign_entries(folder, CHECKPOINT_FILES.__contains__)
    if foreign:
        raise FileExistsError(
            f"{folder} is not empty ({name_list(foreign)}) and holds no random checkpoint; choose a new or empty folder"
        )
    if not any((folder / name).exists() for name in CHECKPOINT_FILES):
        return
    try:
        written = read_json(folder / "config.json")
    except (FileNotFoundError, ValueError):
        written = None
    if not isinstance(written, dict) or any(written.get(k) != v for k, v in RANDOM_MARK.items()):
        raise FileExistsError(
            f"{folder} holds a checkpoint that is not a dsv2viz random checkpoint; it is never overwritten: "
            "choose a new or empty folder"
        )
    if written != _config_json(config, RANDOM_MARK):
        raise FileExistsError(
            f"{folder} holds a random checkpoint of another config, whose files cannot all be replaced at once; "
            "choose a new or empty folder"
        )


def _alone(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy when it is a view into a larger tensor (stacked experts): safetensors stores no shared memory."""
    return t if t.untyped_storage().nbytes() == t.nbytes else t.clone()


def write_checkpoint(
    folder: str | os.PathLike,
    model: DeepseekV2ForCausalLM,
    tokenizer: tokenizers.Tokenizer,
    *,
    dtype: torch.dtype,
    config_extra: dict[str, str] | None = None,
) -> Path:
    """Save `model` and `tokenizer` in the official checkpoint's layout, weights in `dtype`; returns the folder.

    Each file is written whole or not at all, in the order of CHECKPOINT_FILES; `config_extra` adds keys
    to config.json (readers ignore keys they do not know).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: _alone(v.detach().to(dtype).contiguous()) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    atomic_write(folder / "config.json", json.dumps(_config_json(model.config, config_extra), indent=2) + "\n")
    with atomic_path(folder / "model.safetensors") as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    write_tokenizer_files(folder, tokenizer, bos_token=DEEPSEEK_BOS, eos_token=DEEPSEEK_EOS)
    return folder


def _config_json(config: DeepseekV2Config, extra: dict[str, str] | None) -> dict:
    """config.json's content, as written and as read back."""
    return json.loads(json.dumps({**config.to_dict(), **(extra or {})}))
