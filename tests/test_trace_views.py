"""What a trace can show: the accessors every view asks instead of reading tensor names."""

from __future__ import annotations

import pytest
import torch

import dsv2viz
from dsv2viz.traces import Recording, TraceError

PROMPT = list(range(3, 13))  # 10 token ids


def test_queries_without_latents_show_no_attention_and_say_what_to_record(tiny_model, tmp_path):
    model = tiny_model()
    trace = model.generate(PROMPT, 4, record=Recording(queries=True, latents=False)).run()
    assert trace.attention_layers() == [] and trace.attention_parts_layers() == []
    assert "latents=True" in trace.missing("attention")
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
    assert stored.missing("attention") is None and stored.missing("attention_parts") is not None
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
