"""``eplb`` command line: ``python -m megatron_dualpipe eplb plan --load FILE ...``.

The top-level dispatcher calls :func:`add_arguments` on its ``eplb`` sub-parser and
:func:`run` on dispatch; :func:`main` runs the same thing stand-alone
(``python -m megatron_dualpipe.eplb.cli plan ...``).
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path

import numpy as np
import torch

from megatron_dualpipe.cli_args import non_negative_int, positive_int, writable_file
from megatron_dualpipe.eplb.api import MODES, rebalance_experts
from megatron_dualpipe.eplb.placement.planner import POLICIES, as_weight_array, make_layout
from megatron_dualpipe.eplb.placement.report import gpu_loads, report
from megatron_dualpipe.errors import UserError

EXIT_BAD_INPUT = 2


class CliError(UserError):
    """A mistake in an ``eplb`` argument or input file: printed as one line, exit code 2."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``eplb`` sub-commands (currently ``plan``) to ``parser``."""
    sub = parser.add_subparsers(dest="eplb_command", metavar="COMMAND")
    sub.required = True
    plan = sub.add_parser("plan", help="plan expert replication and placement from loads",
                          description="Plan expert replicas/placement and report balancedness.")
    plan.add_argument("--load", required=True, metavar="FILE",
                      help="per-expert loads [layers, experts] (.pt tensor or .npy)")
    plan.add_argument("--replicas", type=positive_int, required=True,
                      help="physical slots per layer")
    plan.add_argument("--groups", type=positive_int, required=True, help="expert groups")
    plan.add_argument("--nodes", type=positive_int, required=True, help="server nodes")
    plan.add_argument("--gpus", type=positive_int, required=True, help="GPUs in total")
    plan.add_argument("--current", metavar="PLAN",
                      help="current plan (.pt from this command, or a phy2log .pt/.npy); "
                           "enables migration-aware planning")
    plan.add_argument("--out", default="eplb_plan.pt", metavar="FILE", type=writable_file,
                      help="where to write the plan (default: eplb_plan.pt)")
    plan.add_argument("--png", metavar="FILE", type=writable_file,
                      help="draw per-GPU load before/after (matplotlib)")
    plan.add_argument("--mode", choices=MODES, default="fast")
    plan.add_argument("--policy", choices=POLICIES, default="auto")
    plan.add_argument("--expert-bytes", type=non_negative_int, default=0, metavar="N",
                      help="bytes per expert, for the bytes-moved report")


def _load_array(path: str, what: str, keys: tuple[str, ...]) -> np.ndarray:
    file = Path(path)
    if not file.is_file():
        raise CliError(f"{what} file not found: {path}")
    try:
        if file.suffix == ".npy":
            return np.load(file, allow_pickle=False)
        if file.suffix == ".pt":
            obj = torch.load(file, map_location="cpu", weights_only=True)
            if isinstance(obj, dict):
                obj = next((obj[k] for k in keys if k in obj), None)
                if obj is None:
                    raise CliError(f"{what} file {path} has none of the keys {list(keys)}")
            if not isinstance(obj, torch.Tensor):
                raise CliError(f"{what} file {path} does not hold a tensor")
            return obj.detach().cpu().numpy()
    except CliError:
        raise
    except (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise CliError(f"cannot read {what} file {path}: {first_line}") from None
    raise CliError(f"{what} file must end in .pt or .npy: {path}")


def _static_placement(num_layers: int, num_logical: int, num_replicas: int) -> np.ndarray:
    """No-EPLB baseline: slot ``s`` holds expert ``s % num_logical``."""
    return np.tile(np.arange(num_replicas) % num_logical, (num_layers, 1))


def _plot(path: str, before_LG: np.ndarray, after_LG: np.ndarray, before_label: str,
          balancedness: tuple[float, float], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mean = before_LG.mean()
    gpus = np.arange(before_LG.shape[1])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.12 * gpus.size + 2), 3.5))
    ax.bar(gpus - 0.2, before_LG.mean(axis=0) / mean, width=0.4,
           label=f"{before_label}: balancedness {balancedness[0]:.3f}")
    ax.bar(gpus + 0.2, after_LG.mean(axis=0) / mean, width=0.4,
           label=f"EPLB plan: balancedness {balancedness[1]:.3f}")
    ax.axhline(1.0, color="k", linewidth=0.8)
    ax.set_xlabel("GPU")
    ax.set_ylabel("load / mean (averaged over layers)")
    ax.set_title(f"{title}\nbalancedness = mean / max GPU load per layer, averaged over layers",
                 fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _run_plan(args: argparse.Namespace) -> int:
    if args.png:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise CliError("--png needs matplotlib: pip install matplotlib") from None
    load = _load_array(args.load, "load", ("weight", "load", "loads"))
    if load.ndim == 1:
        load = load[None, :]
    current = None
    if args.current:
        current = _load_array(args.current, "current plan", ("phy2log",))
    try:
        phy2log, log2phy, logcnt = rebalance_experts(
            load, args.replicas, args.groups, args.nodes, args.gpus, mode=args.mode,
            policy=args.policy, current_phy2log=current)
        load = as_weight_array(load)
        layout = make_layout(load.shape, args.replicas, args.groups, args.nodes, args.gpus,
                             args.policy)
        before = current if current is not None else _static_placement(
            load.shape[0], load.shape[1], args.replicas)
        rep_before = report(load, before, args.gpus, args.nodes)
        rep_after = report(load, phy2log, args.gpus, args.nodes, current_phy2log=current,
                           expert_bytes=args.expert_bytes)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    policy = "hierarchical" if layout.hierarchical else "global"
    label = "current plan" if current is not None else "static placement"
    meta = {
        "num_replicas": args.replicas, "num_groups": args.groups, "num_nodes": args.nodes,
        "num_gpus": args.gpus, "mode": args.mode, "policy": policy,
        "load_file": str(args.load), "current_file": args.current,
        "balancedness_before": rep_before.mean_balancedness,
        "balancedness_after": rep_after.mean_balancedness,
        "slots_moved": rep_after.slots_moved, "bytes_moved": rep_after.bytes_moved,
    }
    try:
        torch.save({"phy2log": phy2log, "log2phy": log2phy, "logcnt": logcnt, "meta": meta},
                   args.out)
        if args.png:
            _plot(args.png, gpu_loads(load, np.asarray(before, np.int64), args.gpus),
                  gpu_loads(load, phy2log.numpy(), args.gpus), label,
                  (rep_before.mean_balancedness, rep_after.mean_balancedness),
                  f"EPLB plan: {load.shape[0]} layers, {load.shape[1]} experts -> "
                  f"{args.replicas} slots on {args.gpus} GPUs ({args.nodes} nodes), {policy}")
    except OSError as exc:
        raise CliError(f"cannot write output: {exc}") from None
    num_layers, num_logical = load.shape
    print(f"eplb plan: {num_layers} layers, {num_logical} experts -> {args.replicas} slots on "
          f"{args.gpus} GPUs ({args.nodes} nodes), policy={policy}, mode={args.mode}")
    print(f"balancedness before: {rep_before.mean_balancedness:.4f} ({label})")
    print(f"balancedness after:  {rep_after.mean_balancedness:.4f}")
    if current is not None:
        total = num_layers * args.replicas
        print(f"slots moved: {rep_after.slots_moved} of {total} "
              f"({100.0 * rep_after.slots_moved / total:.1f}%), {rep_after.bytes_moved} bytes")
    print(f"wrote {args.out}" + (f" and {args.png}" if args.png else ""))
    return 0


def run(args: argparse.Namespace) -> int:
    """Execute a parsed ``eplb`` command; returns the process exit code."""
    try:
        if args.eplb_command == "plan":
            return _run_plan(args)
        raise CliError(f"unknown eplb command {args.eplb_command!r}")
    except CliError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_BAD_INPUT


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of usage + message
        self.exit(EXIT_BAD_INPUT, f"error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m megatron_dualpipe.eplb.cli plan ...``."""
    parser = _OneLineParser(prog="eplb", description="EPLB expert placement planner")
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
