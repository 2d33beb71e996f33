"""The hands-on notebooks (interventions, the hook API) run top to bottom on the bundled demo model, and
what each one shows is recomputed here independently, in the notebook's own kernel."""

from __future__ import annotations


def test_05_interventions(run_notebook):
    run_notebook(
        "05_interventions.ipynb",
        """
import math
import torch.nn.functional as F

K, E, moe = c.num_experts_per_tok, c.n_routed_experts, c.moe_layers
hooks_left = [name for name, h in model.hook_points.items() if h.active]
assert not hooks_left, hooks_left

def routed_count(trace, layer, expert):
    return int((trace.routing(layer)[0] == expert).sum())

def shared_len(a, b):
    ids_a, ids_b = a.token_ids.tolist(), b.token_ids.tolist()
    return next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))

# experts and layers come from the baseline's own routing and the config
assert first == moe[0] and mid == moe[len(moe) // 2]
load_first = [routed_count(base, first, e) for e in range(E)]
load_mid = [routed_count(base, mid, e) for e in range(E)]
assert load_first[busy] == max(load_first) > 0 and load_mid[rare] == min(load_mid)

# ablation: the baseline routed tokens to the expert, the ablated run none; at the ablated layer exactly the
# tokens that had chosen it changed their expert set
assert routed_count(base, first, busy) > 0 and routed_count(ablated, first, busy) == 0
n = shared_len(base, ablated)
had = [busy in s for s in base.routing(first)[0][:n].tolist()]
assert sum(had) > 0 and math.isclose(ablated_cmp.routing_changed[0], sum(had) / n) and math.isclose(had_it, sum(had) / n)

# zeroing the output keeps the routing at that layer (the expert is still chosen) but moves the output
n = shared_len(base, zeroed)
assert torch.equal(zeroed.routing(first)[0][:n], base.routing(first)[0][:n])
assert zeroed_cmp.routing_changed[0] == 0 and routed_count(zeroed, first, busy) > 0
assert zeroed_cmp.kl[0] > 0

# forcing: every token has the forced expert, in the first slot, at that layer; the strip shows only it
assert (forced.routing(mid)[0][:, 0] == rare).all()
assert ((experts == rare).sum(-1) == 1).all()
cells = [z for trace in strip.data for row in trace.z for z in row if not math.isnan(z)]
assert len(cells) == len(forced) and set(cells) == {rare}

# every comparison recomputed from the two traces: divergence, routing sets, exact KL where comparable
unchanged_through = {  # the last MoE layer whose routing cannot change, by construction
    f"ablate expert {busy} at layer {first}": first - 1,
    f"zero expert {busy}'s output at layer {first}": first,   # the router runs before the experts
    f"force expert {rare} at layer {mid}": mid - 1,
    f"ablate head {head} at layer {mid}": mid - 1,             # attention feeds this layer's router
    f"zero the {c.kv_lora_rank // 8} strongest latent dims at layer {mid}": mid - 1,
    f"zero {c.kv_lora_rank // 8} random latent dims at layer {mid}": mid - 1,
    **{f"steer x{s:g} at layer {mid}": mid for s in (0.5, 1.0, 2.0)},  # added after this layer's MLP
}
assert list(results) == list(unchanged_through), list(results)
for name, (trace, cmp) in results.items():
    n = shared_len(base, trace)
    assert cmp.first_divergence == (None if n == min(len(base), len(trace)) else n), name
    assert cmp.layers == moe and cmp.kl_exact
    for row, layer in enumerate(moe):
        sets_a = [set(s) for s in base.routing(layer)[0][:n].tolist()]
        sets_b = [set(s) for s in trace.routing(layer)[0][:n].tolist()]
        assert math.isclose(cmp.routing_changed[row], sum(x != y for x, y in zip(sets_a, sets_b)) / n), (name, layer)
        if layer <= unchanged_through[name]:
            assert cmp.routing_changed[row] == 0, (name, layer)
            assert torch.equal(trace.routing(layer)[0][:n], base.routing(layer)[0][:n]), (name, layer)
    for i in range(len(base) - P):
        if P + i <= n:
            la, lb = base.tensors["logprobs"][i].double(), trace.tensors["logprobs"][i].double()
            assert math.isclose(cmp.kl[i], float((la.exp() * (la - lb)).sum()), rel_tol=1e-6, abs_tol=1e-9), (name, i)
        else:
            assert math.isnan(cmp.kl[i]), (name, i)
    assert trace.meta["interventions"] and base.meta["interventions"] == []

# the head sweep, with a hand-written hook instead of iv.ablate_heads and torch's own KL
assert torch.allclose(ref[-1], base.tensors["logprobs"][0].to(ref), atol=1e-4)
def zero_head(h):
    def fn(z, hook):
        z = z.clone()
        z[:, :, h] = 0
        return z
    return fn
for h in range(c.num_attention_heads):
    logits = model.run_with_hooks(ids, fwd_hooks=[(f"model.layers.{mid}.self_attn.hook_z", zero_head(h))])
    kl = F.kl_div(logits[0].float().log_softmax(-1), ref, log_target=True, reduction="none").sum(-1).mean()
    assert math.isclose(head_kl[h], float(kl), rel_tol=1e-4, abs_tol=1e-7), h
assert head == max(range(c.num_attention_heads), key=lambda h: head_kl[h])

# latent patching: the strongest dims by mean magnitude, a disjoint random control of the same size, and
# both are zero in what the patched runs cached (the baseline's were not)
R = c.kv_lora_rank
magnitude = base.latent(mid)[0].abs().mean(0)
assert len(strong) == len(drawn) == R // 8 and not set(strong) & set(drawn)
assert magnitude[strong].min() >= magnitude[[d for d in range(R) if d not in strong]].max()
assert (patched.latent(mid)[0][:, strong] == 0).all() and (control.latent(mid)[0][:, drawn] == 0).all()
assert (base.latent(mid)[0][:, strong] != 0).any(-1).all()

# steering: the direction is the difference of the two prompts' mean residuals after BOS, read here with a
# plain reading hook; the table counts import/from lines of each continuation
def mean_after(text):
    seen = []
    model.run_with_hooks(torch.tensor([model.tokenizer.encode(text)], device=model.device),
                         fwd_hooks=[(f"model.layers.{mid}.hook_resid_post", lambda x, hook: seen.append(x[0, 1:].float()))])
    return seen[0].mean(0)
assert torch.allclose(direction, mean_after(IMPORTS) - mean_after(BODY), atol=1e-5)
import re
assert steer_table.scale.tolist() == [0.0, 0.5, 1.0, 2.0]
for t, count in zip([base, *steered.values()], steer_table["import/from lines generated"]):
    text = t.generated_text
    assert count == len(re.findall(r"^\\s*(?:import|from) ", text, flags=re.M)), text
assert list(steered) == [0.5, 1.0, 2.0] and all(results[f"steer x{s:g} at layer {mid}"][0] is t for s, t in steered.items())

# the summary figures show the comparisons
for fig_trace, (name, (_, cmp)) in zip(kl_fig.data, results.items()):
    assert fig_trace.name == name
    assert all(math.isnan(y) if math.isnan(k) else y == k for y, k in zip(fig_trace.y, cmp.kl.tolist()))
assert list(changed_fig.data[0].y) == list(results)
assert (changed_fig.data[0].z == torch.stack([cmp.routing_changed for _, cmp in results.values()]).numpy()).all()
""",
    )


def test_06_hook_api(run_notebook):
    run_notebook(
        "06_hook_api.ipynb",
        """
import math
from collections import Counter

K, E, H, R, moe = c.num_experts_per_tok, c.n_routed_experts, c.num_attention_heads, c.kv_lora_rank, c.moe_layers
L, T = c.num_hidden_layers, ids.shape[1]

# names: every HookPoint submodule under its module path, ending in hook_*; the selections the notebook shows
modules = {n: m for n, m in model.named_modules() if isinstance(m, dsv2viz.HookPoint)}
assert sorted(names) == sorted(modules) and all(model.hook_points[n] is modules[n] for n in names)
assert all(n.rsplit(".", 1)[-1].startswith("hook_") for n in names)
assert layer == moe[0] and one_layer == [n for n in names if n.startswith(f"model.layers.{layer}.")]
assert len(one_layer) - len(shown) == E - 1
assert model.hook_names("*.mlp.gate.hook_topk_idx") == [f"model.layers.{i}.mlp.gate.hook_topk_idx" for i in moe]

# run_with_cache: exactly the selected names, shapes from the config, a causal softmax pattern
expected = {f"model.layers.{i}.self_attn.hook_c_kv" for i in range(L)} | {f"model.layers.{i}.mlp.gate.hook_topk_idx" for i in moe}
expected.add(f"model.layers.{layer}.self_attn.hook_pattern")
assert set(acts) == expected
assert tuple(logits.shape) == (1, T, c.vocab_size)
for i in range(L):
    assert tuple(acts[f"model.layers.{i}.self_attn.hook_c_kv"].shape) == (1, T, R)
for i in moe:
    idx = acts[f"model.layers.{i}.mlp.gate.hook_topk_idx"]
    assert tuple(idx.shape) == (1, T, K) and idx.dtype == torch.int64 and 0 <= idx.min() and idx.max() < E
pattern = acts[f"model.layers.{layer}.self_attn.hook_pattern"]
assert tuple(pattern.shape) == (1, H, T, T)
assert torch.allclose(pattern.sum(-1), torch.ones(1, H, T), atol=1e-5) and (pattern.triu(1) == 0).all()
assert tuple(latents.shape) == (L, 1, T, R) and torch.equal(latents[layer], acts[f"model.layers.{layer}.self_attn.hook_c_kv"])

# reading: the recorded norms are those of the residual stream after each layer
_, resid = model.run_with_cache(ids, names_filter="*.hook_resid_post")
assert list(resid_norms) == [f"model.layers.{i}.hook_resid_post" for i in range(L)]
for n, v in resid_norms.items():
    assert math.isclose(float(v), float(resid[n][0].norm(dim=-1).mean()), rel_tol=1e-5)

# replacing: with the rope scores zeroed, each pattern is the causal softmax of the content scores alone
with model.hooks([("*.self_attn.hook_scores_rope", no_rope)]):
    again, seen = model.run_with_cache(ids, names_filter=["*.self_attn.hook_scores_nope", "*.self_attn.hook_pattern"])
assert torch.equal(again, no_position) and not torch.allclose(no_position, logits)
causal = torch.ones(T, T, dtype=torch.bool).tril()
for i in range(L):
    nope = seen[f"model.layers.{i}.self_attn.hook_scores_nope"].masked_fill(~causal, float("-inf"))
    assert torch.allclose(seen[f"model.layers.{i}.self_attn.hook_pattern"], nope.softmax(-1), atol=1e-5)
for lg, column in ((logits, "next token, model as is"), (no_position, "without rope scores")):
    p = lg[0, -1].float().softmax(-1)
    order = sorted(range(c.vocab_size), key=lambda t: -float(p[t]))[:5]
    assert [s.rsplit(" ", 1)[0] for s in top_next(lg)] == [repr(model.tokenizer.decode([t])) for t in order]

# the hand-written counter: the experts of every recorded position of both traces, nothing attached afterwards
ref = torch.zeros(len(moe), E, dtype=torch.int64)
for t in traces:
    for row, i in enumerate(moe):
        for e, n in Counter(t.routing(i)[0].flatten().tolist()).items():
            ref[row, e] += n
assert torch.equal(counts.cpu(), ref) and int(ref.sum()) == sum(len(t) for t in traces) * K * len(moe)
assert [len(t) - t.prompt_len for t in traces] == [N_NEW, N_NEW]
assert not any(h.active for h in model.hook_points.values())

# head writes: recomputed from the captured z and o_proj; summed over heads they are the attention output
_, za = model.run_with_cache(ids, names_filter=["*.self_attn.hook_z", "*.self_attn.hook_out"])
assert head_norms[["layer", "head"]].values.tolist() == [[i, h] for i in range(L) for h in range(H)]
for i in range(L):
    z = za[f"model.layers.{i}.self_attn.hook_z"][0]  # (T, H, dv)
    w = model.model.layers[i].self_attn.o_proj.weight
    per_head = [z[:, h] @ w[:, h * c.v_head_dim:(h + 1) * c.v_head_dim].T for h in range(H)]  # (T, D) each
    assert torch.allclose(sum(per_head), za[f"model.layers.{i}.self_attn.hook_out"][0], atol=1e-4)
    for h in range(H):
        got = head_norms[(head_norms.layer == i) & (head_norms["head"] == h)].write_norm.item()
        assert math.isclose(got, float(per_head[h].norm(dim=-1).mean()), rel_tol=1e-4)
assert (heads_fig.data[0].z == analysis.head_matrix(head_norms, "write_norm").numpy()).all()

# the pandas analysis: each layer's mean first-choice share of the routed weight, prompt and generated apart
t = traces[0]
for i in moe:
    experts, weights = t.routing(i)
    share = weights[:, 0].double() / weights.double().sum(-1)
    for part, span in (("prompt", slice(0, t.prompt_len)), ("generated", slice(t.prompt_len, None))):
        assert math.isclose(first_share.loc[i, part], float(share[span].mean()), rel_tol=1e-5), (i, part)

# failing hooks: HookErrors naming the hook point and function; nothing left attached; same forward pass
assert f"model.layers.{layer}.self_attn.hook_z" in str(shape_error) and "drop_a_head" in str(shape_error)
assert f"model.layers.{moe[0]}.mlp.gate.hook_topk_idx" in str(crash_error) and "crash" in str(crash_error)
assert isinstance(crash_error.__cause__, ValueError)
assert still_attached == [] and not any(h.active for h in model.hook_points.values())
assert torch.equal(before, after)
# and as the first forward pass of the notebook (its recorded pattern took the explicit-scores path: rounding only)
assert torch.allclose(after, logits, atol=1e-4)
""",
    )
