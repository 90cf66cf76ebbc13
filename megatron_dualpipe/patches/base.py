"""A small, reversible, version-guarded monkey patch of one Megatron-Core target."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

from packaging.version import Version

_MISSING = object()


def megatron_version() -> Version:
    from megatron.core import package_info

    return Version(package_info.__version__)


@dataclass
class Patch:
    """Replace attributes of one Megatron-Core module; `revert()` restores them.

    Args:
        name: short identifier, also the file name in `patches/`.
        module: dotted module path of the target, or `module:Class` for class attributes.
        replacements: attribute name -> factory returning the new value, given the original
            (or None when the attribute is absent).
        min_version / max_version: the Megatron-Core range the patch was written and tested
            for (max exclusive); applying outside it raises `RuntimeError`.
    """

    name: str
    module: str
    replacements: dict[str, Callable[[Any], Any]]
    min_version: str = "0.19.0"
    max_version: str = "0.20.0"
    _saved: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def applied(self) -> bool:
        return bool(self._saved)

    def check_version(self) -> None:
        version = megatron_version()
        if not Version(self.min_version) <= version < Version(self.max_version):
            raise RuntimeError(
                f"patch {self.name!r} targets megatron-core>={self.min_version},"
                f"<{self.max_version} but {version} is installed; install megatron-core 0.19.x"
            )

    def target(self):
        module, _, cls = self.module.partition(":")
        target = importlib.import_module(module)
        return getattr(target, cls) if cls else target

    def apply(self) -> None:
        if self.applied:
            return
        self.check_version()
        target = self.target()
        for attr, make in self.replacements.items():
            original = getattr(target, attr, _MISSING)
            self._saved[attr] = original
            setattr(target, attr, make(None if original is _MISSING else original))

    def revert(self) -> None:
        if not self.applied:
            return
        target = self.target()
        for attr, original in self._saved.items():
            if original is _MISSING:
                delattr(target, attr)
            else:
                setattr(target, attr, original)
        self._saved.clear()
