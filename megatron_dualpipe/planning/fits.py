"""Does the recipe fit this machine's devices? The `train` launcher's memory rule.

`plan`'s memory model (planning/memory.py) per pipeline rank against `device_memory_gb`
(config/preflight.py). The launcher adds `MEMORY_RULE` to the rules it runs before any worker
starts (`config.rules.launch_rules`) unless `train --force`.
"""

from __future__ import annotations

from megatron_dualpipe.config import preflight
from megatron_dualpipe.config.rules import Rule
from megatron_dualpipe.config.schema import Recipe
from megatron_dualpipe.config.validate import num_microbatches, world_size
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.planning import memory, pipeline_ranks, simulate_recipe


def estimate_gb(recipe: Recipe):
    """The memory model of `plan` (planning/memory.py): one `RankMemory` per pipeline rank.

    Activations peak within the first few micro-batches per rank (warm-up), so a step of very
    many is walked with `pp x (chunks + 3)` of them: same peak, bounded time.
    """
    p = recipe.parallel
    enough = p.pp * ((p.vpp or 2) + 3)
    actions, sim = simulate_recipe(recipe, microbatches=min(num_microbatches(recipe), enough))
    return [memory.rank_memory(recipe, r, actions[r.pp_rank],
                               sim.peak_activations_per_rank[r.pp_rank])
            for r in pipeline_ranks(recipe)]


def check_memory(recipe: Recipe) -> None:
    """Refuse a recipe whose estimated memory exceeds the device (`train --force` skips this).

    On a GPU the largest pipeline rank must fit one GPU; on the CPU every rank of this node
    shares the host's memory.
    """
    device = preflight.device_memory_gb(recipe)
    if device is None:
        return
    kind, capacity = device
    ranks = estimate_gb(recipe)
    worst = max(ranks, key=lambda r: r.total)
    if kind == "GPU":
        need, what = worst.total, f"pipeline rank {worst.pp_rank} needs {worst.total:.3g} GB"
    else:
        per_node = world_size(recipe) // recipe.parallel.num_nodes
        share = per_node / len(ranks)  # processes per pipeline rank on this node
        need = sum(r.total for r in ranks) * share
        what = (f"{per_node} processes need {need:.3g} GB (pipeline rank {worst.pp_rank}: "
                f"{worst.total:.3g} GB)")
    if need <= capacity:
        return
    items = {"weights": worst.weights, "gradients": worst.grads, "optimizer": worst.optimizer,
             "fp8 weights": worst.fp8_weights, "activations": worst.activations}
    biggest = sorted(items.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{name} {gb:.3g} GB" for name, gb in biggest)
    raise UserError(
        f"estimated memory too large for this machine: {what}, the {kind} has "
        f"{capacity:.3g} GB (biggest items per device: {parts}; "
        f"{worst.params:,.0f} parameters on it); "
        "see `plan` for the breakdown, or pass --force to run anyway"
    )


MEMORY_RULE = Rule(check_memory)
