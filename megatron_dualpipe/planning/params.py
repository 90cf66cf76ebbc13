"""Parameter counts from the recipe fields, with explicit per-module formulas.

All counts are for the whole (unsharded) model. Biases: none (`add_bias_linear=False`), except
the router's expert bias (`moe.expert_bias`, a buffer in Megatron, a parameter in the HF
checkpoint; counted here, 256 numbers per layer for V3). Norms are RMSNorm (one weight).

"Activated" counts the distinct weights one token is multiplied with in the forward pass:
attention, the dense MLP or the router plus `moe.topk` routed and the shared expert, the norms
and the output head. The input embedding is a table lookup that reads one row, so the table is
not counted (`activated_main_with_embedding` adds it). `activated` is per *training* token:
the main model plus the MTP modules' own weights (each training token also runs through them;
they share the embedding and the output head with the main model, counted once). The MTP
module's own parameters are the 2h->h projection, two input norms, one transformer layer and a
final norm. `total` is the main model only (DeepSeek's 671B excludes MTP).

DeepSeek-V3 (`docs/deepseek_v3.md`, "What `plan` counts"): total 671.03B (report: 671B);
activated 37.31B per training token (report: 37B), of which the main model 36.63B
(README_WEIGHTS.md: 36.7B). The same "one vocabulary matrix" count gives DeepSeek-V2 20.85B
(report: 21B) and V2-Lite 2.45B (2.4B); adding the embedding table would give 37.55B (V3),
21.38B and 2.66B, further from every published number.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_dualpipe.config.schema import Recipe


@dataclass(frozen=True)
class Block:
    """Parameters of one module: `dense` (replicated over EP), `expert` (all routed experts,
    sharded over EP) and `activated` (what one token uses)."""

    dense: int = 0
    expert: int = 0
    activated: int = 0

    @property
    def total(self) -> int:
        return self.dense + self.expert

    def __add__(self, other: Block) -> Block:
        return Block(self.dense + other.dense, self.expert + other.expert,
                     self.activated + other.activated)


def attention_params(recipe: Recipe) -> int:
    """Self-attention incl. its input norm: MLA (q/kv down + norms + up, output proj) or GQA."""
    m = recipe.model
    h, heads = m.hidden_size, m.num_attention_heads
    if m.attention == "mla":
        a = m.mla
        qk = a.qk_head_dim + a.qk_pos_emb_head_dim
        if a.q_lora_rank:
            q = h * a.q_lora_rank + a.q_lora_rank + a.q_lora_rank * heads * qk
        else:
            q = h * heads * qk
        kv_down = h * (a.kv_lora_rank + a.qk_pos_emb_head_dim)  # latent + shared rope key
        kv_up = a.kv_lora_rank + a.kv_lora_rank * heads * (a.qk_head_dim + a.v_head_dim)
        out = heads * a.v_head_dim * h
        return h + q + kv_down + kv_up + out
    head_dim = h // heads
    groups = m.num_query_groups or heads
    return h + h * heads * head_dim + 2 * h * groups * head_dim + heads * head_dim * h


def gated_mlp_params(hidden: int, ffn: int) -> int:
    """SwiGLU MLP: gate and up (h x ffn each) and down (ffn x h)."""
    return 3 * hidden * ffn


def dense_layer(recipe: Recipe) -> Block:
    m = recipe.model
    n = attention_params(recipe) + m.hidden_size + gated_mlp_params(m.hidden_size,
                                                                     m.ffn_hidden_size)
    return Block(dense=n, activated=n)


def moe_layer(recipe: Recipe) -> Block:
    """Attention + pre-MLP norm + router (+ bias) + shared expert + all routed experts."""
    m, moe = recipe.model, recipe.moe
    h = m.hidden_size
    expert = gated_mlp_params(h, moe.ffn_hidden_size)
    router = moe.num_experts * h + (moe.num_experts if moe.expert_bias else 0)
    shared = gated_mlp_params(h, moe.shared_expert_ffn_hidden_size)
    dense = attention_params(recipe) + h + router + shared
    return Block(dense=dense, expert=moe.num_experts * expert,
                 activated=dense + moe.topk * expert)


def is_moe_layer(recipe: Recipe, layer: int) -> bool:
    return layer >= recipe.model.num_dense_layers


def decoder_layer(recipe: Recipe, layer: int) -> Block:
    return moe_layer(recipe) if is_moe_layer(recipe, layer) else dense_layer(recipe)


def embedding_params(recipe: Recipe) -> int:
    return recipe.model.vocab_size * recipe.model.hidden_size


def head_params(recipe: Recipe) -> int:
    """Output projection; 0 when tied to the embedding (`model.untie_embeddings=false`)."""
    return embedding_params(recipe) if recipe.model.untie_embeddings else 0


def mtp_depth(recipe: Recipe) -> Block:
    """One MTP depth: enorm + hnorm, 2h->h projection, a layer like the last decoder layer,
    its final norm. Embedding and output head are shared with the main model (not counted)."""
    h = recipe.model.hidden_size
    layer = decoder_layer(recipe, recipe.model.num_layers - 1)
    own = 2 * h + 2 * h * h + h
    return layer + Block(dense=own, activated=own)


def embedding_block(recipe: Recipe) -> Block:
    return Block(dense=embedding_params(recipe), activated=0)


def head_block(recipe: Recipe) -> Block:
    """Final norm and output head (the head is the embedding when tied: used, not stored)."""
    h = recipe.model.hidden_size
    used = embedding_params(recipe)
    return Block(dense=h + head_params(recipe), activated=h + used)


ACTIVATED_CONVENTION = (
    "per training token: main model + MTP modules' own weights; output head counted once, "
    "embedding table not (a lookup)"
)


@dataclass(frozen=True)
class ParamSummary:
    """Whole-model counts (see the module docstring for what each includes)."""

    total: int  # main model: embedding + decoder layers + final norm + output head
    activated: int  # per training token: main model + MTP own weights; head in, embedding not
    activated_main: int  # main model per token, output head included, embedding table not
    activated_main_with_embedding: int
    embedding: int
    output_head: int
    decoder_layers: int
    mtp: int  # unique MTP parameters (all depths), embedding/head shared
    mtp_activated: int  # per token, unique MTP parameters only
    total_with_mtp: int

    def to_json(self) -> dict:
        return asdict(self)


def count_params(recipe: Recipe) -> ParamSummary:
    """Total and activated parameters of the recipe's model."""
    m = recipe.model
    layers = Block()
    for i in range(m.num_layers):
        layers = layers + decoder_layer(recipe, i)
    emb, head = embedding_block(recipe), head_block(recipe)
    main = layers + emb + head
    mtp = Block()
    for _ in range(m.mtp_num_layers):
        mtp = mtp + mtp_depth(recipe)
    return ParamSummary(
        total=main.total,
        activated=main.activated + mtp.activated,
        activated_main=main.activated,
        activated_main_with_embedding=main.activated + emb.dense,
        embedding=emb.dense,
        output_head=head_params(recipe),
        decoder_layers=layers.total,
        mtp=mtp.total,
        mtp_activated=mtp.activated,
        total_with_mtp=main.total + mtp.total,
    )
