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


def installed_version(package: str) -> Version:
    """The version of `package` ("megatron-core" or "torch") as imported in this process."""
    if package == "megatron-core":
        return megatron_version()
    if package == "torch":
        import torch

        return Version(torch.__version__.split("+")[0])
    raise ValueError(f"no version probe for {package!r}")


@dataclass
class Patch:
    """Replace attributes of one module (or class); `revert()` restores them.

    Args:
        name: short identifier, also the file name in `patches/`.
        module: dotted module path of the target, or `module:Class` for class attributes.
        replacements: attribute name -> factory returning the new value, given the original
            (or None when the attribute is absent).
        min_version / max_version: the `package` range the patch was written and tested
            for (max exclusive); applying outside it raises `RuntimeError`.
        package: whose version guards the patch ("megatron-core", or "torch" for the one
            torch target).
    """

    name: str
    module: str
    replacements: dict[str, Callable[[Any], Any]]
    min_version: str = "0.19.0"
    max_version: str = "0.20.0"
    package: str = "megatron-core"
    _saved: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def applied(self) -> bool:
        return bool(self._saved)

    def check_version(self) -> None:
        version = installed_version(self.package)
        if not Version(self.min_version) <= version < Version(self.max_version):
            raise RuntimeError(
                f"patch {self.name!r} targets {self.package}>={self.min_version},"
                f"<{self.max_version} but {version} is installed; install {self.package} "
                f">={self.min_version},<{self.max_version}"
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
            # Saved from the target's own namespace, so that reverting a method a class
            # inherits (torch.Tensor.record_stream) deletes the override instead of copying it.
            self._saved[attr] = vars(target).get(attr, _MISSING)
            original = getattr(target, attr, None)
            setattr(target, attr, make(original))

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
