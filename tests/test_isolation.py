"""Runs that cannot disturb each other: hooks belong to the run that attached them.

Every test here failed before hooks were scoped to their run: interventions attached model-wide stayed
on after an error, a paused generation's hooks acted on other runs, and two threads mixed their traces.
"""

from __future__ import annotations

import contextvars
import math
import threading

import pytest
import torch
from conftest import generate_together

from dsv2viz import HookError, NonFiniteError, Sampling
from dsv2viz import interventions as iv
from dsv2viz.traces import Recording
from dsv2viz.widgets import GenerationDashboard

PROMPT = list(range(3, 23))  # 20 token ids
OTHER = list(range(40, 52))
FULL = Recording(attention="full", queries=True, router_probs=True, full_logits=True)


def no_hooks_left(model) -> bool:
    return not any(h.active for h in model.hook_points.values())


def logits_of(model, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))


def test_a_bad_name_anywhere_in_a_list_attaches_nothing(tiny_model):
    model = tiny_model()
    before = logits_of(model, PROMPT)
    bad = [*iv.ablate_experts({1: [0, 1, 2]}), ("model.layers.1.mlp.gate.hook_probz", lambda x, h: None)]
    with pytest.raises(KeyError, match="hook_probz"):
        model.generate(PROMPT, 4, interventions=bad)
    with pytest.raises(KeyError, match="hook_probz"), model.hooks(bad):
        pass
    with pytest.raises(KeyError, match="hook_probz"):
        model.run_with_hooks(torch.tensor([PROMPT]), fwd_hooks=bad)
    assert no_hooks_left(model)
    assert torch.equal(logits_of(model, PROMPT), before)


def test_a_paused_generation_touches_no_other_run(tiny_model):
    model = tiny_model()
    baseline = model.generate(OTHER, 10, record=FULL).run()
    before = logits_of(model, OTHER)
    top = int(baseline.routing(1)[0][0, 0])
    paused = model.generate(PROMPT, 12, record=FULL, interventions=iv.ablate_experts({1: [top]}))
    steps = iter(paused)
    next(steps), next(steps)
    held = paused.trace
    assert no_hooks_left(model)
    assert torch.equal(logits_of(model, OTHER), before)  # its ablation is not applied to a plain pass
    assert model.generate(OTHER, 10, record=FULL).run() == baseline  # nor to another generation
    assert paused.trace == held  # and its recorder saw nothing of them
    rest = list(steps)
    assert len(rest) == 10
    straight = model.generate(PROMPT, 12, record=FULL, interventions=iv.ablate_experts({1: [top]})).run()
    assert paused.trace == straight  # resuming gives exactly the uninterrupted run


def test_two_threads_generate_exactly_what_each_generates_alone(tiny_model):
    model = tiny_model(max_position_embeddings=4096)
    runs = {
        "plain": lambda: model.generate(PROMPT, 40, record=FULL),
        "ablated, sampled": lambda: model.generate(
            OTHER, 40, record=FULL, temperature=0.8, seed=3, interventions=iv.ablate_experts({2: [0, 5]})
        ),
    }
    alone = {name: make().run() for name, make in runs.items()}
    together = generate_together(runs)
    for name in runs:
        assert together[name].trace == alone[name], name
    assert no_hooks_left(model)


def test_a_hooks_block_acts_only_in_its_own_thread(tiny_model):
    model = tiny_model()
    before = logits_of(model, PROMPT)
    inside, done = threading.Event(), threading.Event()
    seen = {}

    def block() -> None:
        with model.hooks([("model.layers.1.hook_resid_post", lambda x, h: torch.zeros_like(x))]):
            inside.set()
            done.wait(30)
            seen["inside"] = logits_of(model, PROMPT)

    thread = threading.Thread(target=block)
    thread.start()
    inside.wait(30)
    assert torch.equal(logits_of(model, PROMPT), before)  # the other thread's block does not reach here
    done.set()
    thread.join(30)
    assert not torch.equal(seen["inside"], before)  # but it did act inside its own block
    assert no_hooks_left(model)


def test_a_thread_run_in_a_copy_of_the_context_sees_the_blocks_hooks(tiny_model):
    model = tiny_model()
    calls = []
    with model.hooks([("model.hook_embed", lambda x, h: calls.append(tuple(x.shape)))]):
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(logits_of, model, PROMPT))
        thread.start()
        thread.join(30)
    assert calls == [(1, 20, 64)]


def test_torch_module_hooks_on_a_hook_point_point_to_the_dsv2viz_api(tiny_model):
    model = tiny_model()
    point = model.hook_points["model.layers.1.self_attn.hook_c_kv"]
    with pytest.raises(HookError, match=r"hook_c_kv does not run torch module hooks.*model\.hooks"):
        point.register_forward_hook(lambda *a: None)
    with pytest.raises(HookError, match=r"model\.hooks"):
        point.register_forward_pre_hook(lambda *a: None)


def test_run_with_cache_takes_names_filter_and_remove_batch_dim(tiny_model):
    model = tiny_model()
    ids = torch.tensor([PROMPT])
    names = ["model.layers.1.self_attn.hook_c_kv", "model.layers.2.self_attn.hook_c_kv"]
    _, by_list = model.run_with_cache(ids, names_filter=names)
    _, by_glob = model.run_with_cache(ids, names_filter="model.layers.[12].self_attn.hook_c_kv")
    _, by_predicate = model.run_with_cache(ids, names_filter=lambda n: n in names)
    assert list(by_list) == list(by_glob) == list(by_predicate) == names
    _, squeezed = model.run_with_cache(
        ids, names_filter=["*.hook_c_kv", "model.layers.1.mlp.experts.*"], remove_batch_dim=True
    )
    assert squeezed["model.layers.1.self_attn.hook_c_kv"].shape == (20, 32)
    torch.testing.assert_close(squeezed["model.layers.1.self_attn.hook_c_kv"], by_list[names[0]][0], atol=0, rtol=0)
    routed = [n for n in squeezed if ".experts." in n]
    assert routed and all(squeezed[n].dim() == 2 and squeezed[n].shape[1] == 64 for n in routed)  # (N, D) kept
    assert sum(squeezed[n].shape[0] for n in routed) == 20 * 3  # every (token, slot) pair
    with pytest.raises(ValueError, match="batch size 1"):
        model.run_with_cache(torch.tensor([PROMPT, PROMPT]), names_filter="*.hook_c_kv", remove_batch_dim=True)


def test_the_inner_model_has_a_forward(tiny_model):
    model = tiny_model()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        hidden = model.model(ids)
        assert hidden.shape == (1, 20, 64)
        assert torch.equal(model.lm_head(hidden), model(ids))


def test_non_finite_output_names_the_first_layer_and_leaves_the_cache(tiny_model):
    model = tiny_model()
    cache = model.new_cache()
    nan = [("model.layers.1.hook_resid_post", lambda x, h: x * float("nan"))]
    with pytest.raises(NonFiniteError, match=r"layer 1 \(model\.layers\.1\.hook_resid_post\)"):
        model.run_with_hooks(torch.tensor([PROMPT]), cache, fwd_hooks=nan)
    assert cache.length == 0
    with pytest.raises(NonFiniteError, match="layer 1"):
        model.generate(PROMPT, 3, interventions=nan).run()
    assert no_hooks_left(model)
    assert model.generate(PROMPT, 3).run().generated_ids == model.generate(PROMPT, 3).run().generated_ids


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": math.nan},
        {"temperature": math.inf},
        {"temperature": -0.5},
        {"top_p": math.nan},
        {"top_p": 0.0},
        {"top_k": 0},
        {"top_k": 2.5},
        {"max_new_tokens": True},
        {"max_new_tokens": -1},
        {"seed": -3},
        {"stop_tokens": (1, -2)},
    ],
    ids=lambda bad: ",".join(f"{k}={v}" for k, v in bad.items()),
)
def test_sampling_values_are_checked(bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name.replace("_", ".")):
        Sampling(**bad)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: iv.ablate_experts({1: [-1]}), "experts -1 is negative"),
        (lambda: iv.ablate_experts({1: [8]}), r"experts \[8\] out of range: layer 1 has 8"),
        (lambda: iv.ablate_experts({0: [1]}), "layer 0 is not an MoE layer"),
        (lambda: iv.ablate_experts({1: range(6)}), "cannot ablate 6 of 8 experts"),
        (lambda: iv.force_experts({2: [1, 2, 3, 4]}), "cannot force 4 experts"),
        (lambda: iv.force_experts({2: [-8]}), "negative"),
        (lambda: iv.ablate_heads({1: [4]}), r"heads \[4\] out of range"),
        (lambda: iv.ablate_heads({-1: [0]}), "layer -1 is negative"),
        (lambda: iv.patch_latent(0, dims=[32]), r"dims \[32\] out of range"),
        (lambda: iv.patch_latent(0, positions=[-1]), "positions -1 is negative"),
        (lambda: iv.patch_latent(0, value=float("nan")), "finite"),
        (lambda: iv.steer(1, torch.ones(63)), "63 values; the residual stream has 64"),
        (lambda: iv.steer(1, torch.ones(64), scale=math.inf), "finite"),
    ],
)
def test_intervention_indices_are_checked_before_any_forward_pass(tiny_model, make, message):
    model = tiny_model()
    passes = []
    model.register_forward_pre_hook(lambda *a: passes.append(1))
    with pytest.raises(ValueError, match=message):
        model.generate(PROMPT, 3, interventions=make())
    assert passes == [] and no_hooks_left(model)


def test_patch_latent_at_chosen_positions_only(tiny_model):
    model = tiny_model()
    cache, patched_cache = model.new_cache(), model.new_cache()
    names = "model.layers.1.self_attn.hook_c_kv"
    patch = iv.patch_latent(1, dims=[0, 3], value=5.0, positions=[4, 21])
    prompt, decode = torch.tensor([PROMPT]), torch.tensor([[7]])
    for ids in (prompt, decode, decode):  # positions 0..19, then 20, then 21
        _, plain = model.run_with_cache(ids, cache, names_filter=names)
        with model.hooks(patch):
            _, patched = model.run_with_cache(ids, patched_cache, names_filter=names)
        plain, patched = plain[names][0], patched[names][0]  # (T, R)
        start = patched_cache.length - ids.shape[1]
        for row in range(ids.shape[1]):
            if start + row in (4, 21):
                assert (patched[row, [0, 3]] == 5.0).all() and torch.equal(patched[row, 4:], plain[row, 4:])
            elif start + row < 4:
                assert torch.equal(patched[row], plain[row])  # before the patch nothing differs
            else:
                assert not (patched[row, [0, 3]] == 5.0).all()
    assert patched_cache.length == 22


def test_a_failing_dashboard_generation_shows_its_error_and_returns_to_ready(tiny_model):
    dash = GenerationDashboard(tiny_model())
    dash.max_new_tokens.value = 6
    make = dash._generation
    dash._generation = lambda prompt, interventions: make(
        prompt, [("model.layers.1.self_attn.hook_z", lambda x, h: 1 / 0)]
    )
    dash.run(PROMPT, wait=True)
    assert "ZeroDivisionError" in dash.status.value and "error" in dash.status.value
    assert not dash.generate_button.disabled and dash.stop_button.disabled and not dash.running
    dash._generation = make
    dash.run(PROMPT, wait=True)  # and it generates again
    assert dash.status.value.startswith("generated: 6 tokens")


def test_two_dashboards_on_one_model_run_at_once(tiny_model):
    model = tiny_model()
    a, b = GenerationDashboard(model), GenerationDashboard(model)
    for dash in (a, b):
        dash.max_new_tokens.value = 16
    a.run(PROMPT, wait=True)
    layer = model.config.moe_layers[0]
    a.iv_layer.value, a.iv_expert.value = layer, int(a.trace.routing(layer)[0][0, 0])
    streams = [a.regenerate(wait=False), b.run(OTHER, wait=False)]  # an intervention and a plain run, together
    for s in streams:
        s.join(120)
    assert all(s.error is None for s in streams)

    def alone(prompt, interventions=()):
        return model.generate(prompt, 16, seed=0, record=Recording(queries=True), interventions=interventions).run()

    assert b.trace == alone(OTHER)
    assert a.intervention_trace == alone(PROMPT, iv.ablate_experts({layer: [a.iv_expert.value]}))
    assert a.status.value.startswith("intervention: 16 tokens") and b.status.value.startswith("generated: 16 tokens")
    assert no_hooks_left(model)
