"""Model shapes the benchmarks share: DeepSeek-V2-Lite's proportions scaled down to run in minutes on two cores.

Written in transformers' config spelling, which both transformers and dsv2viz read.
"""

from __future__ import annotations

# medium: widths and head dims halved, experts 8x narrower, 4 layers; small: a quarter of the widths, 3 layers.
SIZES: dict[str, dict] = {
    "medium": dict(
        vocab_size=8192,
        hidden_size=1024,
        num_hidden_layers=4,
        num_attention_heads=8,
        kv_lora_rank=256,
        qk_nope_head_dim=64,
        qk_rope_head_dim=32,
        v_head_dim=64,
        n_routed_experts=64,
        num_experts_per_tok=6,
        moe_intermediate_size=176,
        intermediate_size=2736,
    ),
    "small": dict(
        vocab_size=4096,
        hidden_size=512,
        num_hidden_layers=3,
        num_attention_heads=4,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=32,
        num_experts_per_tok=6,
        moe_intermediate_size=88,
        intermediate_size=1368,
    ),
}
COMMON = dict(
    q_lora_rank=None,
    first_k_dense_replace=1,
    n_shared_experts=2,
    topk_method="greedy",
    n_group=1,
    topk_group=1,
    norm_topk_prob=False,
    routed_scaling_factor=1.0,
    max_position_embeddings=163840,
    tie_word_embeddings=False,
    rope_parameters=dict(
        rope_type="yarn",
        rope_theta=10000.0,
        factor=40.0,
        original_max_position_embeddings=4096,
        beta_fast=32,
        beta_slow=1,
        mscale=0.707,
        mscale_all_dim=0.707,
    ),
)
