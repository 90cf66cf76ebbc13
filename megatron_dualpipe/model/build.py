"""Build the model chunks of this rank: Megatron-Core `GPTModel`s with MoE layers.

GPTModel (not HybridModel) because Megatron-Core 0.19's pipeline schedules, combined-1F1B
schedule plans (`build_schedule_plan`) and MTP are implemented for it; HybridModel is a
layer-pattern model whose MoE path has no schedule-plan support in 0.19.
"""

from __future__ import annotations

import torch

from megatron_dualpipe import te
from megatron_dualpipe.config import Recipe
from megatron_dualpipe.config.stage_split import megatron_layout
from megatron_dualpipe.config.to_megatron import ddp_config, transformer_config
from megatron_dualpipe.config.validate import num_physical_experts
from megatron_dualpipe.distributed import process_groups
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.fp8.overrides import apply_bf16_modules
from megatron_dualpipe.model.init import init_chunk
from megatron_dualpipe.model.layout import ChunkPlacement, chunk_placements
from megatron_dualpipe.model.spec_walk import walk_spec
from megatron_dualpipe.model.wgrad_fusion import fuse_te_wgrad_accumulation
from megatron_dualpipe.schedules.spec import SPECS


def use_transformer_engine(recipe: Recipe, device: torch.device) -> bool:
    spec = recipe.model.spec
    if spec == "auto":
        return device.type == "cuda" and te.te_available()
    if spec == "te" and not te.te_available():
        raise UserError(
            "model.spec=te needs Transformer Engine (pip install 'megatron_dualpipe[gpu]')"
        )
    return spec == "te"


def layer_specs(config, placement: ChunkPlacement, use_te: bool, router_cls=None):
    """Decoder block spec (and MTP spec) for one chunk, with an optional router class."""
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_decoder_layer_specs,
        get_gpt_mtp_block_spec,
    )
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    block = get_gpt_decoder_block_spec(
        config,
        use_transformer_engine=use_te,
        normalization="RMSNorm",
        vp_stage=placement.vp_stage,
        pp_rank=placement.stage_rank,
    )
    mtp = None
    if config.mtp_num_layers and placement.post_process:
        # Megatron's MTP layer copies the spec of the model's last decoder layer, which it
        # takes from this stage's block; a last stage without decoder layers gets it here.
        source = block
        if not block.layer_specs:
            last = get_gpt_decoder_layer_specs(config, use_te, normalization="RMSNorm")[-1:]
            source = TransformerBlockSubmodules(layer_specs=last, layer_norm=block.layer_norm)
        mtp = get_gpt_mtp_block_spec(
            config, source, use_transformer_engine=use_te, vp_stage=placement.vp_stage,
            pp_rank=placement.stage_rank,
        )
    if router_cls is not None:
        set_router(block, router_cls)
        set_router(mtp, router_cls)
    return block, mtp


def set_router(spec, router_cls) -> None:
    """Set `router_cls` on every `MoESubmodules` reachable from `spec`."""
    from megatron.core.transformer.moe.moe_layer import MoESubmodules

    for node in walk_spec(spec):
        if isinstance(node, MoESubmodules):
            node.router = router_cls


def build_chunk(recipe: Recipe, config, placement: ChunkPlacement, device, use_te: bool,
                router_cls=None):
    """One `GPTModel` chunk holding exactly the layers of `placement`'s stage.

    The chunk gets its own config copy whose pipeline layout is its stage (`chunk_config`), and
    a pipeline group that reports the chunk's stage rank (`PipelineRankView`) for Megatron's
    first/last-stage checks. For DualPipe(V) the chunks keep no embedding group: the copies of
    the word embedding that sit on one rank (tied head, MTP) are summed by the schedule.
    """
    from megatron.core.models.gpt import GPTModel

    from megatron_dualpipe.model.chunk_layout import chunk_config

    config = chunk_config(config, megatron_layout(recipe), placement)
    block, mtp = layer_specs(config, placement, use_te, router_cls)
    if recipe.fp8.expert_gemm == "deepgemm":
        from megatron_dualpipe.fp8.deepgemm import deepgemm_expert_spec

        for spec in (block, mtp):
            deepgemm_expert_spec(spec, recipe.fp8.deepgemm_quantizer)
    ours = SPECS[recipe.parallel.schedule].dualpipe_family
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
        pg_collection=process_groups(placement.stage_rank, embedding_group=not ours),
        vp_stage=placement.vp_stage,
    )
    built = [layer.layer_number - 1 for layer in chunk.decoder.layers]
    expected = list(config.pipeline_model_parallel_layout.layer_range())
    if built != expected:
        raise RuntimeError(f"stage {placement.stage}: built decoder layers {built}, "
                           f"expected {expected} (Megatron-Core layout not honoured)")
    chunk.placement = placement
    return chunk.to(device)


def build_model(recipe: Recipe, device: torch.device, router_cls=None, wrap_ddp: bool = True):
    """This rank's model chunks (DDP-wrapped), initialized independently of the layout.

    Every chunk builds the global decoder-layer range of its stage from
    `config.stage_split` (even split or `parallel.layers_per_stage`). Returns the shared
    config (the one the DDP wrappers and schedules use) and the chunks.
    """
    from megatron.core import parallel_state
    from megatron.core.distributed import DistributedDataParallel

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
    if SPECS[recipe.parallel.schedule].bidirectional:
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
    if recipe.model.gradient_accumulation_fusion and device.type == "cuda":
        fuse_te_wgrad_accumulation(wrapped)
    return config, wrapped
