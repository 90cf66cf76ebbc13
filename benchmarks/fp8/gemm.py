"""fp8_bench worker `gemm`: dense and grouped GEMMs through Transformer Engine (and
torch._grouped_mm), BF16 vs each FP8 recipe."""

from __future__ import annotations

import inspect
import traceback

from megatron_dualpipe.in_process import env_vars

from .common import (
    DENSE_SHAPES,
    FP8_RECIPES,
    GROUPED_SHAPES,
    _short,
    machine_info,
    rel_err,
    te_autocast,
    te_recipe,
    time_cuda,
)


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
