"""Shared constants (shapes, recipes, result tag) and helpers of the fp8_bench GPU workers:
CUDA-event timing, relative error, TE recipes and autocast, environment variables, machine
information."""

from __future__ import annotations

import contextlib
import inspect
import platform
import statistics
from pathlib import Path

from ..portable import portable

ROOT = Path(__file__).resolve().parents[2]

RESULT_TAG = "FP8_BENCH_RESULT "
TARGET_SPEEDUP = 1.3
FP8_RECIPES = ("delayed", "current", "blockwise")

# (label, tokens M, in K, out N): DeepSeek-V3 hidden 7168, dense/shared FFN 18432, MLA.
DENSE_SHAPES = [
    ("dense/shared FFN fc1 7168->18432", 4096, 7168, 18432),
    ("dense/shared FFN fc2 18432->7168", 4096, 18432, 7168),
    ("MLA q_down 7168->1536", 4096, 7168, 1536),
    ("MLA kv_down 7168->576", 4096, 7168, 576),
    ("MLA q_up 1536->24576", 4096, 1536, 24576),
    ("MLA kv_up 512->32768", 4096, 512, 32768),
    ("attn out 16384->7168", 4096, 16384, 7168),
]
# (label, in K, out N) per expert; expert FFN 2048.
GROUPED_SHAPES = [("expert fc1 7168->2048", 7168, 2048), ("expert fc2 2048->7168", 2048, 7168)]


def time_cuda(fn, warmup: int, iters: int) -> dict:
    """Median / min / max milliseconds of `fn()` by CUDA events, after `warmup` calls."""
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    ms = sorted(s.elapsed_time(e) for s, e in zip(starts, ends, strict=True))
    return {"ms": statistics.median(ms), "min_ms": ms[0], "max_ms": ms[-1]}


def rel_err(out, ref) -> float:
    out, ref = out.float(), ref.float()
    if not bool(out.isfinite().all()):
        return float("nan")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def _short(err: BaseException) -> str:
    text = portable(f"{type(err).__name__}: {err}").replace("\n", " ").replace("|", "/")
    return text if len(text) <= 160 else text[:157] + "..."


def te_recipe(name: str):
    """A TE recipe object for `name` (None for bf16), as Megatron-Core builds it."""
    if name == "bf16":
        return None
    from transformer_engine.common import recipe as R

    if name == "delayed":
        return R.DelayedScaling(fp8_format=R.Format.HYBRID, amax_history_len=1,
                                amax_compute_algo="most_recent")
    if name == "current":
        return R.Float8CurrentScaling(fp8_format=R.Format.E4M3)
    if name == "blockwise":
        return R.Float8BlockScaling(fp8_format=R.Format.E4M3)
    raise ValueError(name)


def te_autocast(recipe):
    """`te.pytorch.autocast(recipe=...)` (TE >= 2.x) or `fp8_autocast`; nullcontext for BF16."""
    if recipe is None:
        return contextlib.nullcontext()
    import transformer_engine.pytorch as te

    autocast = getattr(te, "autocast", None)
    if autocast is not None and "recipe" in inspect.signature(autocast).parameters:
        return autocast(enabled=True, recipe=recipe)
    return te.fp8_autocast(enabled=True, fp8_recipe=recipe)


def machine_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count, memory_gb=round(props.total_memory / 2**30))
    from megatron_dualpipe.te import te_version

    info["transformer_engine"] = te_version()
    try:
        import transformer_engine.pytorch  # noqa: F401 - loads TE's core library first
        import transformer_engine_torch as tex

        v = int(tex.get_cublasLt_version())
        info["cublaslt"] = f"{v // 10000}.{v // 100 % 100}.{v % 100}"
    except Exception as err:  # noqa: BLE001 - informational only
        info["cublaslt"] = f"unknown ({type(err).__name__})"
    try:
        import importlib.metadata as md

        info["megatron_core"] = md.version("megatron-core")
    except Exception:  # noqa: BLE001
        info["megatron_core"] = None
    return info
