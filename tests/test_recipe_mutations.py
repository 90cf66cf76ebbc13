"""Every field of every shipped recipe, mutated: the one-message rule holds.

The schema (`config/schema.py`) is walked; each field of each recipe in `recipes/` gets a value
of the wrong type, one just out of range, null, and a huge one, and each section an unknown
key. `train` must answer a bad value with exactly one line that names the field, exit status 2,
no traceback and no worker started. A mutation that is in fact valid (null for an optional
field, a huge step count) must reach the point where workers would start, and only fields
listed in `UNBOUNDED` (or unused by the recipe) may accept a huge value.

The CLI's `main()` runs in this process (workers replaced by a sentinel) so the ~3,000 cases
take seconds; `test_through_a_real_subprocess` runs a handful as a user would.
"""

from __future__ import annotations

import contextlib
import io
import subprocess
import sys
import types
import typing
from pathlib import Path

import annotated_types as at
import pytest
from pydantic import BaseModel

from megatron_dualpipe import launch
from megatron_dualpipe.cli import main
from megatron_dualpipe.config import load_recipe, preflight
from megatron_dualpipe.config.schema import Recipe

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "recipes").glob("*.yaml"))
HUGE_INT = 10**18
HUGE_FLOAT = 1e300

# Fields where any large value is a legitimate choice (counts of steps, intervals, seeds up to
# 2**63 - 1, rates and thresholds with no natural upper limit).
UNBOUNDED = {
    "train.steps", "train.save_interval", "train.log_interval", "train.seed", "data.seed",
    "train.eval_interval", "train.eval_iters",
    "train.global_batch_size",
    "eplb.window", "eplb.interval", "optimizer.lr_warmup_steps", "optimizer.clip_grad",
    "optimizer.weight_decay", "optimizer.lr", "optimizer.min_lr", "optimizer.adam_eps",
    "eplb.min_gain", "moe.bias_update_rate", "moe.seq_aux_loss_coeff", "moe.router_bias_init",
    "moe.topk_scaling_factor", "moe.capacity_factor", "model.mtp_loss_scaling_factor",
    "model.init_method_std", "model.norm_epsilon", "model.rotary_base",
}


class Spawned(Exception):
    """Raised instead of starting workers: the recipe passed every check."""


def leaf_fields(model: type[BaseModel], prefix: str = ""):
    """(dotted path, annotation, FieldInfo) of every non-section field, depth first."""
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from leaf_fields(ann, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", ann, field


def sections(model: type[BaseModel] = Recipe, prefix: str = ""):
    yield prefix.rstrip(".")
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            yield from sections(ann, f"{prefix}{name}.")


def split_optional(ann) -> tuple[object, bool]:
    args = typing.get_args(ann)
    if typing.get_origin(ann) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True
    return ann, False


def out_of_range(base, field) -> str | None:
    """A YAML value just outside the field's numeric bounds (None: no bound)."""
    step = 1 if base is int else 1e-3
    for meta in field.metadata:
        if isinstance(meta, at.Ge):
            return str(meta.ge - step)
        if isinstance(meta, at.Gt):
            return str(meta.gt)
        if isinstance(meta, at.Lt):
            return str(meta.lt)
        if isinstance(meta, at.Le):
            return str(meta.le + step)
    return None


def mutations(path: str, ann, field):
    """(kind, YAML value, must be refused) for one field."""
    base, nullable = split_optional(ann)
    wrong = {int: "abc", float: "abc", bool: "abc", str: "[1, 2]"}.get(base)
    if wrong is None:  # a Literal, list, tuple or union: a mapping is none of them
        wrong = "[1, 2]" if typing.get_origin(base) is typing.Literal else "{a: 1}"
    yield "wrong type", wrong, True
    yield "null", "null", not nullable
    if base in (int, float):
        bound = out_of_range(base, field)
        if bound is not None:
            yield "out of range", bound, True
        yield "huge", str(HUGE_INT if base is int else HUGE_FLOAT), path not in UNBOUNDED


def unused(recipe: str, path: str) -> bool:
    """Fields the recipe does not use, where any value is harmless: MLA sizes with MHA, query
    groups with MLA, the dense FFN size without dense layers."""
    model = load_recipe(recipe).model
    mla = model.attention == "mla"
    return (path.startswith("model.mla.") and not mla or path == "model.num_query_groups" and mla
            or path == "model.ffn_hidden_size" and model.num_dense_layers == 0)


CASES = [(recipe, path, kind, value, refuse and not (kind == "huge" and unused(recipe, path)))
         for recipe in RECIPES
         for path, ann, field in leaf_fields(Recipe)
         for kind, value, refuse in mutations(path, ann, field)]
CASES += [(recipe, f"{section}.no_such_field" if section else "no_such_field", "unknown key",
           "1", True) for recipe in RECIPES for section in sections()]


def base_overrides(recipe: str) -> list[str]:
    """What makes a shipped recipe trainable on any machine: synthetic data for the recipes
    whose indexed data the user makes (`data prepare`), and no FP8 dispatch for the 671B one
    (not in Megatron-Core 0.19)."""
    loaded = load_recipe(recipe)
    return ((["data.kind=synthetic"] if loaded.data.kind == "indexed" else [])
            + (["fp8.dispatch=false"] if loaded.fp8.dispatch else []))


# A multi-node recipe passed every check when `train` says to use torchrun or Slurm.
MULTI_NODE = "start multi-node jobs with torchrun or scripts/train.sbatch"


def run_train(recipe: str, *overrides: str) -> tuple[int | str, str]:
    """`train` in this process: (exit status or "spawned", stderr)."""
    err = io.StringIO()
    overrides = (*base_overrides(recipe), *overrides)
    argv = ["train", recipe, *(a for o in overrides for a in ("--set", o))]
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status: int | str = main(argv)
        except Spawned:
            status = "spawned"
        except SystemExit as exit_:
            status = exit_.code
    if status == 2 and MULTI_NODE in err.getvalue():
        return "spawned", ""
    return status, err.getvalue()


def _spawn(*_args, **_kwargs):
    raise Spawned


@pytest.fixture(scope="module")
def no_workers():
    """No worker starts; the machine has H200s (141 GB) and Transformer Engine, wherever the
    test runs."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(launch, "spawn_local", _spawn)
        patch.setattr(preflight, "device_memory_gb", lambda recipe: ("GPU", 141.0))
        patch.setattr(preflight.te, "te_installed", lambda: True)
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID"):
            patch.delenv(var, raising=False)
        yield


@pytest.fixture(scope="module")
def baselines(no_workers):
    """What each unmutated recipe does here: "spawned", or its one error line."""
    return {recipe: run_train(recipe) for recipe in RECIPES}


def test_every_shipped_recipe_passes_unmutated(baselines):
    assert baselines == {recipe: ("spawned", "") for recipe in RECIPES}


def test_the_mutation_table_covers_every_field():
    paths = {path for path, _, _ in leaf_fields(Recipe)}
    assert {"train.steps", "moe.num_experts", "model.mla.kv_lora_rank"} <= paths
    assert {c[1] for c in CASES} >= paths and len(RECIPES) >= 8
    assert UNBOUNDED <= paths, UNBOUNDED - paths


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_mutation_of_every_field(recipe, baselines):
    failures = []
    for _, path, kind, value, refuse in (c for c in CASES if c[0] == recipe):
        status, err = run_train(recipe, f"{path}={value}")
        lines = err.splitlines()
        field = path.rsplit(".", 1)[0] if kind == "unknown key" else path
        if refuse:
            ok = (status == 2 and len(lines) == 1 and "Traceback" not in err
                  and lines[0].startswith("megatron-dualpipe train: error: ")
                  and (path in lines[0] or field in lines[0]
                       or (kind == "huge" and "estimated memory" in lines[0])))
        else:  # valid alone: behaves like the unmutated recipe, or a cross-field message
            ok = (status, err) == baselines[recipe] or (
                status == 2 and len(lines) == 1 and "Traceback" not in err)
        if not ok:
            failures.append(f"{path}={value} ({kind}): status {status}: {err.strip()[:300]}")
    assert not failures, f"{len(failures)} of them:\n" + "\n".join(failures)


@pytest.mark.parametrize("override, named", [
    ("train.steps=true", "train.steps: expected an integer, got true"),
    ("moe.num_experts=1000000000000", "moe.num_experts: Input should be less than or equal to"),
    ("model.hidden_size=1000000000000", "estimated memory too large"),
    ("parallel.pp=null", "parallel.pp"),
    ("model.no_such_field=1", "model.no_such_field: unknown field"),
])
def test_through_a_real_subprocess(tmp_path, override, named):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_dualpipe", "train", "recipes/tiny_moe_cpu.yaml",
         "--set", override, "--set", f"train.log_dir={tmp_path / 'logs'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and named in proc.stderr, proc.stderr
    assert "step" not in proc.stdout  # no worker trained
