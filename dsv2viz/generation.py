"""Streaming generation with the latent cache, recording a trace step by step.

``model.generate(prompt, ...)`` returns a :class:`Generation`. Iterating it yields one :class:`Step` per
new token as soon as the model has processed it (so the step carries that token's own routing, latent
and attention), which is what a live dashboard shows. ``stop()`` (thread-safe) ends it between two
steps; ``run()`` drives it to the end and returns the :class:`Trace`.

A generation's hooks (its recorder's and its interventions') act on its own forward passes only: they are
resolved, all or nothing, when the generation is created, and put in scope (:func:`dsv2viz.hooks.scope`)
around each of its forward passes. Between two steps, paused, abandoned or while another thread or
dashboard runs the same model, they touch nothing else; there is nothing to remove when it ends.

The prompt is read by the eager model; each new token is decoded through the fast path
(:mod:`dsv2viz.fast_decode`: one fixed-shape, compiled step that records into the same buffers and applies
built-in interventions as tensors) unless a hook other than the generation's own is in play, in which case
that step runs through the eager model, the reference. :attr:`Generation.decode_path` says which ran.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Union

import torch

from .fast_decode import FastDecoder, hooks_in_play, unavailable
from .hooks import NameFilter, scope
from .tokenizer import SequenceText
from .traces.recorder import Recorder
from .traces.recording import Recording
from .traces.trace import Trace, token_byte_tensors

if TYPE_CHECKING:
    from .model import DeepseekV2ForCausalLM

Prompt = Union[str, Sequence[int], Sequence[dict]]
Intervention = tuple[NameFilter, Callable]

#: Largest score tensor (heads x query rows x keys) one layer may build while a prompt is read with its
#: pattern asked for; longer prompts are read in chunks of query rows to stay under it.
SCORE_ELEMENTS_PER_CHUNK = 2**25


@dataclass(frozen=True)
class Sampling:
    """How the next token is drawn. temperature 0 is greedy."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int | None = None  # keep the k likeliest tokens
    top_p: float | None = None  # keep the smallest set whose probability reaches p
    seed: int | None = None
    stop_tokens: tuple[int, ...] | None = None  # default: the tokenizer's EOS

    def __post_init__(self) -> None:
        _check_int("max_new_tokens", self.max_new_tokens, 0)
        _check_number("temperature", self.temperature, "must be >= 0 (0 is greedy)", lambda t: t >= 0)
        if self.top_k is not None:
            _check_int("top_k", self.top_k, 1)
        if self.top_p is not None:
            _check_number("top_p", self.top_p, "must be in (0, 1]", lambda p: 0 < p <= 1)
        if self.seed is not None:
            _check_int("seed", self.seed, 0, 2**63 - 1)
        if self.stop_tokens is not None:
            object.__setattr__(self, "stop_tokens", tuple(self.stop_tokens))
            for token in self.stop_tokens:
                _check_int("each of stop_tokens", token, 0)

    def choose(self, logits: torch.Tensor, generator: torch.Generator | None) -> int:
        """Pick the next token from fp32 logits (V,)."""
        if self.temperature == 0:
            return int(logits.argmax())
        logits = logits / self.temperature
        if self.top_k is not None:
            kth = logits.topk(min(self.top_k, logits.numel())).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.top_p is not None:
            sorted_logits, order = logits.sort(descending=True)
            before = sorted_logits.softmax(-1).cumsum(-1) - sorted_logits.softmax(-1)  # mass of better tokens
            drop = torch.zeros_like(logits, dtype=torch.bool).scatter_(0, order, before >= self.top_p)
            logits = logits.masked_fill(drop, float("-inf"))
        return int(torch.multinomial(logits.softmax(-1), 1, generator=generator))


def _check_int(name: str, value: object, low: int, high: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name}={value!r} must be an integer")
    if value < low or (high is not None and value > high):
        raise ValueError(f"{name}={value} must be >= {low}" + (f" and <= {high}" if high is not None else ""))


def _check_number(name: str, value: object, rule: str, ok: Callable[[float], bool]) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not ok(value):
        raise ValueError(f"{name}={value!r} {rule}")


@dataclass
class Step:
    """One generated token, after the model has processed it (steps and positions: see dsv2viz.traces.trace)."""

    index: int  # its step: g for the g-th generated token, counted from 0
    position: int  # its position in the sequence: prompt length + index
    token_id: int
    text: str  # the characters this token completes (dsv2viz.text); all steps' joined: the generated text
    probability: float  # of this token under the distribution it was drawn from (temperature 1, unfiltered)
    record: dict[str, torch.Tensor]  # this token's slice of the trace: experts (M, K), weights (M, K), ...


class Generation:
    """A generation in progress: iterate for Steps, `stop()` to end early, `trace` for what is recorded."""

    def __init__(
        self,
        model: DeepseekV2ForCausalLM,
        prompt: Prompt,
        sampling: Sampling,
        recording: Recording,
        interventions: Iterable[Intervention] = (),
        chat: bool = False,
    ) -> None:
        self.model, self.sampling, self.recording = model, sampling, recording
        self.interventions = list(interventions)
        self.prompt_ids = encode_prompt(model, prompt, chat)
        P, N = len(self.prompt_ids), sampling.max_new_tokens
        if P == 0:
            raise ValueError("the prompt is empty: give at least one token")
        context = model.config.max_position_embeddings
        if context < P + N:
            raise ValueError(
                f"prompt of {P} tokens + max_new_tokens={N} exceeds the context of {context} positions; "
                "shorten the prompt or ask for fewer tokens"
            )
        value_bytes = torch.finfo(model.dtype).bits // 8
        recording.check_budget(model.config, P, N, value_bytes)  # before any work
        self.recorder = Recorder(model, recording, P, P + N)
        # every name resolved now, before any work: a bad name in the list attaches nothing
        self._hooks = model.resolve_hooks([*self.interventions, *self.recorder.hooks()])
        self._fast_unavailable = unavailable(model, self.interventions)  # None: decode through the fast path
        self.decode_path: str | None = None  # how the latest token was decoded: "fast", or "eager (why)"
        self.compile_seconds: float | None = None  # when this generation compiled the fast path's step
        self.token_ids: list[int] = list(self.prompt_ids)
        self._text = SequenceText(model.tokenizer)
        self.prompt_text = self._text.append(self.prompt_ids)  # what the steps' texts continue
        self.top: list[tuple[torch.Tensor, torch.Tensor]] = []  # per new token: (top ids, top probs)
        self.logprobs: list[torch.Tensor] = []
        self.finish_reason: str | None = None  # "length", "stop_token" or "stopped" once ended
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a trace snapshot taken from another thread sees whole steps only
        self._started = False

    def stop(self) -> None:
        """Ask the generation to end before its next step (safe to call from another thread)."""
        self._stop.set()

    def run(self) -> Trace:
        """Generate to the end and return the trace."""
        for _ in self:
            pass
        return self.trace

    def __iter__(self) -> Iterator[Step]:
        if self._started:
            raise RuntimeError("this generation has already run; call model.generate again")
        self._started = True
        return self._steps()

    def _steps(self) -> Iterator[Step]:
        model, s = self.model, self.sampling
        stop_tokens = set(s.stop_tokens if s.stop_tokens is not None else self._default_stop())
        gen = torch.Generator(device="cpu").manual_seed(s.seed) if s.seed is not None else None
        cache = model.new_cache(1, capacity=len(self.prompt_ids) + s.max_new_tokens)
        self.recorder.start(cache)
        fast = None
        if self._fast_unavailable is None and s.max_new_tokens:
            fast = FastDecoder(model, self.recorder, [fn.spec for _, fn in self.interventions], cache)
        try:
            logits = self._prefill(cache)
            for index in range(s.max_new_tokens):
                if self._stop.is_set():
                    self.finish_reason = "stopped"
                    return
                probs = logits.softmax(-1)
                token = s.choose(logits, gen)
                logits = self._decode(token, cache, fast)
                with self._lock:  # the token, its text, its distribution and its records become visible together
                    self.token_ids.append(token)
                    text = self._text.append([token])
                    if token in stop_tokens or index == s.max_new_tokens - 1:
                        text += self._text.flush()  # the last step: no later token can finish a character
                    self._keep_distribution(probs)
                    self.recorder.commit(cache.length)
                yield Step(index, len(self.token_ids) - 1, token, text, float(probs[token]), self._last_record())
                if token in stop_tokens:
                    self.finish_reason = "stop_token"
                    return
            self.finish_reason = "length"
        finally:
            if self.finish_reason is None:  # closed from outside, or an error
                self.finish_reason = "stopped"

    def _decode(self, token: int, cache, fast: FastDecoder | None) -> torch.Tensor:
        """Next-token logits (V,) fp32 after reading `token`: through the fast path unless other hooks are in play."""
        if fast is not None and not hooks_in_play(self.model):
            self.decode_path = "fast"
            logits = fast.step(token)
            self.compile_seconds = fast.compile_seconds
            return logits
        why = self._fast_unavailable or "a hook other than this generation's is attached"
        self.decode_path = f"eager ({why})"
        return self._forward(torch.tensor([[token]], device=self.model.device), cache)

    def _forward(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """Next-token logits (V,) fp32 after reading `ids` (1, T) through the eager model, with this generation's
        hooks in scope. What the recorder wrote becomes part of the trace when the caller commits it."""
        with torch.no_grad(), scope(self._hooks):
            return self.model(ids, cache, last_only=True)[0, -1].float()

    def _default_stop(self) -> list[int]:
        tok = self.model.tokenizer
        eos = tok.eos_token_id if tok is not None else self.model.config.eos_token_id
        return [] if eos is None else [eos]

    def _prefill(self, cache) -> torch.Tensor:
        """Read the prompt, in chunks of query rows when the scores of a long prompt would be too large."""
        ids = torch.tensor([self.prompt_ids], device=self.model.device)
        P, H = ids.shape[1], self.model.config.num_attention_heads
        chunk = P
        if self.recording.attention != "none":
            chunk = max(1, min(P, SCORE_ELEMENTS_PER_CHUNK // (H * P)))
        for start in range(0, P, chunk):
            logits = self._forward(ids[:, start : start + chunk], cache)
        with self._lock:
            self.recorder.commit(cache.length)
        return logits

    def _keep_distribution(self, probs: torch.Tensor) -> None:
        k = self.recording.top_logits
        if k:
            top = probs.topk(min(k, probs.numel()))
            self.top.append((top.indices.cpu(), top.values.cpu()))
        if self.recording.full_logits:
            self.logprobs.append(probs.log().cpu())

    def _last_record(self) -> dict[str, torch.Tensor]:
        """The newest token's slice of each recorded quantity (small; copied to the CPU)."""
        out = self.recorder.record_at(len(self.token_ids) - 1)
        if self.top:
            out["top_ids"], out["top_probs"] = self.top[-1]
        return out

    @property
    def texts(self) -> list[str]:
        """Each token's label so far, prompt included (what ``trace.token_texts`` holds)."""
        return self._text.labels

    @property
    def text(self) -> str:
        """The prompt and generated text so far, decoded from the tokens' bytes (dsv2viz.text)."""
        return self._text.text

    @property
    def trace(self) -> Trace:
        """What has been recorded so far: a snapshot of whole steps, safe to take from any thread at any time."""
        with self._lock:
            return self._snapshot()

    def _snapshot(self) -> Trace:
        tensors = self.recorder.tensors()
        tensors["token_ids"] = torch.tensor(self.token_ids)
        tensors.update(token_byte_tensors(self._text.chunks))
        if self.top:
            tensors["top_ids"] = torch.stack([i for i, _ in self.top])
            tensors["top_probs"] = torch.stack([p for _, p in self.top])
        if self.logprobs:
            tensors["logprobs"] = torch.stack(self.logprobs)
        meta: dict[str, Any] = {
            "sampling": asdict(self.sampling),
            "interventions": [describe(f, fn) for f, fn in self.interventions],
            "finish_reason": self.finish_reason,
        }
        return Trace(self.model.config, len(self.prompt_ids), list(self.texts), tensors, self.recording, meta)


def encode_prompt(model: DeepseekV2ForCausalLM, prompt: Prompt, chat: bool) -> list[int]:
    """Token ids of a prompt given as text, as ids, or as chat messages (always chat-formatted)."""
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], dict)):
        if model.tokenizer is None:
            raise ValueError("this model has no tokenizer (no tokenizer.json in its folder): pass token ids")
        if isinstance(prompt, str) and not chat:
            return model.tokenizer.encode(prompt, max_tokens=model.config.max_position_embeddings)
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return model.tokenizer.encode_chat(messages, add_generation_prompt=True)
    ids = [int(i) for i in prompt]
    bad = [i for i in ids if not 0 <= i < model.config.vocab_size]
    if bad:
        raise ValueError(f"token ids {bad[:5]} are outside the vocabulary of {model.config.vocab_size}")
    return ids


def describe(filter: NameFilter, fn: Callable) -> str:
    """A JSON-friendly description of an intervention, for the trace's metadata."""
    what = getattr(fn, "description", None) or getattr(fn, "__qualname__", repr(fn))
    where = (
        filter
        if isinstance(filter, str)
        else (list(filter) if not callable(filter) else getattr(filter, "__name__", "predicate"))
    )
    return f"{what} at {where}"
