"""Training-time EPLB on top of the aux-loss-free bias, under routing scenarios a user meets.

For each scenario (benchmarks/eplb_scenarios.py: ``static`` skew, skew that ``drift``s over
steps, per-batch ``burst``s of another domain, and ``uniform`` for the replicas' own overhead)
four variants of the same multi-layer MoE proxy (same weights, same data, EP = number of
processes) train side by side in one process group (``train.setup`` once per variant; they
share Megatron's model-parallel groups), their steps interleaved:

* ``none``:      no redundant experts, no expert bias;
* ``bias``:      the aux-loss-free expert bias (Megatron's sign update at ``--bias-rate``);
* ``eplb``:      ``--redundant`` extra slots, replanned and moved every ``--interval`` steps
                 from the last ``--interval`` steps' loads (``eplb.window``);
* ``bias+eplb``: both.

The bias variants start from a bias tuned to the scenario's step-0 routing (as after a long run:
``--bias-steps`` sign updates on the routers alone), then follow the scenario with the training
update. Per variant, over the timed steps (after ``--warmup``):

* MoE-layer time: forward+backward of the first MoE layer on a fixed batch of hidden states,
  right after each step (current placement and bias), median over steps, max over ranks;
* whole-step tokens/s of the proxy (``train_step``: global tokens / step time), median;
* balancedness (mean EP-rank load / busiest EP-rank load over the step's routed tokens, all MoE
  layers; from the EPLB hook's metrics);
* rebalance cost: plan + move time of each rebalance and its share of the interval's time;
* the run-time pay-off estimate of the EPLB hook (eplb/payoff.py: time saved vs cost per step,
  mean over the rebalances), to compare with the measured speeds.

    python benchmarks/eplb_train_bench.py                     # 2 GPUs, V3 rank shapes, writes
                                                              # the docs/benchmarks.md section
    python benchmarks/eplb_train_bench.py --tiny --no-write   # CPU/gloo, tiny sizes (plumbing)
"""

from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.docs_section import write_section  # noqa: E402
from benchmarks.eplb_scenarios import KINDS, Scenario, apply  # noqa: E402
from benchmarks.portable import command_line  # noqa: E402

MARK_START, MARK_END = "<!-- eplb_train_bench:start -->", "<!-- eplb_train_bench:end -->"
VARIANTS = ("none", "bias", "eplb", "bias+eplb")
COMMON = ["parallel.pp=1", "parallel.schedule=1f1b", "moe.seq_aux_loss_coeff=0",
          "eplb.enabled=true", "eplb.min_gain=0", "eplb.migration_aware=true",
          "optimizer.lr_warmup_steps=0", "optimizer.lr_decay_style=constant",
          "model.num_layers=2", "model.num_dense_layers=0", "moe.num_groups=null",
          "moe.group_topk=null"]
# preset -> (recipe, overrides). v3: the V3 rank recipe (hidden 7168, MLA, expert FFN 2048,
# shared expert; docs/deepseek_v3.md) on EP=2 with 16 experts top-8 and 8192 tokens per rank per
# micro-batch: each expert sees 2 * 8192 * 8 / 16 = 8192 tokens, as one GPU of V3's EP64 does
# (64 * 4096 * 8 / 256), and each GPU does 8 experts' work per token, as in V3. BF16.
PRESETS = {
    "tiny": ("tiny_moe_cpu.yaml", [
        "model.hidden_size=64", "model.num_attention_heads=4", "moe.num_experts=8", "moe.topk=2",
        "moe.ffn_hidden_size=32", "moe.shared_expert_ffn_hidden_size=32",
        "model.seq_length=64", "train.micro_batch_size=2", "model.dtype=fp32",
        "train.device=cpu"]),
    "v3": ("deepseek_v3_rank_1gpu.yaml", [
        "moe.num_experts=16", "moe.topk=8", "train.micro_batch_size=2", "fp8.recipe=none"]),
}
TARGETS = {"gain_drift_burst": 1.05, "static_loss": 0.01, "overhead": 0.02, "move_share": 0.01}


def variant_overrides(name: str, args) -> list[str]:
    eplb = "eplb" in name
    return [f"moe.expert_bias={'true' if 'bias' in name else 'false'}",
            f"moe.bias_update_rate={args.bias_rate}",
            f"eplb.num_redundant_experts={args.redundant if eplb else 0}",
            f"eplb.interval={args.interval if eplb else 10**9}",
            f"eplb.window={args.interval}"]


def recipe_for(args, name: str, nproc: int):
    from megatron_dualpipe.config import load_recipe

    recipe, preset = PRESETS[args.preset]
    return load_recipe(ROOT / "recipes" / recipe, COMMON + preset + [
        f"parallel.ep={nproc}", f"parallel.nproc_per_node={nproc}",
        f"train.global_batch_size={nproc * args.micro_batches * _mbs(args)}",
        f"train.steps={args.warmup + args.steps}", "train.log_dir=/tmp/eplb_train_bench",
    ] + variant_overrides(name, args) + list(args.set))


def _mbs(args) -> int:
    values = dict(o.split("=", 1) for o in PRESETS[args.preset][1] + args.set)
    return int(values.get("train.micro_batch_size", 2))


def scenario_for(args, kind: str, num_experts: int) -> Scenario:
    return Scenario(kind, num_experts, skew=args.skew, drift_every=args.drift_every,
                    drift_experts=args.drift_experts, burst_period=args.burst_period,
                    burst_len=args.burst_len)


# ---- worker --------------------------------------------------------------------------------
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tune_bias(routers, hidden, steps: int) -> None:
    """Aux-loss-free bias on the routers alone: ``expert_bias += rate * sign(mean - load)``
    with a decaying rate (the bias of a long run under the current routing)."""
    import torch.distributed as dist

    for router in routers:
        rate = 0.05
        for _ in range(steps):
            router.take_counts()
            router(hidden)
            counts = router.take_counts()[0].to(torch.float64)
            dist.all_reduce(counts, group=router.tp_dp_cp_group)
            with torch.no_grad():
                update = torch.sign(counts.mean() - counts).to(router.expert_bias.dtype)
                router.expert_bias += rate * update.to(router.expert_bias.device)
            rate *= 0.97
        if router.local_tokens_per_expert is not None:
            router.local_tokens_per_expert.zero_()


class Variant:
    """One variant's state, its routers and a timing probe on its first MoE layer."""

    def __init__(self, name: str, state, args):
        from benchmarks.speed.systems import CachedBatches

        self.name, self.state = name, state
        self.hook = next(h for h in state.hooks if hasattr(h, "rebalance"))
        self.routers = [layer.router for layer in self.hook.layers]
        first = self.routers[0]
        self.moe = next(m for m in state.model[0].module.modules()
                        if getattr(m, "router", None) is first)
        self.source = CachedBatches.from_recipe(state.recipe, state.device, num_steps=1)
        r = state.recipe
        dtype = torch.bfloat16 if r.model.dtype == "bf16" else torch.float32
        import torch.distributed as dist

        gen = torch.Generator().manual_seed(1234 + dist.get_rank())
        shape = (r.model.seq_length, r.train.micro_batch_size, r.model.hidden_size)
        self.hidden = torch.randn(shape, generator=gen).to(state.device, dtype).requires_grad_()
        self.grad = torch.randn(shape, generator=gen).to(state.device, dtype)
        self.records, self.layer_ms = [], []

    def time_layer(self) -> float:
        """Forward+backward of the first MoE layer (ms); its routing counts are dropped."""
        _sync(self.state.device)
        start = time.perf_counter()
        out = self.moe(self.hidden)
        (out[0] if isinstance(out, tuple) else out).backward(self.grad)
        _sync(self.state.device)
        ms = (time.perf_counter() - start) * 1e3
        for router in self.routers:
            router.take_counts()
            if router.local_tokens_per_expert is not None:
                router.local_tokens_per_expert.zero_()
        return ms


def run_scenario(args, kind: str) -> dict:
    from megatron_dualpipe.train import setup, train_step

    recipes = [recipe_for(args, name, args.nproc) for name in args.variants]
    states = [setup(r) for r in recipes]  # one process group, same model-parallel groups
    variants = [Variant(name, state, args) for name, state in zip(args.variants, states)]
    scenario = scenario_for(args, kind, recipes[0].moe.num_experts)
    for v in variants:
        if v.state.recipe.moe.expert_bias:
            apply(v.routers, scenario, 0)
            flat = v.hidden.detach().reshape(-1, v.hidden.shape[-1])
            tune_bias(v.routers, flat, args.bias_steps)
    for step in range(args.warmup + args.steps):
        order = variants if step % 2 == 0 else variants[::-1]  # alternate who goes first
        for v in order:
            apply(v.routers, scenario, step)
            record = train_step(v.state, v.source, step)
            ms = v.time_layer()
            if step >= args.warmup:
                v.records.append(record)
                v.layer_ms.append(ms)
    out = {"scenario": scenario.describe(), "variants": {}}
    for v in variants:
        out["variants"][v.name] = summarize(v, args)
    del variants, states  # free the models before the next scenario's
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return out


def summarize(v: Variant, args) -> dict:
    import torch.distributed as dist

    ms = torch.tensor([statistics.median(v.layer_ms)], dtype=torch.float64)
    ms = ms.to(v.state.device) if v.state.device.type == "cuda" else ms
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the layer is as slow as its slowest rank
    recs = v.records
    moves = [r for r in recs if r.get("eplb_replanned")]
    step_s = statistics.median(r["step_time_s"] for r in recs)
    move_ms = [r["eplb_move_ms"] + r["eplb_plan_ms"] for r in moves]
    interval_s = args.interval * step_s
    return {
        "moe_ms": float(ms),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in recs),
        "step_s": step_s,
        "balancedness": statistics.mean(r["eplb_balancedness"] for r in recs),
        "min_balancedness": min(r["eplb_balancedness"] for r in recs),
        "slots": v.routers[0].num_slots,
        "rebalances": len(moves),
        "rebalance_ms": statistics.mean(move_ms) if move_ms else 0.0,
        "move_share": (statistics.mean(move_ms) / 1e3 / interval_s) if move_ms else 0.0,
        "loss_last": recs[-1]["loss"],
        # the run-time pay-off estimate (eplb/payoff.py), mean over the rebalances
        "payoff_saved_ms": _mean(r.get("eplb_payoff_saved_ms") for r in recs),
        "payoff_cost_ms": _mean(r.get("eplb_payoff_cost_ms") for r in recs),
    }


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.mean(values) if values else None


def worker(args) -> dict:
    import torch.distributed as dist

    from megatron_dualpipe.distributed import destroy_distributed

    try:
        results = {kind: run_scenario(args, kind) for kind in args.scenarios}
        results["world"] = dist.get_world_size()
        return results
    finally:
        destroy_distributed()


# ---- report --------------------------------------------------------------------------------
def machine(device: str) -> str:
    if device == "cuda" and torch.cuda.is_available():
        gpu = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    else:
        gpu = f"CPU ({os.cpu_count()} cores)"
    return (f"{gpu}, `{platform.platform()}`, Python {platform.python_version()}, "
            f"torch {torch.__version__}")


def targets(results: dict, args) -> list[str]:
    """The issue's targets, each with its measured value and met / NOT met."""
    out = []

    def line(text: str, ok: bool) -> None:
        out.append(f"- {text} ({'met' if ok else 'NOT met'})")

    for kind in args.scenarios:
        v = results[kind]["variants"]
        if not {"bias", "bias+eplb"} <= set(v) or kind == "uniform":
            continue
        gain = v["bias+eplb"]["tokens_per_s"] / v["bias"]["tokens_per_s"]
        layer = v["bias"]["moe_ms"] / v["bias+eplb"]["moe_ms"]
        if kind == "static":
            line(f"static: bias+EPLB {gain:.3f}x bias alone (tokens/s; MoE layer {layer:.3f}x), "
                 f"no slower than 1 - {TARGETS['static_loss']}", gain >= 1 - TARGETS["static_loss"])
        else:
            line(f"{kind}: bias+EPLB {gain:.3f}x bias alone (tokens/s; MoE layer {layer:.3f}x), "
                 f">= {TARGETS['gain_drift_burst']}x", gain >= TARGETS["gain_drift_burst"])
    uni = results.get("uniform", {}).get("variants", {})
    if {"none", "eplb"} <= set(uni):
        over = uni["eplb"]["moe_ms"] / uni["none"]["moe_ms"] - 1
        line(f"replica overhead at equal balance (uniform: EPLB vs none, MoE layer): "
             f"{100 * over:+.1f}%, <= {100 * TARGETS['overhead']:.0f}%",
             over <= TARGETS["overhead"])
    shares = [(k, results[k]["variants"][n]["move_share"]) for k in args.scenarios
              for n in results[k]["variants"] if results[k]["variants"][n]["rebalances"]]
    if shares:
        kind, worst = max(shares, key=lambda s: s[1])
        line(f"rebalance plan+move time per interval: worst {100 * worst:.2f}% ({kind}), "
             f"<= {100 * TARGETS['move_share']:.0f}%", worst <= TARGETS["move_share"])
    return out


def markdown(results: dict, args, command: str) -> str:
    recipe, preset = PRESETS[args.preset]
    preset = f"recipes/{recipe} " + " ".join(COMMON + preset + list(args.set))
    lines = [
        "## Training-time EPLB on top of the aux-loss-free bias (`benchmarks/eplb_train_bench.py`)",
        "", f"Machine: {machine(PRESET_DEVICE[args.preset])}.", "", f"Command: `{command}`", "",
        (f"Proxy: ep={results['world']}, `{preset}`; {args.micro_batches} micro-batch(es) per "
         f"rank per step; {args.warmup} warm-up + {args.steps} timed steps, the four variants' "
         f"steps interleaved in one process group. EPLB: +{args.redundant} slots, replanned "
         f"every {args.interval} steps from the last {args.interval} steps. Bias: tuned to "
         f"step 0 ({args.bias_steps} router-only sign updates), then Megatron's update at rate "
         f"{args.bias_rate}. MoE ms: forward+backward of the first MoE layer after each step, "
         "median, max over ranks. Balancedness: mean/max EP-rank load, all MoE layers, mean "
         "(min) over the timed steps. Rebalance: plan + move per rebalance, and its share of "
         "the interval (interval x median step time)."), "",
        ("| scenario | variant | slots | MoE fwd+bwd ms | tokens/s | step s | balancedness (min) "
         "| rebalances | plan+move ms | share of interval | hint: saved / cost ms per step |"),
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in args.scenarios:
        for name, r in results[kind]["variants"].items():
            lines.append(
                f"| {kind} | {name} | {r['slots']} | {r['moe_ms']:.2f} | {r['tokens_per_s']:,.0f} "
                f"| {r['step_s']:.3f} | {r['balancedness']:.3f} ({r['min_balancedness']:.3f}) | "
                f"{r['rebalances']} | {r['rebalance_ms']:.1f} | {100 * r['move_share']:.2f}% | "
                f"{_payoff(r)} |")
    lines += ["", "Scenarios: " + "; ".join(results[k]["scenario"] for k in args.scenarios) + ".",
              "", "Targets:", "", *targets(results, args), ""]
    return "\n".join(lines)


PRESET_DEVICE = {"tiny": "cpu", "v3": "cuda"}


def _payoff(r: dict) -> str:
    if r["payoff_cost_ms"] is None:
        return "-"
    verdict = "pays" if r["payoff_saved_ms"] >= r["payoff_cost_ms"] else "does not pay"
    return f"{r['payoff_saved_ms']:.2f} / {r['payoff_cost_ms']:.2f} ({verdict})"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tiny", action="store_true", help="CPU/gloo, tiny sizes (implies --no-write)")
    p.add_argument("--nproc", type=int, default=2, help="processes = EP ranks")
    p.add_argument("--scenarios", default="static,drift,burst,uniform",
                   help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--skew", type=float, default=None,
                   help="router logit ramp per expert (default 0.3 tiny, 0.1 v3)")
    p.add_argument("--drift-every", type=int, default=2, help="steps per hot-spot move")
    p.add_argument("--drift-experts", type=int, default=1, help="experts per hot-spot move")
    p.add_argument("--burst-period", type=int, default=8)
    p.add_argument("--burst-len", type=int, default=2)
    p.add_argument("--redundant", type=int, default=None,
                   help="EPLB redundant slots (default: num_experts / 4, a multiple of EP)")
    p.add_argument("--interval", type=int, default=4, help="steps between rebalances")
    p.add_argument("--bias-rate", type=float, default=1e-3, help="moe.bias_update_rate")
    p.add_argument("--bias-steps", type=int, default=200)
    p.add_argument("--micro-batches", type=int, default=1, help="per rank per step")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=16, help="timed steps per variant")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra recipe override for every variant (repeatable)")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    args.preset = "tiny" if args.tiny else "v3"
    args.no_write = args.no_write or args.tiny
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.variants = [s.strip() for s in args.variants.split(",") if s.strip()]
    for given, allowed, flag in ((args.scenarios, KINDS, "--scenarios"),
                                 (args.variants, VARIANTS, "--variants")):
        bad = [x for x in given if x not in allowed]
        if bad:
            p.error(f"{flag}: unknown {bad}; allowed: {', '.join(allowed)}")
    if args.skew is None:
        args.skew = 0.3 if args.tiny else 0.1
    if args.redundant is None:
        values = dict(o.split("=", 1) for o in PRESETS[args.preset][1] + args.set)
        experts = int(values["moe.num_experts"])
        args.redundant = math.ceil(experts / 4 / args.nproc) * args.nproc
    if not args.tiny and torch.cuda.device_count() < args.nproc:
        p.error(f"needs {args.nproc} GPUs, found {torch.cuda.device_count()} (use --tiny on CPU)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from megatron_dualpipe.testing import run_distributed

    results = run_distributed(worker, args.nproc, (args,))[0]
    command = command_line("benchmarks/eplb_train_bench.py",
                           argv if argv is not None else sys.argv[1:])
    section = markdown(results, args, command)
    print(section)
    if not args.no_write:
        write_section(args.docs, section, MARK_START, MARK_END)
        print(f"wrote the eplb_train_bench section of {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
