"""Recipe rules about this machine: output directories, memory per device.

They run with the other `train` rules (config/rules.py; the data files are checked there too)
in the launcher, before any worker starts, so that an unwritable directory or a recipe too big
for the device is one message, not a traceback from every rank or an out-of-memory kill.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from megatron_dualpipe.config.schema import Recipe
from megatron_dualpipe.errors import UserError


def check_output_dirs(recipe: Recipe) -> None:
    """`train.log_dir` and `train.ckpt_dir` can be created and written (tried, not guessed)."""
    for field, value in (("train.log_dir", recipe.train.log_dir),
                         ("train.ckpt_dir", recipe.train.ckpt_dir)):
        if value:
            _try_writing(field, Path(value))


def _try_writing(field: str, path: Path) -> None:
    if path.exists() and not path.is_dir():
        raise UserError(f"{field}={path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write_test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise UserError(f"{field}={path}: cannot write there: {err.strerror or err}") from None


# ---------------------------------------------------------------------------- memory


def device_memory_gb(recipe: Recipe) -> tuple[str, float] | None:
    """(what, GB) the recipe's ranks may use on one device, or None when unknown.

    GPU: the smallest GPU's memory (nvidia-smi; no CUDA context is created here). CPU: the
    host's memory, shared by the ranks of this node.
    """
    want = recipe.train.device
    gpus = _gpu_memory_gb() if want in ("auto", "cuda") else []
    if gpus:
        return "GPU", min(gpus)
    if want == "cuda":
        return None
    try:
        import psutil
    except ImportError:
        return None
    return "host", psutil.virtual_memory().total / 1e9


def _gpu_memory_gb() -> list[float]:
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True,
                             text=True, timeout=20, check=True).stdout
        return [float(line) * 2**20 / 1e9 for line in out.split()]
    except (OSError, subprocess.SubprocessError, ValueError):
        return []


def estimate_gb(recipe: Recipe):
    """The memory model of `plan` (planning/memory.py): one `RankMemory` per pipeline rank.

    Activations peak within the first few micro-batches per rank (warm-up), so a step of very
    many is walked with `pp x (chunks + 3)` of them: same peak, bounded time.
    """
    from megatron_dualpipe.config.validate import num_microbatches
    from megatron_dualpipe.planning import memory, pipeline_ranks, simulate_recipe

    p = recipe.parallel
    enough = p.pp * ((p.vpp or 2) + 3)
    actions, sim = simulate_recipe(recipe, microbatches=min(num_microbatches(recipe), enough))
    return [memory.rank_memory(recipe, r, actions[r.pp_rank],
                               sim.peak_activations_per_rank[r.pp_rank])
            for r in pipeline_ranks(recipe)]


def check_memory(recipe: Recipe) -> None:
    """Refuse a recipe whose estimated memory exceeds the device (`train --force` skips this).

    On a GPU the largest pipeline rank must fit one GPU; on the CPU every rank of this node
    shares the host's memory.
    """
    device = device_memory_gb(recipe)
    if device is None:
        return
    kind, capacity = device
    ranks = estimate_gb(recipe)
    worst = max(ranks, key=lambda r: r.total)
    if kind == "GPU":
        need, what = worst.total, f"pipeline rank {worst.pp_rank} needs {worst.total:.3g} GB"
    else:
        from megatron_dualpipe.config.validate import world_size

        per_node = world_size(recipe) // recipe.parallel.num_nodes
        share = per_node / len(ranks)  # processes per pipeline rank on this node
        need = sum(r.total for r in ranks) * share
        what = (f"{per_node} processes need {need:.3g} GB (pipeline rank {worst.pp_rank}: "
                f"{worst.total:.3g} GB)")
    if need <= capacity:
        return
    items = {"weights": worst.weights, "gradients": worst.grads, "optimizer": worst.optimizer,
             "fp8 weights": worst.fp8_weights, "activations": worst.activations}
    biggest = sorted(items.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{name} {gb:.3g} GB" for name, gb in biggest)
    raise UserError(
        f"estimated memory too large for this machine: {what}, the {kind} has "
        f"{capacity:.3g} GB (biggest items per device: {parts}; "
        f"{worst.params:,.0f} parameters on it); "
        "see `plan` for the breakdown, or pass --force to run anyway"
    )
