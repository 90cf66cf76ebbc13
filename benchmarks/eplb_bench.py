"""EPLB planner benchmark at DeepSeek-V3 scale: fast vs compat mode, and migration-aware mode.

58 MoE layers x 256 experts, 320 slots, 8 groups, 8 nodes, 64 GPUs (5 slots per GPU). Loads are
lognormal(sigma) per expert, or Zipf(s): 65,536 routed tokens per layer drawn with expert
probability proportional to rank^-s over a random expert order. Seeds are fixed.

For each distribution it reports, per policy: wall time per full-model ``rebalance_experts`` call
(median over repeats), mean balancedness over layers, layers where fast < compat, duplicates
(replicas sharing a GPU with a replica of the same expert); then for the migration-aware mode
after a 10% load drift (every load times lognormal(0, 0.1)): slots and bytes moved and the
balancedness loss against a fresh plan.

    python benchmarks/eplb_bench.py          # full run; rewrites its section of docs/benchmarks.md
    python benchmarks/eplb_bench.py --quick  # smoke test: 8 layers, few repeats, no docs write
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # runnable from a checkout without installing the package
    sys.path.insert(0, str(REPO))

from benchmarks.docs_section import write_section  # noqa: E402
from benchmarks.portable import command_line  # noqa: E402

NUM_LAYERS, NUM_EXPERTS, NUM_REPLICAS, NUM_GROUPS, NUM_NODES, NUM_GPUS = 58, 256, 320, 8, 8, 64
TOKENS_PER_LAYER = 65536
DRIFT_SIGMA = 0.1
EXPERT_BYTES = 3 * 7168 * 2048  # gate/up/down of one DeepSeek-V3 routed expert, FP8 weights
DISTRIBUTIONS = [("lognormal", 0.5), ("lognormal", 1.0), ("lognormal", 1.5),
                 ("zipf", 0.8), ("zipf", 1.0), ("zipf", 1.2)]
MARK_START, MARK_END = "<!-- eplb_bench:start -->", "<!-- eplb_bench:end -->"
TARGET_MS, TARGET_MOVED, TARGET_LOSS = 10.0, 0.25, 0.01


def make_loads(kind: str, param: float, num_layers: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    if kind == "lognormal":
        loads = rng.lognormal(0.0, param, (num_layers, NUM_EXPERTS)) * 1000
    else:
        ranks = np.arange(1, NUM_EXPERTS + 1) ** -param
        loads = np.stack([rng.multinomial(TOKENS_PER_LAYER, rng.permutation(ranks) / ranks.sum())
                          for _ in range(num_layers)])
    return torch.from_numpy(loads.astype(np.float32))


def timed(fn, repeats: int):
    """(median seconds, result of the last call)."""
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times)), result


def bench_one(loads: torch.Tensor, policy: str, repeats: int, seed: int) -> dict:
    from megatron_dualpipe.eplb import rebalance_experts, report

    args = (NUM_REPLICAS, NUM_GROUPS, NUM_NODES, NUM_GPUS)
    rebalance_experts(loads, *args, policy=policy)  # warm-up (imports, allocator)
    t_fast, fast = timed(lambda: rebalance_experts(loads, *args, policy=policy), repeats)
    t_compat, compat = timed(
        lambda: rebalance_experts(loads, *args, policy=policy, mode="compat"),
        max(1, repeats // 4))
    rep_fast = report(loads, fast[0], NUM_GPUS, NUM_NODES)
    rep_compat = report(loads, compat[0], NUM_GPUS, NUM_NODES)

    drift = np.random.default_rng(seed + 7).lognormal(0.0, DRIFT_SIGMA, tuple(loads.shape))
    new_loads = loads * torch.from_numpy(drift.astype(np.float32))
    fresh = rebalance_experts(new_loads, *args, policy=policy)[0]
    def migrate():
        return rebalance_experts(new_loads, *args, policy=policy, current_phy2log=fast[0])

    migrate()  # warm-up: the first fallback imports scipy's assignment solver
    t_mig, mig = timed(migrate, max(1, repeats // 4))
    rep_mig = report(new_loads, mig[0], NUM_GPUS, NUM_NODES, current_phy2log=fast[0],
                     expert_bytes=EXPERT_BYTES)
    rep_fresh = report(new_loads, fresh, NUM_GPUS, NUM_NODES, current_phy2log=fast[0])
    rep_stale = report(new_loads, fast[0], NUM_GPUS, NUM_NODES)
    total_slots = loads.shape[0] * NUM_REPLICAS
    return {
        "fast_ms": 1e3 * t_fast, "compat_ms": 1e3 * t_compat,
        "fast_bal": rep_fast.mean_balancedness, "compat_bal": rep_compat.mean_balancedness,
        "layers_worse": int((rep_fast.balancedness < rep_compat.balancedness - 1e-12).sum()),
        "fast_dups": rep_fast.duplicates, "compat_dups": rep_compat.duplicates,
        "stale_bal": rep_stale.mean_balancedness, "fresh_bal": rep_fresh.mean_balancedness,
        "mig_bal": rep_mig.mean_balancedness,
        "mig_worst_loss": float((1 - rep_mig.balancedness / rep_fresh.balancedness).max()),
        "mig_moved": rep_mig.slots_moved / total_slots,
        "fresh_moved": rep_fresh.slots_moved / total_slots,
        "mig_gb": rep_mig.bytes_moved / 1e9, "mig_ms": 1e3 * t_mig,
    }


def machine() -> str:
    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"`{platform.platform()}`, {cpu}, os.cpu_count()={os.cpu_count()} "
            f"(usable {usable}), Python {platform.python_version()}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), numpy {np.__version__}")


def markdown(results: dict, num_layers: int, command: str) -> str:
    lines = [
        "## EPLB planner (`benchmarks/eplb_bench.py`)", "",
        f"Machine: {machine()}.", "",
        f"Command: `{command}`", "",
        (f"Shape: {num_layers} layers x {NUM_EXPERTS} experts -> {NUM_REPLICAS} slots, "
        f"{NUM_GROUPS} groups, {NUM_NODES} nodes, {NUM_GPUS} GPUs. Time is the median wall time "
        "of one full-model `rebalance_experts` call. Balancedness = mean GPU load / max GPU load, "
        "averaged over layers. *worse* = layers where fast < compat. Zipf loads are "
        f"{TOKENS_PER_LAYER} routed tokens per layer."), "",
    ]
    for policy, title in (("auto", "auto policy, i.e. hierarchical (8 groups % 8 nodes == 0)"),
                          ("global", "global policy (extra: the targets are for auto)")):
        rows = results[policy]
        lines += [f"### Default (fast) vs compat, {title}", "",
                  ("| loads | fast ms | compat ms | fast bal. | compat bal. | worse | fast dups "
                  "| compat dups |"), "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['fast_ms']:.1f} | {r['compat_ms']:.1f} | "
                         f"{r['fast_bal']:.4f} | {r['compat_bal']:.4f} | {r['layers_worse']} | "
                         f"{r['fast_dups']} | {r['compat_dups']} |")
        lines += ["", (f"Migration-aware, {title}, after {DRIFT_SIGMA:.0%} drift: slots moved vs "
                  "the current plan, against a fresh plan for the new loads; GB at "
                  f"{EXPERT_BYTES / 1e6:.1f} MB per expert."), "",
                  ("| loads | stale bal. | fresh bal. | migration bal. | worst-layer loss | "
                  "moved | GB | fresh plan moved | time ms |"),
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in rows.items():
            lines.append(f"| {name} | {r['stale_bal']:.4f} | {r['fresh_bal']:.4f} | "
                         f"{r['mig_bal']:.4f} | {100 * r['mig_worst_loss']:.2f}% | "
                         f"{100 * r['mig_moved']:.1f}% | {r['mig_gb']:.1f} | "
                         f"{100 * r['fresh_moved']:.1f}% | {r['mig_ms']:.0f} |")
        lines.append("")
    lines += ["### Targets (auto policy)", ""] + [f"- {t}" for t in targets(results["auto"])]
    return "\n".join(lines) + "\n"


def targets(rows: dict) -> list[str]:
    worst_ms = max(r["fast_ms"] for r in rows.values())
    bal_ok = all(r["fast_bal"] >= r["compat_bal"] for r in rows.values())
    worst_moved = max(r["mig_moved"] for r in rows.values())
    worst_loss = max(r["mig_worst_loss"] for r in rows.values())

    def mark(ok):
        return "met" if ok else "MISSED"

    return [
        (f"fast mode <= {TARGET_MS:.0f} ms per call: slowest distribution {worst_ms:.1f} ms "
        f"({mark(worst_ms <= TARGET_MS)})"),
        f"fast balancedness >= compat on every distribution ({mark(bal_ok)})",
        (f"migration-aware moves <= {TARGET_MOVED:.0%} of slots at <= {TARGET_LOSS:.0%} loss: "
        f"worst {100 * worst_moved:.1f}% moved, worst-layer loss {100 * worst_loss:.2f}% "
        f"({mark(worst_moved <= TARGET_MOVED and worst_loss <= TARGET_LOSS + 1e-9)})"),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 8 layers, few repeats; does not write docs")
    parser.add_argument("--docs", type=Path, default=REPO / "docs" / "benchmarks.md",
                        help="markdown file whose eplb_bench section is rewritten")
    parser.add_argument("--no-docs", action="store_true", help="only print the results")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per measurement")
    args = parser.parse_args(argv)
    num_layers = 8 if args.quick else NUM_LAYERS
    repeats = args.repeats or (2 if args.quick else 20)
    results: dict = {"auto": {}, "global": {}}
    for index, (kind, param) in enumerate(DISTRIBUTIONS):
        seed = 1000 + index
        loads = make_loads(kind, param, num_layers, seed)
        name = f"{kind}(sigma={param})" if kind == "lognormal" else f"zipf(s={param})"
        for policy, rows in results.items():
            rows[name] = bench_one(loads, policy, repeats, seed)
            print(f"{policy:6s} {name:22s} " + " ".join(
                f"{k}={v:.4g}" for k, v in rows[name].items()), flush=True)
    command = command_line("benchmarks/eplb_bench.py", argv or sys.argv[1:])
    section = markdown(results, num_layers, command)
    print()
    print(section)
    if not (args.quick or args.no_docs):
        write_section(args.docs, section, MARK_START, MARK_END)
        print(f"wrote the eplb_bench section of {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
