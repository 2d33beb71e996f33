"""The fast decoding path (dsv2viz.fast_decode) computes what the eager model computes.

Generations decode through the fast path whenever only their own hooks are in play; putting any other hook
in scope sends every step through the eager model, the reference, which is how these tests run both ways.
Tests use the step uncompiled (DSV2VIZ_COMPILE=0, see conftest), except the compile test at the end.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import time
from pathlib import Path

import pytest
import torch
from conftest import generate_together

import dsv2viz
from dsv2viz import NonFiniteError, fast_decode
from dsv2viz import interventions as iv
from dsv2viz.analysis.routing import router_margin
from dsv2viz.hooks import scope
from dsv2viz.model import MoE, grouped_experts, looped_routed_sum, routed_sum
from dsv2viz.random_checkpoint import write_random_checkpoint
from dsv2viz.traces import Recording
from dsv2viz.traces.recorder import Recorder

PROMPT = list(range(3, 23))  # 20 token ids
NEW = 64
ATOL = 1e-4  # fp32: logits, probabilities, norms and latents of the two paths
EVERYTHING = dict(router_probs=True, queries=True, full_logits=True, top_logits=5)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models decode in a fraction of the time on one thread; on a busy machine two threads spin-wait."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _noop(x: torch.Tensor, hook) -> None:
    return None


@contextlib.contextmanager
def eager_path(model):
    """A hook of no effect in scope: every decoding step inside goes through the eager model."""
    with model.hooks([("model.hook_embed", _noop)]):
        yield


def both_ways(model, record: Recording, interventions=(), prompt=PROMPT, new=NEW):
    fast = model.generate(prompt, new, record=record, interventions=list(interventions), stop_tokens=())
    fast_trace = fast.run()
    assert fast.decode_path == "fast"
    with eager_path(model):
        eager = model.generate(prompt, new, record=record, interventions=list(interventions), stop_tokens=())
        eager_trace = eager.run()
    assert eager.decode_path.startswith("eager")
    return fast_trace, eager_trace


def assert_same_trace(fast, eager, atol: float = ATOL) -> None:
    """Identical tokens and integer tensors (routing), floats within `atol`."""
    assert fast.generated_ids == eager.generated_ids
    assert sorted(fast.tensors) == sorted(eager.tensors)
    for name, a in fast.tensors.items():
        b = eager.tensors[name]
        if a.is_floating_point():
            torch.testing.assert_close(a, b, atol=atol, rtol=0, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(a, b), name


@pytest.mark.parametrize("attention", ["none", "last_row", "full"])
def test_whole_generations_match_the_eager_path_with_every_recording_option(tiny_model, attention):
    model = tiny_model()
    fast, eager = both_ways(model, Recording(attention=attention, **EVERYTHING))
    assert_same_trace(fast, eager)
    assert fast.tensors["topk_idx"].shape[1] == len(PROMPT) + NEW  # every position recorded, prompt and steps


@pytest.mark.parametrize(
    "make",
    [
        lambda: iv.ablate_experts({1: [0, 3], 2: [5]}),
        lambda: iv.force_experts({2: [6, 1]}),
        lambda: iv.ablate_heads({0: [1], 2: [0, 3]}),
        lambda: iv.patch_latent(1, dims=[0, 7, 9], value=2.5, positions=[21, 30, 60]),
        lambda: iv.patch_latent(2, value=torch.linspace(-1, 1, 32)),
        lambda: iv.steer(1, torch.randn(64, generator=torch.Generator().manual_seed(0)), scale=3.0),
    ],
    ids=["ablate_experts", "force_experts", "ablate_heads", "patch_latent_some", "patch_latent_all", "steer"],
)
def test_each_built_in_intervention_matches_the_eager_path(tiny_model, make):
    model = tiny_model()
    record = Recording(router_probs=True, full_logits=True)
    fast, eager = both_ways(model, record, make())
    assert_same_trace(fast, eager)
    plain = model.generate(PROMPT, NEW, record=record, stop_tokens=()).run()
    assert not torch.allclose(plain.tensors["logprobs"], fast.tensors["logprobs"])  # it did act


def test_interventions_together_match_the_eager_path(tiny_model):
    model = tiny_model()
    together = [
        *iv.ablate_experts({1: [0]}),
        *iv.force_experts({2: [4]}),
        *iv.ablate_heads({1: [2]}),
        *iv.patch_latent(0, dims=[3], value=-1.0, positions=[40]),
        *iv.steer(2, torch.ones(64), scale=0.5),
    ]
    fast, eager = both_ways(model, Recording(attention="last_row", **EVERYTHING), together)
    assert_same_trace(fast, eager)
    assert (fast.routing(2)[0][len(PROMPT) :, 0] == 4).all() and not (fast.routing(1)[0] == 0).any()


def test_fast_steps_give_the_eager_logits_and_experts_token_by_token(tiny_model):
    """Teacher-forced: the same tokens read by both paths from the same prefilled cache, step by step."""
    model = tiny_model()
    record = Recording(router_probs=True)
    tokens = torch.randint(0, 320, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    P, S = len(PROMPT), len(PROMPT) + len(tokens)
    recorders, caches = [], []
    for _ in range(2):
        cache, recorder = model.new_cache(1, S), Recorder(model, record, P, S)
        recorder.start(cache)
        with torch.no_grad():
            model(torch.tensor([PROMPT]), cache)
        recorders.append(recorder)
        caches.append(cache)
    decoder = fast_decode.FastDecoder(model, recorders[0], [], caches[0])
    eager_hooks = model.resolve_hooks(recorders[1].hooks())
    for token in tokens:
        fast_logits = decoder.step(token)
        with torch.no_grad(), scope(eager_hooks):
            eager_logits = model(torch.tensor([[token]]), caches[1], last_only=True)[0, -1].float()
        torch.testing.assert_close(fast_logits, eager_logits, atol=ATOL, rtol=0)
    fast, eager = recorders[0].buffers, recorders[1].buffers
    assert torch.equal(fast["topk_idx"][:, P:S], eager["topk_idx"][:, P:S])  # every token, every MoE layer
    torch.testing.assert_close(fast["router_probs"][:, P:S], eager["router_probs"][:, P:S], atol=1e-6, rtol=0)
    torch.testing.assert_close(caches[0].c_kv, caches[1].c_kv, atol=1e-5, rtol=0)
    assert caches[0].length == caches[1].length == S


def test_bf16_routing_differs_only_at_near_ties(tiny_model):
    model = tiny_model().to(torch.bfloat16)
    record = Recording(router_probs=True)
    fast, eager = both_ways(model, record, new=32)
    P, K = len(PROMPT), model.config.num_experts_per_tok
    same = (fast.tensors["topk_idx"].sort(-1).values == eager.tensors["topk_idx"].sort(-1).values).all(-1)
    common = min(len(fast), len(eager))
    tie = router_margin(eager.tensors["router_probs"], K).near_tie()
    first_diff = next((i for i, (a, b) in enumerate(zip(fast.token_ids, eager.token_ids)) if a != b), common)
    # before the first differing token both read the same text: every expert set differing there is a near tie
    assert first_diff > P
    assert (same[:, P:first_diff] | tie[:, P:first_diff]).all()
    assert same[:, P:first_diff].float().mean() > 0.9


def test_recording_does_not_change_a_token(tiny_model):
    model = tiny_model()
    off = model.generate(PROMPT, NEW, record=Recording(top_logits=NEW, routing=False, latents=False)).run()
    default = model.generate(PROMPT, NEW, record=Recording(top_logits=NEW)).run()
    full = model.generate(PROMPT, NEW, record=Recording(attention="full", **{**EVERYTHING, "top_logits": NEW})).run()
    assert off.generated_ids == default.generated_ids == full.generated_ids
    assert torch.equal(off.tensors["top_probs"], default.tensors["top_probs"])  # bit for bit
    # recording patterns reads the prompt with explicit scores instead of fused attention: rounding only
    torch.testing.assert_close(off.tensors["top_probs"], full.tensors["top_probs"], atol=1e-6, rtol=0)


def test_two_threads_on_the_fast_path_get_what_each_gets_alone(tiny_model):
    model = tiny_model()
    runs = {
        "plain": lambda: model.generate(PROMPT, 40, record=Recording(attention="last_row", router_probs=True)),
        "intervened": lambda: model.generate(
            list(range(40, 52)),
            40,
            record=Recording(queries=True),
            temperature=0.8,
            seed=3,
            interventions=[*iv.force_experts({1: [2]}), *iv.steer(2, torch.ones(64))],
        ),
    }
    alone = {name: make().run() for name, make in runs.items()}
    together = generate_together(runs)
    assert {name: gen.decode_path for name, gen in together.items()} == {name: "fast" for name in runs}
    for name in runs:
        assert together[name].trace == alone[name], name


def test_other_hooks_send_steps_to_the_eager_path_and_see_them(tiny_model):
    model = tiny_model()
    seen: list[int] = []

    def count(x: torch.Tensor, hook) -> None:
        seen.append(x.shape[1])

    remove = model.add_hook("model.layers.0.hook_resid_post", count)
    try:
        gen = model.generate(PROMPT, 5)
        gen.run()
    finally:
        remove()
    assert gen.decode_path.startswith("eager") and seen == [len(PROMPT), 1, 1, 1, 1, 1]

    custom = model.generate(PROMPT, 5, interventions=[("model.layers.1.hook_resid_post", _noop)])
    custom.run()
    assert custom.decode_path == "eager (intervention '_noop' is a custom hook function)"

    moved = [("model.layers.2.mlp.gate.hook_probs", iv.ablate_experts({1: [0]})[0][1])]
    elsewhere = model.generate(PROMPT, 5, interventions=moved)
    elsewhere.run()
    assert "attached at 'model.layers.2.mlp.gate.hook_probs'" in elsewhere.decode_path


def test_a_model_being_trained_keeps_its_parameter_objects(tiny_model):
    """Stacking experts replaces their parameters, which an optimizer holds: never while they require gradients."""
    model = tiny_model().requires_grad_(True)
    before = [id(p) for p in model.parameters()]
    gen = model.generate(PROMPT, 3)
    gen.run()
    assert gen.decode_path.startswith("eager (the experts' weights require gradients")
    assert [id(p) for p in model.parameters()] == before


def test_steps_switching_paths_mid_generation_give_the_same_trace(tiny_model):
    model = tiny_model()
    record = Recording(attention="last_row", **EVERYTHING)
    straight = model.generate(PROMPT, 24, record=record).run()
    gen = model.generate(PROMPT, 24, record=record)
    paths = [gen.decode_path == "fast" for _ in iter_with_scope(gen, model, eager_steps=range(8, 16))]
    assert paths == [not 8 <= i < 16 for i in range(24)]  # fetching step i runs the pass that reads its token
    assert_same_trace(gen.trace, straight)


def iter_with_scope(gen, model, eager_steps: range):
    """Iterate `gen`, fetching the steps in `eager_steps` with a no-op hook in scope."""
    steps = iter(gen)
    for i in range(gen.sampling.max_new_tokens):
        with eager_path(model) if i in eager_steps else contextlib.nullcontext():
            step = next(steps, None)
        if step is None:
            return
        yield step


def test_a_non_finite_step_raises_like_the_eager_path_and_commits_nothing(tiny_model):
    model = tiny_model()
    P = len(PROMPT)
    blow_up = iv.patch_latent(1, value=3e38, positions=[P + 2])  # the third decoded token's latent overflows
    messages = []
    for path in (contextlib.nullcontext, lambda: eager_path(model)):
        gen = model.generate(PROMPT, 4, interventions=blow_up)
        with path(), pytest.raises(NonFiniteError) as err:
            gen.run()
        messages.append(str(err.value))
        assert len(gen.trace) == gen.recorder.length == P + 2  # the failed step left nothing behind
    assert messages[0] == messages[1] and "layer 1" in messages[0]


def test_grouped_experts_equal_the_per_expert_loop(tiny_model):
    """With a per-expert hook active the eager MoE runs expert by expert; the grouped GEMMs give the same."""
    model = tiny_model()
    ids = torch.randint(0, 320, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        grouped, cache = model.run_with_cache(ids, names_filter="*.mlp.gate.hook_topk_idx")
        seen = []
        with model.hooks([("model.layers.*.mlp.experts.*.hook_out", lambda x, h: seen.append(x.shape[0]))]):
            looped, cache2 = model.run_with_cache(ids, names_filter="*.mlp.gate.hook_topk_idx")
    torch.testing.assert_close(grouped, looped, atol=1e-5, rtol=0)
    assert all(torch.equal(cache[k], cache2[k]) for k in cache)
    assert sum(seen) == 3 * 50 * 3 * len(model.config.moe_layers)  # every (token, slot) pair, once


def test_the_few_row_formulations_equal_the_grouped_one():
    """gpt-fast's indexed batch-multiply (the compiled step's MoE) and the row-by-row loop over views of the stack
    (the uncompiled CPU step's and the eager MoE's for a few rows) against the grouped GEMMs."""
    gen = torch.Generator().manual_seed(0)
    E, K, D, inter, N = 8, 3, 16, 12, 5
    w13, w2 = torch.randn(E, 2 * inter, D, generator=gen), torch.randn(E, D, inter, generator=gen)
    x, weights = torch.randn(N, D, generator=gen), torch.rand(N, K, generator=gen)
    idx = torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(N)])
    grouped = routed_sum(x, idx, weights, functools.partial(grouped_experts, w13=w13, w2=w2))
    gathered = fast_decode.gathered_routed_sum(x, idx, weights, w13, w2)
    torch.testing.assert_close(gathered, grouped, atol=1e-5, rtol=1e-5)
    looped = looped_routed_sum(x, idx, weights, w13, w2)
    torch.testing.assert_close(looped, grouped, atol=1e-5, rtol=1e-5)


def test_loaded_experts_are_views_of_one_stack_per_layer(tmp_path):
    folder = write_random_checkpoint(tmp_path / "ckpt", dtype=torch.float32)
    model = dsv2viz.load(folder, device="cpu", dtype=torch.float32, progress=False, compile=False)
    assert model.compile_decode is False
    for block in model.model.layers:
        if not isinstance(block.mlp, MoE):
            continue
        moe = block.mlp
        w13, w2 = moe._stack
        for expert in moe.experts:
            for p in (expert.gate_proj.weight, expert.up_proj.weight):
                assert p.untyped_storage().data_ptr() == w13.untyped_storage().data_ptr()
            assert expert.down_proj.weight.untyped_storage().data_ptr() == w2.untyped_storage().data_ptr()
        assert moe.stacked_experts()[0] is w13  # already current: nothing restacked
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    assert sum(storages.values()) == sum(p.nbytes for p in model.parameters())  # every weight held once

    # an in-place edit of one expert's parameter is what both paths then compute with
    moe = model.model.layers[1].mlp
    with torch.no_grad():
        moe.experts[3].down_proj.weight.mul_(5.0)
    assert torch.equal(moe.stacked_experts()[1][3], moe.experts[3].down_proj.weight)


def test_restacking_after_a_move_keeps_the_weights(tiny_model):
    model = tiny_model()
    moe = model.model.layers[1].mlp
    before = [p.clone() for p in moe._expert_weights()]
    moe.stacked_experts()
    model.to(torch.float64)
    assert moe._stack is None  # the move gave the parameters new storage
    w13, _ = moe.stacked_experts()
    assert w13.dtype == torch.float64
    assert all(torch.equal(p, b.double()) for p, b in zip(moe._expert_weights(), before))


def test_compile_switches(tiny_model, monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.delenv("DSV2VIZ_COMPILE", raising=False)
    assert not fast_decode.compile_by_default(cpu) and fast_decode.compile_by_default(cuda)
    monkeypatch.setenv("DSV2VIZ_COMPILE", "off")
    assert not fast_decode.compile_by_default(cuda)
    monkeypatch.setenv("DSV2VIZ_COMPILE", "1")
    assert fast_decode.compile_by_default(cpu)
    model = tiny_model()
    assert fast_decode.compiling(model)  # the variable decides for a model not told
    model.compile_decode = False
    assert not fast_decode.compiling(model)


def test_a_failing_compiler_warns_once_and_decodes_uncompiled(tiny_model, monkeypatch):
    model = tiny_model()
    expected = model.generate(PROMPT, 8).run()

    def broken(device, moe):
        def fail(*args):
            raise RuntimeError("no C++ compiler found")

        return fail

    monkeypatch.setattr(fast_decode, "_compiled", broken)
    model.compile_decode = True
    with pytest.warns(RuntimeWarning, match="compiling the decoding step failed .*no C\\+\\+ compiler") as warned:
        got = model.generate(PROMPT, 8).run()
    assert len(warned) == 1 and model.compile_decode is False
    assert got == expected


def test_the_compiled_step_matches_and_compiles_once_for_every_length(tiny_model):
    """The one test that compiles (inductor, CPU): a single MoE layer, so one layer step to compile."""
    from torch._dynamo.utils import counters

    model = tiny_model(num_hidden_layers=1, first_k_dense_replace=0)
    record = Recording(router_probs=True)
    uncompiled = model.generate(PROMPT, 8, record=record).run()
    model.compile_decode = True
    start = time.perf_counter()
    gen = model.generate(PROMPT, 8, record=record)
    compiled = gen.run()
    assert gen.compile_seconds is not None and time.perf_counter() - start < 300
    assert_same_trace(compiled, uncompiled, atol=1e-5)
    graphs = counters["stats"]["unique_graphs"]
    other = model.generate(PROMPT[:7], 30, record=record)  # another cache length: the same compiled step
    other.run()
    assert counters["stats"]["unique_graphs"] == graphs and other.compile_seconds is None
    assert other.decode_path == "fast"


def test_bench_gpu_dry_runs_on_cpu_through_the_fast_path(capsys):
    """benchmarks/bench_gpu.py at tiny size on the CPU: one row per context, decoding on the fast path."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--tiny", "--device", "cpu", "--contexts", "16", "40", "--decode-steps", "4", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "fast path fast;" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[:1] in (["16"], ["40"])}
    assert sorted(rows) == ["16", "40"]
    for row in rows.values():  # prefill, decode, share of bandwidth, no recording, eager: all measured
        assert all(float(cell.rstrip("%")) > 0 for cell in row[1:6])
