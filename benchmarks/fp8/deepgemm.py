"""fp8_bench worker `deepgemm`: DeepGEMM grouped FP8 GEMMs (pre-quantized operands, GEMM
kernels only)."""

from __future__ import annotations

import inspect
import time
import traceback

from .blockwise_quant import quant_1x128 as _cast_1x128
from .blockwise_quant import quant_groups_128x128 as _cast_groups_128x128
from .blockwise_quant import quant_k_major_groups as _cast_k_major_groups
from .common import GROUPED_SHAPES, _short, machine_info, rel_err, time_cuda
from .gemm import _grouped_ref, make_splits


def _dg_call(fn, *args, **kwargs):
    """Call with the keyword arguments `fn` accepts (all of them when its signature is unknown,
    as for pybind11 functions, or takes **kwargs)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn(*args, **kwargs)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return fn(*args, **kwargs)
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
