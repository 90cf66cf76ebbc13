"""DualPipe(V) refreshes each chunk's FP8 weight cache once per step, as Megatron's schedules do.

Transformer Engine quantizes a weight to FP8 on a module's first micro-batch and reuses that
copy while `is_first_microbatch` stays false; Megatron's schedules call
`model.set_is_first_microbatch()` on each chunk's first forward of a step. Without it an FP8
run would keep multiplying with the first step's weights. CPU gloo: every chunk's
`set_is_first_microbatch` is counted per call, for the plain and the fused (F&B) executors.
"""

from __future__ import annotations

from functools import partial

import pytest

from megatron_dualpipe.testing import run_distributed

pytestmark = pytest.mark.slow


def count_refreshes(overrides: list[str], overlap: bool, num_calls: int) -> dict:
    import torch.distributed as dist
    from test_overlap_exact import tagged_forward_step

    from megatron_dualpipe import train as train_mod
    from megatron_dualpipe.config import load_recipe
    from megatron_dualpipe.data import make_source
    from megatron_dualpipe.distributed import destroy_distributed
    from megatron_dualpipe.schedules import registry

    def forced(schedule, *, zero_bubble=True, **_):
        return registry.forward_backward_func(schedule, zero_bubble=zero_bubble, overlap=overlap)

    train_mod.forward_backward_func = forced
    recipe = load_recipe("recipes/tiny_moe_cpu.yaml", overrides)
    state = train_mod.setup(recipe)
    source = make_source(recipe, train_mod._dp_rank(), state.device)
    counts: list[list[int]] = []

    def counter(i: int):
        def count() -> None:
            counts[-1][i] += 1
        return count

    for i, chunk in enumerate(state.model):
        chunk.set_is_first_microbatch = counter(i)
    for call in range(num_calls):
        counts.append([0] * len(state.model))
        train_mod.train_step(state, source, call, forward_only=call == 0,
                             forward_step_func=partial(tagged_forward_step, []))
    rank = dist.get_rank()
    destroy_distributed()
    return {"rank": rank, "counts": counts}


@pytest.mark.parametrize("schedule,overlap", [("dualpipev", False), ("dualpipev", True),
                                              ("dualpipe", False)])
def test_each_chunk_refreshes_its_fp8_weights_once_per_step(schedule, overlap):
    overrides = [f"parallel.schedule={schedule}", "parallel.pp=2", "parallel.ep=1"]
    results = run_distributed(count_refreshes, 2, (overrides, overlap, 3), timeout=300)
    for r in results:
        # call 0 is forward-only (no first_val_step: refresh too), calls 1-2 train
        assert r["counts"] == [[1, 1]] * 3, r
