"""Which optional features a recipe turns on: the router class and the `TrainHook`s they need.

The one place that imports feature packages for the training loop; `train.py` and
`checkpoint.py` only see `hooks.TrainHook`. `extensions` gives the model's hooks (`setup`),
`run_hooks` those of a `train` run (profiler, metrics), which setup-and-step callers such as
the benchmarks do without.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_dualpipe.config.schema import Recipe
    from megatron_dualpipe.hooks import TrainHook


def extensions(recipe: Recipe) -> tuple[object, list[TrainHook]]:
    """The router class (None: Megatron's) and the hooks of the recipe's optional features."""
    router_cls, hooks = None, []
    if recipe.eplb.enabled:
        from megatron_dualpipe.eplb.training import make_extension

        router_cls, hook = make_extension(recipe)
        hooks.append(hook)
    return router_cls, hooks


def run_hooks(recipe: Recipe, rank: int, device, resume_step: int) -> list[TrainHook]:
    """The hooks of a `train` run from `resume_step`: the profiler window of
    `train.profile_steps` (when set) and the metrics (written by global rank 0)."""
    from megatron_dualpipe.metrics import MetricsHook

    train = recipe.train
    metrics = MetricsHook(train.log_dir, train.steps, rank == 0, resume_step=resume_step,
                          tensorboard=train.tensorboard)
    if not train.profile_steps:
        return [metrics]
    from megatron_dualpipe.profiling import ProfilerHook

    # first: its trace is written before the metrics' end summary is printed
    return [ProfilerHook(train.profile_steps, train.log_dir, rank, device), metrics]
