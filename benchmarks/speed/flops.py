"""Model FLOPs of one training token (for TFLOP/s and MFU), counted from the recipe.

Training = 3 x forward (the backward costs twice the forward). Forward: 2 FLOPs per activated
parameter (`planning.params.count_params`: experts scaled by top-k, output head counted, the
embedding lookup not; its norm weights are a rounding error) plus causal attention, where each
query sees seq_length / 2 keys on average. Recomputation is not counted (model FLOPs, as MFU).
"""

from __future__ import annotations

from megatron_dualpipe.planning.params import count_params

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H200 SXM datasheet, dense BF16


def core_attention_flops_fwd(recipe) -> float:
    """QK^T and AV of one token in one layer, forward, causal."""
    m = recipe.model
    if m.attention == "mla":
        qk = m.mla.qk_head_dim + m.mla.qk_pos_emb_head_dim
        v = m.mla.v_head_dim
    else:
        qk = v = m.hidden_size // m.num_attention_heads
    return 2.0 * (m.seq_length / 2) * m.num_attention_heads * (qk + v)


def training_flops_per_token(recipe) -> float:
    """Model FLOPs of one token through the main model (no MTP), forward and backward."""
    forward = 2.0 * count_params(recipe).activated_main \
        + recipe.model.num_layers * core_attention_flops_fwd(recipe)
    return 3.0 * forward
