"""`plan RECIPE --search --gpus N`: rank the feasible layouts of N GPUs by predicted throughput.

Candidates keep the recipe's model, tensor parallelism and global batch, and vary the pipeline
size `pp` (a power of two, at most one stage per decoder layer), the expert-parallel size `ep`
(a power of two dividing the data-parallel size and the expert count), the schedule (1f1b,
interleaved with 2 chunks, dualpipe, dualpipev) and the micro-batch size (1 or 2 sequences).
A candidate is feasible if the recipe validates (`plan.validate_plan_recipe`) and every GPU's
memory (`planning/memory.py`) fits the hardware's. Layers are split over stages by `balanced_split`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from megatron_dualpipe.config.load import apply_overrides, load_raw
from megatron_dualpipe.config.stage_split import num_stages
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.planning import memory
from megatron_dualpipe.planning.layout import pipeline_ranks
from megatron_dualpipe.planning.predict import flops as FL
from megatron_dualpipe.planning.predict.calibration import Calibration
from megatron_dualpipe.planning.predict.hardware import Hardware
from megatron_dualpipe.planning.predict.model import StepModel
from megatron_dualpipe.schedules.spec import get_spec

SCHEDULES = ("dualpipe", "dualpipev", "1f1b", "interleaved")
SEARCH_VPP = 2  # model chunks per rank tried for schedules that take parallel.vpp
MICRO_BATCH_SIZES = (1, 2)


@dataclass
class Candidate:
    pp: int
    ep: int
    dp: int
    schedule: str
    micro_batch_size: int
    num_microbatches: int = 0
    layers_per_stage: list[int] | None = None
    step_time_s: float = 0.0
    tokens_per_s_per_gpu: float = 0.0
    max_memory_gb: float = 0.0
    feasible: bool = False
    reason: str = ""

    def to_json(self) -> dict:
        return dict(self.__dict__)


def balanced_split(recipe, stages: int) -> list[int]:
    """Decoder layers per stage: the output head + MTP count as `head_layers` layers of the
    last stage (their forward+backward FLOPs over an MoE layer's, rounded), then as even as
    possible, extra layers going to the first stages."""
    r = recipe
    moe_layer = FL.attention(r).total + FL.moe(r).total
    head = (FL.head(r).total * (1 + r.model.mtp_num_layers)
            + r.model.mtp_num_layers * (FL.mtp_projection(r).total + moe_layer))
    head_layers = round(head / moe_layer)
    total = r.model.num_layers + head_layers
    sizes = [total // stages + (1 if s < total % stages else 0) for s in range(stages)]
    take = head_layers
    for s in reversed(range(stages)):  # remove the head's share from the last stages
        cut = min(take, sizes[s])
        sizes[s] -= cut
        take -= cut
    return sizes


def _powers_of_two(limit: int) -> list[int]:
    out, v = [], 1
    while v <= limit:
        out.append(v)
        v *= 2
    return out


def candidates(recipe, gpus: int) -> list[Candidate]:
    tp = recipe.parallel.tp
    layers = recipe.model.num_layers
    out = []
    for pp in _powers_of_two(gpus // tp):
        dp = gpus // (tp * pp)
        for ep in _powers_of_two(dp):
            if dp % ep or recipe.moe.num_experts % ep:
                continue
            for schedule in SCHEDULES:
                spec = get_spec(schedule)
                if spec.num_stages(pp, SEARCH_VPP if spec.needs_vpp else None) > layers:
                    continue  # a stage without decoder layers
                for mb in MICRO_BATCH_SIZES:
                    out.append(Candidate(pp, ep, dp, schedule, mb))
    return out


def _build(raw: dict, path, base, c: Candidate, gpus: int, gpus_per_node: int, validate):
    """The candidate's recipe: the base recipe's stage split where pp and schedule are the
    recipe's own, else `balanced_split`; `ValueError` if it does not validate."""
    from megatron_dualpipe.config.schema import Recipe

    sets = [f"parallel.pp={c.pp}", f"parallel.ep={c.ep}",
            f"parallel.schedule={c.schedule}", f"train.micro_batch_size={c.micro_batch_size}",
            f"parallel.num_nodes={max(1, gpus // gpus_per_node)}",
            f"parallel.nproc_per_node={min(gpus, gpus_per_node)}",
            f"parallel.vpp={SEARCH_VPP if get_spec(c.schedule).needs_vpp else 'null'}"]
    own = (c.pp, c.schedule) == (base.parallel.pp, base.parallel.schedule)
    if not (own and base.parallel.layers_per_stage):
        draft = Recipe.model_validate(apply_overrides(copy.deepcopy(raw), sets))
        sets.append(f"parallel.layers_per_stage={balanced_split(draft, num_stages(draft))}")
    return validate(apply_overrides(copy.deepcopy(raw), sets), path)


def evaluate(raw: dict, path, base, c: Candidate, gpus: int, hw: Hardware,
             cal: Calibration, validate) -> Candidate:
    """Fill in `c`: feasibility, peak memory and (if it fits) predicted step time and
    throughput."""
    try:
        recipe = _build(raw, path, base, c, gpus, hw.gpus_per_node, validate)
        model = StepModel(recipe, hw, cal)
    except ValueError as err:
        c.reason = str(err).split(";")[0][:120]
        return c
    c.layers_per_stage = list(recipe.parallel.layers_per_stage or [])
    c.num_microbatches = model.m
    c.max_memory_gb = max(
        memory.rank_memory(recipe, r, model.actions[r.pp_rank],
                           _in_flight(model.actions[r.pp_rank])).total
        for r in pipeline_ranks(recipe))
    if c.max_memory_gb > hw.hbm_gb:
        c.reason = f"memory {c.max_memory_gb:.0f} GB > {hw.hbm_gb:g} GB"
        return c
    step_ms, _ = model.step_ms(model.simulate())
    c.step_time_s = step_ms / 1e3
    c.tokens_per_s_per_gpu = recipe.train.global_batch_size * recipe.model.seq_length / gpus / (
        step_ms / 1e3)
    c.feasible = True
    return c


def _in_flight(actions) -> int:
    """Peak micro-batch chunks alive on a rank (what `memory.rank_memory` reports)."""
    return int(memory.peak_activation_bytes(actions, [1.0] * 64))


def search(path, base_overrides, recipe, gpus: int, hw: Hardware, cal: Calibration,
           validate) -> list[Candidate]:
    """Every candidate of `gpus` GPUs, feasible ones first, fastest first.

    `validate(raw, path)` checks a candidate's raw recipe dict and returns the `Recipe`
    (`plan.validate_plan_recipe`; passed in because `plan` imports this module).
    """
    if gpus < 1:
        raise UserError(f"--gpus {gpus}: must be a positive number of GPUs")
    tp = recipe.parallel.tp
    if gpus % tp or (gpus > hw.gpus_per_node and gpus % hw.gpus_per_node):
        raise UserError(f"--gpus {gpus}: must be a multiple of parallel.tp={tp} and, above one "
                        f"node, of {hw.gpus_per_node} GPUs per node ({hw.name})")
    raw = apply_overrides(load_raw(path), base_overrides)
    done = [evaluate(raw, path, recipe, c, gpus, hw, cal, validate)
            for c in candidates(recipe, gpus)]
    return sorted(done, key=lambda c: (not c.feasible, -c.tokens_per_s_per_gpu))
