"""One self-contained HTML report with every view of a trace.

The file embeds plotly.js once (nothing is fetched from a CDN: it opens offline, from an e-mail or a
laptop on a plane) and shows each view the trace's recording allows; a view whose data was not
recorded says which ``Recording`` setting would have recorded it. The views that rerun the model (the
logit lens, direct logit attribution) are drawn when the model is given, else a note says to pass it.
All token text is escaped.
"""

from __future__ import annotations

import html
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import plotly.graph_objects as go

from . import analysis, plots
from .analysis._common import sequence_positions
from .files import atomic_write
from .text import visible
from .traces import Trace
from .traces.trace import is_trace_folder

if TYPE_CHECKING:
    from .model import DeepseekV2ForCausalLM


@dataclass
class Section:
    title: str
    why: str  # one sentence: what the view shows and why it matters
    figure: go.Figure | None = None
    missing: str | None = None  # what to record to get this view
    view: str | None = None  # the trace view it draws (``Trace.missing``'s names); None: needs no recording
    needs_model: bool = False  # a view that reruns the model, shown as a note because none was given


#: The note standing where a view that reruns the model would be.
NEEDS_MODEL = (
    "Not computed: this view reruns the model over the trace's tokens; pass the model "
    "(<code>dsv2viz.report(trace, path, model=model)</code>, or <code>dsv2viz report TRACE -o FILE --model PATH</code>, "
    "<code>--demo-model</code> for a trace of the bundled demo model)."
)


def _not_recorded(trace: Trace, title: str, view: str) -> Section:
    """The note that stands where `view`'s figures would be, naming the Recording setting that records it."""
    return Section(title, "", missing=trace.missing(view), view=view)


def report(
    trace: Trace,
    path: str | os.PathLike,
    *,
    model: DeepseekV2ForCausalLM | None = None,
    title: str | None = None,
    attribution_positions: Sequence[int] = (),
) -> Path:
    """Write the report of `trace` to `path` (an .html file). Returns the path.

    `model` (the one that recorded the trace) adds the views that rerun it: the logit lens, and the direct
    logit attribution of the last generated token and of each of `attribution_positions` (positions whose
    next token is explained; negative ones count from the end). The file is written whole or not at all
    (an existing report is replaced only once the new one is complete); a path inside a trace folder, a
    position outside the trace, or positions without a model are refused before any work.
    """
    path = check_report_path(path)
    positions = check_attribution_positions(trace, attribution_positions, model_given=model is not None)
    sections = build_sections(trace, model, positions)
    path.parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, render(trace, sections, title or "dsv2viz trace report"))


def check_report_path(path: str | os.PathLike) -> Path:
    """`path` as a Path, or ValueError when it is a folder or lies inside a trace folder (where it could
    replace the trace's own files): callers check it before any work."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path} is a folder; name the .html file to write, e.g. {path / 'report.html'}")
    if is_trace_folder(path.parent):
        raise ValueError(
            f"{path} is inside the trace folder {path.parent}; write the report outside it, "
            f"e.g. {path.parent.with_name(path.parent.name + '.html')}"
        )
    return path


def check_attribution_positions(trace: Trace, positions: Sequence[int], *, model_given: bool) -> list[int]:
    """`positions` as positions of `trace` (negative ones counted from the end), or a one-line ValueError
    (positions outside the trace, or positions without a model): callers check them before any work."""
    positions = list(positions)
    if not positions:
        return []
    if not model_given:
        raise ValueError(
            "attribution positions need the model, which attribution reruns: pass model= (--model PATH, or --demo-model)"
        )
    return sequence_positions(positions, len(trace))


def last_generated_position(trace: Trace) -> int:
    """The position whose next token is the trace's last generated token (the last position when nothing
    was generated: then its likeliest next token is explained)."""
    return len(trace) - 2 if len(trace) > trace.prompt_len and len(trace) >= 2 else len(trace) - 1


def build_sections(
    trace: Trace, model: DeepseekV2ForCausalLM | None, attribution_positions: Sequence[int] = ()
) -> list[Section]:
    """Every view the trace supports, in reading order; a view it did not record is a note saying how to,
    and so is a view that needs the model when none is given."""
    if model is not None and model.config != trace.config:
        raise ValueError("this trace was recorded with a model of another configuration; pass that model")
    out: list[Section] = []
    if trace.moe_layers:
        out += _routing_sections(trace) if trace.has("routing") else [_not_recorded(trace, "Routing", "routing")]
    out += _attention_sections(trace)
    if trace.has("latents"):
        out.append(
            Section(
                "Latent KV spectrum",
                "Singular values of the cached latent c_kv per layer: how many of its dimensions the model really uses.",
                plots.latent_spectrum(trace),
                view="latents",
            )
        )
        out.append(
            Section(
                "Latent norms",
                "Norm of each token's cached latent, by layer.",
                plots.latent_norms(trace),
                view="latents",
            )
        )
    else:
        out.append(_not_recorded(trace, "Latent KV", "latents"))
    out.append(
        Section(
            "KV-cache memory",
            "What this model's latent cache holds against a standard multi-head cache of the same heads.",
            plots.kv_cache_memory(trace.config),
        )
    )
    if model is None:
        out += [
            Section("Logit lens", "", needs_model=True),
            Section("Direct logit attribution", "", needs_model=True),
        ]
        return out
    frame = analysis.logit_lens(model, trace)
    out.append(
        Section(
            "Logit lens",
            "The next-token guess read off the residual stream after each layer.",
            plots.logit_lens(frame, trace.token_texts, trace.token_ids.tolist()),
        )
    )
    return out + _attribution_sections(trace, model, attribution_positions)


def _attribution_sections(trace: Trace, model: DeepseekV2ForCausalLM, positions: Sequence[int]) -> list[Section]:
    """Direct logit attribution of the last generated token, then of each position asked for (one forward pass)."""
    last = last_generated_position(trace)
    wanted = list(dict.fromkeys([last, *positions]))
    rerun = (
        " It reruns the model as it is, without this trace's interventions." if trace.meta.get("interventions") else ""
    )
    out = []
    for attr in analysis.logit_attributions(model, trace, wanted):
        p, target = attr.position, visible(attr.target_text)
        if p == len(trace) - 1:
            which = "the token the model finds likeliest next (not generated)"
        else:
            which = "the last generated token" if p == last else "the next token"
        out.append(
            Section(
                f"Direct logit attribution: what wrote “{target}” after position {p}",
                f"Which heads, routed experts, shared experts and dense MLPs wrote the logit of {which}, “{target}”, "
                f"after reading “{visible(attr.token_text)}”: each part's output read through lm_head with the final "
                f"norm's scale frozen; the {len(attr.frame)} parts sum to the model's own logit {attr.logit:.4f}.{rerun}",
                plots.logit_attribution(attr),
            )
        )
    return out


def _routing_sections(trace: Trace) -> list[Section]:
    moe = trace.moe_layers
    mid = moe[len(moe) // 2]
    out = [
        Section(
            f"Tokens by top-1 expert, layer {layer}",
            "Each token coloured by the expert its router ranked first: runs of one colour are text an expert owns.",
            plots.token_strip(trace, layer),
        )
        for layer in dict.fromkeys([moe[0], mid, moe[-1]])
    ]
    last = len(trace) - 1
    out += [
        Section(
            f"Routing of the last token across layers (position {last})",
            "Which experts one token visits layer by layer, and with what weight.",
            plots.routing_across_layers(trace, last),
        ),
        Section(
            "Expert utilization",
            "Tokens per expert and layer; the load-balance figures show idle or overloaded experts.",
            plots.utilization_heatmap(analysis.expert_utilization(trace)),
        ),
        Section(
            f"Expert co-activation, layer {mid}",
            "How often two experts serve the same token: teams of experts show as bright off-diagonal cells.",
            plots.coactivation_matrix(analysis.coactivation(trace, mid), mid),
        ),
        Section(
            "Routing confidence",
            "Margin between the k-th and (k+1)-th expert and routing entropy; marked cells are near-ties a bf16 "
            "rounding could flip (margins need the router probabilities, the figure says how to record them).",
            plots.routing_confidence(trace),
        ),
        Section(
            f"Top tokens per expert, layer {mid}",
            "What each expert specializes in: the tokens routed to it most often.",
            plots.top_tokens_per_expert(analysis.top_tokens_per_expert(trace, mid)),
        ),
    ]
    paths = analysis.routing_paths(trace)
    if len(moe) > 1:
        out.append(
            Section(
                "Routing paths across layers",
                "The largest flows of tokens from one MoE layer's first expert to the next layer's: whether tokens "
                "keep to a family of experts through depth.",
                plots.routing_sankey(paths),
            )
        )
    if paths.pairs:
        out.append(
            Section(
                "Same expert as the previous token",
                "Per layer, how often a token's first expert is the previous token's, against two independent "
                "tokens routed like this layer's: above chance, routing follows the text locally.",
                plots.same_expert_rate(paths),
            )
        )
    for section in out:
        section.view = "routing"
    return out


def _attention_sections(trace: Trace) -> list[Section]:
    if not trace.has("attention"):
        return [_not_recorded(trace, "Attention", "attention")]
    out = [
        Section(
            "Heads overview: entropy",
            "Mean entropy of each head's attention rows: low is focused, high is diffuse.",
            plots.heads_overview(analysis.head_entropy(trace), "entropy"),
            view="attention",
        )
    ]
    if trace.has("attention_parts"):
        out.append(
            Section(
                "Heads overview: rope share",
                "How much of each head's score comes from position (rope) rather than content (nope).",
                plots.heads_overview(analysis.rope_share(trace), "rope_share"),
                view="attention_parts",
            )
        )
    else:
        out.append(_not_recorded(trace, "Heads overview: rope share", "attention_parts"))
    layer = (trace.attention_parts_layers() or trace.attention_layers())[0]  # a layer with parts, if any
    view = trace.attention(layer, trace.attention_heads()[0])
    if view.scores_nope is not None:
        fig = plots.attention_parts(view, trace.token_texts)
        why = "One head's pattern and the content (nope) and position (rope) parts of its scores."
    else:
        fig = plots.attention_pattern(view, trace.token_texts)
        why = "One head's attention pattern: each row is a query, each column a key."
    out.append(Section(f"Attention, layer {view.layer} head {view.head}", why, fig, view="attention"))
    return out


def render(trace: Trace, sections: list[Section], title: str) -> str:
    """The HTML page: a summary, then each section; plotly.js inlined once, before the first figure."""
    body, js_included = [], False
    for s in sections:
        view = f' data-view="{html.escape(s.view)}"' if s.view else ""
        body.append(f"<section{view}><h2>{html.escape(s.title)}</h2>")
        if s.figure is not None:
            body.append(f"<p>{html.escape(s.why)}</p>")
            body.append(
                s.figure.to_html(full_html=False, include_plotlyjs=not js_included, config={"displaylogo": False})
            )
            js_included = True
        elif s.needs_model:
            body.append(f'<p class="missing">{NEEDS_MODEL}</p>')
        else:
            body.append(
                f'<p class="missing">Not recorded: record it with <code>{html.escape(s.missing or "")}</code>.</p>'
            )
        body.append("</section>")
    prompt, generated = html.escape(trace.prompt_text), html.escape(trace.generated_text)  # decoded, exact
    meta = trace.meta
    facts = [
        f"{len(trace)} tokens ({trace.prompt_len} prompt, {len(trace) - trace.prompt_len} generated)",
        f"finish: {meta.get('finish_reason')}",
        f"sampling: {meta.get('sampling')}",
        f"interventions: {meta.get('interventions') or 'none'}",
        f"latent KV cache: {trace.config.kv_cache_bytes_per_token(2):,} bytes/token in bf16",
    ]
    summary = "".join(f"<li>{html.escape(str(f))}</li>" for f in facts)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1000px; margin: 2em auto; color: #222; }}
.report-text {{ white-space: pre-wrap; font-family: ui-monospace, monospace; background: #f6f6f6; padding: 1em; }}
.generated {{ background: #fff1c2; }}
.missing {{ color: #888; }}
section {{ margin-top: 2em; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<div class="report-text">{prompt}<span class="generated">{generated}</span></div>
<ul>{summary}</ul>
{"".join(body)}
</body></html>
"""
