"""Build the model chunks of this rank: Megatron-Core `GPTModel`s with MoE layers.

GPTModel (not HybridModel) because Megatron-Core 0.19's pipeline schedules, combined-1F1B
schedule plans (`build_schedule_plan`) and MTP are implemented for it; HybridModel is a
layer-pattern model whose MoE path has no schedule-plan support in 0.19.
"""

from __future__ import annotations

import torch

from megatron_dualpipe.config import Recipe
from megatron_dualpipe.config.to_megatron import ddp_config, transformer_config
from megatron_dualpipe.config.validate import num_physical_experts
from megatron_dualpipe.distributed import process_groups
from megatron_dualpipe.fp8.overrides import apply_bf16_modules
from megatron_dualpipe.model.init import init_chunk
from megatron_dualpipe.model.layout import ChunkPlacement, chunk_placements


def use_transformer_engine(recipe: Recipe, device: torch.device) -> bool:
    spec = recipe.model.spec
    if spec == "auto":
        return device.type == "cuda" and _te_available()
    if spec == "te" and not _te_available():
        raise ValueError(
            "model.spec=te needs Transformer Engine (pip install 'megatron_dualpipe[gpu]')"
        )
    return spec == "te"


def _te_available() -> bool:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:
        return False
    return True


def layer_specs(config, placement: ChunkPlacement, use_te: bool, router_cls=None):
    """Decoder block spec (and MTP spec) for one chunk, with an optional router class."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_mtp_block_spec,
    )

    block = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_te,
        normalization="RMSNorm",
        vp_stage=placement.vp_stage,
        pp_rank=placement.stage_rank,
    )
    if router_cls is not None:
        for layer_spec in block.layer_specs:
            mlp = layer_spec.submodules.mlp
            if hasattr(mlp, "submodules") and hasattr(mlp.submodules, "router"):
                mlp.submodules.router = router_cls
    mtp = None
    if config.mtp_num_layers and placement.post_process:
        mtp = get_gpt_mtp_block_spec(
            config, block, use_transformer_engine=use_te, vp_stage=placement.vp_stage,
            pp_rank=placement.stage_rank,
        )
    return block, mtp


def build_chunk(recipe: Recipe, config, placement: ChunkPlacement, device, use_te: bool,
                router_cls=None):
    from megatron.core.models.gpt import GPTModel

    block, mtp = layer_specs(config, placement, use_te, router_cls)
    pp = recipe.parallel.pp
    stage_rank = placement.stage_rank if pp > 1 else None
    chunk = GPTModel(
        config=config,
        transformer_layer_spec=block,
        vocab_size=recipe.model.vocab_size,
        max_sequence_length=recipe.model.seq_length,
        pre_process=placement.pre_process,
        post_process=placement.post_process,
        share_embeddings_and_output_weights=not recipe.model.untie_embeddings,
        position_embedding_type="rope",
        rotary_base=recipe.model.rotary_base,
        mtp_block_spec=mtp,
        pg_collection=process_groups(stage_rank),
        vp_stage=placement.vp_stage,
    )
    chunk.placement = placement
    return chunk.to(device)


def build_model(recipe: Recipe, device: torch.device, router_cls=None, wrap_ddp: bool = True):
    """This rank's model chunks (DDP-wrapped), initialized independently of the layout."""
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel

    if recipe.parallel.layers_per_stage is not None:
        raise ValueError(
            "parallel.layers_per_stage (an uneven layer split) is validated and used by `plan`, "
            "but the model builder supports even splits only; remove it to train"
        )
    config = transformer_config(recipe, device)
    use_te = use_transformer_engine(recipe, device)
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    placements = chunk_placements(recipe.parallel.schedule, recipe.parallel.pp, pp_rank,
                                  recipe.parallel.vpp)
    ep = recipe.parallel.ep
    chunks = []
    for placement in placements:
        chunk = build_chunk(recipe, config, placement, device, use_te, router_cls)
        init_chunk(
            chunk,
            seed=recipe.train.seed,
            std=recipe.model.init_method_std,
            num_layers=recipe.model.num_layers,
            tp=recipe.parallel.tp,
            tp_rank=parallel_state.get_tensor_model_parallel_rank(),
            ep_rank=parallel_state.get_expert_model_parallel_rank(),
            num_local_experts=num_physical_experts(recipe) // ep,
        )
        if recipe.fp8.recipe != "none":
            apply_bf16_modules(chunk, recipe.fp8.bf16_modules)
        chunks.append(chunk)
    if recipe.parallel.schedule == "dualpipe":
        # Chunk 1 mirrors a stage that chunk 0 of the mirror rank also holds: count its
        # gradients once in the gradient norm (Megatron skips `shared` parameters there).
        for param in chunks[1].parameters():
            param.shared = True
    if not wrap_ddp:
        return config, chunks
    wrapped = []
    for i, chunk in enumerate(chunks):
        ddp = DistributedDataParallel(
            config,
            ddp_config(recipe),
            chunk,
            disable_bucketing=i > 0,
        )
        ddp.placement = chunk.placement
        wrapped.append(ddp)
    return config, wrapped
