"""`get_forward_backward_func()` returns DualPipe/DualPipeV when one is selected.

Target: `megatron.core.pipeline_parallel.schedules.get_forward_backward_func` and the names
bound to it by `from ... import get_forward_backward_func` in
`megatron.core.pipeline_parallel` and (when importable) `megatron.training.training`, so that
Megatron's own training loop and ours pick the selected schedule. With no schedule
selected, the original function answers.
"""

from __future__ import annotations

import importlib

from megatron_dualpipe.patches.base import Patch

BINDINGS = (
    "megatron.core.pipeline_parallel.schedules",
    "megatron.core.pipeline_parallel",
    "megatron.training.training",
)

_selected: dict = {}


def select(factory=None) -> None:
    """Answer with `factory()` (a zero-argument callable); None: the original answers again."""
    _selected.clear()
    if factory is not None:
        _selected.update(factory=factory)


def _make(original):
    def get_forward_backward_func(*args, **kwargs):
        if _selected:
            return _selected["factory"]()
        return original(*args, **kwargs)

    get_forward_backward_func.__wrapped__ = original
    return get_forward_backward_func


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # megatron.training needs Python >= 3.12 and is optional
        return False
    return True


def make_patches() -> list[Patch]:
    return [
        Patch(name="forward_backward_func", module=module,
              replacements={"get_forward_backward_func": _make})
        for module in BINDINGS
        if _importable(module)
    ]
