"""Recipe rules about this machine: output directories, and the memory of its devices.

They run with the other `train` rules (config/rules.py; the data files are checked there too)
in the launcher, before any worker starts, so that an unwritable directory or a recipe too big
for the device is one message, not a traceback from every rank or an out-of-memory kill. The
memory rule itself (`planning/fits.py`) compares `device_memory_gb` with `plan`'s memory model.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from megatron_dualpipe import te
from megatron_dualpipe.config.schema import Recipe
from megatron_dualpipe.errors import UserError


def check_output_dirs(recipe: Recipe) -> None:
    """`train.log_dir` and `train.ckpt_dir` can be created and written (tried, not guessed)."""
    for field, value in (("train.log_dir", recipe.train.log_dir),
                         ("train.ckpt_dir", recipe.train.ckpt_dir)):
        if value:
            _try_writing(field, Path(value))


def check_cuda_graph_device(recipe: Recipe) -> None:
    """`model.cuda_graphs` with `train.device=auto` on a machine without a GPU (explicit
    `train.device=cpu` is a recipe rule, `validate.check_cuda_graphs`)."""
    m = recipe.model
    if m.cuda_graphs != "none" and recipe.train.device == "auto" and not _gpu_memory_gb():
        raise UserError(f"model.cuda_graphs={m.cuda_graphs} needs a GPU and this machine has "
                        "none (nvidia-smi finds no device); allowed here: model.cuda_graphs=none")


def check_mla_device(recipe: Recipe) -> None:
    """`model.attention=mla` with `train.device=auto` on a machine without a GPU, or without
    Transformer Engine (explicit CPU or local layers: `validate_training.unsupported_for_training`).
    """
    m, device = recipe.model, recipe.train.device
    if m.attention != "mla" or device == "cpu" or m.spec == "local":
        return
    if device == "auto" and not _gpu_memory_gb():
        raise UserError("model.attention=mla needs a GPU with Transformer Engine and this machine "
                        "has no GPU (nvidia-smi finds no device); allowed here: "
                        "model.attention=mha")
    if not te.te_installed():
        raise UserError("model.attention=mla needs Transformer Engine layers, and "
                        "transformer_engine is not installed (pip install "
                        "'megatron_dualpipe[gpu]'); allowed without it: model.attention=mha")


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
