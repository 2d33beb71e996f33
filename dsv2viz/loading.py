"""Load a DeepSeek-V2 checkpoint folder (the official one, or any small one in its layout) into dsv2viz.

The model is built on the meta device, so no memory is spent on throw-away initial weights; every
tensor is then read from the safetensors shards straight onto the target device in the target dtype
and handed to the model with ``assign=True``. Peak host memory stays about the size of the weights in
their target dtype (no fp32 copy of a bf16 model). Nothing from the folder is executed: only
``config.json``, ``tokenizer*.json`` and ``*.safetensors`` are read. Any problem (missing shard,
truncated file, missing or unexpected key, a shape that disagrees with config.json) raises before a
model is returned.

Checks run cheapest first, so a bad input costs nothing: the device (it must exist here); the config's
types and ranges; the memory the weights need in the target dtype, computed from the config's shapes and
compared with what the device has free; the tokenizer (its ids must fit the embedding); the shard headers
(keys, shapes, dtypes). Only then is the model built on the meta device and are weights read.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, checkpoint_folder, open_checkpoint
from .config import DeepseekV2Config
from .model import DeepseekV2ForCausalLM
from .tokenizer import Tokenizer
from .traces.recording import format_bytes


class DeviceError(ValueError):
    """The requested device does not exist here, or cannot hold the model; the message says what to use."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """`device` as a torch.device that exists on this machine (None: CUDA when available, else CPU)."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise DeviceError(f"device {device!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'") from None
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise DeviceError(f"device {device!r} is not supported: dsv2viz runs on 'cpu' or 'cuda'")
    if not torch.cuda.is_available():
        raise DeviceError(
            f"device {device!r} is not available: this torch sees no CUDA GPU (none installed, a CPU-only torch, "
            "or CUDA_VISIBLE_DEVICES empty); use device 'cpu'"
        )
    count = torch.cuda.device_count()
    if resolved.index is not None and resolved.index >= count:
        raise DeviceError(f"device {device!r} does not exist: this machine has {count} CUDA device(s), cuda:0..")
    return resolved


def available_memory(device: torch.device) -> int | None:
    """Bytes free for new tensors on `device` (CUDA: free device memory; CPU: the kernel's MemAvailable), or
    None where the platform does not say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = Path("/proc/meminfo").read_text()
        found = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo, re.MULTILINE)
        if found:
            return int(found.group(1)) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(config: DeepseekV2Config, device: torch.device, dtype: torch.dtype, source: str = "the model") -> int:
    """The bytes `config`'s weights take in `dtype`; DeviceError when `device` has less free memory than that.

    Counted from the config's shapes (no model is built), so an absurd config fails at once. Activations
    and caches come on top: this is the least the weights alone need.
    """
    n = config.num_parameters
    needed = n * dtype.itemsize
    free = available_memory(device)
    if free is not None and needed > free:
        smaller = " or a smaller dtype (bfloat16 halves float32)" if dtype.itemsize > 2 else ""
        raise DeviceError(
            f"{source}: its {n:,} parameters need {format_bytes(needed)} in {str(dtype).removeprefix('torch.')} but "
            f"{device} has {format_bytes(free)} free; use a device with more memory{smaller}, or check config.json"
        )
    return needed


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

    Raises ConfigError, DeviceError (no such device, or too little free memory for the weights),
    TokenizerError or CheckpointError, each one line naming the file and the fix, before any weight is read.

    `compile` says whether generations compile their decoding step (dsv2viz.fast_decode: the first generation
    of a recording plan pays the compile, later ones reuse it); None: as the environment variable
    ``DSV2VIZ_COMPILE`` says, else on a GPU only. The routed experts' weights are read into one stack per
    layer, each expert's parameters a view into it, so they are held once.
    """
    folder = checkpoint_folder(DEMO_MODEL if path is None else path)
    device = resolve_device(device)
    config = DeepseekV2Config.from_json(folder)
    dtype = dtype or default_dtype(device)
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise DeviceError(f"dtype={dtype!r} is not a floating-point torch dtype: use torch.bfloat16 or torch.float32")
    check_memory(config, device, dtype, source=str(folder / "config.json"))
    tokenizer = None
    if (folder / "tokenizer.json").exists():  # checked before the weights: a mismatch should fail fast
        tokenizer = Tokenizer.from_dir(
            folder, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, vocab_size=config.vocab_size
        )
    ckpt = open_checkpoint(folder)

    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight")
    try:
        ckpt.check_against(expected)
    except CheckpointError as e:
        raise CheckpointError(f"{e} (the shapes expected come from {folder / 'config.json'})") from None
    stored_as_ints = [k for k in ckpt.keys() if not ckpt.dtype(k).is_floating_point]  # noqa: SIM118
    if stored_as_ints:
        k = stored_as_ints[0]
        raise CheckpointError(
            f"{ckpt.file_of(k)}: tensor {k!r} is stored as {str(ckpt.dtype(k)).removeprefix('torch.')} "
            f"({len(stored_as_ints)} tensors are not floating point), but every weight of the model is; "
            "these are not DeepSeek-V2 weights, or were quantized to integers: use a float checkpoint"
        )

    # each routed expert is copied into its layer's stack as it is read (its parameters become views of it)
    state = dict(model.into_expert_stacks(ckpt.iter_tensors(device=device, dtype=dtype, progress=progress)))
    model.load_state_dict(state, strict=not config.tie_word_embeddings, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    model.eval().requires_grad_(False)
    model.tokenizer = tokenizer
    model.compile_decode = compile
    return model
