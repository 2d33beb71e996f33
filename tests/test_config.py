"""Config: both spellings, the V2-Lite preset's exact size, YaRN numbers, and clear errors for what is unsupported."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_HF, tiny_config

from dsv2viz import DEEPSEEK_V2_LITE, ConfigError, DeepseekV2Config, DeepseekV2ForCausalLM
from dsv2viz.config import MAX_EXPERT_MODULES
from dsv2viz.model import yarn_inv_freq


def test_v2_lite_preset_has_the_published_parameter_count_and_keys():
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(DEEPSEEK_V2_LITE)
    state = model.state_dict()
    assert sum(t.numel() for t in state.values()) == 15_706_484_224
    assert len(state) == 5_291
    # the arithmetic count that `dsv2viz info` and the loader's memory check use, part by part
    assert DEEPSEEK_V2_LITE.parameter_counts() == counts_by_part(model)
    assert DEEPSEEK_V2_LITE.num_parameters == 15_706_484_224
    shapes = {
        "model.embed_tokens.weight": (102400, 2048),
        "lm_head.weight": (102400, 2048),
        "model.layers.0.self_attn.q_proj.weight": (3072, 2048),
        "model.layers.5.self_attn.kv_a_proj_with_mqa.weight": (576, 2048),
        "model.layers.5.self_attn.kv_a_layernorm.weight": (512,),
        "model.layers.5.self_attn.kv_b_proj.weight": (4096, 512),
        "model.layers.5.self_attn.o_proj.weight": (2048, 2048),
        "model.layers.0.mlp.gate_proj.weight": (10944, 2048),
        "model.layers.0.mlp.down_proj.weight": (2048, 10944),
        "model.layers.26.mlp.gate.weight": (64, 2048),
        "model.layers.26.mlp.experts.63.up_proj.weight": (1408, 2048),
        "model.layers.26.mlp.experts.63.down_proj.weight": (2048, 1408),
        "model.layers.1.mlp.shared_experts.gate_proj.weight": (2816, 2048),
        "model.layers.1.mlp.shared_experts.down_proj.weight": (2048, 2816),
    }
    for key, shape in shapes.items():
        assert tuple(state[key].shape) == shape, key
    assert DEEPSEEK_V2_LITE.moe_layers == list(range(1, 27))


def test_v2_lite_softmax_scale_includes_yarn_mscale_squared():
    m = 0.1 * 0.707 * math.log(40) + 1
    assert round(m, 4) == 1.2608
    assert DEEPSEEK_V2_LITE.softmax_scale == pytest.approx(192**-0.5 * m * m, rel=1e-12)
    assert round(DEEPSEEK_V2_LITE.softmax_scale, 4) == 0.1147
    assert DEEPSEEK_V2_LITE.rope_amplitude == 1.0


def test_v2_lite_yarn_ramp_spans_dims_10_to_23():
    inv = yarn_inv_freq(DEEPSEEK_V2_LITE)
    trained = 1.0 / 10000 ** (torch.arange(0, 64, 2, dtype=torch.float32) / 64)
    assert inv.shape == (32,)
    torch.testing.assert_close(inv[:11], trained[:11])  # fast pairs kept (ramp 0 up to low = 10)
    torch.testing.assert_close(inv[23:], trained[23:] / 40)  # slow pairs interpolated (ramp 1 from high = 23)
    mid = inv[11:23]
    assert torch.all((mid < trained[11:23]) & (mid > trained[11:23] / 40))


def test_yarn_matches_transformers():
    from transformers import DeepseekV2Config as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = HFConfig(**TINY_HF)
    inv, amplitude = ROPE_INIT_FUNCTIONS["yarn"](hf)
    ours = DeepseekV2Config.from_dict(TINY_HF)
    torch.testing.assert_close(yarn_inv_freq(ours), inv.float(), atol=0, rtol=1e-6)
    assert ours.rope_amplitude == pytest.approx(amplitude)


def test_both_spellings_read_the_same(tmp_path):
    original = DEEPSEEK_V2_LITE.to_dict()  # DeepSeek's spelling, as in the official config.json
    assert original["rope_scaling"]["type"] == "yarn" and original["rope_theta"] == 10000.0
    hf_style = {k: v for k, v in original.items() if k not in ("rope_scaling", "rope_theta")}
    rope = {k: v for k, v in original["rope_scaling"].items() if k != "type"}
    hf_style["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 10000.0, **rope}
    (tmp_path / "config.json").write_text(json.dumps(hf_style))
    assert DeepseekV2Config.from_json(tmp_path) == DeepseekV2Config.from_dict(original) == DEEPSEEK_V2_LITE


@pytest.mark.parametrize(
    "change, field",
    [
        ({"scoring_func": "sigmoid"}, "scoring_func='sigmoid'"),
        ({"topk_method": "noaux_tc"}, "topk_method='noaux_tc'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope scaling type 'linear'"),
        ({"num_key_value_heads": 4}, "num_key_value_heads=4"),
        ({"num_experts_per_tok": 65}, "num_experts_per_tok=65"),
        ({"topk_method": "group_limited_greedy", "n_group": 5}, "n_group=5"),
        ({"topk_method": "group_limited_greedy", "n_group": 8, "topk_group": 9}, "topk_group=9"),
        ({"topk_method": "group_limited_greedy", "n_group": 32, "topk_group": 2}, "cannot supply"),
    ],
)
def test_unsupported_settings_name_the_field(tmp_path, change, field):
    raw = {**DEEPSEEK_V2_LITE.to_dict(), **change}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as err:
        DeepseekV2Config.from_json(tmp_path)
    assert field in str(err.value) and str(tmp_path / "config.json") in str(err.value)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match=r"no config.json"):
        DeepseekV2Config.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        DeepseekV2Config.from_json(tmp_path)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        DeepseekV2Config.from_json(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"num_hidden_layers": 10_000_000}, "num_hidden_layers=10000000 is out of range: expected 1..1024"),
        ({"n_routed_experts": 10**9}, "n_routed_experts=1000000000 is out of range: expected 1..4096"),
        ({"vocab_size": 0}, "vocab_size=0 is out of range: expected 1..2097152"),
        ({"vocab_size": "102400"}, "vocab_size='102400' has the wrong type: expected an integer"),
        ({"hidden_size": 2048.0}, "hidden_size=2048.0 has the wrong type: expected an integer"),
        ({"v_head_dim": True}, "v_head_dim=true has the wrong type: expected an integer"),
        ({"kv_lora_rank": None}, "kv_lora_rank=null is not allowed: expected an integer"),
        ({"q_lora_rank": 0}, "q_lora_rank=0 is out of range: expected 1..65536"),
        ({"q_lora_rank": "1536"}, "q_lora_rank='1536' has the wrong type: expected an integer or null"),
        ({"n_shared_experts": -1}, "n_shared_experts=-1 is out of range: expected 0..64"),
        ({"first_k_dense_replace": -1}, "first_k_dense_replace=-1 is out of range: expected 0..1024"),
        ({"moe_layer_freq": 0}, "moe_layer_freq=0 is out of range: expected 1..1024"),
        ({"norm_topk_prob": "false"}, "norm_topk_prob='false' has the wrong type: expected true or false"),
        ({"tie_word_embeddings": 0}, "tie_word_embeddings=0 has the wrong type: expected true or false"),
        ({"hidden_act": None}, "hidden_act=null is not allowed: expected a string"),
        ({"rms_norm_eps": 0}, "rms_norm_eps=0 is out of range: expected more than 0 and at most 1"),
        ({"rms_norm_eps": float("nan")}, "rms_norm_eps=nan is not allowed: expected a finite number"),
        ({"routed_scaling_factor": float("inf")}, "routed_scaling_factor=inf is not allowed: expected a finite number"),
        ({"rope_theta": 1}, "rope_theta=1 is out of range: expected more than 1 and at most 1e+12"),
        ({"rope_theta": "10000"}, "rope_theta='10000' has the wrong type: expected a finite number"),
        (
            {"max_position_embeddings": 2**30},
            "max_position_embeddings=1073741824 is out of range: expected 1..16777216",
        ),
        ({"bos_token_id": 102400}, "bos_token_id=102400 is out of range: the embedding has vocab_size=102400 rows"),
        ({"eos_token_id": -1}, "eos_token_id=-1 is out of range: expected 0..2097152"),
        ({"num_experts_per_tok": None}, "num_experts_per_tok=null must be between 1 and n_routed_experts=64"),
        ({"rope_scaling": "yarn"}, "rope_scaling='yarn' has the wrong type: expected an object or null"),
        ({"rope_scaling": {"type": "yarn", "factor": 0}}, "rope_scaling.factor=0 is out of range"),
        (
            {"rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": None, "mscale": -1}},
            "rope_scaling.mscale=-1 is out of range",
        ),
        (
            {"rope_scaling": {"type": "yarn", "factor": 40, "beta_slow": "1"}},
            "rope_scaling.beta_slow='1' has the wrong",
        ),
        (
            {"rope_scaling": {"type": "yarn", "original_max_position_embeddings": 0}},
            "original_max_position_embeddings=0",
        ),
        (
            {"rope_parameters": {"rope_type": "yarn", "factor": -2}},
            "rope_parameters.factor=-2 is out of range",  # named as this file spells it
        ),
        ({"rope_parameters": ["yarn"]}, "rope_parameters=['yarn'] has the wrong type: expected an object or null"),
    ],
)
def test_every_field_is_checked_for_type_and_range_in_one_line(tmp_path, change, message):
    raw = {**DEEPSEEK_V2_LITE.to_dict(), **change}
    if "rope_parameters" in change:
        raw.pop("rope_scaling")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as err:
        DeepseekV2Config.from_json(tmp_path)
    assert str(err.value).startswith(f"{path}: {message}")
    assert "\n" not in str(err.value)


def test_config_files_that_cannot_be_read_are_one_line_errors(tmp_path):
    path = tmp_path / "config.json"
    for content, message in [
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),  # RecursionError in the parser
        (b"{}" + b" " * 2**20, "bytes, over the 1,048,576"),  # sized before it is read
        (b'{"hidden_act": "\xff"}', "not UTF-8"),
    ]:
        path.write_bytes(content)
        with pytest.raises(ConfigError, match=message) as err:
            DeepseekV2Config.from_json(tmp_path)
        assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    path.unlink()
    path.mkdir()
    with pytest.raises(ConfigError, match=r"config\.json: is not a file"):
        DeepseekV2Config.from_json(tmp_path)


def test_numbers_written_as_integers_are_read_as_floats():
    raw = {**DEEPSEEK_V2_LITE.to_dict(), "rope_theta": 10000, "rms_norm_eps": 1, "routed_scaling_factor": 16}
    raw["rope_scaling"] = {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1}
    config = DeepseekV2Config.from_dict(raw)
    values = [config.rope_theta, config.rms_norm_eps, config.routed_scaling_factor, config.rope_scaling.factor]
    assert values == [10000.0, 1.0, 16.0, 40.0] and all(type(v) is float for v in values)
    assert (
        type(config.rope_scaling.beta_fast) is float
        and type(config.rope_scaling.original_max_position_embeddings) is int
    )


def test_expert_modules_are_bounded_but_v3_sized_models_pass():
    base = {**DEEPSEEK_V2_LITE.to_dict(), "first_k_dense_replace": 0, "num_hidden_layers": 256}
    assert len(DeepseekV2Config.from_dict({**base, "n_routed_experts": 256}).moe_layers) * 256 == MAX_EXPERT_MODULES
    with pytest.raises(ConfigError, match="n_routed_experts=257 in 256 MoE layers makes 65,792 experts"):
        DeepseekV2Config.from_dict({**base, "n_routed_experts": 257})


#: The full DeepSeek-V2 (236B) and DeepSeek-V3's shapes (V3 with V2's softmax router: this package runs V2's).
DEEPSEEK_V2 = dict(
    vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60,
    num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, n_routed_experts=160, n_shared_experts=2,
    num_experts_per_tok=6, topk_method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0,
)  # fmt: skip
DEEPSEEK_V3 = dict(
    vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
    num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512, n_routed_experts=256, n_shared_experts=1,
    num_experts_per_tok=8, first_k_dense_replace=3, bos_token_id=0, eos_token_id=1,
)  # fmt: skip


@pytest.mark.parametrize(
    "shapes, total, active",
    [(DEEPSEEK_V2, 236e9, 21e9), (DEEPSEEK_V3, 671e9, 37e9)],  # the papers' rounded figures
    ids=["v2-236b", "v3-671b"],
)
def test_the_bounds_admit_the_deepseek_family_and_count_its_published_sizes(shapes, total, active):
    from dsv2viz.cli import parameter_counts

    counts = parameter_counts(DEEPSEEK_V2_LITE.replace(**shapes))
    assert abs(counts["total"] - total) < 0.005 * total
    assert abs(counts["active per token, less embedding"] - active) < 0.03 * active


def counts_by_part(model: DeepseekV2ForCausalLM) -> dict[str, int]:
    """Parameters by part of a built model, sorted by each parameter's checkpoint key."""
    parts: dict[str, int] = {}
    for name, p in model.named_parameters():  # a tied lm_head is the embedding's parameter: listed once
        leaf = name.split(".")[-2]
        if name.startswith(("model.embed_tokens", "lm_head")):
            part = "embedding + lm_head"
        elif leaf.endswith("norm") or leaf.endswith("layernorm"):
            part = "norms"
        elif ".self_attn." in name:
            part = "attention"
        elif name.endswith("mlp.gate.weight"):
            part = "router"
        elif ".shared_experts." in name:
            part = "shared experts"
        elif ".experts." in name:
            part = "routed experts"
        else:
            assert ".mlp." in name, name
            part = "dense MLP"
        parts[part] = parts.get(part, 0) + p.numel()
    return parts


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"q_lora_rank": 24, "tie_word_embeddings": True, "moe_layer_freq": 2, "n_shared_experts": None},
        {"q_lora_rank": 16, "attention_bias": True, "first_k_dense_replace": 0, "n_shared_experts": 0},
        {"n_routed_experts": None, "num_experts_per_tok": None},  # every layer dense
        {
            "topk_method": "group_limited_greedy",
            "n_group": 4,
            "topk_group": 2,
            "num_hidden_layers": 5,
            "moe_layer_freq": 3,
        },
    ],
    ids=["tiny", "q_lora-tied-freq2-no-shared", "q_lora-bias-no-dense", "all-dense", "grouped-freq3"],
)
def test_parameter_counts_equal_a_model_built_on_meta(changes):
    config = tiny_config(**changes)
    with torch.device("meta"):
        built = counts_by_part(DeepseekV2ForCausalLM(config))
    assert {k: v for k, v in config.parameter_counts().items() if v} == built
    assert config.num_parameters == sum(built.values())
