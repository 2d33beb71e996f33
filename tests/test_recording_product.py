"""The whole product of Recording options: every combination makes a report and opens every explorer.

For each of the 2 x 2 x 2 x 2 x 3 = 48 combinations of routing, latents, queries, router_probs and
attention (none, last_row, full; attention_layers a subset of the layers), a short trace is generated on
one tiny model and reopened from disk; the reopened trace equals the recorded one, and:

* ``trace.missing`` names, for each view, exactly the setting the combination lacks (the expected
  answer is worked out here from the options, not asked of the trace);
* the written report has, for each view, its figures or one "Not recorded" note naming that setting;
* RoutingExplorer, AttentionExplorer and LatentExplorer show their figures or that note.
"""

from __future__ import annotations

import html
import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass

import ipywidgets
import plotly.graph_objects as go
import pytest
from conftest import tiny_config

import dsv2viz
from dsv2viz.model import DeepseekV2ForCausalLM
from dsv2viz.traces import Recording, Trace
from dsv2viz.widgets import AttentionExplorer, LatentExplorer, RoutingExplorer

PROMPT = [3, 4, 5, 6]
NEW_TOKENS = 2
ATTENTION_LAYERS = [1]  # of layers 0 (dense) and 1 (MoE)
ATTENTION_HEADS = [1]  # of heads 0 and 1
ANY_ATTENTION = "Recording(attention='full' or 'last_row', or queries=True with latents=True)"
#: The views the report and the explorers draw from recorded tensors (the KV-cache memory needs none).
VIEWS = ("routing", "router_probs", "latents", "attention", "attention_parts")


@dataclass(frozen=True)
class Options:
    routing: bool
    latents: bool
    queries: bool
    router_probs: bool
    attention: str

    def recording(self) -> Recording:
        return Recording(
            routing=self.routing,
            latents=self.latents,
            queries=self.queries,
            router_probs=self.router_probs,
            attention=self.attention,
            attention_layers=ATTENTION_LAYERS,
            attention_heads=ATTENTION_HEADS,
        )

    def missing(self) -> dict[str, str | None]:
        """What each view lacks under these options: None, or the setting that records it."""
        queries_kept = self.queries or self.attention != "none"  # patterns are recorded with their queries
        shown = {
            "routing": self.routing,
            "router_probs": self.router_probs,
            "latents": self.latents,
            "attention": self.attention != "none" or (self.queries and self.latents),
            "attention_parts": queries_kept and self.latents,
        }
        lacking_parts = ", ".join(
            f"{name}=True" for name, kept in (("queries", queries_kept), ("latents", self.latents)) if not kept
        )
        how = {
            "routing": "Recording(routing=True)",
            "router_probs": "Recording(router_probs=True)",
            "latents": "Recording(latents=True)",
            "attention": "Recording(latents=True)" if self.queries else ANY_ATTENTION,
            "attention_parts": f"Recording({lacking_parts})",
        }
        return {view: None if shown[view] else how[view] for view in VIEWS}

    def __str__(self) -> str:
        flags = [name for name in ("routing", "latents", "queries", "router_probs") if getattr(self, name)]
        return "-".join(flags + [f"attention={self.attention}"])


PRODUCT = [Options(*o) for o in itertools.product(*[(False, True)] * 4, ("none", "last_row", "full"))]


@pytest.fixture(scope="module")
def model() -> Iterator[DeepseekV2ForCausalLM]:
    """Two layers (0 dense, 1 MoE with 4 experts, top 2), two heads: the smallest model with every view."""
    config = tiny_config(
        num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2
    )
    yield DeepseekV2ForCausalLM(config).init_weights(std=0.15, seed=0).eval().requires_grad_(False)


@dataclass
class ReportSection:
    view: str | None
    title: str
    body: str  # the section's HTML after its title

    @property
    def drawn(self) -> bool:
        """A plotly figure with at least one trace."""
        return re.search(r'Plotly\.newPlot\(\s*"[^"]+",\s*\[\{', self.body) is not None

    @property
    def note(self) -> str | None:
        found = re.search(r'<p class="missing">(.*?)</p>', self.body, re.S)
        return None if found is None else html.unescape(re.sub(r"<[^>]+>", "", found.group(1)))


def report_sections(page: str) -> list[ReportSection]:
    """The report's sections in order (plotly.js, inlined in the first, holds no '<section')."""
    found = re.finditer(r'<section(?: data-view="([^"]*)")?><h2>(.*?)</h2>(.*?)</section>', page, re.S)
    return [ReportSection(m[1], html.unescape(m[2]), m[3]) for m in found]


def notes(widget: ipywidgets.Widget) -> list[str]:
    """The text of every note an explorer shows (HTML widgets), unescaped, in display order."""
    if isinstance(widget, ipywidgets.HTML):
        return [html.unescape(re.sub(r"<[^>]+>", "", widget.value))]
    return [n for child in getattr(widget, "children", ()) for n in notes(child)]


def figures(widget: ipywidgets.Widget) -> list[go.FigureWidget]:
    """Every FigureWidget an explorer shows, in display order."""
    if isinstance(widget, go.FigureWidget):
        return [widget]
    return [f for child in getattr(widget, "children", ()) for f in figures(child)]


def shows(widget: ipywidgets.Widget, expected: list[go.FigureWidget]) -> bool:
    """Whether `widget` shows exactly these figures, each with at least one trace (compared by identity:
    plotly's == compares whole figures as JSON)."""
    shown = figures(widget)
    return len(shown) == len(expected) and all(a is b and a.data for a, b in zip(shown, expected))


def check_report(trace: Trace, missing: dict[str, str | None], path) -> None:
    sections = report_sections(dsv2viz.report(trace, path).read_text(encoding="utf-8"))
    by_view = {view: [s for s in sections if s.view == view] for view in VIEWS}
    assert by_view["router_probs"] == []  # margins are part of the routing confidence figure
    if missing["attention"] is not None:  # one note stands for all the attention views
        assert by_view["attention_parts"] == []
    for view in ("routing", "latents", "attention") + (("attention_parts",) if missing["attention"] is None else ()):
        shown = by_view[view]
        if missing[view] is None:
            assert shown and all(s.drawn and s.note is None for s in shown), (view, [s.title for s in shown])
        else:
            assert len(shown) == 1 and not shown[0].drawn, (view, [s.title for s in shown])
            assert shown[0].note == f"Not recorded: record it with {missing[view]}."
    other = [s for s in sections if s.view is None]  # no model given: the views that rerun it are notes
    assert [s.title for s in other] == ["KV-cache memory", "Logit lens", "Direct logit attribution"]
    assert other[0].drawn and not other[1].drawn and not other[2].drawn
    assert other[1].note == other[2].note and other[1].note.startswith("Not computed: this view reruns the model")
    if missing["routing"] is None:
        (confidence,) = [s for s in by_view["routing"] if s.title == "Routing confidence"]
        margins = "top-k margin" in confidence.body
        assert margins == (missing["router_probs"] is None)
        assert (f"Margins and near-ties need {missing['router_probs']}" in confidence.body) == (not margins)
    if missing["attention"] is None:
        (head,) = [s for s in by_view["attention"] if s.title.startswith("Attention, layer")]
        assert head.title == f"Attention, layer {ATTENTION_LAYERS[0]} head {ATTENTION_HEADS[0]}"


def check_explorers(trace: Trace, missing: dict[str, str | None]) -> None:
    routing = RoutingExplorer(trace)
    parts = [routing.strip, routing.coactivation, routing.across_layers, routing.utilization, routing.confidence]
    if missing["routing"] is None:
        assert shows(routing, parts) and notes(routing) == []
        panels = [t for t in routing.confidence.data if t.type == "heatmap"]  # margin and entropy, or entropy
        assert len(panels) == (1 if missing["router_probs"] else 2)
        if missing["router_probs"]:
            assert (
                f"Margins and near-ties need {missing['router_probs']}" in routing.confidence.layout.title.subtitle.text
            )
    else:
        assert parts == [None] * 5 and figures(routing) == []
        assert notes(routing) == [f"This trace has no routing to explore: record it with {missing['routing']}."]

    attention = AttentionExplorer(trace)
    if missing["attention"] is None:
        assert [v for _, v in attention.layer.options] == ATTENTION_LAYERS
        assert [v for _, v in attention.head.options] == ATTENTION_HEADS
        rope = [] if attention.rope_share is None else [attention.rope_share]
        assert shows(attention, [attention.entropy, *rope, attention.pattern])
        assert len(attention.pattern.data) == (1 if missing["attention_parts"] else 3)  # pattern, nope, rope
        if missing["attention_parts"] is None:
            assert rope and notes(attention) == []
        else:
            assert not rope and len(notes(attention)) == 1
            assert notes(attention)[0].endswith(f"record them with {missing['attention_parts']}.")
    else:
        assert (attention.entropy, attention.rope_share, attention.pattern) == (None, None, None)
        assert figures(attention) == []
        assert notes(attention) == [f"This trace has no attention to show: record it with {missing['attention']}."]

    latent = LatentExplorer(trace)
    if missing["latents"] is None:
        assert shows(latent, [latent.spectrum, latent.norms, latent.memory]) and notes(latent) == []
        assert len(latent.spectrum.data) == trace.config.num_hidden_layers
    else:
        assert latent.spectrum is None and latent.norms is None and shows(latent, [latent.memory])
        assert notes(latent) == [
            f"This trace recorded no latents: record them with {missing['latents']} (the default)."
        ]


@pytest.mark.parametrize("options", PRODUCT, ids=str)
def test_every_view_is_drawn_or_names_what_would_record_it(model, options, tmp_path):
    trace = model.generate(PROMPT, NEW_TOKENS, record=options.recording()).run()
    reopened = Trace.load(trace.save(tmp_path / "trace"))
    missing = options.missing()
    assert {view: trace.missing(view) for view in VIEWS} == missing
    assert trace.attention_layers() == (ATTENTION_LAYERS if missing["attention"] is None else [])
    # Every view is drawn from the reopened trace only, so no figure is built twice: equal to the
    # recorded one (every tensor with its dtype, the config, recording, meta and text), it shows the same.
    assert reopened == trace
    assert {view: reopened.missing(view) for view in VIEWS} == missing
    check_report(reopened, missing, tmp_path / "report.html")
    check_explorers(reopened, missing)
