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


def test_07_attribution(run_notebook):
    nb = run_notebook(
        "07_attribution.ipynb",
        """
import math
from collections import Counter
import numpy as np
from dsv2viz import interventions as iv

L, H, K, moe = c.num_hidden_layers, c.num_attention_heads, c.num_experts_per_tok, c.moe_layers
assert not [name for name, h in model.hook_points.items() if h.active]

def plain_logits(tokens, hooks=()):  # (T, V) fp32 of one plain forward pass over `tokens`, with `hooks`
    with torch.no_grad():
        return model.run_with_hooks(torch.as_tensor(tokens)[None].to(model.device), fwd_hooks=list(hooks))[0].float().cpu()

# direct attribution of the last generated token: it is the trace's last token, the model's likeliest after
# `pos`, and the parts (one per head, routed expert the token used, shared experts, dense MLP, embedding) sum
# to the model's own logit, recomputed with a plain forward pass
ids = trace.token_ids
logits = plain_logits(ids)
assert len(trace) - trace.prompt_len == N_NEW and pos == len(trace) - 2 and attr.position == pos
assert attr.target == int(ids[-1]) == int(logits[pos].argmax())
assert len(attr.frame) == 1 + L * H + len(moe) * (K + 1) + (L - len(moe))
for layer in moe:
    used = attr.frame[(attr.frame.kind == "expert") & (attr.frame.layer == layer)]
    experts, weights = trace.routing(layer)
    assert sorted(used["index"]) == sorted(experts[pos].tolist())
    assert np.allclose(sorted(used.weight), sorted(weights[pos].tolist()), atol=1e-5)
assert math.isclose(attr.total, float(logits[pos, attr.target]), abs_tol=1e-4)
assert math.isclose(attr.logit, float(logits[pos, attr.target]), abs_tol=1e-4)
assert math.isclose(sum(attr_fig.data[0].x), attr.logit, abs_tol=1e-4)  # 15 bars and the rest

# one part by hand: the head with the largest contribution, its slice of o_proj applied to its z, read
# through lm_head with the final norm's 1/rms of this run
head = attr.frame[attr.frame.kind == "head"].iloc[0]
layer, h, dv = int(head.layer), int(head["index"]), c.v_head_dim
z_name, last = f"model.layers.{layer}.self_attn.hook_z", f"model.layers.{L - 1}.hook_resid_post"
_, acts = model.run_with_cache(ids[None].to(model.device), names_filter=[z_name, last])
write = acts[z_name][0, pos, h].double() @ model.model.layers[layer].self_attn.o_proj.weight[:, h * dv:(h + 1) * dv].double().T
x = acts[last][0, pos].double()
u = model.lm_head.weight[attr.target].double() * model.model.norm.weight.double()
assert math.isclose(head.contribution, float(write @ u) / float((x.pow(2).mean() + model.model.norm.eps).sqrt()), abs_tol=1e-5)

# the contrast: the runner-up of the recorded step and of a plain forward pass; the parts sum to the difference
top2 = logits[pos].topk(2).indices.tolist()
assert [diff.target, diff.contrast] == top2 == trace.candidates(pos)[0][:2].tolist()
assert math.isclose(diff.total, float(logits[pos, top2[0]] - logits[pos, top2[1]]), abs_tol=1e-4)
assert math.isclose(sum(diff_fig.data[0].x), diff.logit, abs_tol=1e-4)

# ablation effects: the unablated log-probability, and the largest expert and head effects, each rerun
# alone (the expert through ablate_experts at pos, the head through a hand-written hook)
logp = logits[pos].log_softmax(-1)
assert effects.target == attr.target and math.isclose(effects.clean_logprob, float(logp[attr.target]), abs_tol=1e-4)
assert len(effects.frame) == L * H + len(moe) * (K + 1) + (L - len(moe))
expert = effects.frame[effects.frame.kind == "expert"].iloc[0]
alone = plain_logits(ids, iv.ablate_experts({int(expert.layer): [int(expert["index"])]}, positions=[pos]))
assert math.isclose(expert.effect, float(alone[pos].log_softmax(-1)[attr.target] - logp[attr.target]), abs_tol=1e-4)
head = effects.frame[effects.frame.kind == "head"].iloc[0]
def zero_head(z, hook):
    z = z.clone()
    z[:, pos, int(head["index"])] = 0
    return z
alone = plain_logits(ids, [(f"model.layers.{int(head.layer)}.self_attn.hook_z", zero_head)])
assert math.isclose(head.effect, float(alone[pos].log_softmax(-1)[attr.target] - logp[attr.target]), abs_tol=1e-4)
assert effects.frame.effect.abs().max() > 0.1

# the estimate of that head, from a gradient taken here: -grad_z . z of log p(target) at pos
kept = {}
def leaf(z, hook):
    kept["z"] = z.detach().requires_grad_(True)
    return kept["z"]
with torch.enable_grad():
    out = model.run_with_hooks(ids[None, : pos + 1].to(model.device), fwd_hooks=[(f"model.layers.{int(head.layer)}.self_attn.hook_z", leaf)])
    (grad,) = torch.autograd.grad(out[0, pos].float().log_softmax(-1)[attr.target], kept["z"])
z_h = kept["z"][0, pos, int(head["index"])].detach()
guess = estimates.at(pos).set_index("component").estimate[head.component]
assert math.isclose(guess, -float((grad[0, pos, int(head["index"])] * z_h).sum()), rel_tol=1e-3, abs_tol=1e-5)

# Spearman's rank correlation, recomputed from the two tables with ranks computed here
def ranks(v):  # 1..n, tied values share their mean rank
    v = np.asarray(v, dtype=float)
    r = np.empty(len(v))
    r[v.argsort(kind="stable")] = np.arange(1, len(v) + 1)
    for value in np.unique(v):
        r[v == value] = r[v == value].mean()
    return r
def rank_corr(exact, guess):  # two tables joined on the part's name
    e = exact.set_index("component").effect
    g = guess.set_index("component").estimate
    assert sorted(e.index) == sorted(g.index)
    return float(np.corrcoef(ranks(e), ranks(g[e.index]))[0, 1])
recomputed = rank_corr(effects.frame, estimates.at(pos))
assert len(both) == len(effects.frame) and math.isclose(rho, recomputed, abs_tol=1e-9)
for p, t in per_position.items():
    exact = analysis.ablation_effects(model, trace, p).frame
    assert math.isclose(rank_table.Spearman[p], rank_corr(exact, t), abs_tol=1e-9)
    row = exact.loc[exact.effect.abs().idxmax()]
    assert rank_table["largest exact effect"][p] == row.component and math.isclose(rank_table["its effect"][p], row.effect)
# what the markdown says of the demo model: the layer-0 MLP's removal is the largest, and its estimate is a
# small fraction of it, mostly of the opposite sign
assert (rank_table["largest exact effect"] == "L0.mlp").all()
assert (rank_table["its estimate"].abs() < rank_table["its effect"].abs() / 4).all()
assert (np.sign(rank_table["its estimate"]) != np.sign(rank_table["its effect"])).sum() > len(rank_table) / 2
print(f"RECOMPUTED_RHO {recomputed:.2f} {len(both)} {pos}")

# patching: the two prompts differ in the name only; the clean and corrupted differences from plain runs
clean_last, corrupted_last = plain_logits(CLEAN)[-1], plain_logits(CORRUPTED)[-1]
target, contrast = int(clean_last.argmax()), int(corrupted_last.argmax())
assert len(CLEAN) == len(CORRUPTED) and differ == [6]
assert [model.tokenizer.decode([t]) for t in (target, contrast, CLEAN[6], CORRUPTED[6])] == ["key", "name", " key", " name"]
def metric(lg):
    return float(lg[target] - lg[contrast])
for kind, r in patching.items():
    assert r.kind == kind and (r.target, r.contrast) == (target, contrast)
    assert math.isclose(r.clean, metric(clean_last), abs_tol=1e-4) and math.isclose(r.corrupted, metric(corrupted_last), abs_tol=1e-4)
    assert r.positions == list(range(len(CLEAN))) and r.layers == (moe if kind == "routing" else list(range(L)))
    assert r.recovered[:, : differ[0]].abs().max() < 1e-5  # identical prefix: nothing to recover
for fig, r in ((resid_fig, resid), (latent_fig, latent), (routing_fig, routing)):
    assert np.allclose(fig.data[0].z, r.recovered.numpy())

def clean_values(name):
    _, cache = model.run_with_cache(torch.tensor([CLEAN], device=model.device), names_filter=name)
    return cache[name]
def recovered_by(patches):  # (name, hook) pairs, run on the corrupted prompt
    return (metric(plain_logits(CORRUPTED, patches)[-1]) - metric(corrupted_last)) / (metric(clean_last) - metric(corrupted_last))

# the whole first-layer residual stream written by hand: exactly the clean difference
def replace_with(value):  # a hook writing the clean run's whole tensor
    return lambda x, hook: value.to(x)
first = clean_values("model.layers.0.hook_resid_pre")
assert math.isclose(recovered_by([("model.layers.0.hook_resid_pre", replace_with(first))]), 1.0, abs_tol=1e-5)
assert math.isclose(checks["residual at every position of layer 0"], 1.0, abs_tol=1e-5)
assert abs(checks["nothing patched"]) < 1e-5

# the latent of the name's position at layer 1, by hand; and the markdown's account of where the name moves
name = "model.layers.1.self_attn.hook_c_kv"
value = clean_values(name)[0, 6]
def one_latent(x, hook):
    x = x.clone()
    x[:, 6] = value
    return x
assert math.isclose(latent.recovered[1, 6].item(), recovered_by([(name, one_latent)]), abs_tol=1e-5)
assert latent.recovered[1, 6] > 0.95 and (latent.recovered[[0, 2, 3], 6].abs() < 0.05).all()
assert carried["residual: position recovering most"].tolist() == [6, 6, 13, 13]
assert (carried.recovered > 0.95).all()

# routing: every MoE layer's clean choice forced into the corrupted run by hand; the runs did choose
# differently at some cells, and forcing the clean choices recovers close to nothing
forced = [(g, replace_with(clean_values(g))) for g in gates]
assert math.isclose(checks["routing at every position and MoE layer"], recovered_by(forced), abs_tol=1e-5)
assert chose_differently > 0
assert abs(checks["routing at every position and MoE layer"]) < 0.01 and routing.recovered.abs().max() < 0.01
assert not [name for name, h in model.hook_points.items() if h.active]

# routing paths recounted from the traces' routing, token by token
assert len(traces) == 3 and traces[0] is trace
for top, counted in ((1, paths), (K, paths_k)):
    chosen = {layer: [set(s[:top]) for t in traces for s in t.routing(layer)[0].tolist()] for layer in moe}
    starts = np.cumsum([0] + [len(t) for t in traces])[:-1].tolist()
    pairs = [s for s in range(1, sum(len(t) for t in traces)) if s not in starts]
    assert counted.tokens == sum(len(t) for t in traces) and counted.pairs == len(pairs)
    for row, layer in enumerate(moe):
        shared = sum(len(chosen[layer][s] & chosen[layer][s - 1]) for s in pairs)
        assert math.isclose(counted.same_rate[row], shared / (len(pairs) * top))
        share = Counter(e for s in chosen[layer] for e in s)
        assert math.isclose(counted.chance[row], sum((n / counted.tokens) ** 2 for n in share.values()) / top)
        label = "first expert" if top == 1 else f"all {K} experts"
        assert math.isclose(rates[(label, "same_rate")][layer], shared / (len(pairs) * top))
    for a, b in zip(moe, moe[1:]):
        moves = Counter((i, j) for s in range(counted.tokens) for i in chosen[a][s] for j in chosen[b][s])
        assert {(i, j): int(counted.transitions[moe.index(a), i, j]) for i, j in moves} == dict(moves)
        assert int(counted.transitions[moe.index(a)].sum()) == sum(moves.values())
top_flows = paths.flows(30)
assert list(sankey.data[0].link.value) == top_flows["count"].tolist()
assert top_flows["count"].is_monotonic_decreasing
assert np.allclose(rate_fig.data[0].y, paths.same_rate.numpy()) and np.allclose(rate_fig.data[1].y, paths.chance.numpy())
""",
    )
    # the rank correlation the notebook printed is the one recomputed in its kernel
    printed = "".join(
        o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])
    )
    recomputed, parts, pos = printed.split("RECOMPUTED_RHO ")[1].split()[:3]
    assert f"Spearman rank correlation over the {parts} parts at position {pos}: {recomputed}\n" in printed
