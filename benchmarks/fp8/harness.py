"""Single-process training harness of fp8_bench (also used by tests/test_fp8_gpu.py and
tests/test_gpu_training.py): vectorized synthetic data, cached batches, `run_training`."""

from __future__ import annotations

import gc
import os
import time

from .common import env_vars


def fast_synthetic_sample(tokens):
    """A vectorized `SyntheticTokens.sample`, bit-identical (same generator draws), ~1 ms for
    4096 tokens instead of ~30 ms for the per-token Python loop."""
    import numpy as np
    import torch

    successor = tokens.successor.numpy()

    def sample(index: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(tokens.seed * 1_000_003 + index)
        n = tokens.seq_length + 1
        reset = (torch.rand(n, generator=g) < tokens.noise).numpy()
        random_tokens = torch.randint(0, tokens.vocab_size, (n,), generator=g).numpy()
        reset[0] = True
        pos = np.arange(n)
        start = np.maximum.accumulate(np.where(reset, pos, 0))
        distance = pos - start
        out = random_tokens[start]
        for k in range(int(distance.max())):
            moving = distance > k
            out[moving] = successor[out[moving]]
        return torch.from_numpy(out)

    return sample


def use_fast_synthetic(source) -> None:
    """Swap a synthetic source's sampler for the vectorized one (indexed data: unchanged)."""
    from megatron_dualpipe.data import SyntheticTokens

    if isinstance(source.tokens, SyntheticTokens):
        source.tokens.sample = fast_synthetic_sample(source.tokens)


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

    for name in ("model", "optimizer", "scheduler", "config"):
        setattr(state, name, None)
    parallel_state.destroy_model_parallel()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_training(recipe, steps: int, *, cache: bool = False, after=None) -> dict:
    """Train `recipe` for `steps` steps in this process (world size 1, the process group is
    kept for further runs; model parallel state is torn down at the end).

    Checks the FP8 environment first, uses the vectorized synthetic sampler, times every step
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
            use_fast_synthetic(source)
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
