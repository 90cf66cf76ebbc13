"""megatron_dualpipe: DeepSeek-V3 training parallelism (DualPipe, EPLB, FP8) for Megatron-Core."""

__version__ = "0.1.0"


def register(schedule: str | None = None, *, zero_bubble: bool = True,
             overlap: bool = False) -> None:
    """Make Megatron-Core's `get_forward_backward_func()` return our schedule.

    `schedule` is "dualpipe" or "dualpipev" (None: read MEGATRON_DUALPIPE_SCHEDULE; unset or
    empty: Megatron's own schedules answer). Covers every binding of the name, including
    `megatron.training.training`'s. The model must be built with two chunks per rank in
    our layout (`megatron_dualpipe.model.build.build_model`).
    """
    import functools
    import os

    from megatron_dualpipe.patches import enable_schedule_selection
    from megatron_dualpipe.patches.forward_backward_func import select
    from megatron_dualpipe.schedules.registry import our_schedule
    from megatron_dualpipe.schedules.spec import OURS

    if schedule is None:
        schedule = os.environ.get("MEGATRON_DUALPIPE_SCHEDULE") or None
    if schedule is not None and schedule not in OURS:
        raise ValueError(f"schedule={schedule!r}: allowed values: {', '.join(OURS)}")
    enable_schedule_selection()
    select(None if schedule is None else functools.partial(
        our_schedule, schedule, zero_bubble=zero_bubble, overlap=overlap))
