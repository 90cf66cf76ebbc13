"""Walk a Megatron-Core layer spec: every spec object below it, once.

Megatron-Core 0.19's specs are `ModuleSpec`s (submodules, params), `functools.partial`s (the
MoE layer), dataclass submodules and lists, so a walk looks into all of them.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator


def walk_spec(spec, seen: set | None = None) -> Iterator:
    """`spec` and every spec object below it, depth first, each once."""
    seen = set() if seen is None else seen
    if spec is None or id(spec) in seen or isinstance(spec, (str, int, float, type)):
        return
    seen.add(id(spec))
    yield spec
    if isinstance(spec, functools.partial):
        children = list(spec.args) + list(spec.keywords.values())
    elif isinstance(spec, (list, tuple)):
        children = list(spec)
    elif dataclasses.is_dataclass(spec):
        children = [getattr(spec, f.name) for f in dataclasses.fields(spec)]
    else:
        children = [getattr(spec, "submodules", None), getattr(spec, "params", None)]
    for child in children:
        yield from walk_spec(child, seen)
