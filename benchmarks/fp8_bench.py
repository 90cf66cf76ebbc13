#!/usr/bin/env python
"""FP8 vs BF16 on one Hopper GPU, side by side in one run (DeepSeek-V3 shapes).

    python benchmarks/fp8_bench.py             # everything; writes the fp8_bench section of
                                               # docs/benchmarks.md
    python benchmarks/fp8_bench.py --dry-run   # the plan, without CUDA
    python benchmarks/fp8_bench.py --parts gemm --no-write

Parts, each in its own worker process (a crash or a sticky CUDA error in one is reported in
the table and the others still run):

* gemm:     (a) dense `te.Linear` forward+backward TFLOP/s, BF16 vs FP8 delayed / current /
            blockwise (and blockwise with the FP8 weight cached, as from the second micro-batch
            on), at hidden 7168, dense/shared FFN 18432, MLA projections, 4096-token
            micro-batches; (b) grouped expert GEMM (`te.GroupedLinear`, 8 local experts x ~4096
            tokens, uneven splits) for BF16 and each recipe, plus TE's CUTLASS grouped GEMM
            (NVTE_USE_CUTLASS_GROUPED_GEMM, Hopper BF16), TE's single-launch grouped GEMM
            (`use_grouped_tensor=True` / NVTE_GROUPED_LINEAR_USE_FUSED_GROUPED_GEMM) and
            `torch._grouped_mm`.
* deepgemm: DeepGEMM's FP8 grouped GEMMs (fprop, dgrad, wgrad kernels on pre-quantized
            operands), if `import deep_gemm` works (pip: sgl-deep-gemm); skipped otherwise.
* proxy:    (c) the whole proxy model (recipes/fp8_proxy_1gpu.yaml with DeepSeek-V3-sized
            layers, see DEFAULT_PROXY_SET) through `megatron_dualpipe.train`: step time and
            tokens/s, BF16 vs blockwise FP8 (one worker per variant).

Timing: warm-up first, then CUDA events around each iteration and the median (GEMMs); the
proxy times whole optimizer steps (synchronized) and takes the median. Every GEMM path is also
checked against an FP32 reference (relative error column).

This module also holds the single-process training harness that tests/test_fp8_gpu.py uses
(`run_training`, `use_fast_synthetic`).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import inspect
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MARK_START, MARK_END = "<!-- fp8_bench:start -->", "<!-- fp8_bench:end -->"
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

PROXY_RECIPE = "recipes/fp8_proxy_1gpu.yaml"
# DeepSeek-V3 layer shapes on one GPU: hidden 7168, dense FFN 18432, expert FFN 2048 (8 experts,
# top-4: ~2048 tokens per expert and micro-batch), 4096-token micro-batches. ~2B parameters,
# ~50 GB on an 80 GB H100.
DEFAULT_PROXY_SET = [
    "model.num_layers=3", "model.num_dense_layers=1", "model.hidden_size=7168",
    "model.ffn_hidden_size=18432", "model.num_attention_heads=56", "model.vocab_size=16384",
    "model.seq_length=4096", "moe.num_experts=8", "moe.topk=4", "moe.num_groups=4",
    "moe.group_topk=2", "moe.ffn_hidden_size=2048", "moe.shared_expert_ffn_hidden_size=2048",
    "train.micro_batch_size=1", "train.global_batch_size=4",
]
BF16_MLA = ("['*self_attention.linear_q_down_proj', '*self_attention.linear_kv_down_proj', "
            "'*self_attention.linear_q_up_proj', '*self_attention.linear_kv_up_proj']")
PROXY_VARIANTS = {
    "bf16": ["fp8.recipe=none"],
    "blockwise": ["fp8.recipe=blockwise"],
    "blockwise+fused": ["fp8.recipe=blockwise", "fp8.grouped_gemm_fused=true"],
    # MLA's low-rank projections (small N or K) stay BF16: TE's FP8 is slower there.
    "blockwise+bf16mla": ["fp8.recipe=blockwise", "fp8.bf16_modules=" + BF16_MLA],
    "current": ["fp8.recipe=current"],
    "delayed": ["fp8.recipe=delayed"],
}


# =============================================================================================
# Single-process training harness (also used by tests/test_fp8_gpu.py)
# =============================================================================================


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
    env = fp8_environment_variables(recipe)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    single_process_env()
    state = None
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
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if state is not None:
            _release(state)


# =============================================================================================
# Timing and checking helpers (GPU workers)
# =============================================================================================


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
    text = f"{type(err).__name__}: {err}".replace("\n", " ").replace("|", "/")
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


@contextlib.contextmanager
def env_vars(values: dict):
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


def machine_info() -> dict:
    import torch

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    sms=props.multi_processor_count, memory_gb=round(props.total_memory / 2**30))
    from megatron_dualpipe.fp8.env_check import installed_te_version

    info["transformer_engine"] = installed_te_version()
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


# =============================================================================================
# Worker: dense and grouped GEMMs through Transformer Engine (and torch._grouped_mm)
# =============================================================================================


def _bench_te_linear(te, W, x, dy, recipe_name, cached, args) -> dict:
    import torch

    N, K = W.shape
    layer = te.Linear(K, N, bias=False, params_dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        layer.weight.copy_(W)
    recipe = te_recipe(recipe_name)
    calls = {"n": 0}

    def step():
        x.grad = None
        layer.weight.grad = None
        first = (calls["n"] == 0) if cached else None
        calls["n"] += 1
        with te_autocast(recipe):
            y = layer(x, is_first_microbatch=first)
        y.backward(dy)

    timing = time_cuda(step, args.warmup, args.iters)
    with torch.no_grad(), te_autocast(recipe):
        y = layer(x, is_first_microbatch=False if cached else None)
    timing["err"] = rel_err(y, x.detach().float() @ W.float().t())
    return timing


def bench_dense(args, results: dict) -> None:
    import torch
    import transformer_engine.pytorch as te

    rows = results.setdefault("dense", [])
    columns = ["bf16", *FP8_RECIPES, "blockwise cachedW"]
    for label, M, K, N in DENSE_SHAPES:
        row = {"shape": label, "M": M, "K": K, "N": N, "cells": {}}
        rows.append(row)
        try:
            g = torch.Generator(device="cuda").manual_seed(args.seed)
            W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(torch.bfloat16)
            x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
            x.requires_grad_(True)
            dy = torch.randn(M, N, device="cuda", generator=g, dtype=torch.bfloat16)
        except Exception as err:  # noqa: BLE001
            row["error"] = _short(err)
            continue
        flops = 6.0 * M * K * N
        for col in columns:
            name, cached = ("blockwise", True) if col == "blockwise cachedW" else (col, False)
            try:
                t = _bench_te_linear(te, W, x, dy, name, cached, args)
                t["tflops"] = flops / (t["ms"] * 1e-3) / 1e12
                row["cells"][col] = t
            except Exception as err:  # noqa: BLE001
                row["cells"][col] = {"error": _short(err)}
                print(f"[dense] {label} {col}: {traceback.format_exc()}", flush=True)
        print(f"[dense] {label}: " + ", ".join(
            f"{c} {v.get('tflops', float('nan')):.0f}" for c, v in row["cells"].items()),
            flush=True)
        del W, x, dy
        torch.cuda.empty_cache()


def make_splits(num_experts: int, per_expert: int, seed: int, multiple: int = 16) -> list[int]:
    """Uneven token counts (+-30%) per local expert, multiples of `multiple` (Megatron's router
    padding for FP8), summing to num_experts x per_expert."""
    import random

    rng = random.Random(seed)
    total = num_experts * per_expert
    raw = [per_expert * rng.uniform(0.7, 1.3) for _ in range(num_experts)]
    scale = total / sum(raw)
    splits = [max(multiple, round(r * scale / multiple) * multiple) for r in raw]
    splits[-1] += total - sum(splits)
    return splits


def _grouped_path_note(te_mod, recipe) -> str:
    """Whether TE's single-launch grouped-tensor path will really run (else it falls back)."""
    import torch

    try:
        from transformer_engine.pytorch.module.grouped_linear import (
            is_module_grouped_tensor_path_supported,
        )
    except ImportError:
        return "support check unavailable in this TE"
    try:
        ok = is_module_grouped_tensor_path_supported(recipe, torch.bfloat16)
    except Exception as err:  # noqa: BLE001
        return f"support check failed: {_short(err)}"
    return "single-launch grouped GEMM" if ok else (
        "not supported here (cuBLASLt too old for this recipe?): per-expert fallback")


def _bench_te_grouped(te, Ws, x, dy, splits, variant, args) -> dict:
    import torch

    G, N, K = Ws.shape
    recipe_name = variant["recipe"]
    recipe = te_recipe(recipe_name)
    kwargs = {}
    fused = variant.get("fused", False)
    init_params = inspect.signature(te.GroupedLinear.__init__).parameters
    env = dict(variant.get("env", {}))
    note = ""
    if fused:
        if "use_grouped_tensor" in init_params:
            kwargs["use_grouped_tensor"] = True
        else:
            env["NVTE_GROUPED_LINEAR_USE_FUSED_GROUPED_GEMM"] = "1"
        note = _grouped_path_note(te, recipe)
    with env_vars(env):
        layer = te.GroupedLinear(G, K, N, bias=False, params_dtype=torch.bfloat16,
                                 device="cuda", **kwargs)
        params = [p for _, p in layer.named_parameters()]
        with torch.no_grad():
            if len(params) == G:
                for p, w in zip(params, Ws, strict=True):
                    p.copy_(w)
            else:
                params[0].copy_(Ws.view_as(params[0]))
        m_splits = torch.tensor(splits, dtype=torch.int64, device="cuda") if fused else splits
        cached = variant.get("cached", False)
        calls = {"n": 0}

        def step():
            x.grad = None
            for p in params:
                p.grad = None
            first = (calls["n"] == 0) if cached else None
            calls["n"] += 1
            with te_autocast(recipe):
                y = layer(x, m_splits, is_first_microbatch=first)
            y.backward(dy)

        timing = time_cuda(step, args.warmup, args.iters)
        with torch.no_grad(), te_autocast(recipe):
            y = layer(x, m_splits, is_first_microbatch=False if cached else None)
    timing["err"] = rel_err(y, _grouped_ref(x.detach(), Ws, splits))
    timing["note"] = note
    return timing


def _grouped_ref(x, Ws, splits):
    import torch

    outs, start = [], 0
    for w, s in zip(Ws, splits, strict=True):
        outs.append(x[start:start + s].float() @ w.float().t())
        start += s
    return torch.cat(outs)


def _bench_torch_grouped_mm(Ws, x, dy, splits, args) -> dict:
    import torch

    if not hasattr(torch, "_grouped_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no torch._grouped_mm")
    w = Ws.detach().clone().requires_grad_(True)  # [G, N, K]
    offs = torch.cumsum(torch.tensor(splits, device="cuda"), 0).to(torch.int32)

    def step():
        x.grad = None
        w.grad = None
        y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
        y.backward(dy)

    timing = time_cuda(step, args.warmup, args.iters)
    with torch.no_grad():
        y = torch._grouped_mm(x, w.transpose(-2, -1), offs=offs)
    timing["err"] = rel_err(y, _grouped_ref(x.detach(), Ws, splits))
    timing["note"] = "torch._grouped_mm (CUTLASS), BF16"
    return timing


GROUPED_VARIANTS = [
    {"name": "bf16", "recipe": "bf16"},
    {"name": "bf16 + NVTE_USE_CUTLASS_GROUPED_GEMM", "recipe": "bf16",
     "env": {"NVTE_USE_CUTLASS_GROUPED_GEMM": "1", "NVTE_CUTLASS_GROUPED_GEMM_WARN_FALLBACK": "1"}},
    {"name": "bf16 + single-launch (use_grouped_tensor)", "recipe": "bf16", "fused": True},
    {"name": "bf16 torch._grouped_mm", "recipe": "bf16", "torch": True},
    {"name": "delayed", "recipe": "delayed"},
    {"name": "current", "recipe": "current"},
    {"name": "current + single-launch (use_grouped_tensor)", "recipe": "current", "fused": True},
    {"name": "blockwise", "recipe": "blockwise"},
    {"name": "blockwise cachedW", "recipe": "blockwise", "cached": True},
    {"name": "blockwise + single-launch (use_grouped_tensor)", "recipe": "blockwise",
     "fused": True},
]


def bench_grouped(args, results: dict) -> None:
    import torch
    import transformer_engine.pytorch as te

    splits = make_splits(args.experts, args.tokens_per_expert, args.seed)
    results["grouped_splits"] = splits
    rows = results.setdefault("grouped", [])
    M = sum(splits)
    for label, K, N in GROUPED_SHAPES:
        try:
            g = torch.Generator(device="cuda").manual_seed(args.seed + 1)
            Ws = (torch.randn(args.experts, N, K, device="cuda", generator=g) / K**0.5).to(
                torch.bfloat16)
            x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
            x.requires_grad_(True)
            dy = torch.randn(M, N, device="cuda", generator=g, dtype=torch.bfloat16)
        except Exception as err:  # noqa: BLE001
            rows.append({"shape": label, "variant": "-", "error": _short(err)})
            continue
        flops = 6.0 * M * K * N
        for variant in GROUPED_VARIANTS:
            row = {"shape": label, "variant": variant["name"], "recipe": variant["recipe"],
                   "M": M, "K": K, "N": N}
            try:
                if variant.get("torch"):
                    t = _bench_torch_grouped_mm(Ws, x, dy, splits, args)
                else:
                    t = _bench_te_grouped(te, Ws, x, dy, splits, variant, args)
                t["tflops"] = flops / (t["ms"] * 1e-3) / 1e12
                row.update(t)
            except Exception as err:  # noqa: BLE001
                row["error"] = _short(err)
                print(f"[grouped] {label} {variant['name']}: {traceback.format_exc()}",
                      flush=True)
            rows.append(row)
            print(f"[grouped] {label} {variant['name']}: "
                  f"{row.get('tflops', float('nan')):.0f} TFLOP/s {row.get('note', '')}",
                  flush=True)
        del Ws, x, dy
        torch.cuda.empty_cache()


def worker_gemm(args) -> dict:
    results = {"machine": machine_info()}
    for part, fn in (("dense", bench_dense), ("grouped", bench_grouped)):
        try:
            fn(args, results)
        except Exception as err:  # noqa: BLE001
            results[f"{part}_error"] = _short(err)
            print(traceback.format_exc(), flush=True)
    return results


# =============================================================================================
# Worker: DeepGEMM grouped FP8 GEMMs (pre-quantized operands, GEMM kernels only)
# =============================================================================================


def _cast_1x128(x):
    """[m, k] -> (fp8 [m, k], fp32 scales [m, k/128]): 1x128 tiles, as DeepSeek-V3."""
    import torch

    m, k = x.shape
    v = x.float().view(m, k // 128, 128)
    sf = v.abs().amax(-1).clamp(min=1e-4) / 448.0
    return (v / sf.unsqueeze(-1)).to(torch.float8_e4m3fn).view(m, k), sf


def _cast_128x128(w):
    """[n, k] -> (fp8 [n, k], fp32 scales [ceil(n/128), k/128]): 128x128 blocks."""
    import torch

    n, k = w.shape
    n_pad = -(-n // 128) * 128
    padded = torch.zeros(n_pad, k, device=w.device, dtype=torch.float32)
    padded[:n] = w.float()
    v = padded.view(n_pad // 128, 128, k // 128, 128)
    sf = v.abs().amax(dim=(1, 3), keepdim=True).clamp(min=1e-4) / 448.0
    q = (v / sf).to(torch.float8_e4m3fn).view(n_pad, k)[:n].contiguous()
    return q, sf.view(n_pad // 128, k // 128)


def _cast_groups_128x128(ws):
    import torch

    qs, sfs = zip(*(_cast_128x128(w) for w in ws), strict=True)
    return torch.stack(qs), torch.stack(sfs)


def _cast_k_major_groups(x, ks):
    """K-grouped operand for DeepGEMM's SM90 wgrad kernel: per group rows [k_g, mn] cast with
    128x1 tiles along k, stored transposed (k-major) and flattened; scales [mn, sum k_g/128]."""
    import torch

    mn = x.size(1)
    data = torch.zeros(x.numel(), dtype=torch.float8_e4m3fn, device=x.device)
    sfs, start = [], 0
    for k in ks:
        if k == 0:
            continue
        v = x[start:start + k].float().view(k // 128, 128, mn)
        sf = v.abs().amax(1).clamp(min=1e-4) / 448.0
        q = (v / sf.unsqueeze(1)).to(torch.float8_e4m3fn).view(k, mn)
        data[start * mn:(start + k) * mn] = q.t().flatten()
        sfs.append(sf)
        start += k
    return data, torch.cat(sfs).t()


def _dg_call(fn, *args, **kwargs):
    params = inspect.signature(fn).parameters
    return fn(*args, **{k: v for k, v in kwargs.items() if k in params})


def _deepgemm_operands(Ws, x, dy, splits, aligned):
    """Pad each expert's rows to DeepGEMM's alignment and quantize every operand once."""
    import torch

    _, N, K = Ws.shape
    Mp = sum(aligned)
    xp = torch.zeros(Mp, K, device="cuda", dtype=torch.bfloat16)
    dyp = torch.zeros(Mp, N, device="cuda", dtype=torch.bfloat16)
    m_indices = torch.full((Mp,), -1, device="cuda", dtype=torch.int32)
    valid = torch.zeros(Mp, device="cuda", dtype=torch.bool)
    off = src = 0
    for e, (s, a) in enumerate(zip(splits, aligned, strict=True)):
        xp[off:off + s], dyp[off:off + s] = x[src:src + s], dy[src:src + s]
        m_indices[off:off + s] = e
        valid[off:off + s] = True
        off, src = off + a, src + s
    return {
        "m_indices": m_indices, "valid": valid,
        "x": _cast_1x128(xp), "w": _cast_groups_128x128(Ws),
        "dy": _cast_1x128(dyp), "wt": _cast_groups_128x128(Ws.transpose(1, 2).contiguous()),
        "dy_k": _cast_k_major_groups(dyp, aligned), "x_k": _cast_k_major_groups(xp, aligned),
        "ks": torch.tensor(aligned, device="cuda", dtype=torch.int32),
    }


def _deepgemm_ops(dg_fns, Ws, x, dy, splits, aligned) -> dict:
    """{name: (run, check, flops)} for DeepGEMM's fprop, dgrad (m-grouped) and wgrad
    (k-grouped, FP32 accumulate) kernels."""
    import torch

    m_grouped, k_grouped = dg_fns
    G, N, K = Ws.shape
    M = sum(splits)
    ops = _deepgemm_operands(Ws, x, dy, splits, aligned)
    valid = ops["valid"]
    y = torch.empty(valid.numel(), N, device="cuda", dtype=torch.bfloat16)
    dx = torch.empty(valid.numel(), K, device="cuda", dtype=torch.bfloat16)
    flags = {"disable_ue8m0_cast": True}

    def fprop():
        _dg_call(m_grouped, ops["x"], ops["w"], y, ops["m_indices"], **flags)

    def dgrad():
        _dg_call(m_grouped, ops["dy"], ops["wt"], dx, ops["m_indices"], **flags)

    out = {
        "fprop": (fprop, lambda: rel_err(y[valid], _grouped_ref(x, Ws, splits)), 2.0 * M * K * N),
        "dgrad": (dgrad, lambda: rel_err(dx[valid], _grouped_ref(dy, Ws.transpose(1, 2), splits)),
                  2.0 * M * K * N),
    }
    if k_grouped is not None:
        dw = torch.zeros(G, N, K, device="cuda", dtype=torch.float32)
        dw_ref = torch.stack([dy[s0:s0 + s].float().t() @ x[s0:s0 + s].float()
                              for s, s0 in zip(splits, _starts(splits), strict=True)])

        def wgrad():  # accumulates into dw (FP32), as into Megatron's main_grad
            _dg_call(k_grouped, ops["dy_k"], ops["x_k"], dw, aligned, ops["ks"], c=dw,
                     recipe=(1, 1, 128))

        out["wgrad"] = (wgrad, lambda: rel_err(dw, dw_ref), 2.0 * M * K * N)
    return out


def _deepgemm_case(dg_fns, label, K, N, splits, aligned, args) -> dict:
    import torch

    M = sum(splits)
    row = {"shape": label, "variant": "DeepGEMM FP8 (GEMM kernels only)", "M": M, "K": K, "N": N}
    g = torch.Generator(device="cuda").manual_seed(args.seed + 1)
    Ws = (torch.randn(args.experts, N, K, device="cuda", generator=g) / K**0.5).to(torch.bfloat16)
    x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
    dy = torch.randn(M, N, device="cuda", generator=g, dtype=torch.bfloat16)
    parts = {}
    for name, (fn, check, flops) in _deepgemm_ops(dg_fns, Ws, x, dy, splits, aligned).items():
        try:
            fn()
            torch.cuda.synchronize()
            err = check()
            if not err < 0.1:
                raise RuntimeError(f"wrong result: relative error {err:.3g}")
            t = time_cuda(fn, args.warmup, args.iters)
            parts[name] = {"ms": t["ms"], "err": err, "tflops": flops / (t["ms"] * 1e-3) / 1e12}
        except Exception as err:  # noqa: BLE001
            parts[name] = {"error": _short(err)}
            print(f"[deepgemm] {label} {name}: {traceback.format_exc()}", flush=True)
    row["parts"] = parts
    if len(parts) == 3 and all("ms" in p for p in parts.values()):
        row["ms"] = sum(p["ms"] for p in parts.values())
        row["tflops"] = 6.0 * M * K * N / (row["ms"] * 1e-3) / 1e12
        row["err"] = parts["fprop"]["err"]
    else:
        row["error"] = "; ".join(f"{k}: {v.get('error', 'ok')}" for k, v in parts.items())
    row["note"] = "operands pre-quantized (no quantization time); " + ", ".join(
        f"{k} {v['tflops']:.0f}" for k, v in parts.items() if "tflops" in v)
    return row


def worker_deepgemm(args) -> dict:
    results = {"machine": machine_info(), "deepgemm": []}
    rows = results["deepgemm"]
    try:
        import deep_gemm as dg
        import torch
    except Exception as err:  # noqa: BLE001
        results["deepgemm_skipped"] = f"import deep_gemm failed: {_short(err)}"
        return results
    results["deepgemm_version"] = getattr(dg, "__version__", None) or _dg_version()
    if torch.cuda.get_device_capability(0)[0] != 9:
        results["deepgemm_skipped"] = "DeepGEMM's 1x128/128x128 FP8 kernels here are for sm_90"
        return results
    m_grouped = (getattr(dg, "m_grouped_fp8_gemm_nt_contiguous", None)
                 or getattr(dg, "m_grouped_fp8_fp4_gemm_nt_contiguous", None))
    k_grouped = getattr(dg, "k_grouped_fp8_gemm_nt_contiguous", None)
    if m_grouped is None:
        results["deepgemm_skipped"] = "deep_gemm has no m_grouped_fp8_gemm_nt_contiguous"
        return results
    try:
        align = int(dg.get_mk_alignment_for_contiguous_layout())
    except Exception:  # noqa: BLE001 - older releases: fixed 128
        align = 128
    splits = make_splits(args.experts, args.tokens_per_expert, args.seed)
    aligned = [-(-s // align) * align for s in splits]
    deadline = time.perf_counter() + args.deepgemm_budget_s
    for label, K, N in GROUPED_SHAPES:
        if time.perf_counter() > deadline:
            rows.append({"shape": label, "variant": "DeepGEMM FP8 (GEMM kernels only)",
                         "error": f"skipped: --deepgemm-budget-s {args.deepgemm_budget_s} "
                                  "spent (JIT compilation)"})
            continue
        try:
            row = _deepgemm_case((m_grouped, k_grouped), label, K, N, splits, aligned, args)
        except Exception as err:  # noqa: BLE001
            row = {"shape": label, "variant": "DeepGEMM FP8 (GEMM kernels only)",
                   "error": _short(err)}
            print(traceback.format_exc(), flush=True)
        rows.append(row)
        print(f"[deepgemm] {label}: {row.get('tflops', float('nan')):.0f} TFLOP/s "
              f"{row.get('note', '')} {row.get('error', '')}", flush=True)
        torch.cuda.empty_cache()
    return results


def _starts(splits):
    out, s = [], 0
    for n in splits:
        out.append(s)
        s += n
    return out


def _dg_version():
    try:
        import importlib.metadata as md

        for dist in ("sgl-deep-gemm", "deep-gemm", "deep_gemm"):
            try:
                return f"{dist} {md.version(dist)}"
            except md.PackageNotFoundError:
                continue
    except Exception:  # noqa: BLE001, S110 - informational only
        pass
    return None


# =============================================================================================
# Worker: the whole proxy model through megatron_dualpipe.train
# =============================================================================================


# First match wins (lower-case substrings of CUDA kernel names).
KERNEL_CATEGORIES = (
    ("communication", ("nccl",)),
    ("attention", ("flash", "fmha", "fused_attn", "attn_fwd", "attn_bwd", "cudnn")),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "grouped_mm")),
    ("FP8 quantize/cast", ("quantize", "cast_transpose", "amax", "compute_scale", "fp8",
                           "block_scaled", "dequant")),
    ("optimizer", ("multi_tensor", "adam")),
    ("norm", ("rmsnorm", "layernorm", "layer_norm", "rms_norm")),
    ("MoE routing/permute", ("permute", "topk", "sort", "scatter", "gather", "index", "histc",
                             "bincount", "cumsum", "radix")),
)


def kernel_category(name: str) -> str:
    lower = name.lower()
    for category, keys in KERNEL_CATEGORIES:
        if any(k in lower for k in keys):
            return category
    return "elementwise/other"


def kernel_breakdown(events) -> dict[str, float]:
    """GPU kernel time (ms) per category from `torch.profiler` key averages of CUDA kernels
    (`events`: objects with `.key` and `.self_device_time_total` in microseconds)."""
    totals: dict[str, float] = {}
    for e in events:
        us = getattr(e, "self_device_time_total", 0) or 0
        if us <= 0:
            continue
        category = kernel_category(e.key)
        totals[category] = totals.get(category, 0.0) + us / 1e3
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def profile_one_step(state, source, step: int) -> dict:
    """Wall time and per-category GPU kernel time of one extra training step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from megatron_dualpipe import train as T

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        T.train_step(state, source, step)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3
    kernels = [e for e in prof.key_averages()
               if str(getattr(e, "device_type", "")).endswith("CUDA")]
    breakdown = kernel_breakdown(kernels)
    return {"wall_ms": wall_ms, "kernels_ms": breakdown, "busy_ms": sum(breakdown.values())}


def proxy_overrides(args, variant: str) -> list[str]:
    base = DEFAULT_PROXY_SET if args.proxy_default_set else []
    return [*base, *args.proxy_set, *PROXY_VARIANTS[variant],
            f"train.steps={args.proxy_warmup + args.proxy_steps}",
            "train.log_dir=runs/fp8_bench_proxy"]


def _activated_flops_per_token(recipe, chunk) -> float:
    """Approximate training FLOPs per token: 6 x activated parameters (embedding lookup
    excluded, routed experts scaled by topk/num_experts) + causal attention."""
    m, moe = recipe.model, recipe.moe
    total = experts = embed = 0
    for name, p in chunk.named_parameters():
        total += p.numel()
        if ".experts." in name:
            experts += p.numel()
        elif "word_embeddings" in name:
            embed += p.numel()
    active = total - embed - experts + experts * moe.topk / moe.num_experts
    if m.attention == "mla":
        qk = m.num_attention_heads * (m.mla.qk_head_dim + m.mla.qk_pos_emb_head_dim)
        v = m.num_attention_heads * m.mla.v_head_dim
    else:
        qk = v = m.hidden_size
    attention = 3.0 * m.seq_length * (qk + v) * m.num_layers  # fwd+bwd, causal half
    return 6.0 * active + attention


def worker_proxy(args) -> dict:
    import torch

    from megatron_dualpipe.config import load_recipe
    from megatron_dualpipe.fp8 import fp8_module_report

    overrides = proxy_overrides(args, args.variant)
    recipe = load_recipe(ROOT / args.proxy_recipe, overrides)
    steps = args.proxy_warmup + args.proxy_steps

    def after(state, source):
        report = fp8_module_report(state.model)
        profiled = None
        try:  # one extra step (the last step's data again) under the profiler
            profiled = profile_one_step(state, source, steps - 1)
        except Exception as err:  # the timing above stands without it
            profiled = {"error": _short(err)}
        return {"flops_per_token": _activated_flops_per_token(recipe, state.model[0].module),
                "fp8_summary": report["summary"], "profile": profiled,
                "params": sum(p.numel() for c in state.model for p in c.parameters())}

    run = run_training(recipe, steps, cache=True, after=after)
    timed = run["step_times_s"][args.proxy_warmup:]
    step_s = statistics.median(timed)
    tokens = recipe.train.global_batch_size * recipe.model.seq_length
    info = run["after"]
    return {
        "machine": machine_info(), "variant": args.variant, "overrides": overrides,
        "step_s": step_s, "step_min_s": min(timed), "step_max_s": max(timed),
        "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
        "tflops": info["flops_per_token"] * tokens / step_s / 1e12,
        "params": info["params"], "fp8_summary": info["fp8_summary"],
        "profile": info.get("profile"),
        "max_memory_gb": run["max_memory_gb"], "losses": run["losses"],
        "cuda_mem_total_gb": torch.cuda.get_device_properties(0).total_memory / 2**30,
    }


# =============================================================================================
# Orchestration, tables, docs
# =============================================================================================


def _worker_cmd(args, part: str, variant: str | None = None) -> list[str]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", part,
           "--iters", str(args.iters), "--warmup", str(args.warmup),
           "--experts", str(args.experts), "--tokens-per-expert", str(args.tokens_per_expert),
           "--seed", str(args.seed), "--deepgemm-budget-s", str(args.deepgemm_budget_s),
           "--proxy-recipe", args.proxy_recipe, "--proxy-steps", str(args.proxy_steps),
           "--proxy-warmup", str(args.proxy_warmup)]
    if not args.proxy_default_set:
        cmd.append("--no-proxy-default-set")
    for item in args.proxy_set:
        cmd += ["--proxy-set", item]
    if variant:
        cmd += ["--variant", variant]
    return cmd


def run_worker(args, part: str, variant: str | None = None) -> dict:
    """Run one worker process, echo its output, return its result (or {"error": ...})."""
    cmd = _worker_cmd(args, part, variant)
    tag = part + (f":{variant}" if variant else "")
    print(f"\n=== worker {tag}: {shlex.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    tail: list[str] = []
    result = None
    timed_out = threading.Event()
    try:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT)
        watchdog = threading.Timer(args.worker_timeout_s,
                                   lambda: (timed_out.set(), proc.kill()))
        watchdog.start()
        try:
            for line in proc.stdout:
                if line.startswith(RESULT_TAG):
                    result = json.loads(line[len(RESULT_TAG):])
                    continue
                sys.stdout.write(f"  [{tag}] {line}")
                tail = (tail + [line.rstrip()])[-15:]
            proc.wait()
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                proc.kill()
    except Exception as err:  # noqa: BLE001
        return {"error": _short(err), "seconds": time.perf_counter() - start}
    seconds = time.perf_counter() - start
    print(f"=== worker {tag}: exit {proc.returncode} after {seconds:.0f} s", flush=True)
    if timed_out.is_set():
        return {"error": f"worker killed after --worker-timeout-s {args.worker_timeout_s}",
                "seconds": seconds}
    if result is None:
        last = next((t for t in reversed(tail) if t.strip()), "no output")
        return {"error": f"worker exited {proc.returncode}: {last[-200:]}", "seconds": seconds}
    result["seconds"] = seconds
    return result


def _fmt(value, spec=".0f", missing="-"):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _cell(cell: dict | None, base: float | None = None) -> str:
    if not cell:
        return "-"
    if "error" in cell:
        return f"error: {cell['error']}"
    text = _fmt(cell.get("tflops"))
    if base and cell.get("tflops"):
        text += f" ({cell['tflops'] / base:.2f}x)"
    return text


def dense_table(results: dict) -> list[str]:
    rows = results.get("dense") or []
    if not rows:
        return [f"_not run: {results.get('dense_error', results.get('error', 'no result'))}_"]
    cols = ["bf16", *FP8_RECIPES, "blockwise cachedW"]
    out = ["| GEMM (M=4096 tokens) | " + " | ".join(cols) + " | rel.err bf16 / blockwise |",
           "|---|" + "---:|" * len(cols) + "---:|"]
    for row in rows:
        if "error" in row:
            out.append(f"| {row['shape']} | error: {row['error']} |" + " |" * len(cols))
            continue
        cells = row["cells"]
        base = cells.get("bf16", {}).get("tflops")
        texts = [_cell(cells.get(c), None if c == "bf16" else base) for c in cols]
        errs = " / ".join(_fmt(cells.get(c, {}).get("err"), ".1e") for c in ("bf16", "blockwise"))
        out.append(f"| {row['shape']} | " + " | ".join(texts) + f" | {errs} |")
    return out


def grouped_table(rows: list[dict]) -> list[str]:
    if not rows:
        return ["_no result_"]
    out = ["| expert GEMM | path | fwd+bwd TFLOP/s | x BF16 (TE default) | ms | rel.err | note |",
           "|---|---|---:|---:|---:|---:|---|"]
    base = {r["shape"]: r.get("tflops") for r in rows if r.get("variant") == "bf16"}
    for r in rows:
        if "error" in r:
            out.append(f"| {r['shape']} | {r['variant']} | error: {r['error']} | | | | |")
            continue
        b = base.get(r["shape"])
        ratio = f"{r['tflops'] / b:.2f}x" if b else "-"
        out.append(f"| {r['shape']} | {r['variant']} | {_fmt(r.get('tflops'))} | {ratio} | "
                   f"{_fmt(r.get('ms'), '.2f')} | {_fmt(r.get('err'), '.1e')} | "
                   f"{r.get('note', '')} |")
    return out


def proxy_table(proxy: dict) -> list[str]:
    if not proxy:
        return ["_not run_"]
    out = [("| variant | step ms (median) | tokens/s | x BF16 | ~model TFLOP/s | max mem GB | "
            "loss first/last | FP8 GEMM modules |"), "|---|---:|---:|---:|---:|---:|---|---|"]
    base = (proxy.get("bf16") or {}).get("tokens_per_s")
    for name, r in proxy.items():
        if "error" in r:
            out.append(f"| {name} | error: {r['error']} | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        fp8_mods = sum(c.get("fp8", 0) for c in (r.get("fp8_summary") or {}).values())
        losses = r.get("losses") or []
        loss = f"{losses[0]:.3f} / {losses[-1]:.3f}" if losses else "-"
        out.append(f"| {name} | {r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:.0f} | {ratio} | "
                   f"{r['tflops']:.0f} | {r['max_memory_gb']:.1f} | {loss} | {fp8_mods} |")
    return out + [""] + profile_table(proxy)


def profile_table(proxy: dict) -> list[str]:
    """GPU kernel time per category of one profiled step per variant (ms)."""
    profiles = {n: r.get("profile") for n, r in proxy.items()
                if isinstance(r.get("profile"), dict) and "kernels_ms" in r["profile"]}
    if not profiles:
        return []
    categories = [c for c, _ in KERNEL_CATEGORIES] + ["elementwise/other"]
    used = [c for c in categories if any(p["kernels_ms"].get(c) for p in profiles.values())]
    out = ["One extra step per variant under `torch.profiler` (GPU kernel time per category, ms; "
           "busy = sum of kernels; wall includes profiler overhead):", "",
           "| variant | wall | busy | " + " | ".join(used) + " |",
           "|---|---:|---:|" + "---:|" * len(used)]
    for name, p in profiles.items():
        cells = " | ".join(f"{p['kernels_ms'].get(c, 0.0):.1f}" for c in used)
        out.append(f"| {name} | {p['wall_ms']:.0f} | {p['busy_ms']:.0f} | {cells} |")
    return out


def targets(results: dict) -> list[str]:
    lines = []
    for row in results.get("gemm", {}).get("dense", []) or []:
        if not row["shape"].startswith("dense"):
            continue
        cells = row.get("cells", {})
        b = cells.get("bf16", {}).get("tflops")
        for col in ("blockwise", "blockwise cachedW"):
            f = cells.get(col, {}).get("tflops")
            if b and f:
                ok = "met" if f / b >= TARGET_SPEEDUP else "NOT met"
                lines.append(f"- {row['shape']}, {col}: {f / b:.2f}x BF16 "
                             f"(target {TARGET_SPEEDUP}x: {ok})")
    proxy = results.get("proxy", {})
    b = (proxy.get("bf16") or {}).get("tokens_per_s")
    f = (proxy.get("blockwise") or {}).get("tokens_per_s")
    if b and f:
        ok = "met" if f / b >= TARGET_SPEEDUP else "NOT met"
        lines.append(f"- whole proxy step, blockwise: {f / b:.2f}x BF16 tokens/s "
                     f"(target {TARGET_SPEEDUP}x: {ok})")
    grouped = [r for r in (results.get("gemm", {}).get("grouped") or []) +
               (results.get("deepgemm", {}).get("deepgemm") or []) if r.get("tflops")]
    for shape in dict.fromkeys(r["shape"] for r in grouped):
        rows = [r for r in grouped if r["shape"] == shape]
        bf16 = max((r for r in rows if r.get("recipe") == "bf16"), key=lambda r: r["tflops"],
                   default=None)
        fp8 = max((r for r in rows if r.get("recipe") != "bf16"), key=lambda r: r["tflops"],
                  default=None)
        if bf16 and fp8:
            lines.append(f"- {shape}: fastest FP8 path `{fp8['variant']}` {fp8['tflops']:.0f} "
                         f"TFLOP/s = {fp8['tflops'] / bf16['tflops']:.2f}x the fastest BF16 path "
                         f"`{bf16['variant']}` ({bf16['tflops']:.0f})")
    return lines or ["- no complete result"]


def render(results: dict, args, command: str) -> str:
    gemm = results.get("gemm", {})
    machine = gemm.get("machine") or next(
        (r.get("machine") for r in results.get("proxy", {}).values() if r.get("machine")), {})
    dg = results.get("deepgemm", {})
    arch = "sm_" + str(machine.get("capability", "?")).replace(".", "")
    lines = [
        "## FP8: BF16 vs delayed / current / blockwise (`benchmarks/fp8_bench.py`)",
        "",
        (f"Machine: {machine.get('gpu', '?')} ({arch}, {machine.get('memory_gb', '?')} GB), "
         f"driver {results.get('driver', '?')}; torch {machine.get('torch', '?')} (CUDA "
         f"{machine.get('cuda', '?')}), Transformer Engine {machine.get('transformer_engine')}, "
         f"cuBLASLt {machine.get('cublaslt', '?')}, megatron-core {machine.get('megatron_core')}"
         f", DeepGEMM {dg.get('deepgemm_version') or 'not available'}."),
        "",
        f"Command: `{command}`",
        "",
        (f"Method: forward+backward (Fprop, Dgrad, Wgrad: 6·M·K·N FLOPs) per call, "
         f"{args.warmup} warm-up calls, then the median of {args.iters} calls timed with CUDA "
         "events; FP8 times include TE's quantization (activations and, except *cachedW*, "
         "weights every call); *cachedW* = FP8 weight cached as from the 2nd micro-batch on. "
         "rel.err = ‖y − y_fp32‖/‖y_fp32‖ of the forward output. Recipes as Megatron builds "
         "them: delayed (HYBRID, amax history 1), current (E4M3), blockwise (E4M3, 1x128 "
         "activations / 128x128 weights)."),
        "",
        "### (a) Dense Linear, TFLOP/s (x BF16)",
        "",
        *dense_table(gemm if gemm else {"error": "not run (--parts)"}),
        "",
        (f"### (b) Grouped expert GEMM: {args.experts} local experts, token splits "
         f"{results.get('gemm', {}).get('grouped_splits')} (sum "
         f"{args.experts * args.tokens_per_expert})"),
        "",
        *grouped_table((gemm.get("grouped") or []) + (dg.get("deepgemm") or [])),
    ]
    if gemm.get("grouped_error") or gemm.get("error"):
        lines += ["", f"gemm worker error: {gemm.get('grouped_error') or gemm.get('error')}"]
    if dg.get("deepgemm_skipped") or dg.get("error"):
        lines += ["", f"DeepGEMM: {dg.get('deepgemm_skipped') or dg.get('error')}"]
    proxy_cfg = ", ".join((DEFAULT_PROXY_SET if args.proxy_default_set else []) + args.proxy_set)
    lines += [
        "",
        f"### (c) Whole proxy model: `{args.proxy_recipe}` with {proxy_cfg or 'no overrides'}",
        "",
        (f"Median of {args.proxy_steps} optimizer steps after {args.proxy_warmup} warm-up "
         "steps (synchronized host timing, data pre-generated); ~model TFLOP/s = (6 x "
         "activated parameters + causal attention) x tokens / step time."),
        "",
        *proxy_table(results.get("proxy", {})),
        "",
        "### Targets",
        "",
        *targets(results),
        "",
    ]
    return "\n".join(lines) + "\n"


def write_section(path: Path, section: str) -> None:
    """Replace the text between the fp8_bench markers in `path` (or append the section)."""
    block = f"{MARK_START}\n{section}{MARK_END}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    if MARK_START in text and MARK_END in text:
        head, rest = text.split(MARK_START, 1)
        _, tail = rest.split(MARK_END, 1)
        text = head + block + tail.lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "?"
    except Exception:  # noqa: BLE001
        return "?"


def dry_run(args) -> int:
    from megatron_dualpipe.config import load_recipe

    print("fp8_bench plan (no CUDA used)\n")
    print(f"parts: {', '.join(args.parts)}; warm-up {args.warmup}, timed {args.iters} calls")
    print("\n(a) dense te.Linear fwd+bwd, recipes: bf16, " + ", ".join(FP8_RECIPES)
          + ", blockwise cachedW")
    for label, M, K, N in DENSE_SHAPES:
        print(f"  {label:<36} M={M} K={K} N={N}  {6 * M * K * N / 1e12:.2f} TFLOP per call")
    splits = make_splits(args.experts, args.tokens_per_expert, args.seed)
    print(f"\n(b) grouped te.GroupedLinear, {args.experts} experts, splits {splits}")
    for label, K, N in GROUPED_SHAPES:
        print(f"  {label:<36} M={sum(splits)} K={K} N={N}  "
              f"{6 * sum(splits) * K * N / 1e12:.2f} TFLOP per call")
    for v in GROUPED_VARIANTS:
        print(f"    - {v['name']}")
    print("    - DeepGEMM FP8 (if `import deep_gemm` works; pip: sgl-deep-gemm), "
          f"budget {args.deepgemm_budget_s} s incl. JIT")
    recipe_path = ROOT / args.proxy_recipe
    print(f"\n(c) proxy {args.proxy_recipe}, variants {', '.join(args.proxy_variants)}, "
          f"{args.proxy_warmup} warm-up + {args.proxy_steps} timed steps")
    for variant in args.proxy_variants:
        overrides = proxy_overrides(args, variant)
        try:
            r = load_recipe(recipe_path, overrides)
            m, moe = r.model, r.moe
            print(f"  {variant:<16} hidden {m.hidden_size}, {m.num_layers} layers "
                  f"({m.num_dense_layers} dense, FFN {m.ffn_hidden_size}), {moe.num_experts} "
                  f"experts top-{moe.topk} FFN {moe.ffn_hidden_size}, seq {m.seq_length}, "
                  f"{r.train.global_batch_size}x{r.train.micro_batch_size}.. tokens/step "
                  f"{r.train.global_batch_size * m.seq_length}, fp8.recipe={r.fp8.recipe}")
        except Exception as err:  # noqa: BLE001
            print(f"  {variant:<16} recipe error: {err}")
    print("\nworkers:")
    for part in args.parts:
        if part == "proxy":
            for v in args.proxy_variants:
                print("  " + shlex.join(_worker_cmd(args, part, v)))
        else:
            print("  " + shlex.join(_worker_cmd(args, part)))
    print(f"\nwould write the {MARK_START} section of {args.out}"
          if not args.no_write else "\n--no-write: docs untouched")
    return 0


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dry-run", action="store_true", help="print the plan; no CUDA needed")
    p.add_argument("--parts", default="gemm,deepgemm,proxy",
                   help="comma list of gemm, deepgemm, proxy (default: all)")
    p.add_argument("--iters", type=int, default=20, help="timed calls per GEMM case")
    p.add_argument("--warmup", type=int, default=5, help="warm-up calls per GEMM case")
    p.add_argument("--experts", type=int, default=8, help="local experts (grouped GEMM)")
    p.add_argument("--tokens-per-expert", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deepgemm-budget-s", type=float, default=240.0,
                   help="stop starting DeepGEMM cases after this long (its JIT is slow)")
    p.add_argument("--proxy-recipe", default=PROXY_RECIPE)
    p.add_argument("--proxy-set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for the proxy (repeatable)")
    p.add_argument("--no-proxy-default-set", dest="proxy_default_set", action="store_false",
                   help="do not apply DEFAULT_PROXY_SET (DeepSeek-V3-sized layers)")
    p.add_argument("--proxy-variants", default="bf16,blockwise,blockwise+bf16mla",
                   help=f"comma list of {', '.join(PROXY_VARIANTS)}")
    p.add_argument("--proxy-steps", type=int, default=15, help="timed proxy steps")
    p.add_argument("--proxy-warmup", type=int, default=5, help="untimed proxy steps")
    p.add_argument("--worker-timeout-s", type=float, default=900.0)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks.md"))
    p.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    p.add_argument("--json", default=None, help="also write all raw results to this file")
    p.add_argument("--worker", choices=["gemm", "deepgemm", "proxy"], help=argparse.SUPPRESS)
    p.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    args.proxy_variants = [x.strip() for x in args.proxy_variants.split(",") if x.strip()]
    for part in args.parts:
        if part not in ("gemm", "deepgemm", "proxy"):
            p.error(f"--parts: unknown part {part!r}")
    for v in args.proxy_variants:
        if v not in PROXY_VARIANTS:
            p.error(f"--proxy-variants: unknown variant {v!r}; choose from {list(PROXY_VARIANTS)}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        fn = {"gemm": worker_gemm, "deepgemm": worker_deepgemm, "proxy": worker_proxy}[args.worker]
        try:
            result = fn(args)
        except Exception as err:  # noqa: BLE001 - fail soft: report it in the table
            traceback.print_exc()
            sys.stderr.flush()
            result = {"error": _short(err)}
        print(RESULT_TAG + json.dumps(result, default=str), flush=True)
        return 0
    if args.dry_run:
        return dry_run(args)
    command = "python benchmarks/fp8_bench.py" + (
        " " + shlex.join(sys.argv[1:]) if argv is None and sys.argv[1:] else "")
    start = time.perf_counter()
    results: dict = {"driver": driver_version()}
    if "gemm" in args.parts:
        results["gemm"] = run_worker(args, "gemm")
    if "deepgemm" in args.parts:
        results["deepgemm"] = run_worker(args, "deepgemm")
    if "proxy" in args.parts:
        results["proxy"] = {v: run_worker(args, "proxy", v) for v in args.proxy_variants}
    section = render(results, args, command)
    print("\n" + section)
    parts = {k: v.get("seconds", 0) for k, v in results.items() if isinstance(v, dict)
             and "seconds" in v}
    parts.update({f"proxy:{k}": v.get("seconds", 0) for k, v in results.get("proxy", {}).items()})
    print(f"fp8_bench: {time.perf_counter() - start:.0f} s in all ("
          + ", ".join(f"{k} {v:.0f} s" for k, v in parts.items()) + ")")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    if not args.no_write:
        write_section(Path(args.out), section)
        print(f"wrote the fp8_bench section of {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
