"""Write the runtime patches as unified diffs against the installed Megatron-Core's source.

    python -m megatron_dualpipe.patches.export_diffs patches/

One `NN-<name>.diff` per entry of `PATCHES` whose target is Megatron-Core source, with paths
`a/megatron/core/...` so that `patch -p1` applies it in a Megatron-LM checkout (or in
site-packages). Each diff appends, to the end of the target module, what the runtime patch
does there: the replacement function's own source (rendered with `inspect`), a wrapper's
`original` renamed to the saved original, and the rebinding of the target name. Names the
replacement takes from this package are imported from it. `cpu-only` patches are put under
``if not torch.cuda.is_available():``, as the runtime applies them. `record_stream` (a torch
target, scoped to one call) has no Megatron-Core source and is not exported.

The diffs form a series (several append to the same module): the `feature` ones come first
and apply to the pristine release; each `cpu-only` one applies on top of those numbered
before it.
"""

from __future__ import annotations

import argparse
import builtins
import difflib
import importlib
import inspect
import io
import textwrap
import tokenize
import types
from pathlib import Path

from megatron_dualpipe.patches import PATCHES, PatchEntry, patches_of
from megatron_dualpipe.patches.base import Patch

HEADER = "# megatron_dualpipe patch {name} ({condition}): see megatron_dualpipe/patches/{name}.py"


def exportable(entry: PatchEntry) -> bool:
    return all(p.package == "megatron-core" for p in patches_of(entry.name))


def _module_and_class(patch: Patch):
    module_name, _, cls = patch.module.partition(":")
    return importlib.import_module(module_name), cls


def _defined_elsewhere(patch: Patch, others: list[Patch]) -> bool:
    """A binding imported from another patched module of the same entry (follows it)."""
    module, cls = _module_and_class(patch)
    if cls:
        return False
    for attr in patch.replacements:
        home = getattr(getattr(module, attr), "__module__", module.__name__)
        if home != module.__name__ and any(o.module == home for o in others):
            return True
    return False


def _rename(source: str, names: dict[str, str]) -> str:
    """`source` with the identifiers in `names` renamed (tokens, not text: strings stay)."""
    tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
    renamed = [t._replace(string=names.get(t.string, t.string)) if t.type == tokenize.NAME
               else t for t in tokens]
    return tokenize.untokenize(renamed)


def _render(patch: Patch, attr: str, module, cls: str) -> list[str]:
    """The source lines that make `attr` of the target what the runtime patch makes it."""
    owner = getattr(module, cls) if cls else module
    original = getattr(owner, attr)
    value = patch.replacements[attr](original)
    target = f"{cls}.{attr}" if cls else attr
    saved = f"_{cls}_{attr}_original" if cls else f"_{attr}_original"
    if not isinstance(value, types.FunctionType):
        home, var = _home(value)
        return [f"from {home} import {var} as {attr}"]
    code = value.__code__
    names = {}
    for var, cell in zip(code.co_freevars, value.__closure__ or ()):
        if cell.cell_contents is not original:
            raise TypeError(f"{patch.name}: closure variable {var!r} is not the original")
        names[var] = saved
    name = f"_{cls}_{attr}" if cls else attr
    names[code.co_name] = name
    source = _rename(textwrap.dedent(inspect.getsource(code)), names)
    ours = value.__globals__
    lines = []
    for n in _global_names(source):
        obj = ours.get(n)
        if n not in ours or n in vars(module) or hasattr(builtins, n):
            continue
        if isinstance(obj, types.ModuleType):
            lines.append(f"import {obj.__name__}" if obj.__name__ == n
                         else f"import {obj.__name__} as {n}")
        else:
            lines.append(f"from {getattr(obj, '__module__', None) or ours['__name__']} import {n}")
    if code.co_freevars:
        lines.append(f"{saved} = {target}")
    lines += source.rstrip("\n").splitlines()
    for key, val in vars(value).items():
        if key == "__wrapped__" and val is original and "functools.wraps" not in source:
            lines.append(f"{name}.__wrapped__ = {saved}")
        elif isinstance(val, (bool, int, str)) and not key.startswith("__"):
            lines.append(f"{name}.{key} = {val!r}")
    if name != target:
        lines.append(f"{target} = {name}")
    return lines


def _home(value) -> tuple[str, str]:
    """(module, name) of this package that holds `value` (an object, not a function)."""
    import sys

    for module_name, module in sorted(sys.modules.items()):
        if module_name.startswith("megatron_dualpipe.patches.") and module is not None:
            for var, obj in vars(module).items():
                if obj is value and not var.startswith("__"):
                    return module_name, var
    raise TypeError(f"cannot render a {type(value).__name__} replacement")


def _global_names(source: str) -> list[str]:
    """Names a function's source reads (decorators included), in order of first use."""
    import ast

    seen: list[str] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id not in seen:
            seen.append(node.id)
    return seen


def _block(entry: PatchEntry, patch: Patch, module) -> list[str]:
    _, cls = _module_and_class(patch)
    body: list[str] = []
    for attr in patch.replacements:
        body += _render(patch, attr, module, cls)
    header = HEADER.format(name=entry.name, condition=entry.condition)
    if entry.condition.startswith("cpu-only"):
        torch_name = "torch" if "torch" in vars(module) else "__import__('torch')"
        body = [f"if not {torch_name}.cuda.is_available():"] + \
               [f"    {line}" if line else "" for line in body]
    return ["", "", header] + body


def export_order() -> list[PatchEntry]:
    """Exported entries, `feature` ones first: they apply to the pristine release; each
    `cpu-only` one applies on top of those before it (a series, as `git format-patch`)."""
    entries = [e for e in PATCHES if exportable(e)]
    return sorted(entries, key=lambda e: e.condition != "feature")


def relative_path(module) -> str:
    """`megatron/core/...py` (as in a Megatron-LM checkout) of a Megatron-Core module."""
    parts = Path(inspect.getsourcefile(module)).parts
    return "/".join(parts[parts.index("megatron"):])


def render_series() -> dict[str, str]:
    """File name (`NN-<name>.diff`) -> unified diff, for the whole series in order."""
    from megatron.core import package_info

    version = package_info.__version__.split("+")[0]
    current: dict[str, str] = {}  # module name -> source after the diffs so far
    series = {}
    for number, entry in enumerate(export_order(), 1):
        patches = patches_of(entry.name)
        before = {}
        for patch in patches:
            if _defined_elsewhere(patch, patches):
                continue
            module, _ = _module_and_class(patch)
            name = module.__name__
            if name not in current:
                current[name] = Path(inspect.getsourcefile(module)).read_text()
            before.setdefault(name, current[name])
            current[name] = current[name].rstrip("\n") + "\n" + "\n".join(
                _block(entry, patch, module)) + "\n"
        chunks = [f"# megatron_dualpipe patch {entry.name} ({entry.condition}) for "
                  f"megatron-core {version}; `patch -p1` in a Megatron-LM checkout, after the "
                  f"files numbered below {number:02d}\n"]
        for name, old in before.items():
            rel = relative_path(importlib.import_module(name))
            chunks += difflib.unified_diff(old.splitlines(keepends=True),
                                           current[name].splitlines(keepends=True),
                                           fromfile=f"a/{rel}", tofile=f"b/{rel}")
        series[f"{number:02d}-{entry.name}.diff"] = "".join(chunks)
    return series


def export(out_dir: Path) -> list[Path]:
    """Write the series into `out_dir` (old `.diff` files there are removed first)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("*.diff"):
        old.unlink()
    written = []
    for name, text in render_series().items():
        (out_dir / name).write_text(text)
        written.append(out_dir / name)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m megatron_dualpipe.patches.export_diffs",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path, help="folder for the .diff files")
    args = parser.parse_args(argv)
    for path in export(args.out_dir):
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
