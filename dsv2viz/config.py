"""Model configuration for the DeepSeek-V2 family, read from a checkpoint's ``config.json``.

Two spellings of the same config occur in the wild: DeepSeek's original one (``rope_theta`` plus
``rope_scaling: {"type": "yarn", ...}``) and transformers 5's (``rope_parameters: {"rope_type": "yarn",
"rope_theta": ..., ...}``). Both are read into one dataclass. Settings this implementation does not
support raise :class:`ConfigError` naming the field, instead of silently computing something else.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config.json this implementation cannot run faithfully (wrong value, missing field, bad JSON)."""


@dataclass(frozen=True)
class YarnRope:
    """YaRN rope scaling: stretches the 4k-trained rope to long context (factor 40 for V2-Lite)."""

    factor: float = 1.0
    original_max_position_embeddings: int = 4096
    beta_fast: float = 32.0  # rotations above which a frequency is kept as trained (extrapolated)
    beta_slow: float = 1.0  # rotations below which a frequency is divided by `factor` (interpolated)
    mscale: float = 1.0  # cos/sin amplitude numerator, see `rope_amplitude`
    mscale_all_dim: float = 0.0  # also enters the softmax scale squared, see `DeepseekV2Config.softmax_scale`
    attention_factor: float | None = None  # transformers' explicit override of `rope_amplitude`


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature correction, 0.1 * mscale * ln(scale) + 1 (1 when not stretched)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class DeepseekV2Config:
    """Every shape and switch of a DeepSeek-V2-family model; defaults are DeepSeek-V2-Lite's."""

    vocab_size: int = 102400
    hidden_size: int = 2048  # D, the residual stream width
    intermediate_size: int = 10944  # width of the dense SwiGLU MLP in the first layers
    moe_intermediate_size: int = 1408  # width of each routed expert (shared experts are n_shared x this)
    num_hidden_layers: int = 27
    num_attention_heads: int = 16  # H
    # MLA: queries may go through a low-rank bottleneck (None: plain q_proj, as in V2-Lite) ...
    q_lora_rank: int | None = None
    # ... keys and values always do: one latent c_kv of this width per token is all the cache keeps
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128  # per-head key/query part that carries content (no position)
    qk_rope_head_dim: int = 64  # the roped part; its key is shared by all heads (MQA-style)
    v_head_dim: int = 128
    # DeepSeekMoE
    n_routed_experts: int | None = 64  # None: every layer is dense
    n_shared_experts: int | None = 2
    num_experts_per_tok: int | None = 6  # top-k
    first_k_dense_replace: int = 1  # layers before this index use the dense MLP
    moe_layer_freq: int = 1  # after that, every moe_layer_freq-th layer is MoE
    topk_method: str = "greedy"  # or "group_limited_greedy" (DeepSeek-V2 236B)
    n_group: int | None = 1
    topk_group: int | None = 1
    norm_topk_prob: bool = False  # renormalize the top-k weights to sum to 1 ...
    routed_scaling_factor: float = 1.0  # ... or else multiply them by this
    scoring_func: str = "softmax"
    aux_loss_alpha: float = 0.001  # training only: sequence-level load-balance loss weight
    # positions and norms
    max_position_embeddings: int = 163840
    rope_theta: float = 10000.0
    rope_scaling: YarnRope | None = field(default_factory=lambda: YarnRope(40.0, 4096, 32.0, 1.0, 0.707, 0.707))
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 100000
    eos_token_id: int | None = 100001

    def __post_init__(self) -> None:
        self.validate()

    # ----- derived shapes -------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        """Query/key width per head: content part plus rope part (192 for V2-Lite)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: the latent plus the shared roped key (576 for V2-Lite)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """qk_head_dim^-0.5, times YaRN's mscale squared when mscale_all_dim is set (0.1147 for V2-Lite)."""
        scale = self.qk_head_dim**-0.5
        if self.rope_scaling is not None and self.rope_scaling.mscale_all_dim:
            m = yarn_get_mscale(self.rope_scaling.factor, self.rope_scaling.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def rope_amplitude(self) -> float:
        """Factor on cos/sin: mscale(factor, mscale) / mscale(factor, mscale_all_dim), 1.0 for V2-Lite."""
        y = self.rope_scaling
        if y is None:
            return 1.0
        if y.attention_factor is not None:
            return y.attention_factor
        return yarn_get_mscale(y.factor, y.mscale) / yarn_get_mscale(y.factor, y.mscale_all_dim)

    def is_moe_layer(self, layer: int) -> bool:
        """Layer i is MoE when experts exist, i >= first_k_dense_replace and i % moe_layer_freq == 0."""
        return (
            self.n_routed_experts is not None
            and layer >= self.first_k_dense_replace
            and layer % self.moe_layer_freq == 0
        )

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_hidden_layers) if self.is_moe_layer(i)]

    def kv_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """Latent cache bytes per token over all layers (31,104 for V2-Lite in bf16)."""
        return self.kv_cache_dim * self.num_hidden_layers * bytes_per_value

    def mha_cache_bytes_per_token(self, bytes_per_value: int = 2) -> int:
        """What a standard decompressed K/V cache of the same heads would hold per token over all layers."""
        per_layer = self.num_attention_heads * (self.qk_head_dim + self.v_head_dim)
        return per_layer * self.num_hidden_layers * bytes_per_value

    # ----- checks ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the field for any setting the model cannot run faithfully."""
        if self.scoring_func != "softmax":
            raise ConfigError(f"scoring_func={self.scoring_func!r} is not supported: only 'softmax' (DeepSeek-V2)")
        if self.topk_method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(
                f"topk_method={self.topk_method!r} is not supported: use 'greedy' or 'group_limited_greedy'"
            )
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act={self.hidden_act!r} is not supported: only 'silu'")
        if self.qk_rope_head_dim % 2:
            raise ConfigError(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (rope rotates pairs)")
        if self.n_routed_experts is not None:
            k = self.num_experts_per_tok
            if not k or k > self.n_routed_experts:
                raise ConfigError(
                    f"num_experts_per_tok={k} must be between 1 and n_routed_experts={self.n_routed_experts}"
                )
            if self.moe_layer_freq < 1:
                raise ConfigError(f"moe_layer_freq={self.moe_layer_freq} must be at least 1")
            if self.topk_method == "group_limited_greedy":
                g, tg = self.n_group, self.topk_group
                if not g or self.n_routed_experts % g:
                    raise ConfigError(f"n_group={g} must divide n_routed_experts={self.n_routed_experts}")
                if not tg or tg > g:
                    raise ConfigError(f"topk_group={tg} must be between 1 and n_group={g}")
                if tg * (self.n_routed_experts // g) < k:
                    raise ConfigError(
                        f"topk_group={tg} groups of {self.n_routed_experts // g} experts cannot supply "
                        f"num_experts_per_tok={k} experts"
                    )

    # ----- reading and writing --------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> DeepseekV2Config:
        """Read either config spelling; unknown keys (architectures, torch_dtype, ...) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)} - {"rope_scaling", "rope_theta"}
        kwargs: dict[str, Any] = {k: raw[k] for k in known if k in raw}
        if raw.get("num_key_value_heads", raw.get("num_attention_heads")) != raw.get("num_attention_heads"):
            raise ConfigError(
                f"num_key_value_heads={raw['num_key_value_heads']} differs from num_attention_heads: "
                "MLA has one latent shared by all heads, so the two must be equal"
            )
        rope = raw.get("rope_parameters")
        if rope is not None:  # transformers 5: theta and scaling in one dict
            theta, scaling = rope.get("rope_theta", raw.get("rope_theta", 10000.0)), dict(rope)
            kind = scaling.get("rope_type", scaling.get("type", "default"))
        else:  # DeepSeek's own spelling
            theta, scaling = raw.get("rope_theta", 10000.0), raw.get("rope_scaling")
            kind = None if scaling is None else scaling.get("type", scaling.get("rope_type"))
        kwargs["rope_theta"] = float(theta)
        kwargs["rope_scaling"] = _read_yarn(kind, scaling, raw)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> DeepseekV2Config:
        """Read ``config.json`` (or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"{path}: no config.json; point at a checkpoint folder that has one") from None
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None
        except TypeError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        """DeepSeek's original spelling, as in the official config.json."""
        out = dataclasses.asdict(self)
        y = out.pop("rope_scaling")
        if y is not None:
            y = {"type": "yarn", **{k: v for k, v in y.items() if v is not None}}
        out["rope_scaling"] = y
        out.update(
            architectures=["DeepseekV2ForCausalLM"],
            model_type="deepseek_v2",
            num_key_value_heads=self.num_attention_heads,
            torch_dtype="bfloat16",
        )
        return out

    def replace(self, **changes: Any) -> DeepseekV2Config:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)


def _read_yarn(kind: str | None, scaling: dict | None, raw: dict[str, Any]) -> YarnRope | None:
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise ConfigError(f"rope scaling type {kind!r} is not supported: DeepSeek-V2 uses 'yarn' (or none)")
    assert scaling is not None
    fields = {f.name for f in dataclasses.fields(YarnRope)}
    kwargs = {k: scaling[k] for k in fields if scaling.get(k) is not None}
    if "factor" not in kwargs:  # as transformers does for DeepSeek-V3-style configs
        original = kwargs.get("original_max_position_embeddings", YarnRope.original_max_position_embeddings)
        kwargs["factor"] = raw.get("max_position_embeddings", DeepseekV2Config.max_position_embeddings) / original
    return YarnRope(**kwargs)


#: DeepSeek-V2-Lite and -Lite-Chat (DeepSeek-Coder-V2-Lite shares the architecture).
DEEPSEEK_V2_LITE = DeepseekV2Config()
