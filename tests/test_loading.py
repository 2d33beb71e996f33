"""dsv2viz.load: shards, dtypes, every bad checkpoint's clear error, peak memory, and no code run from the folder."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from conftest import peak_rss_growth
from safetensors.torch import load_file, save_file

import dsv2viz
from dsv2viz import CheckpointError, TokenizerError
from dsv2viz.loading import DeviceError
from dsv2viz.random_checkpoint import TINY_CONFIG, write_random_checkpoint


@pytest.fixture
def random_ckpt(tmp_path: Path) -> Path:
    return write_random_checkpoint(tmp_path / "ckpt", dtype=torch.float32)


def logits_of(folder: Path, **kwargs) -> torch.Tensor:
    model = dsv2viz.load(folder, device="cpu", progress=False, **kwargs)
    with torch.no_grad():
        return model(torch.arange(40).view(1, 40) % 250)


def test_sharded_checkpoint_equals_single_file(hf_checkpoint, tmp_path):
    hf_model, single = hf_checkpoint(seed=7)
    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="100KB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and (sharded / "model.safetensors.index.json").exists()
    assert torch.equal(logits_of(single, dtype=torch.float32), logits_of(sharded, dtype=torch.float32))


def test_weights_land_in_the_requested_dtype_unchanged(random_ckpt):
    model = dsv2viz.load(random_ckpt, device="cpu", dtype=torch.bfloat16, progress=False)
    stored = load_file(random_ckpt / "model.safetensors")
    state = model.state_dict()
    assert set(state) == set(stored)
    assert all(t.dtype == torch.bfloat16 for t in state.values())
    assert torch.equal(
        state["model.layers.2.mlp.experts.3.up_proj.weight"],
        stored["model.layers.2.mlp.experts.3.up_proj.weight"].bfloat16(),
    )
    assert not any(p.requires_grad for p in model.parameters()) and not model.training
    assert model.tokenizer is not None and model.tokenizer.bos_token_id == TINY_CONFIG.bos_token_id


def test_wrong_path(tmp_path):
    with pytest.raises(CheckpointError, match="no such folder"):
        dsv2viz.load(tmp_path / "nowhere", progress=False)


def test_missing_shard(hf_checkpoint, tmp_path):
    hf_model, _ = hf_checkpoint(seed=8)
    folder = tmp_path / "sharded"
    hf_model.save_pretrained(folder, max_shard_size="100KB")
    victim = sorted(folder.glob("*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=victim.name):
        dsv2viz.load(folder, progress=False)


def test_truncated_file(random_ckpt):
    path = random_ckpt / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated") as err:
        dsv2viz.load(random_ckpt, progress=False)
    assert "model.safetensors" in str(err.value)


def test_corrupt_header(random_ckpt):
    path = random_ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:16] = b"#garbage"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors"):
        dsv2viz.load(random_ckpt, progress=False)


def rewrite_weights(folder: Path, change) -> None:
    state = load_file(folder / "model.safetensors")
    change(state)
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def test_missing_key(random_ckpt):
    key = "model.layers.3.mlp.experts.11.down_proj.weight"
    rewrite_weights(random_ckpt, lambda s: s.pop(key))
    with pytest.raises(CheckpointError, match="missing") as err:
        dsv2viz.load(random_ckpt, progress=False)
    assert key in str(err.value)


def test_unexpected_key(random_ckpt):
    key = "model.layers.1.mlp.experts.99.up_proj.weight"
    rewrite_weights(random_ckpt, lambda s: s.__setitem__(key, torch.zeros(48, 128)))
    with pytest.raises(CheckpointError, match="unexpected") as err:
        dsv2viz.load(random_ckpt, progress=False)
    assert key in str(err.value)


def test_shape_that_disagrees_with_config(random_ckpt):
    raw = json.loads((random_ckpt / "config.json").read_text())
    raw["kv_lora_rank"] = 48  # the weights were written for 64
    (random_ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(CheckpointError) as err:
        dsv2viz.load(random_ckpt, progress=False)
    msg = str(err.value)
    assert "model.layers.0.self_attn.kv_a_layernorm.weight" in msg and "config.json" in msg


def test_tokenizer_ids_that_disagree_with_config(random_ckpt):
    raw = json.loads((random_ckpt / "config.json").read_text())
    raw["eos_token_id"] = 5
    (random_ckpt / "config.json").write_text(json.dumps(raw))
    with pytest.raises(TokenizerError, match="257") as err:
        dsv2viz.load(random_ckpt, progress=False)
    assert "5" in str(err.value)


def test_no_code_from_the_folder_runs(random_ckpt, tmp_path):
    """A checkpoint shipping remote code and a pickle is loaded from its JSON and safetensors only."""
    marker = tmp_path / "pwned"
    payload = f"open({str(marker)!r}, 'w').write('ran')\n"
    (random_ckpt / "modeling_deepseek.py").write_text(payload)
    (random_ckpt / "configuration_deepseek.py").write_text(payload)
    raw = json.loads((random_ckpt / "config.json").read_text())
    raw["auto_map"] = {"AutoModelForCausalLM": "modeling_deepseek.DeepseekV2ForCausalLM"}
    (random_ckpt / "config.json").write_text(json.dumps(raw))
    (random_ckpt / "pytorch_model.bin").write_bytes(b"not a pickle you would want to open")
    logits_of(random_ckpt, dtype=torch.float32)
    assert not marker.exists()


def test_peak_host_memory_stays_under_1_2x_the_checkpoint(tmp_path):
    """Load a ~180 MB bf16 checkpoint in a fresh process: peak RSS grows by less than 1.2x its bytes.

    A loader that built the model on CPU first, read an fp32 copy, or kept the mmap'd file beside a copy
    would need 2x or more. A tiny checkpoint is loaded first so that one-time costs (the tokenizer
    library, torch's first allocations) do not count against the weights.
    """
    config = TINY_CONFIG.replace(
        hidden_size=512, n_routed_experts=64, moe_intermediate_size=256, num_hidden_layers=4, intermediate_size=1024
    )
    folder = write_random_checkpoint(tmp_path / "big", config, dtype=torch.bfloat16)
    warm_up = write_random_checkpoint(tmp_path / "tiny", dtype=torch.bfloat16)
    size = (folder / "model.safetensors").stat().st_size
    assert size > 150 * 2**20
    growth, _ = peak_rss_growth(
        f"import torch, dsv2viz\ndsv2viz.load({str(warm_up)!r}, device='cpu', dtype=torch.bfloat16, progress=False)",
        f"model = dsv2viz.load({str(folder)!r}, device='cpu', dtype=torch.bfloat16, progress=False)",
    )
    assert growth > 0.9 * size, "the measurement missed the weights: it cannot be trusted"
    assert growth < 1.2 * size, f"peak RSS grew by {growth / size:.2f}x the checkpoint's {size} bytes"


# ----- bounded before allocating: memory, devices, dtypes, tokenizer ids ------------------------------------
def test_weights_that_do_not_fit_are_refused_before_anything_is_built(random_ckpt, monkeypatch):
    from dsv2viz import loading

    needed = TINY_CONFIG.num_parameters * 4  # fp32 on CPU
    monkeypatch.setattr(loading, "available_memory", lambda device: needed - 1)
    monkeypatch.setattr(loading, "DeepseekV2ForCausalLM", None)  # building a model would fail
    with pytest.raises(DeviceError) as err:
        dsv2viz.load(random_ckpt, device="cpu", dtype=torch.float32, progress=False)
    assert f"its {TINY_CONFIG.num_parameters:,} parameters need" in str(err.value) and "float32" in str(err.value)
    assert "bfloat16 halves float32" in str(err.value)  # the fix, named
    monkeypatch.undo()
    monkeypatch.setattr(loading, "available_memory", lambda device: needed)  # exactly enough
    assert dsv2viz.load(random_ckpt, device="cpu", dtype=torch.float32, progress=False).config == TINY_CONFIG


def test_an_absurd_config_fails_at_once_without_weights(tmp_path):
    """10^12 parameters: the memory check answers from the shapes, before the (missing) weights are looked for."""
    raw = {**TINY_CONFIG.to_dict(), "vocab_size": 2**21, "hidden_size": 2**16, "intermediate_size": 2**18}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    start = time.perf_counter()
    with pytest.raises(DeviceError, match="free; use a device with more memory") as err:
        dsv2viz.load(tmp_path, device="cpu", progress=False)
    assert time.perf_counter() - start < 2
    assert str(tmp_path / "config.json") in str(err.value) and "GiB" in str(err.value)


def test_available_cpu_memory_is_what_the_kernel_reports():
    from dsv2viz.loading import available_memory

    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    reported = int(meminfo["MemAvailable"].split()[0]) * 1024
    assert abs(available_memory(torch.device("cpu")) - reported) < 256 * 2**20  # it moves between the two reads
    assert available_memory(torch.device("cpu")) <= int(meminfo["MemTotal"].split()[0]) * 1024


@pytest.mark.parametrize(
    "device, cuda, message",
    [
        ("tpu", False, "device 'tpu' is not a device: use 'cpu', 'cuda' or 'cuda:N'"),
        ("meta", False, "device 'meta' is not supported: dsv2viz runs on 'cpu' or 'cuda'"),
        (3.5, False, "device 3.5 is not a device"),
        ("cuda", False, "device 'cuda' is not available: this torch sees no CUDA GPU"),
        ("cuda:3", True, "device 'cuda:3' does not exist: this machine has 1 CUDA device(s)"),
    ],
)
def test_devices_are_checked_before_any_file_is_read(tmp_path, monkeypatch, device, cuda, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(DeviceError) as err:  # not ConfigError: the empty folder's config is never read
        dsv2viz.load(tmp_path, device=device, progress=False)
    assert str(err.value).startswith(message)


def test_dtype_must_be_floating_point(random_ckpt):
    with pytest.raises(DeviceError, match=r"dtype=torch\.int8 is not a floating-point torch dtype"):
        dsv2viz.load(random_ckpt, device="cpu", dtype=torch.int8, progress=False)


def test_integer_weights_are_refused_before_any_weight_is_read(random_ckpt, monkeypatch):
    from dsv2viz.checkpoint import Checkpoint

    rewrite_weights(random_ckpt, lambda s: s.update({k: s[k].to(torch.int32) for k in list(s)[:3]}))
    monkeypatch.setattr(Checkpoint, "iter_tensors", None)  # reading a weight would fail
    with pytest.raises(CheckpointError) as err:
        dsv2viz.load(random_ckpt, progress=False)
    first = sorted(load_file(random_ckpt / "model.safetensors"))[0]
    assert f"tensor '{first}' is stored as int32 (3 tensors are not floating point)" in str(err.value)


def test_a_tokenizer_with_ids_past_the_embedding_is_refused(random_ckpt):
    import tokenizers

    tok = tokenizers.Tokenizer.from_file(str(random_ckpt / "tokenizer.json"))
    tok.add_special_tokens(["<|tool|>"])  # id 258: the embedding has rows 0..257
    tok.save(str(random_ckpt / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=r"ids up to 258, but config\.json.s vocab_size is 258"):
        dsv2viz.load(random_ckpt, progress=False)
