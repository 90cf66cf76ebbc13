"""fp8_bench report: the Markdown tables, the targets, the docs/benchmarks.md section."""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

from ..docs_section import write_section as write_docs_section
from .common import FP8_RECIPES, TARGET_SPEEDUP
from .proxy import DEFAULT_PROXY_SET, KERNEL_CATEGORIES, baseline_variant

MARK_START, MARK_END = "<!-- fp8_bench:start -->", "<!-- fp8_bench:end -->"


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
    for name, r in proxy.items():
        if "error" in r:
            out.append(f"| {name} | error: {r['error']} | | | | | | |")
            continue
        base = (proxy.get(baseline_variant(name)) or {}).get("tokens_per_s")
        ratio = f"{r['tokens_per_s'] / base:.2f}x" if base else "-"
        fp8_mods = sum(c.get("fp8", 0) for c in (r.get("fp8_summary") or {}).values())
        losses = r.get("losses") or []
        loss = f"{losses[0]:.3f} / {losses[-1]:.3f}" if losses else "-"
        out.append(f"| {name} | {r['step_s'] * 1e3:.0f} | {r['tokens_per_s']:.0f} | {ratio} | "
                   f"{r['tflops']:.0f} | {r['max_memory_gb']:.1f} | {loss} | {fp8_mods} |")
    note = ("x BF16: against the `bf16` variant with the same model and training modifiers "
            "(`mla`, `fusions`, `bf16moments`, `gbs16`).")
    return out + ["", note, ""] + profile_table(proxy)


def _busy(proxy: dict, name: str) -> float | None:
    profile = (proxy.get(name) or {}).get("profile")
    return profile.get("busy_ms") if isinstance(profile, dict) else None


def profile_table(proxy: dict) -> list[str]:
    """GPU kernel time per category of one profiled step per variant (ms)."""
    profiles = {n: r.get("profile") for n, r in proxy.items()
                if isinstance(r.get("profile"), dict) and "kernels_ms" in r["profile"]}
    if not profiles:
        return []
    categories = [c for c, _ in KERNEL_CATEGORIES] + ["elementwise/other"]
    used = [c for c in categories if any(p["kernels_ms"].get(c) for p in profiles.values())]
    out = ["One extra step per variant under `torch.profiler` (GPU kernel time per category, ms; "
           "busy = sum of kernels, *x BF16* its ratio to the baseline's; wall includes profiler "
           "overhead; timed step ms - busy = time the GPU waited for the host):", "",
           "| variant | timed step | wall | busy | busy x BF16 | " + " | ".join(used) + " |",
           "|---|---:|---:|---:|---:|" + "---:|" * len(used)]
    for name, p in profiles.items():
        cells = " | ".join(f"{p['kernels_ms'].get(c, 0.0):.1f}" for c in used)
        base = _busy(proxy, baseline_variant(name))
        ratio = f"{base / p['busy_ms']:.2f}x" if base and p.get("busy_ms") else "-"
        step = proxy[name].get("step_s")
        step_ms = f"{step * 1e3:.0f}" if step else "-"
        out.append(f"| {name} | {step_ms} | {p['wall_ms']:.0f} | {p['busy_ms']:.0f} | {ratio} | "
                   f"{cells} |")
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
    for name, r in proxy.items():
        b = (proxy.get(baseline_variant(name)) or {}).get("tokens_per_s")
        f = r.get("tokens_per_s")
        if name.startswith("bf16") or not (b and f):
            continue
        ok = "met" if f / b >= TARGET_SPEEDUP else "NOT met"
        busy, base_busy = _busy(proxy, name), _busy(proxy, baseline_variant(name))
        kernels = (f"; GPU kernel time {base_busy / busy:.2f}x" if busy and base_busy else "")
        lines.append(f"- whole proxy step, {name}: {f / b:.2f}x `{baseline_variant(name)}` "
                     f"tokens/s (target {TARGET_SPEEDUP}x: {ok}){kernels}")
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


def _commands(results: dict, command: str) -> list[str]:
    """`Command:` lines: one per part when the results were merged from several runs."""
    commands = results.get("commands") or {}
    if len(set(commands.values())) <= 1:
        return [f"Command: `{next(iter(commands.values()), command)}`"]
    lines = ["Commands (results merged from separate runs; every ratio compares variants of "
             "one run):", "", *(f"- {part}: `{cmd}`" for part, cmd in commands.items())]
    if results.get("merged"):
        lines += ["", f"Rendered from their `--json` files by `{command}`."]
    return lines


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
        *_commands(results, command),
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
    proxy_cfg = ", ".join(results.get("proxy_set") or (
        (DEFAULT_PROXY_SET if args.proxy_default_set else []) + args.proxy_set))
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
    """Replace the fp8_bench section of `path` (or append it)."""
    write_docs_section(path, section, MARK_START, MARK_END)


def driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=False)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else "?"
    except Exception:  # noqa: BLE001
        return "?"
