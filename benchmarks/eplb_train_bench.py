"""Training-time EPLB on a skewed router: MoE layer time and the busiest EP rank, side by side.

One MoE layer (Megatron-Core MoELayer with `EPLBRouter`, alltoall dispatcher, ep = number of
processes) sees a fixed batch of hidden states per rank; expert ``e``'s router logit gets
``+ skew * e``, so high experts are hot. Three variants, same weights and inputs:

* none:  no redundant experts, identity placement, no expert bias (Megatron's router + skew).
* eplb:  ``--redundant`` extra slots; loads measured on warm-up iterations, then one live
         rebalance (planner + expert/optimizer-state move) before timing.
* bias:  no replicas, the aux-loss-free expert bias only, tuned on the same batch (sign updates
         with a decaying rate, ``--bias-steps`` forward passes): its best case.

Reported per variant: median forward+backward time of the MoE layer (dispatch, experts,
combine), tokens processed by the busiest EP rank and the mean rank per iteration, max/mean and
balancedness (mean/max). For eplb also the live rebalance: slots moved, bytes received by the
busiest rank, move time and planning time.

    python benchmarks/eplb_train_bench.py                      # 2 GPUs, writes docs section
    python benchmarks/eplb_train_bench.py --device cpu --no-write   # tiny sizes on CPU/gloo
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.docs_section import write_section  # noqa: E402

MARK_START, MARK_END = "<!-- eplb_train_bench:start -->", "<!-- eplb_train_bench:end -->"
RECIPE = ROOT / "recipes" / "tiny_moe_cpu.yaml"
COMMON = ["parallel.pp=1", "model.num_layers=2", "model.num_dense_layers=1",
          "moe.seq_aux_loss_coeff=0", "moe.shared_expert_ffn_hidden_size=0", "eplb.enabled=true",
          "eplb.interval=1000000", "eplb.min_gain=0", "train.steps=1"]
PRESETS = {
    "cpu": ["model.hidden_size=64", "model.num_attention_heads=4", "moe.num_experts=8",
            "moe.topk=2", "moe.ffn_hidden_size=32", "moe.num_groups=4", "moe.group_topk=2",
            "model.seq_length=64", "train.micro_batch_size=2", "model.dtype=fp32"],
    "cuda": ["model.hidden_size=2048", "model.num_attention_heads=16", "moe.num_experts=64",
             "moe.topk=6", "moe.ffn_hidden_size=1024", "moe.num_groups=8", "moe.group_topk=4",
             "model.seq_length=4096", "train.micro_batch_size=1", "model.dtype=bf16"],
}


def variant_overrides(name: str, redundant: int) -> list[str]:
    if name == "eplb":
        return [f"eplb.num_redundant_experts={redundant}", "moe.expert_bias=false"]
    if name == "bias":
        return ["eplb.num_redundant_experts=0", "moe.expert_bias=true"]
    return ["eplb.num_redundant_experts=0", "moe.expert_bias=false"]


# ---- worker --------------------------------------------------------------------------------
def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _rank_tokens(layer) -> tuple[float, float]:
    """(busiest EP rank, mean EP rank) tokens of the last iteration(s), all ranks summed."""
    import torch.distributed as dist

    _, slots = layer.router.take_counts()
    slots = slots.to(torch.float64)
    dist.all_reduce(slots, group=layer.router.tp_dp_cp_group)
    per_rank = slots.view(layer.ep_size, -1).sum(dim=1)
    return float(per_rank.max()), float(per_rank.mean())


def _tune_bias(layer, moe, hidden, steps: int, skew: float) -> None:
    """Aux-loss-free balancing on the benchmark batch: expert_bias += rate * sign(mean - load)."""
    import torch.distributed as dist

    router = layer.router
    rate = max(abs(skew), 1e-3) * (router.num_logical - 1) / 10
    for _ in range(steps):
        router.take_counts()
        moe(hidden)  # grad enabled so the router counts; no backward needed
        counts = router.take_counts()[0].to(torch.float64)
        dist.all_reduce(counts, group=router.tp_dp_cp_group)
        with torch.no_grad():
            update = torch.sign(counts.mean() - counts).to(router.expert_bias.dtype)
            router.expert_bias += rate * update.to(router.expert_bias.device)
        rate *= 0.98
    if router.local_tokens_per_expert is not None:
        router.local_tokens_per_expert.zero_()


def bench_variant(args, name: str) -> dict:
    import torch.distributed as dist
    from megatron.core import parallel_state

    from megatron_dualpipe.config import load_recipe
    from megatron_dualpipe.eplb.load_tracker import step_counts
    from megatron_dualpipe.train import setup

    nproc = dist.get_world_size() if dist.is_initialized() else args.nproc
    recipe = load_recipe(RECIPE, COMMON + PRESETS[args.preset] + [
        f"parallel.ep={nproc}", f"train.device={args.device}", f"moe.router_bias_init={args.skew}",
        "train.log_dir=/tmp/eplb_train_bench",
    ] + variant_overrides(name, args.redundant) + list(args.set))
    state = setup(recipe)
    hook = next(h for h in state.hooks if hasattr(h, "rebalance"))
    layer = hook.layers[0]
    moe = next(m for m in state.model[0].module.modules() if getattr(m, "router", None)
               is layer.router)
    dtype = torch.bfloat16 if recipe.model.dtype == "bf16" else torch.float32
    gen = torch.Generator().manual_seed(1234 + dist.get_rank())
    shape = (recipe.model.seq_length, recipe.train.micro_batch_size, recipe.model.hidden_size)
    hidden = torch.randn(shape, generator=gen).to(state.device, dtype).requires_grad_()
    grad = torch.randn(shape, generator=gen).to(state.device, dtype)

    def step():
        out = moe(hidden)
        out = out[0] if isinstance(out, tuple) else out
        out.backward(grad)

    result = {"slots": layer.num_slots}
    if name == "bias":
        _tune_bias(layer, moe, hidden, args.bias_steps, args.skew)
    for _ in range(args.warmup):
        step()
    experts, _ = step_counts(hook.layers)
    if name == "eplb":
        for opt in getattr(state.optimizer, "chained_optimizers", [state.optimizer]):
            if hasattr(opt, "_init_optimizer_states_with_dummy_values"):
                opt._init_optimizer_states_with_dummy_values()  # Adam moments exist, and move
        hook.window.update(experts)
        stats = hook.rebalance(state, force=True)
        moved = hook.move_record(stats)
        result.update(moved_slots=stats.slots_moved, move_bytes=moved["eplb_move_bytes_max_rank"],
                      move_ms=moved["eplb_move_ms"], plan_ms=moved["eplb_plan_ms"])
    times, busiest, mean = [], [], []
    for _ in range(args.iters):
        layer.router.take_counts()
        _sync(state.device)
        start = time.perf_counter()
        step()
        _sync(state.device)
        times.append(time.perf_counter() - start)
        top, avg = _rank_tokens(layer)
        busiest.append(top)
        mean.append(avg)
    ms = torch.tensor([statistics.median(times) * 1e3], dtype=torch.float64)
    ms = ms.to(state.device) if state.device.type == "cuda" else ms
    dist.all_reduce(ms, op=dist.ReduceOp.MAX)  # the layer is as slow as its slowest rank
    top, avg = statistics.mean(busiest), statistics.mean(mean)
    result.update(ms=float(ms), busiest=top, mean=avg, max_over_mean=top / avg,
                  balancedness=avg / top)
    parallel_state.destroy_model_parallel()
    return result


def worker(args) -> dict:
    from megatron_dualpipe.distributed import destroy_distributed

    try:
        results = {name: bench_variant(args, name) for name in ("none", "eplb", "bias")}
        import torch.distributed as dist

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


def markdown(results: dict, args, command: str) -> str:
    preset = " ".join(PRESETS[args.preset] + list(args.set))
    lines = [
        "## Training-time EPLB on a skewed router (`benchmarks/eplb_train_bench.py`)", "",
        f"Machine: {machine(args.device)}.", "",
        f"Command: `{command}`", "",
        (f"One MoE layer, ep={results['world']} (one EP rank per process), `{preset}`; router "
         f"logit skew +{args.skew} x expert index. Time: median forward+backward of the MoE layer "
         f"over {args.iters} iterations (max over ranks). Tokens: routed tokens processed per "
         "iteration by the busiest EP rank and by the mean rank. *bias*: the aux-loss-free "
         f"expert bias alone, tuned on the same batch ({args.bias_steps} sign updates)."), "",
        ("| variant | slots | MoE fwd+bwd ms | busiest-rank tokens | mean-rank tokens "
         "| max/mean | balancedness |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    titles = {"none": "no EPLB", "eplb": f"EPLB (+{args.redundant} replicas)",
              "bias": "aux-loss-free bias only"}
    for name in ("none", "eplb", "bias"):
        r = results[name]
        lines.append(f"| {titles[name]} | {r['slots']} | {r['ms']:.2f} | {r['busiest']:.0f} | "
                     f"{r['mean']:.0f} | {r['max_over_mean']:.3f} | {r['balancedness']:.3f} |")
    e = results["eplb"]
    lines += ["", (f"Live rebalance (eplb, before timing): {e['moved_slots']} slots moved, "
                   f"{e['move_bytes'] / 1e6:.2f} MB received by the busiest rank (weights + fp32 "
                   f"main params where separate + Adam moments), {e['move_ms']:.1f} ms to move, "
                   f"{e['plan_ms']:.1f} ms to plan."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--nproc", type=int, default=2, help="processes = EP ranks")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="layer sizes (default: the device's)")
    parser.add_argument("--skew", type=float, default=None,
                        help="router logit skew per expert index (default 0.3 cpu, 0.05 cuda)")
    parser.add_argument("--redundant", type=int, default=None,
                        help="EPLB redundant experts (default: num_experts / 4)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--bias-steps", type=int, default=200)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="extra recipe override (repeatable)")
    parser.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args(argv)
    args.preset = args.preset or args.device
    if args.skew is None:
        args.skew = 0.3 if args.preset == "cpu" else 0.05
    if args.redundant is None:  # >= a quarter more slots, divisible by EP and the groups
        values = dict(o.split("=", 1) for o in PRESETS[args.preset] + args.set)
        unit = math.lcm(args.nproc, int(values.get("moe.num_groups", 1)))
        args.redundant = -(-int(values["moe.num_experts"]) // 4 // unit) * unit or unit
    if args.device == "cuda" and torch.cuda.device_count() < args.nproc:
        parser.error(f"--device cuda needs {args.nproc} GPUs, found {torch.cuda.device_count()}")

    from megatron_dualpipe.testing import run_distributed

    results = run_distributed(worker, args.nproc, (args,))[0]
    command = shlex.join(["python", "benchmarks/eplb_train_bench.py", *(argv or sys.argv[1:])])
    section = markdown(results, args, command)
    print(section)
    if not args.no_write:
        write_section(args.docs, section, MARK_START, MARK_END)
        print(f"wrote the eplb_train_bench section of {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
