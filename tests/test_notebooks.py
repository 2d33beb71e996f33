"""The notebooks run top to bottom on the bundled demo model, and what each one claims is asserted."""

from __future__ import annotations


def test_01_quickstart(run_notebook):
    run_notebook("01_quickstart.ipynb", """
asked = dash.max_new_tokens.value
assert len(trace.generated_ids) == asked, (len(trace.generated_ids), asked)
assert dsv2viz.Trace.load(folder) == trace
html = open(report_path, encoding="utf-8").read()
assert html.count('class="plotly-graph-div"') >= 10
import re
assert not re.search(r'<script[^>]+src="https?:', html), "the report must not load scripts from the network"
""")


def test_02_expert_routing(run_notebook):
    run_notebook("02_expert_routing.ipynb", """
import math, keyword
from collections import Counter
K, E, moe = c.num_experts_per_tok, c.n_routed_experts, c.moe_layers

# utilization: every token fills K slots per layer; counts, CV and busiest/mean from the traces' own routing
tokens = sum(len(t) for t in traces)
assert util.tokens == tokens >= 200, tokens
assert (util.counts.sum(1) == tokens * K).all()
for row, lay in enumerate(moe):
    ref = Counter(e for t in traces for chosen in t.routing(lay)[0].tolist() for e in chosen)
    assert all(len(set(chosen)) == K for t in traces for chosen in t.routing(lay)[0].tolist())
    assert util.counts[row].tolist() == [ref[e] for e in range(E)]
    load = [ref[e] for e in range(E)]
    mean = sum(load) / E
    std = math.sqrt(sum((x - mean) ** 2 for x in load) / E)
    assert math.isclose(balance.cv[row], std / mean, rel_tol=1e-9)
    assert math.isclose(balance["busiest/mean"][row], max(load) / mean, rel_tol=1e-9)
    assert math.isclose(balance["least used share"][row], min(load) / (K * tokens), rel_tol=1e-6)
    assert balance["idle experts"][row] == sum(x == 0 for x in load)
assert math.isclose(chance_cv, math.sqrt((E - K) / (K * tokens)))
assert (util_fig.data[0].z == util.counts.numpy()).all()
assert list(util_fig.data[1].x) == util.cv.tolist() and list(util_fig.data[2].x) == util.max_over_mean.tolist()

# co-activation: symmetric, diagonal = the layer's counts, pairs counted from the routed sets
assert layer == moe[int(max(range(len(moe)), key=lambda r: balance.cv[r]))]
assert torch.equal(co, co.T)
assert torch.equal(co.diag(), util.counts[moe.index(layer)])
sets = [set(chosen) for t in traces for chosen in t.routing(layer)[0].tolist()]
for _, p in teams.iterrows():
    ea, eb = int(p["expert a"]), int(p["expert b"])
    together = sum(ea in s and eb in s for s in sets)
    assert p.together == together == int(co[ea, eb]) >= 5
    expected = sum(ea in s for s in sets) * sum(eb in s for s in sets) / tokens
    assert math.isclose(p.ratio, together / expected, rel_tol=1e-9)
assert teams.ratio.is_monotonic_decreasing and teams.ratio.iloc[0] == pairs[pairs.together >= 5].ratio.max()
assert (co_fig.data[0].z == co.numpy()).all()

# specialization: each listed top token's count and share, and the kind table, from the traces
texts = [(text, chosen) for t in traces for text, chosen in zip(t.token_texts, t.routing(layer)[0].tolist())]
for _, r in top.iterrows():
    given_e = sum(r.expert in chosen for _, chosen in texts)
    count = sum(text == r.token and r.expert in chosen for text, chosen in texts)
    assert r["count"] == count and math.isclose(r.share, count / given_e)
def kind_of(s):
    s = s.strip()
    return "whitespace" if not s else "keyword" if keyword.iskeyword(s) else "identifier" if s.isidentifier() else "other"
for _, f in favourites.iterrows():
    mine = [kind_of(text) for text, chosen in texts if f.expert in chosen]
    assert f["tokens given"] == len(mine) >= 10
    assert math.isclose(f["share of its tokens"], mine.count(f.kind) / len(mine))
    assert math.isclose(f["share of all tokens"], sum(kind_of(t) == f.kind for t, _ in texts) / len(texts))
    assert math.isclose(f.enrichment, f["share of its tokens"] / f["share of all tokens"])
    candidates = [e for e in range(E) if sum(e in ch for _, ch in texts) >= 10]
    best = max(sum(kind_of(t) == f.kind for t, ch in texts if e in ch) / sum(e in ch for _, ch in texts) for e in candidates)
    assert math.isclose(f["share of its tokens"], best)

# near-ties: each listed margin recomputed from the router distribution and below 2**-8 of the K-th probability,
# and no other choice is below it
def kth_and_gap(probs):  # (S, E) -> the K-th probability and its lead over the (K+1)-th
    p = probs.double().sort(dim=-1, descending=True).values
    return p[:, K - 1], p[:, K - 1] - p[:, K]
listed = set()
for _, r in ties.iterrows():
    kth, gap = kth_and_gap(traces[r.trace].router_probs(r.layer)[r.position][None])
    assert math.isclose(r.margin, float(gap), rel_tol=1e-5, abs_tol=1e-9)
    assert r.margin < float(kth) * 2 ** -8
    chosen = set(traces[r.trace].routing(r.layer)[0][r.position].tolist())
    assert r.kth_expert in chosen and r.next_expert not in chosen
    listed.add((r.trace, r.layer, r.position))
below = [(i, lay, pos) for i, t in enumerate(traces) for lay in moe
            for pos in (lambda kth, gap: (gap < kth * 2 ** -8).nonzero().flatten().tolist())(*kth_and_gap(t.router_probs(lay)))]
assert set(below) == listed
assert confidence["near-ties"].sum() == len(ties)
reference = torch.cat([torch.stack([kth_and_gap(t.router_probs(lay))[1] for lay in moe]) for t in traces], dim=1)
assert torch.allclose(margins.double(), reference, atol=1e-7)
assert (entropy <= math.log(E) + 1e-9).all() and (entropy >= 0).all()
assert (confidence_fig.data[0].z == margins[:, :len(traces[0])].numpy()).all()
""")
