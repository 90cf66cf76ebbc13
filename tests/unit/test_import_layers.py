"""Imports run down the layers of docs/architecture.md, never up.

Every module of the package belongs to one layer (exact names before `folder.*` patterns); a
module may import (at module level or inside a function) only modules of its own layer or
below. A new module must be given a layer here and in docs/architecture.md.
"""

from __future__ import annotations

import ast
from fnmatch import fnmatchcase
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "megatron_dualpipe"

# Lowest first. Names are relative to megatron_dualpipe.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("foundation", ("errors", "te", "hooks", "schedules", "schedules.spec", "eplb.placement",
                    "eplb.placement.*", "patches.base", "patches.cpu_torch",
                    "patches.cpu_tensor_types", "cli_args", "tokenizer_files")),
    ("recipe", ("config", "config.*", "fp8.env_check", "fp8.overrides", "token_schedules")),
    ("components", ("schedules.*", "patches", "patches.*", "model", "model.*", "eplb", "eplb.*",
                    "fp8", "fp8.*", "data", "data.*", "distributed", "console", "lr_scheduler",
                    "metrics", "profiling", "planning", "planning.*", "checkpoint_files",
                    "lifetime")),
    ("train loop", ("train", "checkpoint", "features", "evaluate")),
    ("entry points", ("__init__", "__main__", "cli", "launch", "plan", "in_process", "testing",
                      "trace", "trace.*", "trace_analysis", "catalogue", "plot")),
]

# Known upward imports (none now; list ("module", "target") pairs here, and in
# docs/architecture.md, only with the reason and the plan to remove them).
KNOWN_UPWARD: set[tuple[str, str]] = set()


def layer_of(name: str) -> int:
    for exact in (True, False):
        for level, (_, patterns) in enumerate(LAYERS):
            for pattern in patterns:
                if ("*" in pattern) != exact and fnmatchcase(name, pattern):
                    return level
    raise AssertionError(f"megatron_dualpipe.{name} has no layer: add it to LAYERS and to "
                         "docs/architecture.md")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def exists(name: str) -> bool:
    base = PACKAGE.joinpath(*name.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imported(tree: ast.AST) -> set[str]:
    """Package modules a file imports (`from pkg import module` names the module)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.startswith("megatron_dualpipe."):
                rel = name[len("megatron_dualpipe."):]
                if exists(rel):
                    found.add(rel)
    # `from pkg.sub import module` counts as the module, not also as the package `pkg.sub`
    return {n for n in found if not any(m.startswith(n + ".") for m in found)}


def test_every_module_has_a_layer_and_imports_only_downwards():
    upward = []
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        level = layer_of(name)
        for target in sorted(imported(ast.parse(path.read_text()))):
            if layer_of(target) > level and (name, target) not in KNOWN_UPWARD:
                upward.append(f"{name} ({LAYERS[level][0]}) imports {target} "
                              f"({LAYERS[layer_of(target)][0]})")
    assert not upward, "imports that run up a layer:\n" + "\n".join(upward)


# Features join the loop through hooks.TrainHook; features.py is the one module that picks them.
FEATURES = ("eplb", "eplb.*", "metrics", "profiling")


def test_the_loop_and_the_checkpoint_import_no_feature():
    for name in ("train", "checkpoint"):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text())
        found = sorted(t for t in imported(tree) if any(fnmatchcase(t, f) for f in FEATURES))
        assert not found, f"{name}.py imports feature modules {found}: go through features.py"

def test_the_checker_sees_an_upward_import():
    tree = ast.parse("from megatron_dualpipe import train\n")
    assert imported(tree) == {"train"}
    assert layer_of("train") > layer_of("config.schema")
    assert layer_of("eplb.placement.planner") < layer_of("eplb.training")


def uses_benchmarks(tree: ast.AST) -> bool:
    """Imports `benchmarks` or names its folder (`ROOT / "benchmarks" / ...` runs a script)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            names = [node.value] if node.value == "benchmarks" else []
        else:
            continue
        if any(n == "benchmarks" or n.startswith("benchmarks.") for n in names):
            return True
    return False


def test_tests_use_nothing_from_benchmarks():
    """Tests of a benchmark live next to it, in benchmarks/tests/ (this file names the folder
    in its checks)."""
    found = [str(path.relative_to(ROOT)) for path in sorted((ROOT / "tests").rglob("*.py"))
             if path != Path(__file__).resolve() and uses_benchmarks(ast.parse(path.read_text()))]
    assert not found, "tests that import or run benchmarks/ code: " + ", ".join(found)


def test_the_checker_sees_a_benchmarks_import():
    for source in ("from benchmarks import overlap_bench\n", "import benchmarks.speed.flops\n",
                   "from benchmarks.eplb_scenarios import apply\n",
                   "script = ROOT / 'benchmarks' / 'calibrate_layer.py'\n"):
        assert uses_benchmarks(ast.parse(source)), source
    assert not uses_benchmarks(ast.parse("msg = 'see benchmarks/deepep/build_on_gpu.sh'\n"))
