"""Every recipe rule, in one list, and the one entry that runs them: `check_recipe`.

`load_recipe` runs `RECIPE_RULES` (any use of a recipe); the `train` command runs all `RULES`
once, in the launcher, before any worker process starts. A rule raises `UserError` naming the
recipe field and what would be valid, and may return warnings. To add a rule, write the
function and append a `Rule` to the list it belongs to; a rule that needs the recipe's path
(files named relative to it) sets `needs_source` and is called as `check(recipe, source)`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from megatron_dualpipe.config import preflight as P
from megatron_dualpipe.config import validate as V
from megatron_dualpipe.config import validate_training as T
from megatron_dualpipe.config.data_files import check_indexed_data
from megatron_dualpipe.config.dispatcher import check_dispatcher, check_dispatcher_installed
from megatron_dualpipe.config.expert_gemm import check_expert_gemm, check_expert_gemm_installed
from megatron_dualpipe.errors import UserError

if TYPE_CHECKING:
    from megatron_dualpipe.config.schema import Recipe


@dataclass(frozen=True)
class Rule:
    """One recipe check: `check(recipe)` (or `check(recipe, source)`) -> None or warnings."""

    check: Callable
    needs_source: bool = False

    def __call__(self, recipe: Recipe, source: str | None) -> list[str]:
        found = self.check(recipe, source) if self.needs_source else self.check(recipe)
        return list(found or [])


def refuse_unsupported(recipe: Recipe) -> None:
    """What `plan` accepts but `train` cannot run (`validate_training.unsupported_for_training`)."""
    unsupported = T.unsupported_for_training(recipe)
    if unsupported:
        raise UserError("; ".join(unsupported))


# Cross-field rules of the recipe alone, in the order a user would fix them.
RECIPE_RULES: list[Rule] = [
    Rule(V.check_parallel),
    Rule(V.check_stage_split),
    Rule(V.check_moe),
    Rule(check_dispatcher),
    Rule(V.check_batch),
    Rule(V.check_eplb),
    Rule(V.check_fp8),
    Rule(check_expert_gemm),
    Rule(V.check_fusions),
    Rule(V.check_cuda_graphs),
]

# Rules only `train` enforces (`plan` reports them as warnings instead).
TRAIN_RULES: list[Rule] = [
    Rule(refuse_unsupported),
    Rule(T.check_token_schedules),
    Rule(T.check_moment_dtype),
    Rule(T.check_recompute),
    Rule(T.check_batch_ramp),
    Rule(check_dispatcher_installed),
    Rule(check_expert_gemm_installed),
    Rule(check_indexed_data),
]

RULES: list[Rule] = [*RECIPE_RULES, *TRAIN_RULES]

# Rules about this machine (config/preflight.py); `train` runs them before it starts workers.
MACHINE_RULES: list[Rule] = [Rule(P.check_output_dirs), Rule(P.check_cuda_graph_device),
                              Rule(P.check_mla_device)]


def launch_rules(memory: Rule | None = None) -> list[Rule]:
    """What `train` checks before any worker starts (after the schema and `RECIPE_RULES`).

    `memory` is the memory estimate against the device (`planning.fits.MEMORY_RULE`, built on
    `plan`'s model, a layer above config): the launcher passes it unless `train --force`.
    """
    return [*TRAIN_RULES, *MACHINE_RULES, *([memory] if memory is not None else [])]


def check_recipe(recipe: Recipe, source: str | None = None,
                 rules: list[Rule] | None = None) -> list[str]:
    """Run `rules` (default: all `RULES`) in order; raises the first `UserError`, returns the
    warnings. `source` is the recipe's path, for rules that read files named relative to it."""
    warnings: list[str] = []
    for rule in RULES if rules is None else rules:
        warnings += rule(recipe, source)
    return warnings
