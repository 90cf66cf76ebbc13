"""Training in this process (world size 1): `run_training` for benchmarks and the GPU tests.

    result = run_training(recipe, steps=20)   # {"losses", "step_times_s", "max_memory_gb", ...}
"""

from __future__ import annotations

import contextlib
import gc
import os
import time


@contextlib.contextmanager
def env_vars(values: dict):
    """Set environment variables inside the block; restore (or remove) them after."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def cache_batches(source, steps) -> None:
    """Build the micro-batches of `steps` now, so data generation stays out of step timings."""
    cache = {(s, m): source.batch(s, m) for s in steps for m in range(source.num_microbatches)}
    original = source.batch
    source.batch = lambda step, mb: cache[(step, mb)] if (step, mb) in cache else original(
        step, mb)


def single_process_env() -> None:
    """RANK/WORLD_SIZE/MASTER_* for a world of one process (kept if already set)."""
    from megatron_dualpipe.launch import free_port

    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))


def _release(state) -> None:
    import torch
    from megatron.core import parallel_state

    from megatron_dualpipe.model.cuda_graphs import release_cuda_graphs

    release_cuda_graphs(state.config)
    for name in ("model", "optimizer", "scheduler", "config"):
        setattr(state, name, None)
    parallel_state.destroy_model_parallel()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_training(recipe, steps: int, *, cache: bool = False, after=None) -> dict:
    """Train `recipe` for `steps` steps in this process (world size 1, the process group is
    kept for further runs; model parallel state is torn down at the end).

    Checks the FP8 environment first, times every step
    (synchronized). `after(state, source)` runs before teardown; its result is returned.
    Returns {"losses", "step_times_s", "max_memory_gb", "after"}.
    """
    import torch

    from megatron_dualpipe import train as T
    from megatron_dualpipe.data import make_source
    from megatron_dualpipe.fp8 import check_fp8_environment, fp8_environment_variables

    check_fp8_environment(recipe)
    single_process_env()
    state = None
    with env_vars(fp8_environment_variables(recipe)):
        try:
            if torch.cuda.is_available():
                torch.cuda.reset_peak_memory_stats()
            state = T.setup(recipe)
            source = make_source(recipe, 0, state.device)
            if cache:
                cache_batches(source, range(steps))
            losses, times = [], []
            for step in range(steps):
                if state.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                record = T.train_step(state, source, step)
                times.append(time.perf_counter() - start)
                losses.append(record["loss"])
            result = after(state, source) if after is not None else None
            memory = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0
            return {"losses": losses, "step_times_s": times, "max_memory_gb": memory,
                    "after": result}
        finally:
            if state is not None:
                _release(state)
