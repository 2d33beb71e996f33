"""The notebooks run top to bottom on the bundled demo model, and what each one claims is asserted."""

from __future__ import annotations


def test_01_quickstart(run_notebook):
    run_notebook(
        "01_quickstart.ipynb",
        """
asked = dash.max_new_tokens.value
assert len(trace.generated_ids) == asked, (len(trace.generated_ids), asked)
assert dsv2viz.Trace.load(folder) == trace
html = open(report_path, encoding="utf-8").read()
assert html.count('class="plotly-graph-div"') >= 10
import re
assert not re.search(r'<script[^>]+src="https?:', html), "the report must not load scripts from the network"
""",
    )


def test_02_expert_routing(run_notebook):
    run_notebook(
        "02_expert_routing.ipynb",
        """
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
texts = [(text, chosen) for t in traces for text, chosen in zip(t.id_labels, t.routing(layer)[0].tolist())]
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

# over a corpus: every module head routed whole, utilization recounted from the Parquet rows, the
# corpus-level enrichment recomputed from the rows' token ids
import numpy as np
docs = corpus.documents()
assert len(docs) == 40 and corpus.skipped().empty
heads = [json.loads(line)["text"] for line in open(work / "stdlib.jsonl")]
assert list(docs.tokens) == [len(model.tokenizer.encode(h)) for h in heads]
rows = corpus.rows(["layer", "experts", "token_id"])
assert corpus_util.tokens == corpus.tokens == docs.tokens.sum() == len(rows) // len(moe)
for row, lay in enumerate(moe):
    recount = np.bincount(np.concatenate(rows.experts[rows.layer == lay].to_numpy()), minlength=E)
    assert corpus_util.counts[row].tolist() == recount.tolist()
assert (corpus_util_fig.data[0].z == corpus_util.counts.numpy()).all()
assert math.isclose(corpus_chance_cv, math.sqrt((E - K) / (K * corpus.tokens)))
mine = rows[rows.layer == layer]
ids = sorted(set(mine.token_id.tolist()))
text_of = dict(zip(ids, corpus.token_text(ids)))
slot_kinds = [kind_of(text_of[tid]) for tid, chosen in zip(mine.token_id, mine.experts) for _ in chosen]
slot_experts = np.concatenate(mine.experts.to_numpy())
for _, h in held.iterrows():
    of_e = [k for k, e in zip(slot_kinds, slot_experts) if e == h.expert]
    expected = (of_e.count(h.kind) / len(of_e)) / (slot_kinds.count(h.kind) / len(slot_kinds))
    assert math.isclose(h["enrichment, corpus"], expected, rel_tol=1e-9)
assert (corpus_co_fig.data[0].z == analysis.coactivation(corpus, layer).numpy()).all()
""",
    )


def test_03_latent_kv(run_notebook):
    run_notebook(
        "03_latent_kv.ipynb",
        """
import math
import numpy as np
R, dr, L, H = c.kv_lora_rank, c.qk_rope_head_dim, c.num_hidden_layers, c.num_attention_heads

# sizes: (latent + rope key) x layers x bytes, against heads x (nope + rope + v) x layers x bytes
for name, cfg in (("this model", c), ("DeepSeek-V2-Lite", DEEPSEEK_V2_LITE)):
    col = sizes[name]
    assert col["MLA bytes per token (bf16)"] == (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_hidden_layers * 2
    per_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    assert col["standard bytes per token (bf16)"] == cfg.num_attention_heads * per_head * cfg.num_hidden_layers * 2
assert sizes["DeepSeek-V2-Lite"]["MLA values per token and layer"] == 576
assert sizes["DeepSeek-V2-Lite"]["standard values per token and layer"] == 5120
assert sizes["DeepSeek-V2-Lite"]["MLA bytes per token (bf16)"] == 31104

# the hand-driven cache: its size from the config and the dtype, and it holds what the trace recorded
assert itemsize == torch.finfo(model.dtype).bits // 8
assert cache.length == len(ids) == len(model.tokenizer.encode(PROMPT)) + N_NEW
assert cache.bytes_per_token == (R + dr) * L * itemsize == c.kv_cache_bytes_per_token(itemsize)
assert cache.nbytes == cache.bytes_per_token * cache.length
assert trace.token_ids.tolist() == ids, "greedy generate and the hand-driven loop must pick the same tokens"
for layer in range(L):
    c_kv, k_pe = trace.latent(layer)
    assert torch.allclose(c_kv, cache.c_kv[layer, 0, : len(ids)], atol=1e-5)
    assert torch.allclose(k_pe, cache.k_pe[layer, 0, : len(ids)], atol=1e-5)

# spectrum and summary, recomputed with numpy's SVD
for layer in range(L):
    s = np.linalg.svd(trace.latent(layer)[0].double().numpy(), compute_uv=False)
    p = s / s.sum()
    rank = math.exp(-(p[p > 0] * np.log(p[p > 0])).sum())
    energy = np.cumsum(s ** 2) / (s ** 2).sum()
    row = summary.iloc[layer]
    assert row.layer == layer and 1 <= row.effective_rank <= min(R, len(trace))
    assert math.isclose(row.effective_rank, rank, rel_tol=1e-4)
    assert math.isclose(row.top1_energy, energy[0], rel_tol=1e-4)
    assert row.rank_for_90pct_energy == int((energy < 0.9).sum()) + 1
    assert np.allclose(spectrum_fig.data[layer].y, s, rtol=1e-4)
    assert f"eff. rank {rank:.1f}" in spectrum_fig.data[layer].name

# latent norms
for layer in range(L):
    n = trace.latent(layer)[0].norm(dim=-1)
    assert largest.position[layer] == int(n.argmax()) and math.isclose(largest.norm[layer], float(n.max()), rel_tol=1e-5)

# rope share: in [0, 1]; each head's nope + rope parts equal the model's own scores, and the share recomputed
# from the model's own scores and pattern (one full forward pass with hooks, not the trace's rebuild)
assert len(shares) == L * H and shares.rope_share.between(0, 1).all()
names = [f"model.layers.{layer}.self_attn.{h}" for layer in range(L) for h in ("hook_scores_nope", "hook_scores_rope", "hook_pattern")]
_, acts = model.run_with_cache(trace.token_ids[None].to(model.device), names_filter=names)
causal = torch.ones(len(trace), len(trace)).tril().bool()
for _, r in shares.iterrows():
    layer, head = int(r.layer), int(r["head"])
    pre = f"model.layers.{layer}.self_attn."
    nope, rope, pattern = (acts[pre + h][0, head].double().cpu() for h in ("hook_scores_nope", "hook_scores_rope", "hook_pattern"))
    view = trace.attention(layer, head)
    assert torch.allclose((view.scores_nope + view.scores_rope)[causal].double(), (nope + rope)[causal], atol=1e-4)
    assert torch.allclose(view.pattern.double(), pattern, atol=1e-5)
    expected = float((pattern * rope.abs()).sum() / (pattern * (nope.abs() + rope.abs())).sum())
    assert math.isclose(r.rope_share, expected, rel_tol=1e-4), (layer, head, r.rope_share, expected)
assert (hi.rope_share, lo.rope_share) == (shares.rope_share.max(), shares.rope_share.min())
assert np.allclose(rope_fig.data[0].z, analysis.head_matrix(shares, "rope_share").numpy(), equal_nan=True)
""",
    )


def test_04_attention_heads(run_notebook):
    run_notebook(
        "04_attention_heads.ipynb",
        """
import math
import numpy as np
L, H, S = c.num_hidden_layers, c.num_attention_heads, len(trace)
assert ATT_LAYERS == list(range(L)) and len(heads) == L * H

# every head's entropy and masses, from the model's own patterns (one forward pass over the trace's tokens)
_, acts = model.run_with_cache(trace.token_ids[None].to(model.device), names_filter="*.self_attn.hook_pattern")
for _, r in heads.iterrows():
    p = acts[f"model.layers.{int(r.layer)}.self_attn.hook_pattern"][0, int(r['head'])].double().cpu()
    rows = [-sum(x * math.log(x) for x in row.tolist() if x > 0) for row in p]
    assert math.isclose(r.entropy, sum(rows) / S, rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(r["previous token"], sum(float(p[q, q - 1]) for q in range(1, S)) / (S - 1), rel_tol=1e-4)
    assert math.isclose(r["first token"], sum(float(p[q, 0]) for q in range(1, S)) / (S - 1), rel_tol=1e-4, abs_tol=1e-7)
assert heads.rope_share.between(0, 1).all() and (heads.entropy >= 0).all()
assert np.allclose(entropy_fig.data[0].z, analysis.head_matrix(heads, "entropy").numpy())
assert np.allclose(rope_fig.data[0].z, analysis.head_matrix(heads, "rope_share").numpy())

# the previous-token candidate: the largest mass, against the uniform level 1/(q+1)
assert prev["previous token"] == heads["previous token"].max()
assert math.isclose(uniform, np.mean([1 / (q + 1) for q in range(1, S)]))
assert rope_rank == 1 + sum(heads.rope_share > prev.rope_share)
assert (view.layer, view.head) == (prev.layer, prev["head"])
assert np.allclose(pattern_fig.data[0].z, view.pattern.numpy())
causal = np.tril(np.ones((S, S), dtype=bool))
assert np.allclose(parts_fig.data[1].z[causal], view.scores_nope.numpy()[causal], atol=1e-6)
assert np.allclose(parts_fig.data[2].z[causal], view.scores_rope.numpy()[causal], atol=1e-6)
assert np.isnan(parts_fig.data[1].z[~causal]).all()

# the positional head leans more on rope than the content head; their figures show those heads
assert positional.rope_share == heads.rope_share.max() > heads.rope_share.min() == content.rope_share
for fig, r in ((positional_fig, positional), (content_fig, content)):
    v = trace.attention(int(r.layer), int(r["head"]))
    assert f"layer {int(r.layer)}, head {int(r['head'])}" in fig.layout.title.text
    assert np.allclose(fig.data[0].z, v.pattern.numpy()) and np.allclose(fig.data[2].z[causal], v.scores_rope.numpy()[causal])
    assert math.isclose(analysis.rope_share(trace, int(r.layer), int(r["head"])).rope_share[0], r.rope_share)

# the explorer: every recorded layer and head, preset to the candidate, its overviews equal the analyses
assert [v for _, v in explorer.layer.options] == ATT_LAYERS and [v for _, v in explorer.head.options] == list(range(H))
assert f"layer {int(prev.layer)}, head {int(prev['head'])}" in explorer.pattern.layout.title.text
assert np.allclose(explorer.pattern.data[0].z, view.pattern.numpy())
assert np.allclose(explorer.rope_share.data[0].z, rope_fig.data[0].z)
assert np.allclose(explorer.entropy.data[0].z, entropy_fig.data[0].z)
""",
    )
