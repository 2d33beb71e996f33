"""The hands-on notebooks (interventions, the hook API) run top to bottom on the bundled demo model, and
what each one shows is recomputed here independently, in the notebook's own kernel."""

from __future__ import annotations


def test_05_interventions(run_notebook):
    run_notebook("05_interventions.ipynb", """
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
    text = "".join(t.token_texts[t.prompt_len:])
    assert count == len(re.findall(r"^\\s*(?:import|from) ", text, flags=re.M)), text
assert list(steered) == [0.5, 1.0, 2.0] and all(results[f"steer x{s:g} at layer {mid}"][0] is t for s, t in steered.items())

# the summary figures show the comparisons
for fig_trace, (name, (_, cmp)) in zip(kl_fig.data, results.items()):
    assert fig_trace.name == name
    assert all(math.isnan(y) if math.isnan(k) else y == k for y, k in zip(fig_trace.y, cmp.kl.tolist()))
assert list(changed_fig.data[0].y) == list(results)
assert (changed_fig.data[0].z == torch.stack([cmp.routing_changed for _, cmp in results.values()]).numpy()).all()
""")

