"""Forward FLOPs per token of the model's parts, from the recipe's shapes.

A GEMM of a k x n weight costs 2kn FLOPs per token forward; its backward costs the same again
for the input gradient and again for the weight gradient. Causal self-attention over s tokens
costs `heads * s * (qk_dim + v_dim)` FLOPs per token forward (QK^T and PV over s/2 keys on
average) and 2.5x that backward (FlashAttention's five matmuls against two), all of it input
gradient. Elementwise work (norms, SwiGLU, permutation) is not counted as FLOPs.

The parts are the calibration's (`calibration.PARTS`): `attention` (MLA or GQA incl. core
attention), `moe` (router, shared expert and the `topk` routed experts a token visits),
`dense_mlp` and `head` (output projection; the MTP block's 2h->h projection is counted with
its head).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_dualpipe.planning import params as P

if TYPE_CHECKING:
    from megatron_dualpipe.config.schema import Recipe

ATTENTION_BACKWARD_RATIO = 2.5  # FlashAttention backward: 5 matmuls vs 2 forward


@dataclass(frozen=True)
class PartFlops:
    """Forward FLOPs per token: `gemm` (weights) and `core` (attention scores, no weights)."""

    gemm: float
    core: float = 0.0

    @property
    def forward(self) -> float:
        return self.gemm + self.core

    @property
    def backward_input(self) -> float:
        return self.gemm + ATTENTION_BACKWARD_RATIO * self.core

    @property
    def backward_weight(self) -> float:
        return self.gemm

    @property
    def total(self) -> float:
        return self.forward + self.backward_input + self.backward_weight


def attention(recipe: Recipe) -> PartFlops:
    m = recipe.model
    norms = m.hidden_size
    if m.attention == "mla":
        norms += (m.mla.q_lora_rank or 0) + m.mla.kv_lora_rank
        qk = m.mla.qk_head_dim + m.mla.qk_pos_emb_head_dim
        v = m.mla.v_head_dim
    else:
        qk = v = m.hidden_size // m.num_attention_heads
    weights = P.attention_params(recipe) - norms
    return PartFlops(2 * weights, m.num_attention_heads * m.seq_length * (qk + v))


def moe(recipe: Recipe) -> PartFlops:
    m, moe_ = recipe.model, recipe.moe
    h = m.hidden_size
    router = moe_.num_experts * h
    shared = P.gated_mlp_params(h, moe_.shared_expert_ffn_hidden_size)
    routed = moe_.topk * P.gated_mlp_params(h, moe_.ffn_hidden_size)
    return PartFlops(2 * (router + shared + routed))


def dense_mlp(recipe: Recipe) -> PartFlops:
    m = recipe.model
    return PartFlops(2 * P.gated_mlp_params(m.hidden_size, m.ffn_hidden_size))


def head(recipe: Recipe) -> PartFlops:
    return PartFlops(2 * P.embedding_params(recipe))


def mtp_projection(recipe: Recipe) -> PartFlops:
    h = recipe.model.hidden_size
    return PartFlops(2 * 2 * h * h)


PART_FLOPS = {"attention": attention, "moe": moe, "dense_mlp": dense_mlp, "head": head}


def model_flops_per_token(recipe: Recipe) -> float:
    """Forward + backward FLOPs of one training token (main model and MTP): the MFU numerator."""
    m = recipe.model
    layers = sum(attention(recipe).total + (moe(recipe) if P.is_moe_layer(recipe, i)
                                            else dense_mlp(recipe)).total
                 for i in range(m.num_layers))
    last = m.num_layers - 1
    mtp_layer = attention(recipe).total + (moe(recipe) if P.is_moe_layer(recipe, last)
                                           else dense_mlp(recipe)).total
    mtp = m.mtp_num_layers * (mtp_layer + head(recipe).total + mtp_projection(recipe).total)
    return layers + head(recipe).total + mtp
