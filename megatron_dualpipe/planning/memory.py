"""Memory per GPU: parameters, gradients, optimizer state, FP8 weight caches, activations.

Assumptions (GB = 1e9 bytes):

* weights in `model.dtype` (bf16: 2 B, fp32: 4 B); gradients in fp32 (4 B, Megatron's
  `grad_reduce_in_fp32=True`); optimizer state = fp32 main weights (4 B, bf16 models only) +
  Adam m and v (`optimizer.moment_dtype`: 4 + 4 B or 2 + 2 B), sharded ZeRO-1 style over the
  data-parallel group (dense weights) or the expert data-parallel group (`dp / ep`, experts)
  when `parallel.distributed_optimizer`; unsharded otherwise.
* FP8 (`fp8.recipe != none`): Transformer Engine caches an FP8 copy of every GEMM weight of the
  decoder and MTP layers for the step, row- and column-wise: 2 B per weight (norms, router,
  embedding and head stay bf16). With `fp8.param_gather` (FP8 primary weights) those GEMM
  weights are stored only in FP8 (2 B, both layouts) and there is no separate cache.
* A rank holds the parameters of all its chunks: under DualPipe that is two pipeline stages
  (stage r and its mirror pp-1-r), i.e. 2x the parameters, gradients and optimizer shards of a
  1F1B rank; under DualPipeV two half-size stages.
* Tensor parallelism divides every weight by tp (experts by the expert tensor-parallel size,
  Megatron's default = tp).
* Activations: bytes one token leaves for the backward pass in each module, per the formulas
  below (what Megatron-Core 0.19 + TE >= 2.6 keep: GEMM inputs as FP8 copies under an FP8
  recipe unless Megatron makes the GEMM save its original input, others in `model.dtype`;
  `model.recompute_modules` drops what it recomputes), times `seq_length x micro_batch_size`
  tokens per micro-batch. The peak per rank walks the same action lists the
  executor runs (`schedules.actions`): a chunk's forward adds its bytes, its backward (input
  gradient) frees them. Weight-gradient passes deferred by zero-bubble (W) keep a few GEMM
  inputs alive a little longer; that is not counted.
* Not counted: CUDA context, NCCL/DeepEP buffers, transient tensors (bf16 logits, all-to-all
  and GEMM workspaces), allocator fragmentation. Keep several GB of headroom.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from megatron_dualpipe.config.validate import data_parallel_size
from megatron_dualpipe.planning import params as P
from megatron_dualpipe.planning.layout import ChunkInfo, PipelineRank, experts_per_rank

if TYPE_CHECKING:
    from megatron_dualpipe.config.schema import Recipe

GB = 1e9
GRAD_BYTES = 4
FP8_WEIGHT_BYTES = 2


def param_bytes(recipe: Recipe) -> int:
    return 2 if recipe.model.dtype == "bf16" else 4


def optimizer_bytes(recipe: Recipe) -> int:
    """Optimizer bytes per parameter before sharding: main weights + m + v."""
    main = 4 if recipe.model.dtype == "bf16" else 0
    return main + (4 if recipe.optimizer.moment_dtype == "fp32" else 2) * 2


@dataclass(frozen=True)
class ChunkParams:
    """Parameters one rank stores for one chunk (after TP and EP sharding)."""

    dense: float
    expert: float
    gemm: float  # GEMM weights that run in FP8


def _gemm_of_layer(recipe: Recipe, layer: int) -> float:
    """GEMM weights of one decoder layer (all experts), i.e. without norms and router."""
    m, moe = recipe.model, recipe.moe
    block = P.decoder_layer(recipe, layer)
    norms = 2 * m.hidden_size
    if m.attention == "mla":
        norms += (m.mla.q_lora_rank or 0) + m.mla.kv_lora_rank
    router = 0
    if P.is_moe_layer(recipe, layer):
        router = moe.num_experts * m.hidden_size + (moe.num_experts if moe.expert_bias else 0)
    return block.total - norms - router


def _fp8_layer(recipe: Recipe, layer: int) -> bool:
    f, n = recipe.fp8, recipe.model.num_layers
    return (f.recipe != "none" and layer >= f.bf16_layers_at_start
            and layer < n - f.bf16_layers_at_end)


def chunk_params(recipe: Recipe, chunk: ChunkInfo) -> ChunkParams:
    """Parameters of `chunk` stored on one rank."""
    m, p = recipe.model, recipe.parallel
    expert_share = experts_per_rank(recipe) / recipe.moe.num_experts  # all slots: EPLB copies
    dense = expert = gemm = 0.0
    layers = list(chunk.layers)
    if chunk.head:
        layers += [m.num_layers - 1] * m.mtp_num_layers  # MTP layer = a copy of the last layer
        mtp_own = P.mtp_depth(recipe).total - P.decoder_layer(recipe, m.num_layers - 1).total
        dense += m.mtp_num_layers * mtp_own + m.hidden_size + P.head_params(recipe)
    if chunk.embedding or (chunk.head and not m.untie_embeddings):
        dense += P.embedding_params(recipe)  # a tied head keeps its own copy on the last stage
    for i, layer in enumerate(layers):
        block = P.decoder_layer(recipe, layer)
        dense += block.dense
        expert += block.expert * expert_share
        is_mtp = i >= len(chunk.layers)
        if recipe.fp8.recipe != "none" and (is_mtp or _fp8_layer(recipe, layer)):
            layer_gemm = _gemm_of_layer(recipe, layer)
            gemm += layer_gemm - block.expert + block.expert * expert_share
    return ChunkParams(dense / p.tp, expert / p.tp, gemm / p.tp)


# ---------------------------------------------------------------------------- activations


def _dtypes(recipe: Recipe) -> tuple[int, int, int]:
    """Bytes of (a stored activation, a GEMM input kept as an FP8 copy, a stored SwiGLU input)."""
    a = param_bytes(recipe)
    q8 = 1 if recipe.fp8.recipe != "none" else a
    return a, q8, (1 if recipe.fp8.activation_input_store else a)


def attention_act(recipe: Recipe) -> float:
    """Bytes per token kept by one self-attention block (incl. its input norm).

    With `layernorm` recomputed the norm output is dropped and so are the down-projections'
    saved inputs (Megatron makes them save the original tensor under FP8); the output
    projection saves the attention output itself, not an FP8 copy.
    """
    m, tp = recipe.model, recipe.parallel.tp
    rc = set(m.recompute_modules)
    a, q8, _ = _dtypes(recipe)
    h, heads = m.hidden_size, m.num_attention_heads
    total = h * a  # norm input (the residual stream)
    mla = m.attention == "mla"
    if "layernorm" not in rc:
        consumers = 2 if mla and m.mla.q_lora_rank else 1  # q and kv down-projections
        total += h * (consumers * q8 if q8 != a else a)  # norm output as saved GEMM input(s)
    if mla:
        x = m.mla
        latents = (x.q_lora_rank or 0) + x.kv_lora_rank + x.qk_pos_emb_head_dim
        total += latents * a  # inputs of the up-projection block
        if "mla_up_proj" not in rc:
            qk = heads * (x.qk_head_dim + x.qk_pos_emb_head_dim)
            normed = ((x.q_lora_rank or 0) + x.kv_lora_rank) * q8  # up-projection inputs
            total += (normed + 2 * qk * a + heads * x.v_head_dim * a) / tp  # q, k, v
        out_dim = heads * x.v_head_dim
    else:
        d = h // heads
        groups = m.num_query_groups or heads
        total += (heads + 2 * groups) * d * a / tp  # q, k, v (flash-attention inputs)
        out_dim = heads * d
    total += out_dim * a / tp  # attention output (also the output projection's input)
    if "core_attn" not in rc:
        total += heads * 4 / tp  # softmax statistics
    return total


def dense_mlp_act(recipe: Recipe) -> float:
    """Bytes per token kept by one dense SwiGLU MLP (incl. its pre-MLP norm)."""
    m, tp = recipe.model, recipe.parallel.tp
    rc = set(m.recompute_modules)
    a, q8, act_in = _dtypes(recipe)
    h, f = m.hidden_size, m.ffn_hidden_size
    total = h * a  # norm input
    norm_out = 0 if "layernorm" in rc else h * q8
    if "mlp" in rc:
        return total + (0 if "layernorm" in rc else h * a)  # checkpoint input
    return total + norm_out + (2 * f * act_in + f * q8) / tp  # fc1 output, fc2 input


def moe_act(recipe: Recipe) -> float:
    """Bytes per token kept by one MoE block (norm, router, top-k experts, shared expert).

    Per rank this is an average: with balanced routing an EP rank processes `topk` expert
    copies per token of its own micro-batch. `moe_act` recompute keeps the bf16 SwiGLU input
    (the checkpoint's input) and drops the fc2 input; otherwise the SwiGLU input is kept in
    FP8 with `fp8.activation_input_store` and fc2 keeps its own (FP8) input.
    """
    m, moe, tp = recipe.model, recipe.moe, recipe.parallel.tp
    rc = set(m.recompute_modules)
    a, q8, act_in = _dtypes(recipe)
    h, k, f, fs = m.hidden_size, moe.topk, moe.ffn_hidden_size, moe.shared_expert_ffn_hidden_size
    total = h * a + (0 if "layernorm" in rc else h * a)  # norm input; norm output (router)
    if "moe" in rc:
        return total
    total += moe.num_experts * 4 + k * 12  # fp32 router scores, top-k probs and indices
    routed = k * h * q8  # dispatched tokens (fc1 input)
    if "moe_act" in rc:
        routed += k * 2 * f * a
    else:
        routed += k * 2 * f * act_in + k * f * q8
    total += routed / tp
    if fs and "shared_experts" not in rc:
        total += (2 * fs * act_in + fs * q8) / tp  # fc1 saves the norm output itself
    return total


def layer_act(recipe: Recipe, layer: int) -> float:
    mlp = moe_act(recipe) if P.is_moe_layer(recipe, layer) else dense_mlp_act(recipe)
    return attention_act(recipe) + mlp


def head_act(recipe: Recipe) -> float:
    """Final norm + output head + cross-entropy (it keeps an fp32 softmax for the backward)."""
    m = recipe.model
    a = param_bytes(recipe)
    return 2 * m.hidden_size * a + m.vocab_size * 4 / recipe.parallel.tp


def mtp_act(recipe: Recipe) -> float:
    """One MTP depth: its two norms and 2h->h projection, its layer, its own head and loss."""
    m = recipe.model
    a = param_bytes(recipe)
    return 4 * m.hidden_size * a + layer_act(recipe, m.num_layers - 1) + head_act(recipe)


def chunk_act_bytes(recipe: Recipe, chunk: ChunkInfo) -> float:
    """Activation bytes one micro-batch leaves on `chunk` until its backward."""
    m = recipe.model
    per_token = sum(layer_act(recipe, layer) for layer in chunk.layers)
    if chunk.head:
        per_token += head_act(recipe) + m.mtp_num_layers * mtp_act(recipe)
    return per_token * m.seq_length * recipe.train.micro_batch_size


def peak_activation_bytes(actions, chunk_bytes: list[float]) -> float:
    """Peak of live activation bytes over one rank's action list (F adds, B frees)."""
    live = peak = 0.0
    for act in actions:
        for part in act.parts():
            if part.kind == "F":
                live += chunk_bytes[part.chunk]
                peak = max(peak, live)
            elif part.kind == "B":
                live -= chunk_bytes[part.chunk]
    return peak


# ---------------------------------------------------------------------------- per rank


@dataclass(frozen=True)
class RankMemory:
    """Memory of every GPU of one pipeline rank, in GB."""

    pp_rank: int
    params: float  # parameters stored (count, all chunks, after TP/EP sharding)
    weights: float
    grads: float
    optimizer: float
    fp8_weights: float
    static: float
    activations: float
    peak_microbatches: int  # chunk micro-batches alive at the peak (simulator's count)
    total: float

    def to_json(self) -> dict:
        return asdict(self)


def rank_memory(recipe: Recipe, prank: PipelineRank, actions, peak_count: int) -> RankMemory:
    """Memory of the GPUs of pipeline rank `prank` (all its tp x dp GPUs are alike)."""
    p = recipe.parallel
    dp = data_parallel_size(recipe)
    dense_shard, expert_shard = (dp, dp // p.ep) if p.distributed_optimizer else (1, 1)
    parts = [chunk_params(recipe, c) for c in prank.chunks]
    dense = sum(c.dense for c in parts)
    expert = sum(c.expert for c in parts)
    n = dense + expert
    gemm = sum(c.gemm for c in parts)
    if recipe.fp8.param_gather:  # FP8 primary weights: no bf16 copy, no separate cache
        weights = (n - gemm) * param_bytes(recipe) + gemm * FP8_WEIGHT_BYTES
        fp8 = 0.0
    else:
        weights = n * param_bytes(recipe)
        fp8 = FP8_WEIGHT_BYTES * gemm
    grads = n * GRAD_BYTES
    optimizer = optimizer_bytes(recipe) * (dense / dense_shard + expert / expert_shard)
    static = weights + grads + optimizer + fp8
    chunk_bytes = [0.0] * (max(c.chunk for c in prank.chunks) + 1)
    for c in prank.chunks:
        chunk_bytes[c.chunk] = chunk_act_bytes(recipe, c)
    act = peak_activation_bytes(actions, chunk_bytes)
    return RankMemory(prank.pp_rank, n, weights / GB, grads / GB, optimizer / GB, fp8 / GB,
                      static / GB, act / GB, peak_count, (static + act) / GB)
