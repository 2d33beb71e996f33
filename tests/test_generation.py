"""Streaming generation and what it records: faithfulness, stopping, budgets, save/load and interventions."""

from __future__ import annotations

import dataclasses
import json
import threading

import pytest
import torch
from safetensors.torch import save_file

from dsv2viz import interventions as iv
from dsv2viz.traces import Recording, Trace, TraceBudgetError, TraceError

PROMPT = list(range(3, 23))  # 20 token ids
FULL = Recording(attention="full", queries=True, router_probs=True, full_logits=True)


def no_hooks_left(model) -> bool:
    return not any(h.active for h in model.hook_points.values())


def test_recorded_routing_is_what_the_router_hook_saw(tiny_model):
    model = tiny_model()
    seen: dict[int, list[torch.Tensor]] = {1: [], 2: []}

    def watch(layer):
        return lambda idx, hook: seen[layer].append(idx[0].clone())

    spy = [(f"model.layers.{layer}.mlp.gate.hook_topk_idx", watch(layer)) for layer in (1, 2)]
    trace = model.generate(PROMPT, 12, interventions=spy).run()
    assert len(trace) == 20 + 12
    for layer in (1, 2):
        experts, weights = trace.routing(layer)
        assert torch.equal(experts, torch.cat(seen[layer]))
        assert experts.shape == weights.shape == (32, 3)
    df = trace.routing_df()
    assert len(df) == 2 * 32 * 3
    sel = df[(df.layer == 2) & (df.position == 25)].sort_values("rank")
    assert sel.expert.tolist() == trace.routing(2)[0][25].tolist()
    assert set(df.step) == {-1, *range(12)} and (df[df.position < 20].step == -1).all()
    assert (df[df.position >= 20].step == df[df.position >= 20].position - 20).all()
    assert [trace.step_of(p) for p in (0, 19, 20, 31, -1)] == [None, None, 0, 11, 11]


def test_rebuilt_patterns_equal_live_ones_and_parts_sum_to_scores(tiny_model):
    model = tiny_model()
    live: list[torch.Tensor] = []
    spy = [("model.layers.2.self_attn.hook_scores", lambda x, h: live.append(x[0].clone()))]
    trace = model.generate(PROMPT, 6, record=FULL, interventions=spy).run()
    S = len(trace)
    for head in range(4):
        view = trace.attention(2, head)
        assert view.pattern.shape == (S, S) and torch.equal(view.query_pos, torch.arange(S))
        rebuilt = dataclasses.replace(
            trace, tensors={k: v for k, v in trace.tensors.items() if not k.startswith("attention.")}
        )
        torch.testing.assert_close(rebuilt.attention(2, head).pattern, view.pattern, atol=1e-5, rtol=0)
        newest = rebuilt.attention(2, head, queries=[-1])  # one row, rebuilt alone
        assert newest.query_pos.tolist() == [S - 1]
        torch.testing.assert_close(newest.pattern[0], view.pattern[-1], atol=1e-5, rtol=0)
        # the parts add up to the scores the model computed, row by row as they were computed
        scores = torch.zeros(S, S)
        row = 0
        for chunk in live:  # (H, T, S_t)
            T, St = chunk.shape[1], chunk.shape[2]
            scores[row : row + T, :St] = chunk[head]
            row += T
        causal = torch.ones(S, S, dtype=torch.bool).tril()
        torch.testing.assert_close((view.scores_nope + view.scores_rope)[causal], scores[causal], atol=1e-5, rtol=0)


def test_last_row_mode_keeps_one_row_per_step(tiny_model):
    model = tiny_model()
    rec = Recording(attention="last_row", attention_layers=[1], attention_heads=[0, 3])
    steps = list(gen := model.generate(PROMPT, 5, record=rec))
    trace = gen.trace
    assert trace.tensors["attention.1"].shape == (2, 6, 25)
    assert trace.tensors["attention.1.query_pos"].tolist() == [19, 20, 21, 22, 23, 24]
    assert torch.equal(steps[-1].record["attention.1"], trace.tensors["attention.1"][:, -1])
    torch.testing.assert_close(trace.tensors["attention.1"].sum(-1), torch.ones(2, 6))
    with pytest.raises(TraceError, match="attention cannot be shown"):
        trace.attention(2, 0)
    assert trace.attention(1, 3, queries=[-1]).pattern.shape == (1, 25)
    with pytest.raises(TraceError, match=r"query positions \[5\] of layer 1 were not recorded"):
        trace.attention(1, 3, queries=[5])


def test_recording_does_not_change_the_tokens(tiny_model):
    model = tiny_model()
    for kwargs in ({}, {"temperature": 0.8, "top_p": 0.9, "top_k": 50, "seed": 3}):
        plain = model.generate(PROMPT, 15, record=Recording.off(), **kwargs).run()
        recorded = model.generate(PROMPT, 15, record=FULL, **kwargs).run()
        assert plain.generated_ids == recorded.generated_ids and len(plain.generated_ids) == 15
        assert set(plain.tensors) == {"token_ids"}


def test_steps_stream_with_their_own_records(tiny_model):
    model = tiny_model()
    gen = model.generate(PROMPT, 4)
    for step in gen:
        trace = gen.trace  # a snapshot between steps covers the token just yielded
        assert len(trace) == step.position + 1 == 21 + step.index
        assert torch.equal(step.record["experts"], trace.tensors["topk_idx"][:, step.position])
        assert step.token_id == trace.token_ids[step.position]
        assert step.record["top_ids"][0] == step.token_id  # greedy takes the likeliest token
        assert 0 < step.probability <= 1
    assert gen.finish_reason == "length"


def test_seeded_sampling_repeats_and_stop_tokens_end_generation(tiny_model):
    model = tiny_model()
    a = model.generate(PROMPT, 20, temperature=1.0, seed=11).run().generated_ids
    b = model.generate(PROMPT, 20, temperature=1.0, seed=11).run().generated_ids
    assert a == b
    stop_at = a[5]
    gen = model.generate(PROMPT, 20, temperature=1.0, seed=11, stop_tokens=(stop_at,))
    trace = gen.run()
    assert trace.generated_ids == a[: a.index(stop_at) + 1] and gen.finish_reason == "stop_token"


def test_interrupting_leaves_no_hook_behind(tiny_model):
    model = tiny_model()
    gen = model.generate(PROMPT, 50, record=FULL, interventions=iv.ablate_experts({1: [0]}))
    it = iter(gen)
    next(it)
    assert no_hooks_left(model)  # paused between steps, the generation's hooks act nowhere
    gen.stop()
    assert list(it) == [] and gen.finish_reason == "stopped"
    assert no_hooks_left(model)

    gen = model.generate(PROMPT, 50, record=FULL)
    for step in gen:
        if step.index == 2:
            break  # the loop drops its iterator, which closes it
    assert no_hooks_left(model) and gen.finish_reason == "stopped"

    gen = model.generate(PROMPT, 50, record=FULL)
    with pytest.raises(KeyError):
        for _ in gen:
            {}["the caller fails mid-generation"]
    assert no_hooks_left(model)


def test_stop_from_another_thread(tiny_model):
    model = tiny_model()
    gen = model.generate(PROMPT, 400, record=Recording.off())
    seen = []
    for step in gen:
        seen.append(step.index)
        if step.index == 3:
            threading.Thread(target=gen.stop).start()
            threading.Event().wait(0.2)
    assert 4 <= len(seen) < 400 and gen.finish_reason == "stopped"
    assert no_hooks_left(model)
    assert model.generate(PROMPT, 3).run().generated_ids == model.generate(PROMPT, 3).run().generated_ids


def test_budget_overrun_refuses_before_any_work(tiny_model):
    model = tiny_model()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    rec = Recording(attention="full", memory_budget=2**20)
    with pytest.raises(TraceBudgetError, match=r"attention.*attention='last_row'"):
        model.generate(list(range(300)), 100, record=rec)
    assert calls == [] and no_hooks_left(model)
    with pytest.raises(TraceBudgetError, match="latents"):
        model.generate(list(range(300)), 100, record=Recording(memory_budget=10_000))


def test_prompt_too_long_for_the_context(tiny_model):
    model = tiny_model(max_position_embeddings=64, rope_parameters=None)
    with pytest.raises(ValueError, match="prompt of 60 tokens \\+ max_new_tokens=10 exceeds the context of 64"):
        model.generate(list(range(60)), 10)


def test_save_and_load_round_trip(tiny_model, tmp_path):
    model = tiny_model()
    trace = model.generate(
        PROMPT, 8, record=FULL, temperature=0.7, seed=1, interventions=iv.force_experts({2: [4]})
    ).run()
    trace.save(tmp_path / "t")
    again = Trace.load(tmp_path / "t")
    assert again == trace
    assert again.meta["interventions"] == ["force experts [4] at model.layers.2.mlp.gate.hook_topk_idx"]
    torch.testing.assert_close(again.attention(1, 2).pattern, trace.attention(1, 2).pattern, atol=0, rtol=0)


def test_version_1_traces_still_load_and_are_resaved_in_version_2(tiny_model, tmp_path):
    trace = tiny_model().generate(PROMPT, 4, record=FULL).run()
    old = tmp_path / "v1"  # the layout before ids: tensors.safetensors and a trace.json without an id
    old.mkdir()
    save_file({k: v.contiguous() for k, v in trace.tensors.items()}, old / "tensors.safetensors")
    header = {
        "format": "dsv2viz-trace",
        "version": 1,
        "prompt_len": trace.prompt_len,
        "token_texts": trace.token_texts,
        "config": trace.config.to_dict(),
        "recording": dataclasses.asdict(trace.recording),
        "meta": trace.meta,
        "tensors": sorted(trace.tensors),
    }
    (old / "trace.json").write_text(json.dumps(header))
    assert Trace.load(old) == trace
    Trace.load(old).save(old)
    (data,) = old.glob("tensors-*.safetensors")
    assert sorted(p.name for p in old.iterdir()) == [data.name, "trace.json"]  # the version 1 file is gone
    assert json.loads((old / "trace.json").read_text())["version"] == 2 and Trace.load(old) == trace


def test_save_refuses_a_folder_that_is_not_a_trace_folder(tiny_model, tmp_path):
    trace = tiny_model().generate(PROMPT, 2).run()
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(TraceError, match=rf"{tmp_path} is not empty \(notes.txt\) and is not a trace folder"):
        trace.save(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "trace.json").write_text('{"format": "another-tool"}')
    with pytest.raises(TraceError, match="is not a dsv2viz trace's"):
        trace.save(tmp_path / "other")
    with pytest.raises(TraceError, match="is a file"):
        trace.save(tmp_path / "notes.txt")
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    # a trace folder is replaced; what the user keeps beside the trace stays
    folder = trace.save(tmp_path / "t")
    (folder / "README").write_text("my notes")
    longer = tiny_model().generate(PROMPT, 5).run()
    longer.save(folder)
    assert Trace.load(folder) == longer and (folder / "README").read_text() == "my notes"
    assert len(list(folder.glob("tensors-*.safetensors"))) == 1


def test_foreign_and_damaged_trace_folders(tiny_model, tmp_path):
    with pytest.raises(TraceError, match=r"no trace.json"):
        Trace.load(tmp_path)
    (tmp_path / "trace.json").write_text('{"format": "something-else"}')
    with pytest.raises(TraceError, match="not a dsv2viz trace"):
        Trace.load(tmp_path)
    folder = tiny_model().generate(PROMPT, 3).run().save(tmp_path / "t")
    (data,) = folder.glob("tensors-*.safetensors")
    data.write_bytes(data.read_bytes()[:-50])
    with pytest.raises(TraceError, match=r"tensors-[0-9a-f]{16}.safetensors: damaged"):
        Trace.load(folder)
    (folder / "trace.json").write_text("{broken")
    with pytest.raises(TraceError, match="not valid JSON"):
        Trace.load(folder)


def test_ablating_an_expert_routes_no_token_to_it_and_changes_the_output(tiny_model):
    model = tiny_model()
    base = model.generate(PROMPT, 10, record=FULL).run()
    busiest = int(base.routing(1)[0].flatten().mode().values)
    ablated = model.generate(PROMPT, 10, record=FULL, interventions=iv.ablate_experts({1: [busiest]})).run()
    assert not (ablated.routing(1)[0] == busiest).any()
    assert (base.routing(1)[0] == busiest).any()
    assert not torch.allclose(ablated.tensors["logprobs"], base.tensors["logprobs"])


def test_forcing_an_expert_routes_every_token_to_it(tiny_model):
    model = tiny_model()
    base = model.generate(PROMPT, 6).run()
    forced = model.generate(
        PROMPT, 6, record=Recording(router_probs=True), interventions=iv.force_experts({2: [6]})
    ).run()
    experts, weights = forced.routing(2)
    assert (experts[:, 0] == 6).all()
    assert torch.equal(weights, forced.router_probs(2).gather(-1, experts))  # the router's own probabilities
    assert all(len(set(row.tolist())) == 3 for row in experts)  # no expert twice
    # the other slots keep the token's own best choices
    own = base.routing(2)[0][:20]
    for row_forced, row_own in zip(experts[:20].tolist(), own.tolist()):
        assert row_forced[1:] == [e for e in row_own if e != 6][:2]


def test_head_ablation_latent_patch_and_steering_change_what_they_should(tiny_model):
    model = tiny_model()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        clean = model(ids)
    _, acts = model.run_with_cache(ids, names_filter="model.layers.1.self_attn.hook_z")
    with model.hooks(iv.ablate_heads({1: [2]})):
        _, ablated = model.run_with_cache(ids, names_filter="model.layers.1.self_attn.hook_z")
    z = ablated["model.layers.1.self_attn.hook_z"]
    assert torch.all(z[:, :, 2] == 0) and torch.equal(z[:, :, 0], acts["model.layers.1.self_attn.hook_z"][:, :, 0])

    with model.hooks(iv.patch_latent(0, dims=[1, 5], value=3.0)):
        _, patched = model.run_with_cache(ids, names_filter="model.layers.0.self_attn.hook_c_kv")
    c = patched["model.layers.0.self_attn.hook_c_kv"]
    assert torch.all(c[..., [1, 5]] == 3.0)

    vector = torch.randn(64)
    with model.hooks(iv.steer(2, vector, scale=2.0)):
        steered, acts2 = model.run_with_cache(ids, names_filter="model.layers.2.hook_resid_post")
    _, plain = model.run_with_cache(ids, names_filter="model.layers.2.hook_resid_post")
    diff = acts2["model.layers.2.hook_resid_post"] - plain["model.layers.2.hook_resid_post"]
    torch.testing.assert_close(diff, (2.0 * vector).expand_as(diff), atol=1e-5, rtol=0)
    assert not torch.allclose(steered, clean) and no_hooks_left(model)


def test_long_prompts_are_read_in_chunks_that_bound_the_score_tensor(tiny_model, monkeypatch):
    """With the pattern recorded, no layer ever builds more than SCORE_ELEMENTS_PER_CHUNK scores at once."""
    from dsv2viz import generation

    model = tiny_model()
    record = Recording(attention="full", queries=True, attention_layers=[2])
    whole = model.generate(PROMPT * 3, 4, record=record).run()
    monkeypatch.setattr(generation, "SCORE_ELEMENTS_PER_CHUNK", 4 * 60 * 8)  # 8 query rows of 60 keys, 4 heads
    largest = []
    spy = [("*.hook_scores", lambda x, h: largest.append(x.numel()))]
    chunked = model.generate(PROMPT * 3, 4, record=record, interventions=spy).run()
    assert max(largest) <= 4 * 60 * 8 < 4 * 60 * 60
    assert chunked.generated_ids == whole.generated_ids
    torch.testing.assert_close(chunked.tensors["attention.2"], whole.tensors["attention.2"], atol=1e-5, rtol=0)
    torch.testing.assert_close(chunked.tensors["topk_idx"], whole.tensors["topk_idx"], atol=0, rtol=0)


def test_chat_prompts_use_the_template(tmp_path):
    from dsv2viz import load
    from dsv2viz.random_checkpoint import write_random_checkpoint

    model = load(write_random_checkpoint(tmp_path / "m", dtype=torch.float32), progress=False)
    tok = model.tokenizer
    trace = model.generate("hi there", 3, chat=True).run()
    expected = tok.encode_chat([{"role": "user", "content": "hi there"}])
    assert trace.token_ids[: trace.prompt_len].tolist() == expected
    assert tok.decode(expected) == "<｜begin▁of▁sentence｜>User: hi there\n\nAssistant:"
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    assert model.generate(messages, 1).run().token_ids[:-1].tolist() == tok.encode_chat(messages)


def test_stored_patterns_need_no_latents(tiny_model):
    """Patterns recorded without latents are still readable; only their nope/rope parts need the latents."""
    model = tiny_model()
    trace = model.generate(PROMPT, 3, record=Recording(attention="full", latents=False, attention_layers=[1])).run()
    view = trace.attention(1, 0)
    assert view.pattern.shape == (23, 23) and view.scores_nope is None and view.scores_rope is None
