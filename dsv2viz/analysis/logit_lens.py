"""The logit lens: what the model would predict if it stopped after each layer.

Each layer's residual stream is read out through the model's own final norm and lm_head (nostalgebraist,
2020). Where the right next token first rises to the top shows at which depth a prediction forms, and
which layers change it. This reruns the model on the tokens (one forward pass without a cache), because a
trace keeps only the residual norms, not the residual stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from ..tokenizer import id_labels
from ..traces import Trace

if TYPE_CHECKING:
    from ..model import DeepseekV2ForCausalLM


def logit_lens(
    model: DeepseekV2ForCausalLM,
    trace_or_ids: Trace | Sequence[int] | torch.Tensor,
    *,
    positions: Sequence[int] | None = None,
    top: int = 5,
) -> pd.DataFrame:
    """The `top` likeliest next tokens read from each layer: (layer, position, rank, token_id, token, prob).

    `token` shows each candidate alone (`dsv2viz.text.label`).

    Layer -1 is the embedding (``model.hook_embed``) and layer l the residual stream after layer l
    (``model.layers.{l}.hook_resid_post``); each is passed through ``model.model.norm`` and
    ``model.lm_head`` and a softmax in fp32, exactly as the model makes its output, so the last layer's
    lens is the model's own next-token distribution for a full forward pass over these tokens (a
    cached generation computes the same up to rounding). `positions` (all by default; negative ones count
    from the end) are the positions whose next token is predicted.
    """
    ids = trace_or_ids.token_ids if isinstance(trace_or_ids, Trace) else torch.as_tensor(trace_or_ids)
    ids = ids.reshape(1, -1).to(model.device)
    T, L = ids.shape[1], model.config.num_hidden_layers
    pos = torch.arange(T) if positions is None else torch.arange(T)[torch.as_tensor(positions, dtype=torch.int64)]
    names = ["model.hook_embed"] + [f"model.layers.{layer}.hook_resid_post" for layer in range(L)]
    frames = []
    with torch.no_grad():
        _, cache = model.run_with_cache(ids, names_filter=names)
        for layer, name in zip(range(-1, L), names):
            resid = cache[name][0, pos.to(model.device)]  # (P, D)
            best = model.lm_head(model.model.norm(resid)).float().softmax(dim=-1).topk(top, dim=-1)
            token_ids = best.indices.cpu().flatten()
            frames.append(
                pd.DataFrame(
                    {
                        "layer": layer,
                        "position": np.repeat(pos.numpy(), top),
                        "rank": np.tile(np.arange(top), len(pos)),
                        "token_id": token_ids.numpy(),
                        "token": id_labels(model.tokenizer, token_ids.tolist()),
                        "prob": best.values.cpu().flatten().numpy(),
                    }
                )
            )
    return pd.concat(frames, ignore_index=True)
