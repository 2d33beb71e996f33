"""What a trace can show: the accessors every view asks instead of reading tensor names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import dsv2viz
from dsv2viz import analysis
from dsv2viz.traces import Recording, TraceError

PROMPT = list(range(3, 13))  # 10 token ids
VIEWS = (
    "routing",
    "router_probs",
    "latents",
    "attention",
    "attention_parts",
    "candidates",
    "full_logits",
    "residual_norms",
    "moe_norms",
)


def test_queries_without_latents_show_no_attention_and_say_what_to_record(tiny_model, tmp_path):
    model = tiny_model()
    trace = model.generate(PROMPT, 4, record=Recording(queries=True, latents=False)).run()
    assert trace.attention_layers() == [] and trace.attention_parts_layers() == [] and trace.attention_heads() == []
    assert trace.missing("attention") == trace.missing("attention_parts") == "Recording(latents=True)"
    with pytest.raises(TraceError, match=r"Recording\(latents=True too\)"):
        trace.attention(1, 0)
    page = dsv2viz.report(trace, tmp_path / "r.html").read_text()  # used to crash asking for queries=True
    assert "Not recorded" in page and "latents=True" in page


def test_attention_layers_are_stored_or_rebuildable_ones(tiny_model):
    model = tiny_model()
    stored = model.generate(
        PROMPT, 3, record=Recording(attention="last_row", attention_layers=[2], latents=False)
    ).run()
    assert stored.attention_layers() == [2] and stored.attention_parts_layers() == []
    assert stored.has("attention") and stored.attention_heads() == [0, 1, 2, 3]
    assert stored.missing("attention") is None and stored.missing("attention_parts") == "Recording(latents=True)"
    rebuilt = model.generate(PROMPT, 3, record=Recording(queries=True, attention_layers=[0, 2])).run()
    assert rebuilt.attention_layers() == rebuilt.attention_parts_layers() == [0, 2]
    assert rebuilt.missing("router_probs") == "Recording(router_probs=True)"
    with pytest.raises(ValueError, match="unknown view"):
        rebuilt.missing("attentions")


def test_candidates_are_the_distribution_each_token_was_drawn_from(tiny_model):
    model = tiny_model()
    generation = model.generate(PROMPT, 5, record=Recording(full_logits=True))
    steps = list(generation)
    trace = generation.trace
    for step in steps:
        ids, probs = trace.candidates(step.position - 1)
        assert ids[0] == step.token_id  # greedy: the token is the likeliest candidate
        full = trace.tensors["logprobs"][step.index].exp()
        assert torch.equal(ids, full.topk(len(ids)).indices) and torch.allclose(probs, full[ids])
    for position in (0, len(PROMPT) - 2, len(trace) - 1):
        with pytest.raises(TraceError, match="no next-token distribution after position"):
            trace.candidates(position)
    assert [trace.step_of(s.position) for s in steps] == [s.index for s in steps] == list(range(5))


def test_missing_names_exactly_the_settings_a_view_lacks(tiny_model):
    model = tiny_model()
    nothing = model.generate(PROMPT, 2, record=Recording.off()).run()
    assert {view: nothing.missing(view) for view in VIEWS} == {
        "routing": "Recording(routing=True)",
        "router_probs": "Recording(router_probs=True)",
        "latents": "Recording(latents=True)",
        "attention": "Recording(attention='full' or 'last_row', or queries=True with latents=True)",
        "attention_parts": "Recording(queries=True, latents=True)",  # used to read 'queries=True and latents=True'
        "candidates": "Recording(top_logits=10)",
        "full_logits": "Recording(full_logits=True)",
        "residual_norms": "Recording(residual_norms=True)",
        "moe_norms": "Recording(moe_norms=True)",
    }
    assert not any(nothing.has(view) for view in VIEWS)
    everything = Recording(router_probs=True, queries=True, attention_heads=[1, 3], full_logits=True)
    full = model.generate(PROMPT, 2, record=everything).run()
    assert all(full.missing(view) is None and full.has(view) for view in VIEWS)
    assert full.attention_heads() == [1, 3]
    patterns = model.generate(PROMPT, 2, record=Recording(attention="full", attention_layers=[1])).run()
    del patterns.tensors["q_nope.1"]  # a pattern kept without its queries
    assert patterns.has("attention") and patterns.missing("attention_parts") == "Recording(queries=True)"


def test_a_model_without_moe_layers_has_no_routing_and_needs_none(tiny_model):
    dense = tiny_model(first_k_dense_replace=3).generate(PROMPT, 2).run()
    for view in ("routing", "router_probs", "moe_norms"):
        assert dense.missing(view) is None and not dense.has(view)
    with pytest.raises(ValueError, match="no MoE layers"):  # used to ask for Recording(moe_norms=True), which was on
        analysis.moe_contributions(dense)


def test_logprobs_are_the_whole_distribution_each_token_was_drawn_from(tiny_model):
    model = tiny_model()
    generation = model.generate(PROMPT, 4, record=Recording(full_logits=True))
    steps = list(generation)
    trace = generation.trace
    for step in steps:
        logprobs = trace.logprobs(step.position - 1)
        assert logprobs.shape == (model.config.vocab_size,)
        assert logprobs.exp().sum().item() == pytest.approx(1, abs=1e-5)
        assert int(logprobs.argmax()) == step.token_id  # greedy
        ids, probs = trace.candidates(step.position - 1)
        assert torch.equal(ids, logprobs.topk(len(ids)).indices) and torch.allclose(probs, logprobs[ids].exp())
    with pytest.raises(TraceError, match="no next-token distribution after position 13"):
        trace.logprobs(len(PROMPT) + 4 - 1)  # the last token: nothing was drawn after it
    with pytest.raises(TraceError, match=r"Recording\(full_logits=True\)"):
        model.generate(PROMPT, 2).run().logprobs(len(PROMPT))


@pytest.mark.parametrize("shared_experts", [2, 0])
def test_moe_and_residual_norms_are_the_norms_of_the_hooked_outputs(tiny_model, shared_experts):
    model = tiny_model(n_shared_experts=shared_experts)
    trace = model.generate(PROMPT, 3).run()
    names = ["model.hook_embed", *(f"model.layers.{layer}.hook_resid_post" for layer in range(3))]
    for layer in trace.moe_layers:
        names += [f"model.layers.{layer}.mlp.hook_routed_out", f"model.layers.{layer}.mlp.shared_experts.hook_out"]
    _, cache = model.run_with_cache(trace.token_ids[None], names_filter=lambda name: name in names)
    residual = torch.stack([cache[name][0].norm(dim=-1) for name in names[:4]])  # (L + 1, S)
    torch.testing.assert_close(trace.residual_norms(), residual, rtol=1e-4, atol=1e-5)
    for layer in trace.moe_layers:
        routed, shared = trace.moe_norms(layer)
        torch.testing.assert_close(routed, cache[f"model.layers.{layer}.mlp.hook_routed_out"][0].norm(dim=-1))
        if shared_experts:
            torch.testing.assert_close(
                shared, cache[f"model.layers.{layer}.mlp.shared_experts.hook_out"][0].norm(dim=-1)
            )
        else:  # no shared experts: they add nothing
            assert torch.equal(shared, torch.zeros(len(trace)))
    with pytest.raises(TraceError, match="not an MoE layer"):
        trace.moe_norms(0)


def test_rope_share_without_latents_asks_for_the_latents(tiny_model):
    trace = tiny_model().generate(PROMPT, 2, record=Recording(attention="last_row", latents=False)).run()
    assert len(analysis.head_entropy(trace)) == 3 * 4  # the stored patterns
    with pytest.raises(TraceError, match=r"record it with Recording\(latents=True\)$"):  # used to ask for queries
        analysis.rope_share(trace)


def test_no_module_outside_the_traces_package_reads_trace_tensors_by_name():
    package = Path(dsv2viz.__file__).parent
    readers = {
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if path.parent.name != "traces" and re.search(r"\.tensors\b(?!\()|\.require\(", path.read_text())
    }
    assert readers == set()
