"""Streaming plumbing for live widgets: a worker thread that coalesces steps, and cheap token-strip HTML.

A Jupyter kernel handles a button click only between cell executions or while another thread runs, so
generation runs in a :class:`Streamer` worker thread: Stop stays clickable. Sending one widget update
per token would flood the front end (and cost more than a tiny model's forward pass), so the worker
keeps the steps in a buffer and hands them over in batches, at most every :data:`FLUSH_INTERVAL`
seconds, only once the browser has drawn the previous batch (`ready`), and once at the end. The
browser, not the kernel, is what falls behind on a busy machine: it takes 0.3 to 1 s to draw one
batch's figures, far longer than a small model takes to write a token, and batches sent faster than
it drew them queued up there, so the page kept drawing old tokens for seconds after Stop. (Measured:
the worker does not starve the kernel; a Stop click the browser has sent reaches the kernel within 3
to 150 ms with both cores busy, and the generation ends before its next step.) The flush runs in the
worker between two steps, where the generation's trace snapshot is consistent, and the time spent in
it is measured for the benchmark. However the run ends (finished, stopped, or an error in the model, a
hook or a flush), `done` is called last, so a widget always returns to ready and can show the error.

The worker runs in a copy of the context that started it: hooks put in scope around the start (``with
model.hooks(...): dash.run(...)``) act on its generation, and those of other runs never do.

The token strip is HTML rather than a figure: one escaped ``<span>`` per token is far cheaper to grow
than a plotly heatmap, and the colours are the figures' own expert palette. It is cut in pieces
(:class:`TokenStrip`) so that a flush sends the new tokens' piece, not the whole strip. Each piece is a
small anywidget (inline JavaScript, nothing fetched) that draws that HTML and sends a click on a token to
the kernel; work that follows such a selection runs in a :class:`Superseding` worker, newest click only.
"""

from __future__ import annotations

import contextvars
import logging
import threading
import time
from collections.abc import Callable

import anywidget
import ipywidgets
import torch
import traitlets

from ..generation import Generation, Step
from ..plots._layout import MONO, expert_color
from ..plots._text import token_label
from ..plots.tokens import PROMPT_LIGHTEN
from ..traces import Trace, TraceError

#: Seconds between two widget flushes while tokens stream.
FLUSH_INTERVAL = 0.25

#: flush(new steps, generation, final): update the widgets; called in the worker thread.
Flush = Callable[[list[Step], Generation, bool], None]
#: done(streamer): called last in the worker thread, whatever happened; streamer.error says what failed.
Done = Callable[["Streamer"], None]


class Streamer:
    """Runs a Generation in a worker thread and hands its steps to `flush` in batches."""

    def __init__(
        self,
        generation: Generation,
        flush: Flush,
        done: Done | None = None,
        interval: float = FLUSH_INTERVAL,
        ready: Callable[[], bool] | None = None,
    ) -> None:
        self.generation, self._flush, self._done, self.interval = generation, flush, done, interval
        self._ready = ready or (lambda: True)  # False while the browser is still drawing the last flush
        self.error: BaseException | None = None  # raised by the generation or a flush, shown by the caller
        self.flushes = 0
        self.flush_seconds = 0.0  # time spent in flush (widget updates), not in the model
        self.wall_seconds = 0.0  # the whole run: model + flushes
        # when each step arrived and when stop() was called (time.time(), comparable with a browser's clock),
        # and how many tokens had been generated then: how promptly Stop takes effect, how far a page lags
        self.step_times: list[float] = []
        self.stop_requested_at: float | None = None
        self.tokens_at_stop: int | None = None
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._work,), name="dsv2viz-generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """End the generation before its next step (thread-safe)."""
        if self.stop_requested_at is None:
            self.stop_requested_at = time.time()
            self.tokens_at_stop = len(self.generation.token_ids) - len(self.generation.prompt_ids)
        self.generation.stop()

    def join(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _work(self) -> None:
        start = last = time.perf_counter()
        buffer: list[Step] = []
        try:
            for step in self.generation:
                self.step_times.append(time.time())
                buffer.append(step)
                if time.perf_counter() - last >= self.interval and self._ready():
                    self._call(buffer, final=False)
                    buffer, last = [], time.perf_counter()
        except Exception as e:  # shown by `done`; the generation's hooks ended with its passes
            self.error = e
        self._call(buffer, final=True)
        self.wall_seconds = time.perf_counter() - start
        if self._done is not None:
            self._done(self)

    def _call(self, steps: list[Step], final: bool) -> None:
        t0 = time.perf_counter()
        try:
            self._flush(steps, self.generation, final)
        except Exception as e:
            self.error = self.error or e
        self.flush_seconds += time.perf_counter() - t0
        self.flushes += 1


def span_color(expert: int, prompt: bool) -> str:
    """A token's strip colour: its top-1 expert's colour, lighter for prompt tokens (as in plots.token_strip)."""
    return expert_color(expert, PROMPT_LIGHTEN if prompt else 0.15)


def token_span(text: str, position: int, expert: int, prompt_len: int) -> str:
    """One token of the strip: escaped text on its expert's colour; a bar marks the first generated token."""
    bar = "border-left:3px solid #111;" if position == prompt_len else ""
    return (
        f'<span class="tok" data-pos="{position}" title="position {position}, expert {expert}" '
        f'style="background:{span_color(expert, position < prompt_len)};{bar}padding:1px 2px;margin:1px;'
        f'border-radius:3px;white-space:pre">{token_label(text)}</span>'
    )


#: Tokens per piece of the strip: a flush re-sends only the pieces that changed, about 40 KB at most.
STRIP_CHUNK = 200

# A piece of the strip, drawn in the browser: its HTML (built and escaped in Python by token_span), the
# selected token outlined, and a click on a token sent to the kernel as {select: position}. Inline, so
# nothing is fetched. The pieces flow as one text, wrapped into lines: a line may break between two
# tokens, never inside one (the spans keep white-space:pre).
_PIECE_ESM = """
function render({ model, el }) {
  el.classList.add("dsv2viz-piece");
  const mark = () => {
    for (const s of el.querySelectorAll(".tok.selected")) s.classList.remove("selected");
    const p = model.get("selected");
    if (p >= 0) el.querySelector(`.tok[data-pos="${p}"]`)?.classList.add("selected");
  };
  const draw = () => { el.innerHTML = model.get("value"); mark(); };
  el.addEventListener("click", (event) => {
    const tok = event.target.closest(".tok");
    if (tok && el.contains(tok)) model.send({ select: Number(tok.dataset.pos) });
  });
  model.on("change:value", draw);
  model.on("change:selected", mark);
  draw();
}
export default { render };
"""
_PIECE_CSS = f"""
.dsv2viz-strip {{font-family:{MONO};font-size:13px;line-height:2;white-space:normal;word-break:break-all}}
.dsv2viz-strip .dsv2viz-piece {{display:inline;overflow:visible}}
.dsv2viz-piece .tok {{cursor:pointer}}
.dsv2viz-piece .tok.selected {{outline:2px solid #111;outline-offset:1px}}
"""


class _StripPiece(anywidget.AnyWidget):
    """Up to :data:`STRIP_CHUNK` tokens of the strip; reports clicks on them."""

    _esm = _PIECE_ESM
    _css = _PIECE_CSS
    value = traitlets.Unicode("").tag(sync=True)  # the tokens' spans (token_span), escaped
    selected = traitlets.Int(-1).tag(sync=True)  # the position outlined in this piece, -1: none


class TokenStrip(ipywidgets.Box):
    """The token strip, in pieces of :data:`STRIP_CHUNK` tokens so that a flush sends only what grew;
    a click on a token selects it (:meth:`on_select`), and the selected token is outlined.

    One HTML value holding every token would be sent whole at each flush, O(tokens) bytes every time
    (0.4 MB at 2,000 tokens); here a flush sends the piece holding the new tokens (and opens new pieces).
    """

    def __init__(self) -> None:
        super().__init__(layout=ipywidgets.Layout(display="block", max_height="260px", overflow="hidden auto"))
        self.add_class("dsv2viz-strip")
        self._pieces: list[_StripPiece] = []
        self._shown = 0  # pieces in use
        self._length = 0  # tokens shown
        self._selected: int | None = None
        self._callbacks: list[Callable[[int], None]] = []

    def show(self, spans: list[str], start: int = 0) -> None:
        """Show `spans`, of which those before `start` are already shown as they are."""
        n = -(-len(spans) // STRIP_CHUNK)  # pieces needed
        while len(self._pieces) < n:
            piece = _StripPiece()
            piece.on_msg(self._clicked)
            self._pieces.append(piece)
        for i in range(start // STRIP_CHUNK, n):
            self._pieces[i].value = "".join(spans[i * STRIP_CHUNK : (i + 1) * STRIP_CHUNK])  # sent if it changed
        if n != self._shown:
            self.children = tuple(self._pieces[:n])
            self._shown = n
        self._length = len(spans)
        if self._selected is not None and self._selected < len(spans):  # selected before its piece was shown
            self._pieces[self._selected // STRIP_CHUNK].selected = self._selected

    @property
    def value(self) -> str:
        """The HTML of every token shown, in order."""
        return "".join(piece.value for piece in self._pieces[: self._shown])

    @property
    def selected(self) -> int | None:
        """The position outlined, or None."""
        return self._selected

    def select(self, position: int | None) -> None:
        """Outline the token at `position` (None: none), now or once it is shown; calls no callback."""
        for p, value in ((self._selected, -1), (position, position)):
            if p is not None and p // STRIP_CHUNK < len(self._pieces):
                self._pieces[p // STRIP_CHUNK].selected = value
        self._selected = position

    def on_select(self, callback: Callable[[int], None]) -> None:
        """Call ``callback(position)`` when a token is clicked in the browser."""
        self._callbacks.append(callback)

    def _clicked(self, piece: _StripPiece, content: dict, buffers: list) -> None:
        position = content.get("select") if isinstance(content, dict) else None
        if isinstance(position, int) and not isinstance(position, bool) and 0 <= position < self._length:
            for callback in self._callbacks:
                callback(position)


class Superseding:
    """Runs jobs in one worker thread, the newest only: a job submitted while another runs replaces any
    still waiting, and :meth:`current` tells a running job whether a newer one came (then its result is
    stale: it shows nothing). For work that follows a selection, such as the dashboard's attribution."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._lock = threading.Lock()
        self._ticket = 0  # the newest job's
        self._waiting: tuple[int, Callable[[int], None]] | None = None
        self._thread: threading.Thread | None = None

    def submit(self, job: Callable[[int], None]) -> int:
        """Run ``job(ticket)`` in the worker once the job running now (if any) ends; returns its ticket."""
        with self._lock:
            self._ticket += 1
            self._waiting = (self._ticket, job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()
            return self._ticket

    def cancel(self) -> None:
        """Drop the waiting job and make the running one stale."""
        with self._lock:
            self._ticket += 1
            self._waiting = None

    def current(self, ticket: int) -> bool:
        """Whether the job of `ticket` is still the newest."""
        return ticket == self._ticket

    def join(self, timeout: float | None = None) -> None:
        """Wait until no job runs or waits (or `timeout` seconds)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    @property
    def busy(self) -> bool:
        return self._thread is not None

    def _work(self) -> None:
        while True:
            with self._lock:
                if self._waiting is None:
                    self._thread = None
                    return
                (ticket, job), self._waiting = self._waiting, None
            try:
                job(ticket)
            except Exception:  # jobs show their own errors; one that escapes is logged and the worker goes on
                logging.getLogger(__name__).exception("%s: a job failed", self.name)


def newest_attention(trace: Trace, layer: int, head: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pattern, scores_nope, scores_rope), each (S,), of the newest token's query at `layer`, `head`.

    A TraceError names the Recording setting that would record them when the trace cannot split them.
    """
    if layer not in trace.attention_parts_layers():
        how = trace.missing("attention_parts") or "Recording(queries=True) with attention_layers including it"
        raise TraceError(f"layer {layer}'s attention cannot be split into content and position: record it with {how}")
    view = trace.attention(layer, head, queries=[-1])  # one row: cheap however long the trace
    return view.pattern[0], view.scores_nope[0], view.scores_rope[0]
