"""Config: both spellings, the V2-Lite preset's exact size, YaRN numbers, and clear errors for what is unsupported."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import TINY_HF

from dsv2viz import DEEPSEEK_V2_LITE, ConfigError, DeepseekV2Config, DeepseekV2ForCausalLM
from dsv2viz.model import yarn_inv_freq


def test_v2_lite_preset_has_the_published_parameter_count_and_keys():
    with torch.device("meta"):
        model = DeepseekV2ForCausalLM(DEEPSEEK_V2_LITE)
    state = model.state_dict()
    assert sum(t.numel() for t in state.values()) == 15_706_484_224
    assert len(state) == 5_291
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
