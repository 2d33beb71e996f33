"""Model configuration for the DeepSeek-V2 family, read from a checkpoint's ``config.json``.

Two spellings of the same config occur in the wild: DeepSeek's original one (``rope_theta`` plus
``rope_scaling: {"type": "yarn", ...}``) and transformers 5's (``rope_parameters: {"rope_type": "yarn",
"rope_theta": ..., ...}``). Both are read into one dataclass. Settings this implementation does not
support raise :class:`ConfigError` naming the field, instead of silently computing something else.

Every field is checked for type and range before anything is built from it (see ``_FIELDS``): a config.json
is input from the internet, and a corrupt or hostile one (10^9 experts, 10^7 layers, a string where a
number belongs) must fail here in one line, not minutes later in a multi-GB allocation or a traceback.
The shapes alone also give the parameter count (:meth:`DeepseekV2Config.parameter_counts`), which the
loader checks against the device's free memory before it builds or reads anything.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from .files import read_json


class ConfigError(ValueError):
    """A config.json this implementation cannot run faithfully (wrong value, missing field, bad JSON)."""


#: Largest config.json read: real ones are about 2 KB.
MAX_CONFIG_BYTES = 2**20


class _Field(NamedTuple):
    """The type a field must have and its range (inclusive; `open_low` excludes `low`); None allowed if `nullable`."""

    kind: type  # int, float, bool or str; an int is never a bool, a float may be written as an int
    low: float | None = None
    high: float | None = None
    nullable: bool = False
    open_low: bool = False


# Upper bounds sit far above every DeepSeek-V2/V3-family model (V2 236B: vocab 102400, hidden 5120, 60 layers,
# 128 heads, 160 experts, q_lora_rank 1536; V3: vocab 129280, hidden 7168, 61 layers, 256 experts). They exist
# so that a corrupt or hostile value fails here, in one line: the loader's memory check catches a model too
# big for the device, but a single absurd field (10^9 experts, 10^7 layers) would make even building the
# model on the meta device, or printing its description, run for minutes into gigabytes of Python objects.
_DIM = 2**16  # one matrix side (hidden, ranks, expert widths): 9x V3's hidden size of 7168
_FIELDS: dict[str, _Field] = {
    "vocab_size": _Field(int, 1, 2**21),  # embedding rows: 16x V3's 129280
    "hidden_size": _Field(int, 1, _DIM),
    "intermediate_size": _Field(int, 1, 2**18),  # the dense MLP: 14x V3's 18432
    "moe_intermediate_size": _Field(int, 1, _DIM),
    "num_hidden_layers": _Field(int, 1, 1024),  # 17x V3's 61; each layer is a module built in Python
    "num_attention_heads": _Field(int, 1, 1024),  # 8x V2's 128
    "q_lora_rank": _Field(int, 1, _DIM, nullable=True),
    "kv_lora_rank": _Field(int, 1, _DIM),
    "qk_nope_head_dim": _Field(int, 1, 4096),  # per-head widths: 32x V2's 128
    "qk_rope_head_dim": _Field(int, 2, 4096),  # rope rotates pairs: at least one
    "v_head_dim": _Field(int, 1, 4096),
    "n_routed_experts": _Field(int, 1, 4096, nullable=True),  # 16x V3's 256; see also MAX_EXPERT_MODULES
    "n_shared_experts": _Field(int, 0, 64, nullable=True),  # V2 has 2, V3 1; they are one MLP this many times wider
    "num_experts_per_tok": _Field(int, 1, 4096, nullable=True),
    "first_k_dense_replace": _Field(int, 0, 1024),  # at or past num_hidden_layers: every layer is dense
    "moe_layer_freq": _Field(int, 1, 1024),
    "topk_method": _Field(str),
    "n_group": _Field(int, 1, 4096, nullable=True),
    "topk_group": _Field(int, 1, 4096, nullable=True),
    "norm_topk_prob": _Field(bool),
    "routed_scaling_factor": _Field(float, 0, 1e4, open_low=True),  # V2 uses 16; 0 would silence every expert
    "scoring_func": _Field(str),
    "aux_loss_alpha": _Field(float, 0, 100),  # training only; finite so a loss stays a number
    "max_position_embeddings": _Field(int, 1, 2**24),  # 100x V2's 163840; sizes the default caches
    "rope_theta": _Field(float, 1, 1e12, open_low=True),  # enters as ln(theta) in a denominator
    "rms_norm_eps": _Field(float, 0, 1, open_low=True),
    "hidden_act": _Field(str),
    "attention_bias": _Field(bool),
    "tie_word_embeddings": _Field(bool),
    "bos_token_id": _Field(int, 0, 2**21, nullable=True),  # also below vocab_size, see validate()
    "eos_token_id": _Field(int, 0, 2**21, nullable=True),
}
_YARN_FIELDS: dict[str, _Field] = {
    "factor": _Field(float, 0, 1e4, open_low=True),  # V2 stretches by 40; the rope divides by it
    "original_max_position_embeddings": _Field(int, 1, 2**24),
    "beta_fast": _Field(float, 0, 1e4, open_low=True),  # both enter as ln(L / (2 pi beta))
    "beta_slow": _Field(float, 0, 1e4, open_low=True),
    "mscale": _Field(float, 0, 100),  # negative values could zero 0.1 * mscale * ln(factor) + 1, a divisor
    "mscale_all_dim": _Field(float, 0, 100),
    "attention_factor": _Field(float, 0, 100, nullable=True, open_low=True),
}

#: Routed experts over all MoE layers: V3 has 58 x 256 = 14,848. Each is three Linear modules built in
#: Python (V3's take about 15 s even on the meta device), so a config of tiny but countless experts,
#: which the memory check would let through, is refused here.
MAX_EXPERT_MODULES = 2**16


def _show(value: Any) -> str:
    """A field's value for an error message (null/true/false as config.json writes them), cut short if long."""
    text = json.dumps(value) if value is None or isinstance(value, bool) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_fields(values: dict[str, Any], fields: dict[str, _Field], prefix: str = "") -> dict[str, Any]:
    """`values` checked against `fields` (ConfigError naming the first bad one), floats given as ints made floats."""
    out = dict(values)
    for name, spec in fields.items():
        if name not in values:
            continue
        value, where = values[name], f"{prefix}{name}={_show(values[name])}"
        kinds = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string"}
        expected = kinds[spec.kind] + (" or null" if spec.nullable else "")
        if value is None:
            if not spec.nullable:
                raise ConfigError(f"{where} is not allowed: expected {expected}")
            continue
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if spec.kind is float and (is_int or isinstance(value, float)):
            value = out[name] = float(value)
            if not math.isfinite(value):
                raise ConfigError(f"{where} is not allowed: expected {expected}")
        elif not (is_int if spec.kind is int else isinstance(value, spec.kind)):
            raise ConfigError(f"{where} has the wrong type: expected {expected}")
        if spec.low is None:
            continue
        too_low = value <= spec.low if spec.open_low else value < spec.low
        if too_low or value > spec.high:
            if spec.kind is int:
                expected = f"{spec.low}..{spec.high}"
            else:
                expected = f"{'more than' if spec.open_low else 'at least'} {spec.low:g} and at most {spec.high:g}"
            raise ConfigError(f"{where} is out of range: expected {expected}")
    return out


def _normalize(obj: Any, fields: dict[str, _Field], prefix: str) -> None:
    """Check a frozen dataclass's fields in place; ints given for floats are stored as floats."""
    values = {name: getattr(obj, name) for name in fields}
    for name, value in _check_fields(values, fields, prefix).items():
        if value is not values[name]:
            object.__setattr__(obj, name, value)


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

    def __post_init__(self) -> None:
        _normalize(self, _YARN_FIELDS, "rope_scaling.")


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

    def parameter_counts(self) -> dict[str, int]:
        """Parameters of each part of the model, from the shapes alone: no model is built, so this is
        instant even for shapes no machine could hold (tied embeddings count once)."""
        D, H, R = self.hidden_size, self.num_attention_heads, self.kv_lora_rank
        bias = int(self.attention_bias)

        def linear(d_in: int, d_out: int, has_bias: int = 0) -> int:
            return d_in * d_out + d_out * has_bias

        if self.q_lora_rank is None:
            q = linear(D, H * self.qk_head_dim)
        else:  # q_a_proj, then (after q_a_layernorm, counted with the norms) q_b_proj
            q = linear(D, self.q_lora_rank, bias) + linear(self.q_lora_rank, H * self.qk_head_dim)
        attention = (
            q
            + linear(D, self.kv_cache_dim, bias)  # kv_a_proj_with_mqa
            + linear(R, H * (self.qk_nope_head_dim + self.v_head_dim))  # kv_b_proj
            + linear(H * self.v_head_dim, D, bias)  # o_proj
        )
        layer_norms = 2 * D + R + (self.q_lora_rank or 0)  # input, post-attention, kv_a and q_a layernorms
        swiglu = 3 * D  # gate_proj, up_proj, down_proj, per unit of width
        n_moe = len(self.moe_layers)
        L, E = self.num_hidden_layers, self.n_routed_experts or 0
        return {
            "embedding + lm_head": self.vocab_size * D * (1 if self.tie_word_embeddings else 2),
            "attention": L * attention,
            "dense MLP": (L - n_moe) * swiglu * self.intermediate_size,
            "router": n_moe * E * D,
            "shared experts": n_moe * swiglu * self.moe_intermediate_size * (self.n_shared_experts or 0),
            "routed experts": n_moe * E * swiglu * self.moe_intermediate_size,
            "norms": L * layer_norms + D,
        }

    @property
    def num_parameters(self) -> int:
        """All parameters (15,706,484,224 for V2-Lite), from the shapes alone."""
        return sum(self.parameter_counts().values())

    # ----- checks ---------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Raise ConfigError naming the field for any setting the model cannot run faithfully: types and
        ranges first (``_FIELDS``), then how fields must agree."""
        _normalize(self, _FIELDS, "")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, YarnRope):
            raise ConfigError(f"rope_scaling={self.rope_scaling!r} must be a YarnRope or None")
        for name in ("bos_token_id", "eos_token_id"):
            token = getattr(self, name)
            if token is not None and token >= self.vocab_size:
                raise ConfigError(
                    f"{name}={token} is out of range: the embedding has vocab_size={self.vocab_size} rows "
                    f"(ids 0..{self.vocab_size - 1})"
                )
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
                    f"num_experts_per_tok={_show(k)} must be between 1 and n_routed_experts={self.n_routed_experts}"
                )
            modules = len(self.moe_layers) * self.n_routed_experts
            if modules > MAX_EXPERT_MODULES:
                raise ConfigError(
                    f"n_routed_experts={self.n_routed_experts} in {len(self.moe_layers)} MoE layers makes {modules:,} "
                    f"experts, over the {MAX_EXPERT_MODULES:,} this loader builds (DeepSeek-V3 has 14,848)"
                )
            if self.topk_method == "group_limited_greedy":
                g, tg = self.n_group, self.topk_group
                if not g or self.n_routed_experts % g:
                    raise ConfigError(f"n_group={_show(g)} must divide n_routed_experts={self.n_routed_experts}")
                if not tg or tg > g:
                    raise ConfigError(f"topk_group={_show(tg)} must be between 1 and n_group={g}")
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
                f"num_key_value_heads={_show(raw['num_key_value_heads'])} differs from num_attention_heads: "
                "MLA has one latent shared by all heads, so the two must be equal"
            )
        rope = raw.get("rope_parameters")
        if rope is not None:  # transformers 5: theta and scaling in one dict
            key = "rope_parameters"
            scaling = _object(rope, key)
            theta = scaling.get("rope_theta", raw.get("rope_theta", 10000.0))
            kind = scaling.get("rope_type", scaling.get("type", "default"))
        else:  # DeepSeek's own spelling
            key = "rope_scaling"
            theta, scaling = raw.get("rope_theta", 10000.0), raw.get("rope_scaling")
            if scaling is not None:
                scaling = _object(scaling, key)
            kind = None if scaling is None else scaling.get("type", scaling.get("rope_type"))
        kwargs["rope_theta"] = theta  # checked with the other fields
        kwargs["rope_scaling"] = _read_yarn(kind, scaling, raw, key)
        return cls(**kwargs)

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> DeepseekV2Config:
        """Read ``config.json`` (or the folder holding it); every problem is a one-line ConfigError naming the file."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            what = "is not a file" if path.exists() else "no config.json"
            raise ConfigError(f"{path}: {what}; point at a checkpoint folder that has a config.json file")
        raw = read_json(path, max_bytes=MAX_CONFIG_BYTES, error=ConfigError)
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: expected a JSON object, found {type(raw).__name__}")
        try:
            return cls.from_dict(raw)
        except ConfigError as e:
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


def _object(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{key}={_show(value)} has the wrong type: expected an object or null")
    return value


def _read_yarn(kind: Any, scaling: dict | None, raw: dict[str, Any], key: str) -> YarnRope | None:
    """The YarnRope of a config's rope dict (`key` names it in errors), or None for plain rope."""
    if kind in (None, "default"):
        return None
    if kind != "yarn":
        raise ConfigError(f"rope scaling type {_show(kind)} is not supported: DeepSeek-V2 uses 'yarn' (or none)")
    assert scaling is not None
    kwargs = {k: scaling[k] for k in _YARN_FIELDS if scaling.get(k) is not None}
    if "factor" not in kwargs:  # as transformers does for DeepSeek-V3-style configs
        lengths = {
            "max_position_embeddings": raw.get("max_position_embeddings", DeepseekV2Config.max_position_embeddings),
            "original_max_position_embeddings": kwargs.get(
                "original_max_position_embeddings", YarnRope.original_max_position_embeddings
            ),
        }
        _check_fields(lengths, {k: {**_FIELDS, **_YARN_FIELDS}[k] for k in lengths})
        kwargs["factor"] = lengths["max_position_embeddings"] / lengths["original_max_position_embeddings"]
    # named as this file spells it (rope_scaling.factor or rope_parameters.factor), then as YarnRope's own
    return YarnRope(**_check_fields(kwargs, _YARN_FIELDS, f"{key}."))


#: DeepSeek-V2-Lite and -Lite-Chat (DeepSeek-Coder-V2-Lite shares the architecture).
DEEPSEEK_V2_LITE = DeepseekV2Config()
