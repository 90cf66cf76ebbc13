"""Map a recipe onto Megatron-Core's TransformerConfig, DDP config and OptimizerConfig."""

from __future__ import annotations

from typing import Any

import torch

from megatron_dualpipe import te
from megatron_dualpipe.config.dispatcher import dispatcher_kwargs
from megatron_dualpipe.config.schema import Recipe
from megatron_dualpipe.config.validate import num_physical_experts
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.schedules.spec import SPECS


def _dtype(recipe: Recipe) -> torch.dtype:
    return torch.bfloat16 if recipe.model.dtype == "bf16" else torch.float32


def virtual_pipeline_size(recipe: Recipe) -> int | None:
    """Model chunks per rank as Megatron sees them (DualPipeV: 2, V-shaped offsets)."""
    p = recipe.parallel
    return SPECS[p.schedule].megatron_vpp(p.vpp)


def transformer_config_kwargs(recipe: Recipe, device: torch.device) -> dict[str, Any]:
    """Keyword arguments for `TransformerConfig`/`MLATransformerConfig`, field by field."""
    m, moe, p, f = recipe.model, recipe.moe, recipe.parallel, recipe.fp8
    on_gpu = device.type == "cuda"
    dtype = _dtype(recipe)
    num_moe_layers = m.num_layers - m.num_dense_layers
    kw: dict[str, Any] = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        init_method_std=m.init_method_std,
        layernorm_epsilon=m.norm_epsilon,
        normalization="RMSNorm",
        gated_linear_unit=True,
        activation_func=torch.nn.functional.silu,  # SwiGLU, as DeepSeek-V3
        add_bias_linear=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=virtual_pipeline_size(recipe),
        expert_model_parallel_size=p.ep,
        sequence_parallel=p.sequence_parallel and p.tp > 1,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        bias_dropout_fusion=on_gpu,
        masked_softmax_fusion=on_gpu,
        gradient_accumulation_fusion=False,
        # Megatron's batched P2P (interleaved 1F1B) mixes up a rank pair's activation and
        # gradient messages on gloo (wrong losses from the 2nd micro-batch); NCCL is fine.
        batch_p2p_comm=on_gpu,
        deterministic_mode=recipe.train.deterministic and not on_gpu,
        # MoE
        num_moe_experts=num_physical_experts(recipe) if num_moe_layers else None,
        moe_layer_freq=[0] * m.num_dense_layers + [1] * num_moe_layers,
        moe_router_topk=moe.topk,
        moe_ffn_hidden_size=moe.ffn_hidden_size,
        moe_shared_expert_intermediate_size=moe.shared_expert_ffn_hidden_size or None,
        moe_router_num_groups=moe.num_groups,
        moe_router_group_topk=moe.group_topk,
        moe_router_score_function=moe.score_function,
        moe_router_topk_scaling_factor=moe.topk_scaling_factor,
        moe_router_enable_expert_bias=moe.expert_bias,
        moe_router_bias_update_rate=moe.bias_update_rate,
        moe_router_load_balancing_type="seq_aux_loss" if moe.seq_aux_loss_coeff else "none",
        moe_aux_loss_coeff=moe.seq_aux_loss_coeff,
        **dispatcher_kwargs(recipe),
        moe_grouped_gemm=moe.grouped_gemm and on_gpu,
        moe_expert_capacity_factor=moe.capacity_factor,
        moe_pad_expert_input_to_capacity=moe.pad_to_capacity,
        moe_router_dtype=moe.router_dtype,
        # MTP
        mtp_num_layers=m.mtp_num_layers or None,
        mtp_loss_scaling_factor=m.mtp_loss_scaling_factor,
        # Selective activation recomputation (DeepSeek-V3 §3.2.3)
        **recompute_kwargs(recipe, on_gpu),
        **fusion_kwargs(recipe, on_gpu),
        **cuda_graph_kwargs(recipe, on_gpu),
    )
    if m.attention == "mla":
        kw.update(
            multi_latent_attention=True,
            # Megatron's MLA applies q/kv layernorms to the latents: DeepSeek-V3's
            # q_a_layernorm and kv_a_layernorm.
            qk_layernorm=True,
            q_lora_rank=m.mla.q_lora_rank,
            kv_lora_rank=m.mla.kv_lora_rank,
            qk_head_dim=m.mla.qk_head_dim,
            qk_pos_emb_head_dim=m.mla.qk_pos_emb_head_dim,
            v_head_dim=m.mla.v_head_dim,
            rotary_base=m.rotary_base,
            mla_down_proj_fusion=m.mla_down_proj_fusion,
        )
    if f.recipe != "none":
        kw.update(_fp8_kwargs(recipe, kw, num_moe_layers))
    return kw


# Megatron-Core 0.19 recomputes these with `CheckpointWithoutOutput`, which queries Transformer
# Engine's FP8 state even without FP8 (`self.fp8 = fp8 is not None`), so they need TE.
DISCARDING_RECOMPUTE = ("layernorm", "mla_up_proj", "moe_act")


def recompute_kwargs(recipe: Recipe, on_gpu: bool) -> dict[str, Any]:
    """`model.recompute_modules` -> Megatron's selective recompute (none when empty).

    `layernorm`, `mla_up_proj` and `moe_act` need Transformer Engine (see above); `moe_act`
    also needs grouped-GEMM experts, which run on GPU only here.
    """
    modules = list(recipe.model.recompute_modules)
    if not modules:
        return {"recompute_granularity": None, "recompute_modules": None}
    allowed = "core_attn, mlp, moe, shared_experts"
    if "moe_act" in modules and not (recipe.moe.grouped_gemm and on_gpu):
        raise UserError(
            "model.recompute_modules: moe_act needs moe.grouped_gemm=true on a GPU (Megatron-Core "
            "recomputes the activation of grouped-GEMM experts only); allowed here: "
            f"{allowed}, layernorm, mla_up_proj"
        )
    needs_te = [m for m in modules if m in DISCARDING_RECOMPUTE]
    if needs_te and not te.te_available():
        raise UserError(
            f"model.recompute_modules: {', '.join(needs_te)} need Transformer Engine (Megatron-"
            "Core 0.19's output-discarding checkpoint uses it even without FP8); allowed "
            f"without Transformer Engine: {allowed}"
        )
    return {"recompute_granularity": "selective", "recompute_modules": modules}


# Recipe field -> TransformerConfig field. Megatron's MLA RoPE fusion is its own Triton kernel
# and the "native" cross-entropy fusion a torch JIT function; the others are TE kernels.
FUSIONS = {
    "model.rope_fusion": "apply_rope_fusion",
    "model.cross_entropy_fusion": "cross_entropy_loss_fusion",
    "moe.router_fusion": "moe_router_fusion",
    "moe.permute_fusion": "moe_permute_fusion",
}


def _field(recipe: Recipe, path: str):
    section, name = path.split(".")
    return getattr(getattr(recipe, section), name)


def cuda_graph_kwargs(recipe: Recipe, on_gpu: bool) -> dict[str, Any]:
    """`model.cuda_graphs` / `model.cuda_graph_modules` as Megatron's fields (none on CPU:
    `validate.check_cuda_graphs` refuses graphs there)."""
    m = recipe.model
    if m.cuda_graphs == "none" or not on_gpu:
        return {}
    return {"cuda_graph_impl": m.cuda_graphs, "cuda_graph_modules": list(m.cuda_graph_modules),
            "use_te_rng_tracker": te.te_available()}  # as model/cuda_graphs.seed_rng seeds


def fusion_kwargs(recipe: Recipe, on_gpu: bool) -> dict[str, Any]:
    """The GPU kernel fusions of `model.*_fusion` / `moe.*_fusion` (all off on CPU, where
    Megatron has no such kernels)."""
    on = {f for f in FUSIONS if _field(recipe, f) and on_gpu}
    kw: dict[str, Any] = {megatron: f in on for f, megatron in FUSIONS.items()}
    needs_te = [f for f in FUSIONS if f in on
                and not (f == "model.cross_entropy_fusion"
                         or (f == "model.rope_fusion" and recipe.model.attention == "mla"))]
    if needs_te and not te.te_available():
        raise UserError(
            f"{', '.join(needs_te)}: these fused kernels come from Transformer Engine, which is "
            "not installed; install it or set them to false"
        )
    if "model.cross_entropy_fusion" in on:
        # Megatron-LM rejects TE's cross-entropy kernel by default (stability); use its own.
        kw["cross_entropy_fusion_impl"] = "native"
    return kw


# --- fp8-specific mapping (megatron_dualpipe/fp8, docs/fp8.md) -------------------------------
# Megatron-Core names the per-tensor current-scaling recipe "tensorwise".
MEGATRON_FP8_RECIPE = {"delayed": "delayed", "current": "tensorwise", "blockwise": "blockwise",
                       "mxfp8": "mxfp8"}


def _fp8_kwargs(recipe: Recipe, kw: dict[str, Any], num_moe_layers: int) -> dict[str, Any]:
    """TransformerConfig fields for `recipe.fp8` (only called when fp8.recipe != none)."""
    f, moe = recipe.fp8, recipe.moe
    swiglu = kw.get("gated_linear_unit") and kw.get("activation_func") is torch.nn.functional.silu
    return {
        "fp8": f.format,
        "fp8_recipe": MEGATRON_FP8_RECIPE[f.recipe],
        "fp8_param": f.param_gather,
        "first_last_layers_bf16": bool(f.bf16_layers_at_start or f.bf16_layers_at_end),
        "num_layers_at_start_in_bf16": f.bf16_layers_at_start,
        "num_layers_at_end_in_bf16": f.bf16_layers_at_end,
        # Pad each expert's routed token count to TE's FP8 alignment (16; 32 for MXFP8) in the
        # router, so the FP8 grouped GEMM needs no padding copy. Megatron allows it for the
        # alltoall/flex (deepep) dispatchers; with allgather the experts pad their input.
        # (The non-deprecated name of moe_router_padding_for_fp8.)
        # With moe.pad_to_capacity every expert already gets its fixed capacity (the experts
        # pad that to the alignment themselves; the counts are known on the host).
        "moe_router_padding_for_quantization": bool(num_moe_layers)
        and moe.token_dispatcher != "allgather" and not moe.pad_to_capacity,
        # Megatron supports the FP8 SwiGLU input store only for SwiGLU (gated silu).
        "activation_func_fp8_input_store": bool(f.activation_input_store and swiglu),
    }


def transformer_config(recipe: Recipe, device: torch.device):
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    kw = transformer_config_kwargs(recipe, device)
    cls = MLATransformerConfig if kw.get("multi_latent_attention") else TransformerConfig
    return cls(**kw)


def ddp_config(recipe: Recipe):
    from megatron.core.distributed import DistributedDataParallelConfig

    p = recipe.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=p.overlap_grad_reduce,
        use_distributed_optimizer=p.distributed_optimizer,
        check_for_nan_in_grad=False,
        bucket_size=None,
    )


MOMENT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def moment_kwargs(recipe: Recipe) -> dict[str, Any]:
    """`optimizer.moment_dtype` -> Megatron's precision-aware optimizer (fp32: nothing).

    BF16 Adam moments (DeepSeek-V3 §3.3.3) with FP32 master weights and gradients. Megatron-Core
    0.19 supports it only through TE's FusedAdam with the distributed optimizer; without
    Transformer Engine (CPU runs) the Torch AdamW fallback keeps FP32 moments, so it is refused.
    """
    o = recipe.optimizer
    if o.moment_dtype == "fp32":
        return {}
    if not te.te_fused_adam_available():
        raise UserError(
            f"optimizer.moment_dtype={o.moment_dtype} needs Transformer Engine's FusedAdam "
            "(Megatron-Core's precision-aware optimizer); the Torch Adam used without it keeps "
            "the moments in FP32; allowed values without Transformer Engine: fp32"
        )
    dtype = MOMENT_DTYPES[o.moment_dtype]
    return {
        "use_precision_aware_optimizer": True,
        "main_params_dtype": torch.float32,
        "main_grads_dtype": torch.float32,
        "exp_avg_dtype": dtype,
        "exp_avg_sq_dtype": dtype,
    }


def optimizer_config(recipe: Recipe):
    from megatron.core.optimizer import OptimizerConfig

    o = recipe.optimizer
    fp8 = recipe.fp8.recipe
    return OptimizerConfig(
        optimizer=o.name,
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=recipe.model.dtype == "bf16",
        params_dtype=_dtype(recipe),
        use_distributed_optimizer=recipe.parallel.distributed_optimizer,
        fp8_recipe=MEGATRON_FP8_RECIPE[fp8] if fp8 != "none" else None,
        **moment_kwargs(recipe),
    )
