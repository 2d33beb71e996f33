"""Load a DeepSeek-V2 checkpoint folder (the official one, or any small one in its layout) into dsv2viz.

The model is built on the meta device, so no memory is spent on throw-away initial weights; every
tensor is then read from the safetensors shards straight onto the target device in the target dtype
and handed to the model with ``assign=True``. Peak host memory stays about the size of the weights in
their target dtype (no fp32 copy of a bf16 model). Nothing from the folder is executed: only
``config.json``, ``tokenizer*.json`` and ``*.safetensors`` are read. Any problem (missing shard,
truncated file, missing or unexpected key, a shape that disagrees with config.json) raises before a
model is returned.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .checkpoint import CheckpointError, open_checkpoint
from .config import DeepseekV2Config
from .model import DeepseekV2ForCausalLM
from .tokenizer import Tokenizer


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on a GPU (the checkpoint's own dtype); fp32 on CPU, where bf16 matmuls are slow on many chips."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


#: The bundled demo model (scripts/train_demo.py): DeepSeek-V2's architecture at 8M parameters.
DEMO_MODEL = Path(__file__).parent / "demo_model"


def load(
    path: str | os.PathLike | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    compile: bool | None = None,
) -> DeepseekV2ForCausalLM:
    """Load the model in `path` for inference (eval mode, no gradients), with its tokenizer when present.

    With no `path`, the bundled demo model (see its MODEL_CARD.md) is loaded, so everything runs before
    the 31 GB checkpoint is downloaded.

    `device` defaults to CUDA when available, else CPU; `dtype` to bf16 on CUDA and fp32 on CPU. The
    tokenizer, if the folder has ``tokenizer.json``, is at ``model.tokenizer`` (else None).

    `compile` says whether generations compile their decoding step (dsv2viz.fast_decode: the first generation
    of a recording plan pays the compile, later ones reuse it); None: as the environment variable
    ``DSV2VIZ_COMPILE`` says, else on a GPU only. The routed experts' weights are read into one stack per
    layer, each expert's parameters a view into it, so they are held once.
    """
    folder = DEMO_MODEL if path is None else Path(path).expanduser()
    if not folder.is_dir():
        raise CheckpointError(
            f"{folder}: no such folder; pass the folder that holds config.json and the *.safetensors shards"
        )
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    config = DeepseekV2Config.from_json(folder)
    tokenizer = None
    if (folder / "tokenizer.json").exists():  # checked before the weights: a mismatch should fail fast
        tokenizer = Tokenizer.from_dir(folder, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id)
    ckpt = open_checkpoint(folder)

    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    try:
        ckpt.check_against(expected)
    except CheckpointError as e:
        raise CheckpointError(f"{e}\n(the shapes expected come from {folder / 'config.json'})") from None

    # each routed expert is copied into its layer's stack as it is read (its parameters become views of it)
    state = dict(model.into_expert_stacks(ckpt.iter_tensors(device=device, dtype=dtype, progress=progress)))
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval().requires_grad_(False)
    model.tokenizer = tokenizer
    model.compile_decode = compile
    return model
