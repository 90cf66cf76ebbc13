"""The table of `benchmarks.speed` and its section of docs/benchmarks.md."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.docs_section import BENCHMARKS_MD, write_section

DOCS = BENCHMARKS_MD
START, END = "<!-- speed:start -->", "<!-- speed:end -->"
def _parts(key: str) -> tuple[str, list[str], str]:
    system, precision = key.split("/")
    base, *modifiers = system.split("+")
    return base, modifiers, precision


def _name(base: str, modifiers) -> str:
    return "+".join([base, *modifiers])


def pairs(keys) -> list[tuple[str, str, float]]:
    """(numerator, denominator, target) of the issue's targets among the variants present:
    our 1F1B vs Megatron-Core with the same recipe modifiers (any FP8 variant of ours against
    its FP8), every DualPipeV variant vs our 1F1B with the same non-schedule modifiers, every
    FP8 variant vs BF16 per system; and each system with a `COMPARED_MODIFIERS` modifier
    (`+graphs`, `+mladown`) vs the same system without it (target None)."""
    from benchmarks.speed.variants import COMPARED_MODIFIERS, MCORE_MODIFIERS, SCHEDULE_MODIFIERS

    out = []
    for key in keys:
        base, modifiers, precision = _parts(key)
        if base == "ours_1f1b":
            mcore = _name("mcore_1f1b", [m for m in modifiers if m in MCORE_MODIFIERS])
            out.append((key, f"{mcore}/{precision.partition(':')[0]}", 0.98))
        elif base == "ours_dualpipev":
            ours = _name("ours_1f1b", [m for m in modifiers if m not in SCHEDULE_MODIFIERS])
            out.append((key, f"{ours}/{precision}", 0.98))
    for key in keys:
        base, modifiers, precision = _parts(key)
        if precision.startswith("fp8"):
            out.append((key, f"{_name(base, modifiers)}/bf16", 1.30))
        for modifier in COMPARED_MODIFIERS:  # no target: what the modifier gives
            if modifier in modifiers:
                without = _name(base, [m for m in modifiers if m != modifier])
                out.append((key, f"{without}/{precision}", None))
    return [p for p in out if p[1] in keys]


def ratios(rows: dict) -> list[tuple[str, str, float, float, float, float]]:
    """(a, b, speed of a over b by medians, lowest and highest over the rounds' extremes,
    target) for each pair present."""
    out = []
    for a, b, target in pairs(list(rows)):
        ra, rb = rows[a], rows[b]
        out.append((a, b, rb["step_s"] / ra["step_s"], rb["min_s"] / ra["max_s"],
                    rb["max_s"] / ra["min_s"], target))
    return out


def render(result: dict) -> str:
    rows = result["rows"]
    lines = [
        "| system / precision | step ms (median) | spread | tokens/s | model TFLOP/s | MFU | "
        "warm-up steps / steady |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for key, r in rows.items():
        warm = " ".join(f"{x:.2f}" for x in r["warmup_vs_steady"])
        lines.append(
            f"| {key} | {r['step_s'] * 1e3:.1f} | {r['min_s'] * 1e3:.1f}-{r['max_s'] * 1e3:.1f} "
            f"({r['spread_pct']:.1f}%) | {r['tokens_per_s']:,.0f} | {r['tflops']:.0f} | "
            f"{r['mfu'] * 100:.1f}% | {warm} |")
    found = ratios(rows)
    if found:
        lines += ["", "| ratio (speed) | median | range | target |",
                  "| --- | --- | --- | --- |"]
    for a, b, median, low, high, target in found:
        verdict = "-" if target is None else (
            f">= {target:.2f}x ({'met' if median >= target else 'missed'})")
        lines.append(f"| {a} over {b} | {median:.3f}x | {low:.3f}-{high:.3f} | {verdict} |")
    if result.get("errors"):
        lines += ["", "Failed (the other variants ran):", ""]
        lines += [f"- `{k}`: {v[:160]}" for k, v in result["errors"].items()]
    profiled = {k: r["profile"] for k, r in rows.items() if r.get("profile")}
    if profiled:
        categories = sorted({c for p in profiled.values() for c in p["kernels_ms"]},
                            key=lambda c: -max(p["kernels_ms"].get(c, 0) for p in
                                               profiled.values()))
        lines += ["", "One profiled step per variant, GPU kernel ms by category:", "",
                  "| variant | wall ms | busy ms | launches | " + " | ".join(categories) + " |",
                  "| --- " * (4 + len(categories)) + "|"]
        for key, p in profiled.items():
            cells = " | ".join(f"{p['kernels_ms'].get(c, 0):.1f}" for c in categories)
            lines.append(f"| {key} | {p['wall_ms']:.0f} | {p['busy_ms']:.0f} | "
                         f"{p['launches']} | {cells} |")
        lines += _gap_lines(profiled)
    return "\n".join(lines)


def _gap_lines(profiled: dict) -> list[str]:
    """Idle GPU time of each profiled step and the host code it waited for (gaps.py)."""
    with_gaps = {k: p["gaps"] for k, p in profiled.items() if p.get("gaps")}
    if not with_gaps:
        return []
    lines = ["", "Idle GPU time in the profiled step (gaps between kernels; `late`: the next "
             "kernel was launched after the GPU went idle) and the host code that launched "
             "the kernel after the gap (top 3):", "",
             "| variant | idle ms | late ms | gaps | waited for (ms, gaps) |",
             "| --- | --- | --- | --- | --- |"]
    for key, g in with_gaps.items():
        top = "; ".join(f"{label} {ms:.1f} ({n})" for label, ms, n in g["by_launcher"][:3])
        lines.append(f"| {key} | {g['idle_ms']:.1f} | {g['late_ms']:.1f} | {g['num_gaps']} | "
                     f"{top.replace('|', '/')} |")
    return lines


def _run_text(result: dict) -> str:
    return (
        f"Command: `{result['command']}` (recipe `{result['recipe']}`; FP8 = "
        f"{result['fp8_recipe']}). {result['rounds']} interleaved rounds x "
        f"{result['steps_per_round']} steps per system and precision after the warm-up steps; "
        f"{result['tokens_per_step']:,} tokens per step; MFU against "
        f"{result['peak_tflops']:.0f} dense BF16 TFLOP/s; peak memory of the whole process "
        f"{result['peak_memory_gb']:.1f} GB.\n\n" + render(result) + "\n"
    )


def section(results: list[dict]) -> str:
    """The docs section: the machine, then each run (the first is the main one)."""
    m = results[0]["machine"]
    text = (
        "## Whole-step speed at V3 per-GPU shapes (`python -m benchmarks.speed`)\n\n"
        f"Machine: {m.get('gpu', 'CPU')}, torch {m.get('torch')}, CUDA {m.get('cuda')}, "
        f"Transformer Engine {m.get('transformer_engine')}, cuBLASLt {m.get('cublaslt')}, "
        f"megatron-core {m.get('megatron_core')}, Python {m.get('python')}. Each run is one "
        "process with every system built side by side and timed interleaved.\n\n"
    )
    return text + "\n".join(_run_text(r) for r in results)


def write_docs(results: list[dict], path: Path = DOCS) -> None:
    write_section(path, section(results), START, END)


def main(argv=None) -> int:
    """Re-render the docs section from saved `--json` files (the main run first)."""
    import sys

    paths = argv if argv is not None else sys.argv[1:]
    write_docs([json.loads(Path(p).read_text()) for p in paths])
    print(f"rewrote the section speed of {DOCS} from {len(paths)} file(s), the first as the "
          "main run; every run the section should keep must be among them")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
