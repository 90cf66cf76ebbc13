"""Pipeline schedules selectable from a recipe, as Megatron-Core `forward_backward_func`s."""

from __future__ import annotations

from typing import Callable

_SCHEDULES: dict[str, Callable] = {}


def register_schedule(name: str, func: Callable) -> None:
    _SCHEDULES[name] = func


def forward_backward_func(schedule: str) -> Callable:
    """The forward-backward function for `parallel.schedule`."""
    if schedule in ("1f1b", "interleaved"):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()
    if schedule not in _SCHEDULES:
        raise ValueError(
            f"parallel.schedule={schedule!r} is not available; registered: "
            f"{', '.join(['1f1b', 'interleaved', *_SCHEDULES])}"
        )
    return _SCHEDULES[schedule]
