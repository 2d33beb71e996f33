"""GenerationDashboard: a live Jupyter dashboard that generates and shows routing, attention and the latent KV as tokens stream.

    dash = GenerationDashboard(model)
    dash          # last in a cell; type a prompt and press Generate (or: dash.run("def f(x):"))

Panels: the token strip coloured by top-1 expert at a chosen MoE layer; the layer x expert utilization
heat map; the newest token's attention at a chosen layer and head, split into its content (nope) and
position (rope) scores; the per-token latent norms (spectrum on a button); the selected token's routing
across layers, its next-token candidates and its direct logit attribution (which heads and experts
wrote the token after it); and an interventions area that bans or forces an expert, regenerates and
compares both runs (routing change per layer, KL per step).

A token is selected by clicking it in the strip or with the "inspect pos" slider; the two stay in step.
Its attribution reruns the model over the trace (:func:`dsv2viz.analysis.logit_attribution`) in a worker
thread with a progress line, so generation and the other panels keep going; a newer selection supersedes
it, and an error shows in the panel as one line.

Generation runs in a worker thread (:class:`~dsv2viz.widgets._live.Streamer`) so Stop stays clickable;
widgets are updated in coalesced batches, never per token, and only once the browser has drawn the
last batch. Figures come from :mod:`dsv2viz.plots` or share its look, every value JSON-safe (NaN and
infinity become gaps); a panel with nothing to show shows only a note saying why. What a trace holds is
asked of the trace (``routing``, ``attention_parts_layers``, ``candidates``), never read from its
tensors. Token text is always escaped with ``token_label``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import ipywidgets as w
import numpy as np
import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

from .. import analysis, plots
from ..analysis import TraceComparison
from ..generation import Generation, Prompt, Step
from ..interventions import ablate_experts, force_experts
from ..model import DeepseekV2ForCausalLM
from ..plots._layout import hover, row_axis, style
from ..plots._text import token_label
from ..tokenizer import id_labels
from ..traces import Recording, Trace, TraceError
from ._figure import Drawn, Panel, notice_html, redraw, update
from ._live import Flush, Streamer, Superseding, TokenStrip, newest_attention, token_span

NOT_YET = "Nothing generated yet: press Generate."
INSPECT_NOTE = (
    "The selected token's routing across layers is drawn when the generation ends; click a token to see it now."
)
SPECTRUM_NOTE = "Press “Latent spectrum” for the singular values of every layer's cached latent (an SVD)."
COMPARE_NOTE = "Regenerate with an intervention to compare it with this run."
ATTRIBUTION_NOTE = (
    "Click a token in the strip (or move “inspect pos”) to see which heads and experts wrote the token after it."
)


class GenerationDashboard(w.VBox):
    """Generate from `model` and watch its experts, attention and latent cache fill in, token by token."""

    def __init__(self, model: DeepseekV2ForCausalLM, prompt: str = "def fibonacci(n):") -> None:
        self.model = model
        c = model.config
        self.trace: Trace | None = None  # the last run's trace (a snapshot while it runs)
        self.comparison: TraceComparison | None = None  # the last intervention's comparison
        self.intervention_trace: Trace | None = None
        self._streamer: Streamer | None = None
        self._prompt: Prompt = prompt
        self.recording = Recording(queries=True)  # queries of every layer: any head's nope/rope split

        self.prompt = w.Textarea(value=prompt, description="prompt", layout=w.Layout(width="98%", height="70px"))
        fit = {"style": {"description_width": "initial"}, "layout": w.Layout(width="170px")}  # labels never cut
        self.max_new_tokens = w.BoundedIntText(
            value=64, min=1, max=c.max_position_embeddings, description="new tokens", **fit
        )
        self.temperature = w.BoundedFloatText(value=0.0, min=0.0, max=5.0, step=0.1, description="temperature", **fit)
        self.top_p = w.BoundedFloatText(value=1.0, min=0.01, max=1.0, step=0.05, description="top-p", **fit)
        self.seed = w.IntText(value=0, description="seed", **fit)
        self.stop_at_eos = w.Checkbox(
            value=True, description="stop at EOS", indent=False, layout=w.Layout(width="130px")
        )
        self.generate_button = w.Button(description="Generate", button_style="primary", icon="play")
        self.stop_button = w.Button(description="Stop", button_style="danger", icon="stop", disabled=True)
        self.status = w.HTML("ready")
        self.generate_button.on_click(lambda _: self._guarded(self.run, wait=False))
        self.stop_button.on_click(lambda _: self.stop())

        moe = c.moe_layers
        self.layer_slider = w.SelectionSlider(options=moe, value=moe[0] if moe else None, description="MoE layer")
        self.strip = TokenStrip()
        self.strip.on_select(lambda position: self._guarded(self.select, position=position))
        self._spans: list[str] = []
        self._top1 = torch.zeros(len(moe), 0, dtype=torch.int64)  # (M, S) top-1 expert per MoE layer and token
        self.layer_slider.observe(lambda _: self._render_strip(), names="value")

        E = c.n_routed_experts or 0
        self.counts = torch.zeros(len(moe), E, dtype=torch.int64)  # (M, E) tokens routed per expert so far
        self.utilization = go.FigureWidget(
            go.Heatmap(
                z=self.counts.numpy(), colorscale="Blues", hovertemplate=hover("layer %{y}, expert %{x}", "%{z} tokens")
            )
        )
        style(self.utilization, "Expert utilization (tokens routed)", height=200 + 22 * len(moe))
        self.utilization.update_yaxes(row_axis([str(m) for m in moe], "MoE layer"))
        self.utilization.update_xaxes(title="expert")
        self.utilization_panel = Panel(self.utilization, NOT_YET)

        self.att_layer = w.Dropdown(options=list(range(c.num_hidden_layers)), value=0, description="layer")
        self.att_head = w.Dropdown(options=list(range(c.num_attention_heads)), value=0, description="head")
        self.attention = go.FigureWidget(make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.08))
        self.attention.add_bar(name="attention", row=1, col=1, marker_color="#444")
        self.attention.add_bar(name="nope (content)", row=2, col=1, marker_color="#1f77b4")
        self.attention.add_bar(name="rope (position)", row=2, col=1, marker_color="#e8453c")
        style(
            self.attention,
            "Attention of the newest token",
            height=440,
            subtitle="top: pattern; bottom: its score split",
        )
        self.attention.update_xaxes(title="key position", row=2, col=1)
        self.attention_panel = Panel(self.attention, NOT_YET)
        for widget in (self.att_layer, self.att_head):
            widget.observe(lambda _: self._guarded(self._render_attention), names="value")

        self.latent = go.FigureWidget(
            go.Heatmap(colorscale="Viridis", hovertemplate=hover("layer %{y}, position %{x}", "|c_kv| %{z:.3g}"))
        )
        style(self.latent, "Latent KV: norm of each token's cached c_kv", height=180 + 22 * c.num_hidden_layers)
        self.latent.update_yaxes(row_axis([str(i) for i in range(c.num_hidden_layers)], "layer"))
        self.latent.update_xaxes(title="position")
        self.latent_panel = Panel(self.latent, NOT_YET)
        self.spectrum = go.FigureWidget()
        self.spectrum_panel = Panel(self.spectrum, SPECTRUM_NOTE)
        self.spectrum_button = w.Button(description="Latent spectrum", icon="bar-chart")
        self.spectrum_button.on_click(lambda _: self._guarded(self.show_spectrum))

        self.inspect = w.IntSlider(value=0, min=0, max=0, description="inspect pos")
        self.inspect_figure = go.FigureWidget()
        self.inspect_panel = Panel(self.inspect_figure, NOT_YET)
        self.candidates = w.HTML()
        self.inspect.observe(lambda _: self._guarded(self._selected), names="value")
        self.attribution_status = w.HTML()  # the progress line of the attribution being computed
        self.attribution_figure = go.FigureWidget()
        self.attribution_panel = Panel(self.attribution_figure, ATTRIBUTION_NOTE)
        self._attribution = Superseding("dsv2viz-attribution")

        self.iv_mode = w.Dropdown(options=["ban", "force"], value="ban", description="intervention")
        self.iv_layer = w.Dropdown(options=moe, value=moe[0] if moe else None, description="at layer")
        self.iv_expert = w.BoundedIntText(value=0, min=0, max=max(E - 1, 0), description="expert")
        self.iv_button = w.Button(
            description="Regenerate with intervention", icon="flask", layout=w.Layout(width="auto")
        )
        self.iv_button.on_click(lambda _: self._guarded(self.regenerate, wait=False))
        self.compare_figure = go.FigureWidget(
            make_subplots(rows=1, cols=2, subplot_titles=("routing changed", "KL per step"))
        )
        self.compare_figure.add_bar(name="routing changed", row=1, col=1, marker_color="#e8453c")
        self.compare_figure.add_scatter(name="KL(base || intervened)", mode="lines+markers", row=1, col=2)
        style(self.compare_figure, "Intervention against the base run", height=320)
        self.compare_figure.update_xaxes(title="MoE layer", type="category", row=1, col=1)
        self.compare_figure.update_yaxes(title="fraction of positions", range=[0, 1], row=1, col=1)
        self.compare_figure.update_xaxes(title="generated step", row=1, col=2)
        self.compare_figure.update_yaxes(title="nats", row=1, col=2)
        self.compare_panel = Panel(self.compare_figure, COMPARE_NOTE)
        # live figures: a run's next flush waits until the browser has drawn these
        self._drawn = Drawn([self.utilization, self.latent, self.attention])

        controls = w.HBox(
            [self.max_new_tokens, self.temperature, self.top_p, self.seed, self.stop_at_eos],
            layout=w.Layout(flex_flow="row wrap", grid_gap="8px"),
        )

        def row(*children: w.Widget) -> w.HBox:  # side by side when the cell is wide enough, else stacked
            return w.HBox(list(children), layout=w.Layout(flex_flow="row wrap"))

        super().__init__(
            [
                self.prompt,
                controls,
                row(self.generate_button, self.stop_button, self.status),
                self.layer_slider,
                self.strip,
                row(self.utilization_panel, self.latent_panel),
                row(self.att_layer, self.att_head),
                self.attention_panel,
                row(self.inspect, self.spectrum_button),
                row(self.inspect_panel, self.candidates),
                self.attribution_status,
                self.attribution_panel,
                self.spectrum_panel,
                row(self.iv_mode, self.iv_layer, self.iv_expert, self.iv_button),
                self.compare_panel,
            ]
        )

    # ----- public API ---------------------------------------------------------------------------------
    def run(self, prompt: Prompt | None = None, wait: bool = True) -> Streamer:
        """Generate from `prompt` (default: the text box) with the sampling controls; `wait` joins the worker."""
        if prompt is None:
            prompt = self.prompt.value
        elif isinstance(prompt, str):
            self.prompt.value = prompt
        self._idle()
        self._prompt = prompt
        generation = self._generation(prompt, [])
        self._reset()
        return self._start(generation, self._flush, "generated", wait, ready=self._drawn.ready)

    def regenerate(self, wait: bool = True) -> Streamer:
        """Rerun the last prompt with the intervention chosen in the widgets and compare it with the last run."""
        if self.trace is None:
            raise RuntimeError("generate once first: the intervention is compared with the last run")
        layer, expert = self.iv_layer.value, self.iv_expert.value
        hooks = (ablate_experts if self.iv_mode.value == "ban" else force_experts)({layer: [expert]})
        return self._start(self._generation(self._prompt, hooks), self._flush_intervention, "intervention", wait)

    def stop(self) -> None:
        """End the running generation before its next token; its hooks are removed when it ends."""
        if self._streamer is not None:
            self._streamer.stop()

    @property
    def streamer(self) -> Streamer | None:
        """The last run's Streamer (also of a run started by a button): its timings and when Stop came."""
        return self._streamer

    @property
    def running(self) -> bool:
        return self._streamer is not None and self._streamer.running

    @property
    def shown(self) -> int:
        """Tokens (prompt + generated) the panels show so far."""
        return len(self._spans)

    def select(self, position: int) -> None:
        """Select the token at `position`, as a click on it in the strip does: "inspect pos" moves there, the
        strip outlines it, and its attribution starts in a worker thread (:meth:`wait_attribution`)."""
        if self.trace is None or not 0 <= position < len(self.trace):
            raise ValueError(f"position {position} is not a token shown in the strip")
        self.inspect.max = max(self.inspect.max, position)  # a click may come before a flush moves the slider's end
        if self.inspect.value == position:
            self._selected()  # the same token again: its attribution is computed again
        else:
            self.inspect.value = position  # its observer does the rest

    def wait_attribution(self, timeout: float | None = None) -> None:
        """Wait until the attribution of the selected token is shown (or `timeout` seconds)."""
        self._attribution.join(timeout)

    def show_spectrum(self) -> None:
        """Singular values of every layer's cached latent over the last trace (computed on request: an SVD)."""
        if self.trace is not None:
            redraw(self.spectrum, plots.latent_spectrum(self.trace))
            self.spectrum_panel.show_figure()

    # ----- running ------------------------------------------------------------------------------------
    def _generation(self, prompt: Prompt, interventions: list) -> Generation:
        top_p = self.top_p.value if self.top_p.value < 1 else None
        return self.model.generate(
            prompt,
            self.max_new_tokens.value,
            temperature=self.temperature.value,
            top_p=top_p,
            seed=self.seed.value,
            stop_tokens=None if self.stop_at_eos.value else (),
            record=self.recording,
            interventions=interventions,
        )

    def _idle(self) -> None:
        if self.running:
            raise RuntimeError("a generation is running: stop it or wait for it to finish")

    def _start(
        self, generation: Generation, flush: Flush, what: str, wait: bool, ready: Callable[[], bool] | None = None
    ) -> Streamer:
        self._idle()
        self._streamer = Streamer(generation, flush, done=lambda streamer: self._finish(streamer, what), ready=ready)
        self.generate_button.disabled = self.iv_button.disabled = True
        self.stop_button.disabled = False
        self.status.value = "generating…"
        self._streamer.start()
        if wait:
            self._streamer.join()
        return self._streamer

    def _finish(self, streamer: Streamer, what: str) -> None:
        """Back to ready, whatever happened: buttons restored, the outcome (and any error) in the status line."""
        self.generate_button.disabled = self.iv_button.disabled = False
        self.stop_button.disabled = True
        generation = streamer.generation
        G = len(generation.token_ids) - len(generation.prompt_ids)
        error = f" — <b>error</b>: {token_label(_error_line(streamer.error))}" if streamer.error else ""
        self.status.value = f"{what}: {G} tokens ({generation.finish_reason}){error}"

    def _guarded(self, fn: Callable[..., Any], **kwargs: Any) -> None:
        """Run a widget callback, showing its error in the status line instead of losing it in the kernel log."""
        try:
            fn(**kwargs)
        except Exception as e:
            self.status.value = f"<b>error</b>: {token_label(str(e))}"

    def _reset(self) -> None:
        self.trace, self.comparison, self.intervention_trace = None, None, None
        self._spans = []
        self._top1 = self._top1[:, :0]
        self.counts.zero_()
        self.strip.show([])
        self.strip.select(None)
        self.candidates.value = ""
        self.inspect.value = self.inspect.max = 0  # no trace: nothing is drawn or attributed
        self._attribution.cancel()
        self.attribution_status.value = ""
        self.attribution_panel.show_note(ATTRIBUTION_NOTE)
        self.inspect_panel.show_note(INSPECT_NOTE)
        self.spectrum_panel.show_note(SPECTRUM_NOTE)
        self.compare_panel.show_note(COMPARE_NOTE)

    # ----- flushes (worker thread, between steps) -----------------------------------------------------
    def _flush(self, steps: list[Step], generation: Generation, final: bool) -> None:
        trace = generation.trace
        start, S = len(self._spans), len(trace)
        if start < S:
            if trace.moe_layers:
                experts = torch.stack([trace.routing(layer)[0][start:] for layer in trace.moe_layers])  # (M, new, K)
                self._top1 = torch.cat([self._top1, experts[:, :, 0]], dim=1)
                for row in range(len(self.counts)):
                    self.counts[row] += experts[row].flatten().bincount(minlength=self.counts.shape[1])
            self._spans += self._spans_for(trace, range(start, S))
        self.trace = trace
        self.strip.show(self._spans, start)
        update(self.utilization, [{"z": self.counts.numpy().copy()}])
        # (L, S) sent as JSON text (plotly sends only 1-D arrays as binary): 3 decimals, a third of the bytes,
        # as many digits as the hover shows
        update(self.latent, [{"z": analysis.latent_norms(trace).double().numpy().round(3)}])
        self.utilization_panel.show_figure()
        self.latent_panel.show_figure()
        self._render_attention()
        self._drawn.sent()
        self.inspect.max = S - 1
        if final:
            self._render_inspect()
        elif steps:
            self.status.value = (
                f"generating… {len(trace) - trace.prompt_len} tokens, last {token_label(trace.token_texts[-1])}"
            )

    def _flush_intervention(self, steps: list[Step], generation: Generation, final: bool) -> None:
        if not final:
            self.status.value = f"regenerating with intervention… {steps[-1].index + 1 if steps else 0} tokens"
            return
        if self._streamer is not None and self._streamer.error is not None:
            return  # nothing to compare with; `_finish` shows the error
        base, other = self.trace, generation.trace
        self.intervention_trace, self.comparison = other, analysis.compare(base, other)
        cmp = self.comparison
        what = f"{self.iv_mode.value} expert {self.iv_expert.value} at layer {self.iv_layer.value}"
        diverge = "never" if cmp.first_divergence is None else f"at position {cmp.first_divergence}"
        update(
            self.compare_figure,
            [
                {"x": [str(m) for m in cmp.layers], "y": cmp.routing_changed},
                {"x": list(range(len(cmp.kl))), "y": cmp.kl},  # NaN where the runs' tokens differ: a gap
            ],
            title_text=f"Intervention ({what}) against the base run; tokens diverge {diverge}",
        )
        self.compare_panel.show_figure()

    # ----- rendering ----------------------------------------------------------------------------------
    def _spans_for(self, trace: Trace, positions: range) -> list[str]:
        moe = self.model.config.moe_layers
        top1 = self._top1[moe.index(self.layer_slider.value)].tolist() if moe else [0] * len(trace)
        return [token_span(trace.token_texts[p], p, top1[p], trace.prompt_len) for p in positions]

    def _render_strip(self) -> None:
        if self.trace is not None:
            self._spans = self._spans_for(self.trace, range(len(self._spans)))
            self.strip.show(self._spans)

    def _render_attention(self) -> None:
        trace = self.trace
        if trace is None:
            return
        layer, head = self.att_layer.value, self.att_head.value
        try:
            pattern, nope, rope = newest_attention(trace, layer, head)
        except TraceError as e:  # this layer or head was not recorded: say which setting records it
            self.attention_panel.show_note(str(e))
            return
        S = len(pattern)
        x, labels = np.arange(S, dtype=np.int32), [[token_label(t)] for t in trace.token_texts[:S]]
        weighted = pattern * (nope.abs() + rope.abs())  # (S,) how much each key's score parts weigh
        share = f": rope share {float((pattern * rope.abs()).sum() / weighted.sum()):.2f}" if weighted.sum() > 0 else ""
        hovertemplate = hover("%{customdata[0]} (position %{x})", "%{y:.4f}")
        newest = token_label(trace.token_texts[-1])
        update(
            self.attention,
            [{"x": x, "y": y, "customdata": labels, "hovertemplate": hovertemplate} for y in (pattern, nope, rope)],
            title_text=f"Attention of the newest token “{newest}”, layer {layer} head {head}{share}",
        )
        self.attention_panel.show_figure()

    def _selected(self) -> None:
        """The "inspect pos" slider moved (by the user, or by a click in the strip): follow it everywhere."""
        if self.trace is None:
            return
        position = min(self.inspect.value, len(self.trace) - 1)
        self.strip.select(position)
        self._render_inspect()
        trace = self.trace
        waiting = "waiting for the one before" if self._attribution.busy else "starting"
        self.attribution_status.value = f"attribution of position {position}: {waiting}…"
        self._attribution.submit(lambda ticket: self._attribute(ticket, trace, position))

    def _attribute(self, ticket: int, trace: Trace, position: int) -> None:
        """Compute and show one position's attribution (the attribution worker); shows nothing once stale."""
        current = lambda: self._attribution.current(ticket)  # noqa: E731
        L, start = self.model.config.num_hidden_layers, time.perf_counter()

        def progress(x: torch.Tensor, hook: Any) -> None:  # after each layer: the progress line
            if current():
                layer = int(hook.name.split(".")[2])
                self.attribution_status.value = f"attribution of position {position}: layer {layer + 1} of {L}…"

        if not current():
            return
        try:
            with self.model.hooks([("model.layers.*.hook_resid_post", progress)]):
                attr = analysis.logit_attribution(self.model, trace, position)
            figure = plots.logit_attribution(attr)
        except Exception as e:
            if current():
                self.attribution_status.value = ""
                self.attribution_panel.show_note(f"attribution of position {position} failed: {_error_line(e)}")
            return
        if current():
            redraw(self.attribution_figure, figure)
            self.attribution_panel.show_figure()
            self.attribution_status.value = (
                f"attribution of position {position}: what wrote {token_label(attr.target_text)} "
                f"({time.perf_counter() - start:.1f} s)"
            )

    def _render_inspect(self) -> None:
        trace = self.trace
        if trace is None or not trace.moe_layers:
            return
        p = min(self.inspect.value, len(trace) - 1)
        redraw(self.inspect_figure, plots.routing_across_layers(trace, p))
        self.inspect_panel.show_figure()
        try:
            ids, probs = trace.candidates(p)  # the distribution computed after reading position p
        except TraceError as e:  # a prompt position, or candidates not recorded: only the note
            self.candidates.value = notice_html(str(e))
            return
        rows = "".join(
            f"<tr><td style='font-family:monospace'>{token_label(t)}</td><td>{q:.3f}</td></tr>"
            for t, q in zip(id_labels(self.model.tokenizer, ids.tolist()), probs.tolist())
        )
        self.candidates.value = f"<b>next-token candidates after position {p}</b><table>{rows}</table>"


def _error_line(error: BaseException) -> str:
    """An error as one line for the status bar: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
