"""Several training setups alive in one process group, for interleaved benchmark rounds.

Megatron-Core keeps its process groups in module globals and refuses a second
``initialize_model_parallel``. Every model built here keeps the groups it was built with (its
modules hold them); ``build_states`` clears the globals before each ``train.setup`` so the next
setup creates fresh groups over the same ranks. All recipes must therefore have the same
parallel layout (tp, pp, ep, vpp); the schedule, dispatcher, features and sizes may differ.
Steps of the variants can then alternate (round 1: a, b, c, d; round 2: a, b, ...), so drift of
the machine (clocks, other tenants) hits every variant alike.
"""

from __future__ import annotations

import gc


def _layout(recipe) -> tuple:
    p = recipe.parallel
    return (p.tp, p.pp, p.ep, p.vpp, p.num_nodes, p.nproc_per_node)


def build_states(recipes: list) -> list:
    """``train.setup`` for every recipe, in order, in this process group (see module doc)."""
    layouts = {_layout(r) for r in recipes}
    if len(layouts) > 1:
        raise ValueError(f"interleaved variants need one parallel layout, got {sorted(layouts)}")
    from megatron.core import parallel_state

    from megatron_dualpipe.train import setup

    states = []
    for recipe in recipes:
        if parallel_state.model_parallel_is_initialized():
            parallel_state.destroy_model_parallel()
        states.append(setup(recipe))
    return states


def release(states: list) -> None:
    """Drop the models and optimizers (GPU memory back before the next set of variants)."""
    import torch
    from megatron.core import parallel_state

    states.clear()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
