"""`python -m megatron_dualpipe {train,recipes,data,plot,simulate,plan,eplb,trace}`."""

from __future__ import annotations

import argparse
import os
import sys

from megatron_dualpipe.cli_args import positive_int
from megatron_dualpipe.console import quiet_dependencies, say
from megatron_dualpipe.errors import UserError


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train from a YAML recipe")
    p.add_argument("recipe", help="path to a recipe YAML (e.g. recipes/tiny_moe_cpu.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set parallel.pp=2 (repeatable)")
    p.add_argument("--nproc-per-node", type=positive_int, default=None,
                   help="processes to start on this machine (default: from the recipe)")
    p.add_argument("--print-config", action="store_true",
                   help="print the fully resolved recipe (what <log_dir>/config.yaml gets) and "
                   "exit")
    p.add_argument("--force", action="store_true",
                   help="start even if the estimated memory per device exceeds the device's")
    p.add_argument("--profile-steps", default=None, metavar="A:B",
                   help="write PyTorch profiler Chrome traces of steps A..B-1 to "
                   "<log_dir>/traces/rank<r>.json (analyze: python -m megatron_dualpipe trace)")


def _run_train(args) -> int:
    from megatron_dualpipe import checkpoint_files, launch
    from megatron_dualpipe.config import load_recipe, world_size
    from megatron_dualpipe.config.rules import TRAIN_RULES, check_recipe, launch_rules
    from megatron_dualpipe.lifetime import LAUNCHER_PID_VAR

    overrides = list(args.overrides)
    if args.nproc_per_node is not None:
        overrides.append(f"parallel.nproc_per_node={args.nproc_per_node}")
    if args.profile_steps:  # [overlap] quoted: YAML would read 2:4 as a base-60 number
        from megatron_dualpipe.profiling import parse_steps

        first, end = parse_steps(args.profile_steps)
        overrides.append(f"train.profile_steps='{first}:{end}'")
    recipe = load_recipe(args.recipe, overrides)  # schema and RECIPE_RULES
    if args.print_config:
        from megatron_dualpipe.config.dump import resolved_yaml

        print(resolved_yaml(recipe), end="")
        return 0
    if launch.in_launched_job() and os.environ.get(LAUNCHER_PID_VAR):
        check_recipe(recipe, args.recipe, TRAIN_RULES)  # our launcher checked this machine
    else:
        from megatron_dualpipe.planning.fits import MEMORY_RULE

        memory = None if args.force else MEMORY_RULE
        check_recipe(recipe, args.recipe, launch_rules(memory))  # before any worker
    if not launch.in_launched_job():
        nproc = recipe.parallel.nproc_per_node or world_size(recipe) // recipe.parallel.num_nodes
        if recipe.parallel.num_nodes > 1:
            raise UserError(
                f"parallel.num_nodes={recipe.parallel.num_nodes}: start multi-node jobs with "
                "torchrun or scripts/train.sbatch"
            )
        checkpoint_files.check_fresh_start(recipe)
        done = _finished(recipe)
        if done:
            print(f"[megatron_dualpipe] {done}", flush=True)
            return 0
        argv = ["train", args.recipe, *sum((["--set", o] for o in overrides), [])]
        say(f"{recipe.name}: starting {nproc} process{'es' * (nproc > 1)} on this machine "
            "(each imports torch and Megatron-Core first: some seconds)")
        return launch.spawn_local(argv, nproc)
    expected = world_size(recipe)
    actual = int(os.environ["WORLD_SIZE"])
    if actual != expected:
        raise UserError(
            f"the job has WORLD_SIZE={actual} processes but the recipe needs {expected} "
            "(parallel.num_nodes x parallel.nproc_per_node); fix one of them"
        )
    from megatron_dualpipe.train import run_worker

    return run_worker(recipe)


def _finished(recipe) -> str | None:
    """The "already complete" message when the newest intact checkpoint is the last step."""
    if not (recipe.train.ckpt_dir and recipe.train.resume):
        return None
    from megatron_dualpipe import checkpoint_files

    step = checkpoint_files.newest_complete(recipe.train.ckpt_dir)
    if step is None or step < recipe.train.steps:
        return None
    return checkpoint_files.already_complete(recipe, step)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-dualpipe", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _optional_subcommands(sub)
    return parser


_OPTIONAL = {
    "recipes": ("megatron_dualpipe.catalogue", "list the shipped recipes"),
    "data": ("megatron_dualpipe.data.prepare",
             "prepare training data: text/JSONL -> Megatron .bin/.idx (data prepare)"),
    "plot": ("megatron_dualpipe.plot", "draw a run's loss, val_loss, tokens/s (and EPLB) to a PNG"),
    "simulate": ("megatron_dualpipe.schedules.simulate_cli", "simulate a pipeline schedule"),
    "eplb": ("megatron_dualpipe.eplb.cli", "expert-parallel load balancing tools"),
    "plan": ("megatron_dualpipe.plan", "dry-run a recipe: layout, parameters, memory"),
    "trace": ("megatron_dualpipe.trace_analysis",
              "all-to-all time and its overlap with compute, from a profiler trace"),
}


def _optional_subcommands(sub) -> None:
    import importlib

    for name, (module, help_text) in _OPTIONAL.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)


def main(argv=None) -> int:
    quiet_dependencies()
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from megatron_dualpipe import launch

        launch.adopt_slurm_env()
        if launch.in_launched_job():  # a worker: die with the launcher, stop on SIGTERM
            from megatron_dualpipe.lifetime import init_worker

            init_worker()
    try:
        if args.command == "train":
            return _run_train(args)
        return args._module.run(args)
    except UserError as err:
        print(f"megatron-dualpipe {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print(f"megatron-dualpipe {args.command}: interrupted", file=sys.stderr)
        return 130
