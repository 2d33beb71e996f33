"""Shared fixtures: small random DeepSeek-V2 checkpoints written by transformers (the reference) or by us."""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable
from pathlib import Path

# Torch on one thread, here and in every process the tests start (kernels, the CLI, JupyterLab): the
# models under test are tiny or small, and on a busy machine two OpenMP threads waiting for each other
# made them 5-10x slower (measured: 64 demo-model tokens took 1 s on one thread, 6-11 s on two).
os.environ["OMP_NUM_THREADS"] = "1"

import pytest
import torch

torch.set_num_threads(1)

# Generations decode through the fast path uncompiled in tests (compiling costs tens of seconds on a small
# machine); tests/test_fast_path.py compiles it on purpose. Subprocesses (the CLI, notebook kernels) inherit this.
os.environ.setdefault("DSV2VIZ_COMPILE", "0")

#: A tiny config in transformers' spelling; tests override fields. Rope dims interleave, the latent is
#: narrower than the heads it feeds, and YaRN is on with a short original context (64), so prompts of a
#: hundred tokens run past it.
TINY_HF = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    moe_intermediate_size=32,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=4,
    q_lora_rank=None,
    kv_lora_rank=32,
    qk_nope_head_dim=16,
    qk_rope_head_dim=8,
    v_head_dim=12,
    n_routed_experts=8,
    n_shared_experts=2,
    num_experts_per_tok=3,
    first_k_dense_replace=1,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    max_position_embeddings=512,
    bos_token_id=1,
    eos_token_id=2,
    rope_parameters={
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 8.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
)


def make_hf_model(seed: int = 0, **overrides):
    """A transformers DeepseekV2ForCausalLM with weights large enough that routing is decisive."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    cfg = DeepseekV2Config(**{**TINY_HF, **overrides})
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                std = 0.5 if name.endswith("gate.weight") else 0.1
                p.copy_(torch.randn(p.shape, generator=gen) * std)
    return model


@pytest.fixture
def hf_checkpoint(tmp_path: Path):
    """Factory: save a transformers reference model to a folder; returns (model, folder)."""

    def build(seed: int = 0, **overrides):
        model = make_hf_model(seed, **overrides)
        folder = tmp_path / f"hf_{seed}_{len(list(tmp_path.iterdir()))}"
        model.save_pretrained(folder)
        return model, folder

    return build


def rewrite_config_in_deepseek_format(folder: Path) -> None:
    """Turn a transformers 5 config.json into DeepSeek's original spelling (rope_theta + rope_scaling)."""
    raw = json.loads((folder / "config.json").read_text())
    rope = raw.pop("rope_parameters")
    raw["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    raw["rope_scaling"] = rope
    raw.update(scoring_func="softmax", moe_layer_freq=1, aux_loss_alpha=0.001, seq_aux=True)
    (folder / "config.json").write_text(json.dumps(raw, indent=2))


def tiny_config(**overrides):
    """The TINY_HF shapes as a dsv2viz config."""
    from dsv2viz.config import DeepseekV2Config

    raw = {**TINY_HF, **overrides}
    return DeepseekV2Config.from_dict(raw)


@pytest.fixture
def tiny_model():
    """Factory: a random tiny dsv2viz model in eval mode, fp32, on CPU."""
    from dsv2viz.model import DeepseekV2ForCausalLM

    def build(seed: int = 0, std: float = 0.15, **overrides):
        return (
            DeepseekV2ForCausalLM(tiny_config(**overrides))
            .init_weights(std=std, seed=seed)
            .eval()
            .requires_grad_(False)
        )

    return build


def peak_rss_growth(setup: str, work: str) -> tuple[int, str]:
    """Run `setup`, then `work`, in a fresh Python process: (bytes its peak RSS grew during `work`, what it printed).

    Peak RSS is VmHWM from /proc/self/status, not getrusage's ru_maxrss: Linux carries the parent's
    (pytest's, often large) peak over into a spawned child's ru_maxrss, which would hide the child's growth.
    """
    import os
    import subprocess
    import sys
    import textwrap

    script = "\n".join(
        [
            "import re",
            "def _peak():",
            "    return int(re.search(r'VmHWM:\\s*(\\d+) kB', open('/proc/self/status').read()).group(1)) * 1024",
            textwrap.dedent(setup),
            "_before = _peak()",
            textwrap.dedent(work),
            "print('PEAK_GROWTH', _peak() - _before)",
        ]
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=repo, env=env
    ).stdout
    lines = out.strip().splitlines()
    return int(lines[-1].split()[1]), "\n".join(lines[:-1])


NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def generate_together(runs: dict[str, Callable], timeout: float = 120) -> dict:
    """Each generation ``runs[name]()`` makes, run to its end in its own thread, all released at once by a
    barrier so that their steps interleave; the generations by name, or the first error any thread raised."""
    done, errors = {}, []
    start = threading.Barrier(len(runs), timeout=timeout)

    def work(name: str) -> None:
        try:
            generation = runs[name]()
            start.wait()
            generation.run()
            done[name] = generation
        except Exception as e:  # raised below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(name,)) for name in runs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    if errors:
        raise errors[0]
    assert sorted(done) == sorted(runs), "a generation did not finish in time"
    return done


CHROMIUM = "/usr/bin/chromium"  # Debian's, which .ci/run installs


def launch_chromium(playwright):
    """Headless Chromium for the browser tests (see ../shared/BROWSER.md), failing with the fix if it is missing."""
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)")
    args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
    return playwright.chromium.launch(executable_path=CHROMIUM, args=[*args, "--disable-sync", "--no-first-run"])


@pytest.fixture
def run_notebook(tmp_path, monkeypatch):
    """Execute a notebook top to bottom (nbclient, a fresh kernel, cwd a temporary folder, on the bundled
    demo model because DSV2VIZ_MODEL is unset), then run `checks` in the same kernel so assertions can read
    the notebook's variables. Any failing cell, checks included, fails the test with the cell's traceback.
    Returns the executed notebook for assertions on outputs."""
    import nbformat
    from nbclient import NotebookClient

    monkeypatch.delenv("DSV2VIZ_MODEL", raising=False)

    def run(name: str, checks: str, timeout: int = 600):
        nb = nbformat.read(NOTEBOOKS / name, as_version=4)
        assert all(not cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), (
            f"{name} is committed with outputs; clear them"
        )
        nb.cells.append(nbformat.v4.new_code_cell(checks))
        NotebookClient(
            nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
        ).execute()
        return nb

    return run


@pytest.fixture
def widget_messages(monkeypatch) -> list[tuple[str, dict]]:
    """Every message the widgets created in the test send to the browser (msg_type, JSON part), opening
    state included: their comms keep the messages instead of sending them."""
    import comm
    from comm.base_comm import BaseComm

    sent: list[tuple[str, dict]] = []

    class KeptComm(BaseComm):
        def publish_msg(self, msg_type, data=None, metadata=None, buffers=None, **keys):
            sent.append((msg_type, data))

    monkeypatch.setattr(comm, "create_comm", KeptComm)
    return sent
