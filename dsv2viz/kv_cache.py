"""The latent KV cache of Multi-head Latent Attention.

MLA caches, per token and layer, only the normalized latent c_kv (kv_lora_rank values) and the roped
key k_pe shared by all heads (qk_rope_head_dim values): 576 values for DeepSeek-V2-Lite, against
16 x (192 + 128) = 5,120 for a standard multi-head cache of the same heads. Per-head keys and values
are never stored; attention either decompresses them on the fly or works in latent space.

Layers write their new tokens at [length, length + T); `length` only moves when the model calls
:meth:`LatentKVCache.advance` after every layer has run, so a forward pass that raises midway (a user's
hook, say) leaves the cache as it was. A generation allocates its cache at its final length up front:
the fast decoding path (dsv2viz.fast_decode) then writes each token in place at a position given as a
tensor and attends over the whole buffer with later positions masked, so its steps keep one shape.
"""

from __future__ import annotations

import torch

from .config import DeepseekV2Config


class LatentKVCache:
    """Per layer: c_kv (B, capacity, kv_lora_rank) and k_pe (B, capacity, qk_rope_head_dim)."""

    def __init__(
        self,
        config: DeepseekV2Config,
        batch_size: int = 1,
        capacity: int = 256,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.config = config
        self.length = 0
        self.max_length = config.max_position_embeddings
        shape = (config.num_hidden_layers, batch_size, max(1, capacity))
        self.c_kv = torch.zeros(*shape, config.kv_lora_rank, device=device, dtype=dtype)  # (L, B, S, R)
        self.k_pe = torch.zeros(*shape, config.qk_rope_head_dim, device=device, dtype=dtype)  # (L, B, S, dr)

    @property
    def batch_size(self) -> int:
        return self.c_kv.shape[1]

    @property
    def capacity(self) -> int:
        return self.c_kv.shape[2]

    def write(self, layer: int, c_kv: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this layer's new tokens after the committed ones; return all of them, (B, S, R) and (B, S, dr)."""
        end = self.length + c_kv.shape[1]
        if end > self.capacity:
            self._grow(end)
        self.c_kv[layer, :, self.length : end] = c_kv
        self.k_pe[layer, :, self.length : end] = k_pe
        return self.c_kv[layer, :, :end], self.k_pe[layer, :, :end]

    def check_room(self, new_tokens: int) -> None:
        """Raise before any work when `new_tokens` more would pass the model's context length."""
        if self.length + new_tokens > self.max_length:
            raise ValueError(
                f"{self.length} cached + {new_tokens} new tokens exceed the context of {self.max_length} "
                "positions (max_position_embeddings); shorten the prompt or start a new cache"
            )

    def advance(self, new_tokens: int) -> None:
        """Commit the tokens every layer has just written."""
        self.length += new_tokens

    def crop(self, length: int) -> None:
        """Forget everything after the first `length` tokens (to rerun from a point, e.g. after an intervention)."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot crop a cache of {self.length} tokens to {length}")
        self.length = length

    def _grow(self, needed: int) -> None:
        new_cap = min(max(needed, 2 * self.capacity), max(needed, self.max_length))
        for name in ("c_kv", "k_pe"):
            old = getattr(self, name)
            new = old.new_zeros(*old.shape[:2], new_cap, old.shape[3])
            new[:, :, : self.length] = old[:, :, : self.length]
            setattr(self, name, new)

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token occupies in this cache, over all layers and per sequence."""
        per_layer = self.c_kv.shape[-1] * self.c_kv.element_size() + self.k_pe.shape[-1] * self.k_pe.element_size()
        return per_layer * self.c_kv.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes held by the committed tokens of all sequences."""
        return self.bytes_per_token * self.length * self.batch_size

    def __repr__(self) -> str:
        return (
            f"LatentKVCache(length={self.length}, batch={self.batch_size}, capacity={self.capacity}, "
            f"{self.bytes_per_token} bytes/token, dtype={self.c_kv.dtype})"
        )
