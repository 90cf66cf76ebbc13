"""Pipeline schedules selectable from a recipe, as Megatron-Core `forward_backward_func`s."""

from __future__ import annotations

import functools
from collections.abc import Callable

OURS = ("dualpipe", "dualpipev")
SCHEDULES = ("1f1b", "interleaved", *OURS)


def our_schedule(name: str, *, zero_bubble: bool = True, overlap: bool = False) -> Callable:
    """DualPipe/DualPipeV with Megatron's keyword signature (options bound)."""
    from megatron_dualpipe.patches import enable_deferred_wgrad
    from megatron_dualpipe.schedules.dualpipe import (
        forward_backward_dualpipe,
        forward_backward_dualpipev,
    )

    if zero_bubble:
        enable_deferred_wgrad()
    func = {"dualpipe": forward_backward_dualpipe, "dualpipev": forward_backward_dualpipev}[name]
    return functools.partial(func, zero_bubble=zero_bubble, overlap=overlap)


def forward_backward_func(schedule: str, *, zero_bubble: bool = True,
                          overlap: bool = False) -> Callable:
    """The forward-backward function for `parallel.schedule`."""
    if schedule in ("1f1b", "interleaved"):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()
    if schedule not in OURS:
        raise ValueError(
            f"parallel.schedule={schedule!r}: allowed values: {', '.join(SCHEDULES)}"
        )
    return our_schedule(schedule, zero_bubble=zero_bubble, overlap=overlap)
