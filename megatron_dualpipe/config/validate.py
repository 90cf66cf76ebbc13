"""Cross-field recipe rules, checked before any process group exists.

Each rule raises `UserError` naming the recipe fields involved and what would be valid.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from megatron_dualpipe.config.stage_split import num_stages
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.schedules.spec import SPECS, TRAIN_SCHEDULES, get_spec, run_options

if TYPE_CHECKING:
    from megatron_dualpipe.config.schema import Recipe


def default_nproc_per_node(recipe: Recipe) -> int:
    p = recipe.parallel
    return p.pp * math.lcm(p.tp, p.ep)


def world_size(recipe: Recipe) -> int:
    p = recipe.parallel
    return p.num_nodes * (p.nproc_per_node or default_nproc_per_node(recipe))


def data_parallel_size(recipe: Recipe) -> int:
    p = recipe.parallel
    return world_size(recipe) // (p.tp * p.pp)


def num_microbatches(recipe: Recipe) -> int:
    t = recipe.train
    return t.global_batch_size // (t.micro_batch_size * data_parallel_size(recipe))


def num_physical_experts(recipe: Recipe) -> int:
    extra = recipe.eplb.num_redundant_experts if recipe.eplb.enabled else 0
    return recipe.moe.num_experts + extra


def _divisors(n: int) -> list[int]:
    small = [d for d in range(1, math.isqrt(n) + 1) if n % d == 0]
    return sorted(set(small + [n // d for d in small]))


def _multiples_near(target: int, unit: int, stop: int) -> list[int]:
    """The multiples of `unit` in [unit, stop) that can be nearest to `target` (at most four;
    `_nearest` picks from them): a huge recipe value costs no time."""
    below = target // unit * unit
    return [v for v in range(max(unit, below - unit), below + 3 * unit, unit) if v < stop]


def _nearest(values: list[int], target: int) -> str:
    best = sorted(values, key=lambda v: (abs(v - target), v))[:2]
    return " or ".join(str(v) for v in sorted(best))


def check_parallel(recipe: Recipe) -> None:
    p = recipe.parallel
    world = world_size(recipe)
    if world % (p.tp * p.pp):
        per_node = world // p.num_nodes
        unit = p.tp * p.pp // math.gcd(p.num_nodes, p.tp * p.pp)  # valid: its multiples
        valid = _multiples_near(per_node, unit, 2 * per_node + p.tp * p.pp + 1)
        raise UserError(
            f"parallel: world size {world} (parallel.num_nodes x parallel.nproc_per_node) is not "
            f"divisible by parallel.tp x parallel.pp = {p.tp * p.pp}; nearest valid "
            f"parallel.nproc_per_node: {_nearest(valid, per_node)}"
        )
    if (world // p.pp) % p.ep:
        raise UserError(
            f"parallel.ep={p.ep} must divide the ranks of one pipeline stage "
            f"(world size {world} / parallel.pp {p.pp} = {world // p.pp}); valid: "
            f"{_divisors(world // p.pp)}"
        )
    spec = SPECS[p.schedule]
    if spec.needs_vpp and p.vpp is None:
        raise UserError("parallel.vpp is required for parallel.schedule=interleaved (e.g. 2)")
    if not spec.needs_vpp and p.vpp is not None:
        raise UserError(
            "parallel.vpp applies only to parallel.schedule=interleaved "
            f"(schedule is {p.schedule}); "
            "dualpipe/dualpipev always use two chunks per rank"
        )
    # DualPipeV with one pipeline rank is well defined: rank 0 holds both stages of the V
    # (the turn is local); bidirectional DualPipe needs a mirror rank.
    if spec.bidirectional and p.pp < 2:
        raise UserError(
            f"parallel.schedule=dualpipe needs an even parallel.pp >= 2 (got {p.pp}); nearest "
            "valid: parallel.pp=2, or parallel.schedule=dualpipev (allows parallel.pp=1)"
        )
    if spec.bidirectional and p.pp % 2:
        raise UserError(
            f"parallel.pp={p.pp} must be even for dualpipe; nearest valid: "
            f"{_nearest(_multiples_near(p.pp, 2, 2 * p.pp + 2), p.pp)}"
        )


def check_layers(recipe: Recipe) -> None:
    m, p = recipe.model, recipe.parallel
    stages = num_stages(recipe)
    if m.num_layers % stages:
        valid = _multiples_near(m.num_layers, stages, 2 * m.num_layers + stages)
        raise UserError(
            f"model.num_layers={m.num_layers} must split evenly into {stages} pipeline stages "
            f"(parallel.schedule={p.schedule}, parallel.pp={p.pp}); nearest valid "
            f"model.num_layers: {_nearest(valid, m.num_layers)}"
        )
    check_model_shape(recipe)


def check_model_shape(recipe: Recipe) -> None:
    """Layer and head rules that do not depend on how the layers are split."""
    m, p = recipe.model, recipe.parallel
    if m.num_dense_layers > m.num_layers:
        raise UserError(
            f"model.num_dense_layers={m.num_dense_layers} exceeds model.num_layers={m.num_layers}"
        )
    if m.attention == "mha" and m.hidden_size % m.num_attention_heads:
        raise UserError(
            f"model.hidden_size={m.hidden_size} must be divisible by "
            f"model.num_attention_heads={m.num_attention_heads}"
        )
    if m.num_attention_heads % p.tp:
        raise UserError(
            f"model.num_attention_heads={m.num_attention_heads} must be divisible by "
            f"parallel.tp={p.tp}"
        )


def check_stage_split(recipe: Recipe) -> None:
    """Layer split rules: the even split (`check_layers`) or `parallel.layers_per_stage`."""
    explicit = recipe.parallel.layers_per_stage
    if explicit is None:
        check_layers(recipe)
        return
    m, p = recipe.model, recipe.parallel
    stages = num_stages(recipe)
    where = f"parallel.schedule={p.schedule}, parallel.pp={p.pp}"
    if len(explicit) != stages:
        raise UserError(
            f"parallel.layers_per_stage has {len(explicit)} entries but {where} has {stages} "
            "pipeline stages; give one decoder-layer count per stage"
        )
    if any(n < 0 for n in explicit):
        raise UserError(f"parallel.layers_per_stage={list(explicit)}: counts must be >= 0")
    if sum(explicit) != m.num_layers:
        raise UserError(
            f"parallel.layers_per_stage sums to {sum(explicit)} but model.num_layers="
            f"{m.num_layers}"
        )
    check_model_shape(recipe)


def check_moe(recipe: Recipe) -> None:
    moe, p = recipe.moe, recipe.parallel
    if moe.topk > moe.num_experts:
        raise UserError(f"moe.topk={moe.topk} exceeds moe.num_experts={moe.num_experts}")
    physical = num_physical_experts(recipe)
    if physical % p.ep:
        what = "moe.num_experts" + (" + eplb.num_redundant_experts" if recipe.eplb.enabled else "")
        raise UserError(
            f"{what} = {physical} is not divisible by parallel.ep={p.ep}; valid parallel.ep: "
            f"{_divisors(physical)}"
        )
    if moe.pad_to_capacity and moe.capacity_factor is None:
        raise UserError("moe.pad_to_capacity=true needs moe.capacity_factor (e.g. 1.25)")
    if moe.capacity_factor is not None and moe.token_dispatcher != "alltoall":
        raise UserError(
            f"moe.capacity_factor needs moe.token_dispatcher=alltoall (got "
            f"{moe.token_dispatcher}); allowed values: alltoall"
        )
    if moe.capacity_factor is not None and recipe.eplb.enabled:
        raise UserError("moe.capacity_factor cannot be combined with eplb.enabled=true "
                         "(capacities are per physical slot, EPLB routes over replicas)")
    if (moe.num_groups is None) != (moe.group_topk is None):
        raise UserError("moe.num_groups and moe.group_topk must be set together (or neither)")
    if moe.num_groups is not None:
        if moe.num_experts % moe.num_groups:
            raise UserError(
                f"moe.num_groups={moe.num_groups} must divide moe.num_experts={moe.num_experts}; "
                f"valid: {_divisors(moe.num_experts)}"
            )
        if moe.group_topk > moe.num_groups:
            raise UserError(
                f"moe.group_topk={moe.group_topk} exceeds moe.num_groups={moe.num_groups}"
            )
        per_group = moe.num_experts // moe.num_groups
        if moe.topk > moe.group_topk * per_group:
            raise UserError(
                f"moe.topk={moe.topk} exceeds the experts reachable in moe.group_topk="
                f"{moe.group_topk} groups of {per_group}"
            )


def check_batch(recipe: Recipe) -> None:
    t = recipe.train
    dp = data_parallel_size(recipe)
    unit = t.micro_batch_size * dp
    if t.global_batch_size % unit:
        raise UserError(
            f"train.global_batch_size={t.global_batch_size} must be a multiple of "
            f"train.micro_batch_size x data-parallel size = {t.micro_batch_size} x {dp} = {unit}; "
            f"nearest valid train.global_batch_size: "
            + _nearest(_multiples_near(t.global_batch_size, unit, t.global_batch_size + 2 * unit),
                       t.global_batch_size)
        )
    p = recipe.parallel
    spec = SPECS[p.schedule]
    if spec.dualpipe_family:
        m = num_microbatches(recipe)
        need = spec.min_microbatches(p.pp)
        if m < need or m % spec.microbatch_multiple:
            valid = need if m < need else m + 1
            raise UserError(
                f"parallel.schedule={p.schedule} with parallel.pp={p.pp} needs an "
                f"{'even ' if spec.microbatch_multiple == 2 else ''}number of micro-batches "
                f">= {need}, "
                f"got {m} (train.global_batch_size / (train.micro_batch_size x dp)); nearest valid "
                f"train.global_batch_size: {valid * unit}"
            )


def check_eplb(recipe: Recipe) -> None:
    e = recipe.eplb
    if e.num_redundant_experts and not e.enabled:
        raise UserError("eplb.num_redundant_experts is set but eplb.enabled is false")
    if recipe.moe.router_bias_init and not e.enabled:
        raise UserError(
            f"moe.router_bias_init={recipe.moe.router_bias_init} needs eplb.enabled=true (the "
            "EPLB router adds the skew; Megatron's router would ignore it); allowed without "
            "eplb: 0"
        )


def check_fp8(recipe: Recipe) -> None:
    f = recipe.fp8
    if f.recipe == "none":
        return
    if recipe.train.device == "cpu":
        raise UserError(
            f"fp8.recipe={f.recipe} needs a GPU with Transformer Engine; train.device is cpu "
            "(use fp8.recipe=none on CPU)"
        )
    if f.bf16_layers_at_start + f.bf16_layers_at_end > recipe.model.num_layers:
        raise UserError(
            "fp8.bf16_layers_at_start + fp8.bf16_layers_at_end exceeds model.num_layers"
        )
    if f.bf16_modules and f.param_gather:
        raise UserError(
            "fp8.bf16_modules cannot be combined with fp8.param_gather=true (FP8 parameters "
            "are created as FP8 tensors; a BF16 GEMM would need BF16 weights)"
        )
    if f.recipe in ("blockwise", "mxfp8"):
        m, moe = recipe.model, recipe.moe
        for name, dim in (
            ("model.hidden_size", m.hidden_size),
            ("model.ffn_hidden_size", m.ffn_hidden_size),
            ("moe.ffn_hidden_size", moe.ffn_hidden_size),
        ):
            if dim % 128:
                raise UserError(
                    f"{name}={dim} must be a multiple of 128 for fp8.recipe={f.recipe} "
                    "(128x128 weight blocks)"
                )
    from megatron_dualpipe.fp8.env_check import check_fp8_recipe

    check_fp8_recipe(recipe)


def check_fusions(recipe: Recipe) -> None:
    p, m = recipe.parallel, recipe.model
    if m.mla_down_proj_fusion and (m.attention != "mla" or m.mla.q_lora_rank is None):
        got = (f"model.attention={m.attention}" if m.attention != "mla"
               else "model.mla.q_lora_rank=null")
        raise UserError(f"model.mla_down_proj_fusion=true needs model.attention=mla with a "
                        f"model.mla.q_lora_rank (got {got}); set model.mla_down_proj_fusion=false")
    if recipe.model.gradient_accumulation_fusion and run_options(p)[0]:
        raise UserError(
            f"model.gradient_accumulation_fusion=true cannot be combined with parallel.schedule="
            f"{p.schedule} and parallel.zero_bubble=true (the zero-bubble W split defers "
            "Transformer Engine weight GEMMs, which fused accumulation would skip); set "
            "parallel.zero_bubble=false or model.gradient_accumulation_fusion=false"
        )


def check_cuda_graphs(recipe: Recipe) -> None:
    """`model.cuda_graphs=local`: what Megatron-Core's per-layer graphs need, named by field
    (Megatron asserts the same inside the workers, one traceback per rank)."""
    m, moe, p = recipe.model, recipe.moe, recipe.parallel
    if m.cuda_graphs == "none":
        if m.cuda_graph_modules:
            raise UserError("model.cuda_graph_modules is set but model.cuda_graphs=none; set "
                            "model.cuda_graphs=local or model.cuda_graph_modules=[]")
        return
    field = f"model.cuda_graphs={m.cuda_graphs}"
    if recipe.train.device == "cpu":
        raise UserError(f"{field} needs a GPU (train.device=cpu); allowed on CPU: "
                        "model.cuda_graphs=none")
    if get_spec(p.schedule).dualpipe_family:
        megatrons = ", ".join(n for n in TRAIN_SCHEDULES if not get_spec(n).dualpipe_family)
        raise UserError(f"{field} needs one of Megatron-Core's own schedules, which create the "
                        f"graphs (parallel.schedule: {megatrons}); got parallel.schedule="
                        f"{p.schedule}")
    modules = set(m.cuda_graph_modules)
    has_moe = moe.num_experts > 0 and m.num_layers > m.num_dense_layers
    if {"moe", "moe_router"} <= modules:
        raise UserError("model.cuda_graph_modules cannot hold both moe and moe_router")
    if "moe_preprocess" in modules and "moe_router" not in modules:
        raise UserError("model.cuda_graph_modules: moe_preprocess needs moe_router too")
    if "mlp" in modules and m.num_dense_layers == 0:
        raise UserError("model.cuda_graph_modules: mlp captures dense layers, and "
                        "model.num_dense_layers=0; allowed: attn, moe, moe_router")
    whole_moe = has_moe and (not modules or "moe" in modules)
    if whole_moe and (moe.capacity_factor is None or not moe.pad_to_capacity):
        raise UserError(f"{field} with the MoE layers in the graphs (model.cuda_graph_modules "
                        f"{sorted(modules) or '[] = whole layer'}) needs fixed expert inputs: "
                        "moe.capacity_factor and moe.pad_to_capacity=true (else capture only "
                        "attn / moe_router)")
