"""Which optional features a recipe turns on: the router class and the `TrainHook`s they need.

The one place that imports feature packages for the training loop; `train.py` and
`checkpoint.py` only see `hooks.TrainHook`.
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
