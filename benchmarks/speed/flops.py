"""Model FLOPs of one training token (for TFLOP/s and MFU), counted from the recipe.

Training = 3 x forward (backward twice the forward); a GEMM with a K x N weight costs 2*K*N
FLOPs per token forward. Causal attention: each query sees seq_length/2 keys on average.
Recomputation is not counted (model FLOPs, as in MFU).
"""

from __future__ import annotations

H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H200 SXM datasheet, dense BF16


def attention_gemm_params(recipe) -> int:
    """Weights of one layer's attention projections."""
    m = recipe.model
    h, heads = m.hidden_size, m.num_attention_heads
    if m.attention == "mla":
        mla = m.mla
        qk = mla.qk_head_dim + mla.qk_pos_emb_head_dim
        q = (h * mla.q_lora_rank + mla.q_lora_rank * heads * qk) if mla.q_lora_rank \
            else h * heads * qk
        kv = h * (mla.kv_lora_rank + mla.qk_pos_emb_head_dim) \
            + mla.kv_lora_rank * heads * (mla.qk_head_dim + mla.v_head_dim)
        return q + kv + heads * mla.v_head_dim * h
    groups = m.num_query_groups or heads
    head_dim = h // heads
    return h * (heads + 2 * groups) * head_dim + heads * head_dim * h


def core_attention_flops_fwd(recipe) -> float:
    """QK^T and AV of one token in one layer, forward, causal."""
    m = recipe.model
    if m.attention == "mla":
        qk = m.mla.qk_head_dim + m.mla.qk_pos_emb_head_dim
        v = m.mla.v_head_dim
    else:
        qk = v = m.hidden_size // m.num_attention_heads
    return 2.0 * (m.seq_length / 2) * m.num_attention_heads * (qk + v)


def ffn_params(hidden: int, ffn: int) -> int:
    """SwiGLU FFN: fc1 (gate and up) and fc2."""
    return 3 * hidden * ffn


def training_flops_per_token(recipe) -> float:
    """Model FLOPs of one token through the whole model, forward and backward."""
    m, moe = recipe.model, recipe.moe
    h = m.hidden_size
    moe_layers = m.num_layers - m.num_dense_layers
    per_layer_gemm = attention_gemm_params(recipe)
    dense_ffn = ffn_params(h, m.ffn_hidden_size)
    moe_ffn = moe.topk * ffn_params(h, moe.ffn_hidden_size) \
        + ffn_params(h, moe.shared_expert_ffn_hidden_size) + h * moe.num_experts
    gemm_params = (m.num_layers * per_layer_gemm + m.num_dense_layers * dense_ffn
                   + moe_layers * moe_ffn + h * m.vocab_size)  # + output head
    forward = 2.0 * gemm_params + m.num_layers * core_attention_flops_fwd(recipe)
    return 3.0 * forward
