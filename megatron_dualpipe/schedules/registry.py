"""Each schedule's executor: its spec's Megatron-Core `forward_backward_func`."""

from __future__ import annotations

import functools
from collections.abc import Callable

from megatron_dualpipe.errors import UserError
from megatron_dualpipe.schedules.spec import SPECS, TRAIN_SCHEDULES


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
    if schedule not in TRAIN_SCHEDULES:
        raise UserError(
            f"parallel.schedule={schedule!r}: allowed values: {', '.join(TRAIN_SCHEDULES)}"
        )
    spec = SPECS[schedule]
    if not spec.dualpipe_family:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()
    return our_schedule(spec.name, zero_bubble=zero_bubble, overlap=overlap)
