"""Recording: every setting checked for type and range in one line before a trace estimates or records anything."""

from __future__ import annotations

import numpy as np
import pytest

from dsv2viz.random_checkpoint import TINY_CONFIG
from dsv2viz.traces import Recording


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"memory_budget": float("inf")}, "memory_budget=inf must be a whole number of bytes >= 0"),
        ({"memory_budget": float("nan")}, "memory_budget=nan must be"),
        ({"memory_budget": -1}, "memory_budget=-1 must be"),
        ({"memory_budget": 2.0 * 2**30}, "memory_budget=2147483648.0 must be"),
        ({"memory_budget": True}, "memory_budget=True must be"),
        ({"attention_layers": [-1]}, r"attention_layers \[-1\]: indices must be whole numbers >= 0 \(no negative"),
        ({"attention_heads": [0, -2]}, r"attention_heads \[-2\]: indices must be whole numbers >= 0"),
        ({"attention_layers": [1.0]}, r"attention_layers \[1.0\]: indices must be whole numbers"),
        ({"attention_heads": [True]}, r"attention_heads \[True\]: indices must be whole numbers"),
        ({"attention_layers": "0,1"}, "attention_layers='0,1' must be a list of indices"),
        ({"attention_layers": 3}, "attention_layers=3 must be a list of indices"),
        ({"attention_heads": {0: 1}}, r"attention_heads=\{0: 1\} must be a list of indices"),
        ({"routing": "yes"}, "routing='yes' must be True or False"),
        ({"top_logits": -1}, "top_logits=-1 must be a whole number >= 0"),
        ({"attention": "rows"}, "attention='rows': use 'none', 'last_row' or 'full'"),
    ],
)
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(ValueError, match=message) as err:
        Recording(**settings)
    assert "\n" not in str(err.value)


def test_indices_past_the_model_are_refused_not_wrapped():
    rec = Recording(attention_layers=[TINY_CONFIG.num_hidden_layers], attention_heads=[0])
    with pytest.raises(ValueError, match=r"attention_layers \[4\] out of range: the model has 4"):
        rec.layers(TINY_CONFIG)


def test_numpy_integers_are_accepted_as_plain_ints():
    rec = Recording(attention_layers=np.arange(2), attention_heads=(np.int64(3),), memory_budget=np.int64(2**20))
    assert rec.attention_layers == (0, 1) and rec.attention_heads == (3,) and rec.memory_budget == 2**20
    assert all(type(v) is int for v in (*rec.attention_layers, *rec.attention_heads, rec.memory_budget))
    assert rec == Recording(attention_layers=[0, 1], attention_heads=[3], memory_budget=2**20)
