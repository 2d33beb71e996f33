"""What a trace records, what that will cost, and the hooks that record it.

:class:`Recording` is the one object that says what a trace keeps. Its defaults (routing, the latent KV,
a logits summary and residual norms) cost a few percent of a decoding step and little memory, so they
can stay on. Attention patterns grow with the square of the sequence: they are off by default, can be
limited to some layers and heads, to the newest query row of each step, or replaced by the queries from
which :meth:`Trace.attention` rebuilds any pattern later.

Before any work, :meth:`Recording.check_budget` estimates the trace's size and refuses one that would
pass its memory budget, naming the parts to drop.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Literal

import numpy as np

from ..config import DeepseekV2Config

AttentionMode = Literal["none", "last_row", "full"]


class TraceBudgetError(MemoryError):
    """A recording would pass its memory budget; the message names what to drop."""


@dataclass(frozen=True)
class Recording:
    """What a trace keeps. Layers and heads default to all of them."""

    routing: bool = True  # top-k experts and weights, every MoE layer and token
    router_probs: bool = False  # the full router distribution too (E values per token and layer)
    latents: bool = True  # c_kv and roped k_pe, every layer and token (what the cache holds)
    attention: AttentionMode = "none"  # patterns: none, the newest query row per step, or full
    attention_layers: Sequence[int] | None = None
    attention_heads: Sequence[int] | None = None
    # q_nope and roped q_pe of attention_layers, to rebuild any pattern later from the latents; always
    # recorded with attention patterns too, since they give each pattern's nope and rope parts
    queries: bool = False
    top_logits: int = 10  # per step: this many most likely next tokens and their probabilities
    full_logits: bool = False  # per step: the whole next-token distribution (needed for exact KL)
    residual_norms: bool = True  # per layer and token: the residual stream's norm after the layer
    moe_norms: bool = True  # per MoE layer and token: norms of the routed and the shared experts' outputs
    memory_budget: int = 2 * 2**30  # bytes; the trace refuses to start past this

    def __post_init__(self) -> None:
        """Check every setting's type and range (one-line ValueError naming it) before anything is estimated."""
        if self.attention not in ("none", "last_row", "full"):
            raise ValueError(f"attention={self.attention!r}: use 'none', 'last_row' or 'full'")
        for name in ("routing", "router_probs", "latents", "queries", "full_logits", "residual_norms", "moe_norms"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} must be True or False")
        if not _is_int(self.top_logits) or self.top_logits < 0:
            raise ValueError(f"top_logits={self.top_logits!r} must be a whole number >= 0")
        if not _is_int(self.memory_budget) or self.memory_budget < 0:
            raise ValueError(
                f"memory_budget={self.memory_budget!r} must be a whole number of bytes >= 0 (e.g. 2 * 2**30 for 2 GiB)"
            )
        for name in ("top_logits", "memory_budget"):  # numpy integers as plain ints: they go into trace JSON
            object.__setattr__(self, name, int(getattr(self, name)))
        for name in ("attention_layers", "attention_heads"):  # tuples: hashable, and equal after a JSON round trip
            items = getattr(self, name)
            if items is None:
                continue
            if isinstance(items, (str, bytes, Mapping)) or not isinstance(items, Iterable):
                raise ValueError(f"{name}={items!r} must be a list of indices, e.g. [0, 3]")
            items = list(items)
            bad = [i for i in items if not _is_int(i) or i < 0]
            if bad:
                raise ValueError(f"{name} {bad!r}: indices must be whole numbers >= 0 (no negative indexing)")
            object.__setattr__(self, name, tuple(int(i) for i in items))

    @classmethod
    def off(cls) -> Recording:
        """Record nothing but the tokens."""
        return cls(routing=False, latents=False, top_logits=0, residual_norms=False, moe_norms=False)

    def layers(self, config: DeepseekV2Config) -> list[int]:
        """The layers whose attention (patterns or queries) is recorded."""
        layers = range(config.num_hidden_layers) if self.attention_layers is None else self.attention_layers
        return _checked(layers, config.num_hidden_layers, "attention_layers")

    def heads(self, config: DeepseekV2Config) -> list[int]:
        heads = range(config.num_attention_heads) if self.attention_heads is None else self.attention_heads
        return _checked(heads, config.num_attention_heads, "attention_heads")

    def estimate(
        self, config: DeepseekV2Config, prompt_len: int, new_tokens: int, value_bytes: int = 4
    ) -> dict[str, int]:
        """Bytes each part of the trace will hold after `prompt_len` + `new_tokens` tokens."""
        c, S = config, prompt_len + new_tokens
        n_moe, L = len(c.moe_layers), c.num_hidden_layers
        n_att, n_heads = len(self.layers(c)), len(self.heads(c))
        parts = {
            "routing": self.routing * n_moe * S * c.num_experts_per_tok * (8 + 4) if n_moe else 0,
            "router_probs": self.router_probs * n_moe * S * (c.n_routed_experts or 0) * 4,
            "latents": self.latents * L * S * c.kv_cache_dim * value_bytes,
            "queries": (self.queries or self.attention != "none") * n_att * S * n_heads * c.qk_head_dim * value_bytes,
            "top_logits": new_tokens * self.top_logits * (8 + 4),
            "full_logits": self.full_logits * new_tokens * c.vocab_size * 4,
            "residual_norms": self.residual_norms * (L + 1) * S * 4,
            "moe_norms": self.moe_norms * n_moe * S * 2 * 4,
        }
        if self.attention == "full":  # stored densely: every query row over every key
            parts["attention"] = n_att * n_heads * S * S * value_bytes
        elif self.attention == "last_row":
            parts["attention"] = n_att * n_heads * (new_tokens + 1) * S * value_bytes
        return parts

    def check_budget(self, config: DeepseekV2Config, prompt_len: int, new_tokens: int, value_bytes: int = 4) -> int:
        """The estimated total; raises TraceBudgetError naming the largest parts when it passes the budget."""
        parts = self.estimate(config, prompt_len, new_tokens, value_bytes)
        total = sum(parts.values())
        if total <= self.memory_budget:
            return total
        biggest = sorted(((n, b) for n, b in parts.items() if b), key=lambda nb: -nb[1])
        listing = ", ".join(f"{n} {format_bytes(b)}" for n, b in biggest[:3])
        advice = _ADVICE.get(biggest[0][0], "record less")
        raise TraceBudgetError(
            f"this trace would hold {format_bytes(total)} for {prompt_len} + {new_tokens} tokens, over its budget of "
            f"{format_bytes(self.memory_budget)} (largest: {listing}). To fit: {advice}; or raise memory_budget."
        )


_ADVICE = {
    "attention": "record attention='last_row' instead of 'full', or fewer attention_layers / attention_heads, "
    "or queries=True with attention='none' to rebuild patterns on demand",
    "queries": "record queries for fewer attention_layers / attention_heads",
    "latents": "set latents=False",
    "router_probs": "set router_probs=False (top-k routing is still recorded)",
    "full_logits": "set full_logits=False (top_logits are still recorded)",
    "routing": "set routing=False",
    "moe_norms": "set moe_norms=False",
    "residual_norms": "set residual_norms=False",
}


def _is_int(value: object) -> bool:
    """An integer (numpy's included), not a bool."""
    return isinstance(value, Integral) and not isinstance(value, bool | np.bool_)


def _checked(items: Sequence[int] | range, n: int, what: str) -> list[int]:
    out = sorted({int(i) for i in items})
    bad = [i for i in out if not 0 <= i < n]
    if bad:
        raise ValueError(f"{what} {bad} out of range: the model has {n}")
    return out


def format_bytes(n: int) -> str:
    """Bytes for a person: GiB from a quarter GiB up, else MiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"
