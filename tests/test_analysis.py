"""Analyses of traces, checked against hand counts, numpy, torch.linalg and the model's own outputs."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch

from dsv2viz import analysis as A
from dsv2viz import interventions as iv
from dsv2viz.traces import Recording, TraceError

PROMPT = list(range(3, 23))  # 20 token ids
PROBS = Recording(router_probs=True, full_logits=True)
E, K, MOE = 8, 3, [1, 2]


def hand_counts(trace, layer: int, start: int = 0) -> list[int]:
    counter = Counter(trace.routing(layer)[0][start:].flatten().tolist())
    return [counter[e] for e in range(E)]


def test_utilization_matches_a_hand_count_and_numpy(tiny_model):
    trace = tiny_model().generate(PROMPT, 10).run()
    util = A.expert_utilization(trace)
    assert util.layers == MOE and util.tokens == 30 and util.counts.dtype == torch.int64
    for row, layer in enumerate(MOE):
        counts = hand_counts(trace, layer)
        assert util.counts[row].tolist() == counts and sum(counts) == 30 * K
        assert util.cv[row].item() == pytest.approx(np.std(counts) / np.mean(counts))
        assert util.max_over_mean[row].item() == pytest.approx(max(counts) / np.mean(counts))
    torch.testing.assert_close(util.fractions.sum(dim=1), torch.full((2,), float(K)), check_dtype=False)

    generated = A.expert_utilization(trace, generated_only=True)
    assert generated.tokens == 10
    assert generated.counts.tolist() == [hand_counts(trace, layer, start=20) for layer in MOE]

    df = util.to_frame()
    assert list(df.columns) == ["layer", "expert", "count", "fraction"] and len(df) == 2 * E
    row = df[(df.layer == 2) & (df.expert == 5)].iloc[0]
    assert row["count"] == hand_counts(trace, 2)[5] and row["fraction"] == pytest.approx(row["count"] / 30)


def test_a_corpus_counts_the_sum_of_its_traces(tiny_model):
    model = tiny_model()
    t1, t2 = model.generate(PROMPT, 6).run(), model.generate(list(range(100, 112)), 9).run()
    both = A.expert_utilization([t1, t2])
    assert both.tokens == len(t1) + len(t2)
    assert torch.equal(both.counts, A.expert_utilization(t1).counts + A.expert_utilization(t2).counts)
    assert torch.equal(A.coactivation([t1, t2], 1), A.coactivation(t1, 1) + A.coactivation(t2, 1))
    assert A.topk_weight_entropy([t1, t2]).shape == (2, len(t1) + len(t2))


def test_coactivation_is_symmetric_with_counts_on_the_diagonal(tiny_model):
    trace = tiny_model().generate(PROMPT, 10).run()
    co = A.coactivation(trace, 2)
    assert co.shape == (E, E) and co.dtype == torch.int64 and torch.equal(co, co.T)
    assert co.diagonal().tolist() == hand_counts(trace, 2)
    rows = [set(r) for r in trace.routing(2)[0].tolist()]
    i, j = sorted(rows[0])[:2]
    assert co[i, j] == sum(1 for r in rows if i in r and j in r) > 0


def test_routing_entropy_is_the_entropy_of_the_router_distribution(tiny_model):
    trace = tiny_model().generate(PROMPT, 5, record=PROBS).run()
    ent = A.routing_entropy(trace)
    assert ent.shape == (2, 25)
    probs = trace.router_probs(2)[7].tolist()
    assert ent[1, 7].item() == pytest.approx(-sum(p * math.log(p) for p in probs if p > 0), rel=1e-6)
    assert (ent <= math.log(E) + 1e-9).all() and (ent >= 0).all()

    weights = trace.routing(1)[1][4].tolist()
    w = [x / sum(weights) for x in weights]
    top = A.topk_weight_entropy(trace)
    assert top[0, 4].item() == pytest.approx(-sum(x * math.log(x) for x in w), rel=1e-6)
    assert (top <= math.log(K) + 1e-9).all()

    default = tiny_model().generate(PROMPT, 2).run()
    with pytest.raises(TraceError, match=r"router_probs=True"):
        A.routing_entropy(default)
    assert A.topk_weight_entropy(default).shape == (2, 22)


def test_margins_and_near_ties(tiny_model):
    trace = tiny_model().generate(PROMPT, 5, record=PROBS).run()
    margin = A.topk_margin(trace)
    assert margin.shape == (2, 25) and (margin >= 0).all()
    ranked = sorted(trace.router_probs(1)[11].tolist(), reverse=True)
    assert margin[0, 11].item() == pytest.approx(ranked[K - 1] - ranked[K], abs=1e-7)

    everything = A.near_ties(trace, threshold=10.0)
    assert len(everything) == 2 * 25
    assert set(zip(everything.position, everything.layer)) == {(p, lay) for p in range(25) for lay in MOE}
    row = everything[(everything.position == 11) & (everything.layer == 1)].iloc[0]
    probs = trace.router_probs(1)[11]
    assert probs[row.kth_expert].item() == ranked[K - 1] and probs[row.next_expert].item() == ranked[K]
    assert row.token == trace.token_texts[11]
    assert A.near_ties(trace, threshold=0.0).empty

    expected = set()
    for layer in MOE:
        for pos, p in enumerate(trace.router_probs(layer).tolist()):
            p = sorted(p, reverse=True)
            if p[K - 1] - p[K] < p[K - 1] * 2**-8:
                expected.add((pos, layer))
    assert set(zip(A.near_ties(trace).position, A.near_ties(trace).layer)) == expected


def test_top_tokens_per_expert_on_a_repetitive_prompt(tiny_model):
    prompt = [7] * 25 + [9, 7, 11, 7, 9, 13]
    trace = tiny_model().generate(prompt, 4).run()
    pairs = Counter()
    for text, chosen in zip(trace.token_texts, trace.routing(1)[0].tolist()):
        pairs.update((e, text) for e in chosen)
    df = A.top_tokens_per_expert(trace, 1, n=2)
    assert list(df.columns) == ["expert", "token", "count", "share"]
    for e in range(E):
        mine = sorted(((-c, text) for (x, text), c in pairs.items() if x == e))[:2]
        got = df[df.expert == e]
        assert [(-c, text) for c, text in zip(got["count"], got.token)] == mine
        total = sum(c for (x, _), c in pairs.items() if x == e)
        assert got.share.tolist() == pytest.approx([-c / total for c, _ in mine])
    assert (df[df.token == "<7>"]["count"] > 1).any()  # the repeated token dominates some expert


def test_moe_contributions_are_the_norms_of_the_experts_outputs(tiny_model):
    seen: dict[str, torch.Tensor] = {}

    def keep_first(key: str):  # the first pass reads the prompt
        return lambda x, hook: None if key in seen else seen.update({key: x[0].norm(dim=-1)})

    spy = [
        ("model.layers.2.mlp.hook_routed_out", keep_first("routed")),
        ("model.layers.2.mlp.shared_experts.hook_out", keep_first("shared")),
    ]
    trace = tiny_model().generate(PROMPT, 3, interventions=spy).run()
    df = A.moe_contributions(trace)
    assert list(df.columns) == ["trace", "layer", "position", "routed_norm", "shared_norm", "routed_share"]
    assert len(df) == 2 * 23 and df.routed_share.between(0, 1).all()
    prompt_rows = df[(df.layer == 2) & (df.position < 20)].sort_values("position")
    np.testing.assert_allclose(prompt_rows.routed_norm, seen["routed"].numpy(), rtol=1e-5)
    np.testing.assert_allclose(prompt_rows.shared_norm, seen["shared"].numpy(), rtol=1e-5)
    r, s = seen["routed"].numpy(), seen["shared"].numpy()
    np.testing.assert_allclose(prompt_rows.routed_share, r / (r + s), rtol=1e-5)


def test_compare_with_itself_and_against_an_ablation(tiny_model):
    model = tiny_model()
    base = model.generate(PROMPT, 10, record=PROBS).run()
    same = A.compare(base, base)
    assert same.first_divergence is None and same.kl_exact and same.layers == MOE
    assert (same.routing_changed == 0).all() and (same.kl == 0).all() and same.kl.shape == (10,)

    busiest = int(base.routing(1)[0].flatten().mode().values)
    ablated = model.generate(PROMPT, 10, record=PROBS, interventions=iv.ablate_experts({1: [busiest]})).run()
    cmp = A.compare(base, ablated)
    first = cmp.first_divergence
    assert first is not None and 20 <= first < 30
    assert base.token_ids[first] != ablated.token_ids[first]
    assert torch.equal(base.token_ids[:first], ablated.token_ids[:first])
    sets = [set(r) for r in base.routing(1)[0][:first].tolist()]
    changed = sum(s != set(r) for s, r in zip(sets, ablated.routing(1)[0][:first].tolist()))
    assert cmp.routing_changed[0].item() == pytest.approx(changed / first) and changed > 0
    steps = first - 20  # the step that drew the first differing token is the last comparable one
    assert not cmp.kl[: steps + 1].isnan().any() and cmp.kl[steps + 1 :].isnan().all()
    p, q = base.tensors["logprobs"][0].double(), ablated.tensors["logprobs"][0].double()
    assert cmp.kl[0].item() == pytest.approx(float((p.exp() * (p - q)).sum()), rel=1e-9)
    assert (cmp.kl[: steps + 1] > 0).all()

    # without full distributions: a coarse-grained KL, never above the exact one (data-processing inequality)
    for t in (base, ablated):
        del t.tensors["logprobs"]
    approx = A.compare(base, ablated)
    assert not approx.kl_exact and torch.equal(approx.kl.isnan(), cmp.kl.isnan())
    ok = ~cmp.kl.isnan()
    assert (approx.kl[ok] >= 0).all() and (approx.kl[ok] <= cmp.kl[ok] + 1e-9).all()
    assert (A.compare(base, base).kl == 0).all()


def test_latent_spectrum_and_effective_rank(tiny_model):
    model = tiny_model()
    t1, t2 = model.generate(PROMPT, 4).run(), model.generate([5, 6, 7], 8).run()
    stacked = torch.cat([t1.tensors["c_kv"][2], t2.tensors["c_kv"][2]]).float()
    s = A.latent_spectrum([t1, t2], 2)
    torch.testing.assert_close(s, torch.linalg.svdvals(stacked))
    assert (s[:-1] >= s[1:]).all()

    rank_one = torch.outer(torch.randn(40), torch.randn(32))
    assert A.effective_rank(torch.linalg.svdvals(rank_one)) == pytest.approx(1.0, abs=1e-3)
    orthonormal, _ = torch.linalg.qr(torch.randn(32, 6))
    assert A.effective_rank(torch.linalg.svdvals(orthonormal)) == pytest.approx(6.0, abs=1e-4)

    summary = A.latent_summary([t1, t2])
    assert summary.layer.tolist() == [0, 1, 2]
    row = summary.iloc[2]
    energy = (s.double() ** 2).tolist()
    assert row.top1_energy == pytest.approx(energy[0] / sum(energy))
    needed = next(r for r in range(1, len(energy) + 1) if sum(energy[:r]) >= 0.9 * sum(energy))
    assert row.rank_for_90pct_energy == needed
    assert 1 <= row.effective_rank <= 32

    norms = A.latent_norms(t1)
    assert norms.shape == (3, 24)
    by_hand = math.sqrt(sum(x * x for x in t1.tensors["c_kv"][1, 5].tolist()))
    assert norms[1, 5].item() == pytest.approx(by_hand, rel=1e-5)


def _zero(x: torch.Tensor, hook) -> torch.Tensor:
    return torch.zeros_like(x)


def test_rope_share_follows_which_part_of_the_query_is_left(tiny_model):
    model = tiny_model()
    rec = Recording(queries=True, attention_layers=[1], attention_heads=[0, 2])
    plain = A.rope_share(model.generate(PROMPT, 5, record=rec).run())
    assert plain[["layer", "head"]].values.tolist() == [[1, 0], [1, 2]]
    assert plain.rope_share.between(0, 1).all() and plain.rope_share.between(1e-3, 1 - 1e-3).all()

    zero_rope = [("model.layers.1.self_attn.hook_q_pe", _zero)]  # the recorded q_pe is zero too
    no_rope = model.generate(PROMPT, 5, record=rec, interventions=zero_rope).run()
    assert (A.rope_share(no_rope).rope_share == 0).all()
    zero_nope = [("model.layers.1.self_attn.hook_q_nope", _zero)]
    no_nope = model.generate(PROMPT, 5, record=rec, interventions=zero_nope).run()
    assert (A.rope_share(no_nope, layer=1, head=2).rope_share == 1).all()

    patterns_only = model.generate(PROMPT, 2, record=Recording(attention="last_row", attention_layers=[1])).run()
    assert A.rope_share(patterns_only).rope_share.between(0, 1).all()  # last-row patterns, queries to split them
    del patterns_only.tensors["q_nope.1"]  # a pattern whose scores cannot be split
    with pytest.raises(TraceError, match="queries=True"):
        A.rope_share(patterns_only)
    with pytest.raises(TraceError, match="recorded no attention"):
        A.head_entropy(model.generate(PROMPT, 2).run())


def test_head_entropy_is_the_mean_entropy_of_attention_rows(tiny_model):
    trace = tiny_model().generate(PROMPT, 4, record=Recording(attention="full", attention_layers=[0, 2])).run()
    df = A.head_entropy(trace)
    assert len(df) == 2 * 4
    pattern = trace.tensors["attention.2"][3].double()  # (S, S), rows every position
    rows = [-sum(p * math.log(p) for p in row if p > 0) for row in pattern.tolist()]
    assert df[(df.layer == 2) & (df["head"] == 3)].entropy.item() == pytest.approx(sum(rows) / len(rows))
    uniform = np.mean([math.log(i + 1) for i in range(len(trace))])  # a uniform row over its causal keys
    assert (df.entropy > 0).all() and (df.entropy <= uniform + 1e-9).all()
    matrix = A.head_matrix(df, "entropy")
    assert matrix.shape == (2, 4) and matrix[1, 3].item() == pytest.approx(sum(rows) / len(rows))


def test_logit_lens_last_layer_is_the_models_output(tiny_model):
    model = tiny_model()
    trace = model.generate(PROMPT, 3).run()
    lens = A.logit_lens(model, trace, top=4)
    assert list(lens.columns) == ["layer", "position", "rank", "token_id", "token", "prob"]
    assert sorted(lens.layer.unique()) == [-1, 0, 1, 2] and len(lens) == 4 * 23 * 4
    with torch.no_grad():
        probs = model(trace.token_ids[None])[0].float().softmax(-1)
    best = probs.topk(4, dim=-1)
    last = lens[lens.layer == 2].sort_values(["position", "rank"])
    assert last.token_id.tolist() == best.indices.flatten().tolist()
    assert torch.equal(torch.tensor(last.prob.to_numpy()), best.values.flatten())
    assert last.token.tolist() == [f"<{i}>" for i in best.indices.flatten().tolist()]

    some = A.logit_lens(model, PROMPT, positions=[0, -1], top=2)
    assert set(some.position) == {0, 19} and len(some) == 4 * 2 * 2
    assert isinstance(some, pd.DataFrame) and (some.groupby(["layer", "position"]).prob.is_monotonic_decreasing).all()
