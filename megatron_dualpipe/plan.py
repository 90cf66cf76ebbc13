"""`python -m megatron_dualpipe plan RECIPE [--json] [--set k=v ...]`: dry-run a recipe.

Validates the recipe and reports world size, rank layout, parameter counts, memory per GPU and
the schedule's bubble, without starting processes or allocating the model. `--predict` adds
the predicted step time, throughput and cost on a GPU type (`planning/predict/`); `--search
--gpus N` ranks the layouts of N GPUs by predicted throughput.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from megatron_dualpipe.cli_args import positive_float, writable_file
from megatron_dualpipe.config import validate as V
from megatron_dualpipe.config.load import apply_overrides, format_validation_error, load_raw
from megatron_dualpipe.config.rules import RECIPE_RULES, check_recipe
from megatron_dualpipe.config.schema import Recipe
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.planning import make_plan
from megatron_dualpipe.schedules.spec import SPECS

B = 1e9


def load_plan_recipe(path: str | Path, overrides=()) -> Recipe:
    """Load and validate like `load_recipe`, accepting `parallel.layers_per_stage`.

    With an explicit split the rules are `RECIPE_RULES` without `check_fusions`; otherwise
    exactly `RECIPE_RULES` (`config/rules.py`).
    """
    return validate_plan_recipe(apply_overrides(load_raw(path), overrides), path)


def validate_plan_recipe(raw: dict, path: str | Path) -> Recipe:
    """`load_plan_recipe` on an already loaded (and overridden) raw recipe dict."""
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err, str(path))) from None
    rules = RECIPE_RULES
    if recipe.parallel.layers_per_stage is not None:
        rules = [rule for rule in RECIPE_RULES if rule.check is not V.check_fusions]
    check_recipe(recipe, str(path), rules)
    return recipe


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", help="path to a recipe YAML")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="override a recipe field (repeatable)")
    parser.add_argument("--gpu-memory-gb", type=positive_float, default=None,
                        help="memory per GPU to check against (default: the --hardware's, "
                        "else 80, H100/H800)")
    parser.add_argument("--predict", action="store_true",
                        help="predict step time, tokens/s per GPU, MFU and GPU-hours per "
                        "trillion tokens (planning/predict/)")
    parser.add_argument("--search", action="store_true",
                        help="rank the layouts of --gpus GPUs by predicted throughput")
    parser.add_argument("--gpus", type=int, default=None, help="GPUs for --search")
    parser.add_argument("--hardware", default="h800",
                        help="h800, h100, h200 or a hardware YAML file (default: h800)")
    parser.add_argument("--calibration", default=None,
                        help="per-layer calibration JSON (default: planning/calibration/"
                        "h200_v3_rank.json)")
    parser.add_argument("--png", default=None, type=writable_file,
                        help="with --predict: write the predicted timeline (and with --search "
                        "the layouts' throughput) to this PNG")


def run(args) -> int:
    predicting = args.predict or args.search
    if args.search and args.gpus is None:
        raise UserError("--search needs --gpus N (the number of GPUs to lay out)")
    if args.gpus is not None and not args.search:
        raise UserError("--gpus is for --search")
    if args.png and not predicting:
        raise UserError("--png needs --predict or --search")
    recipe = load_plan_recipe(args.recipe, args.overrides)
    hw = cal = None
    if predicting:
        from megatron_dualpipe.planning.predict.calibration import load_calibration
        from megatron_dualpipe.planning.predict.hardware import load_hardware

        hw, cal = load_hardware(args.hardware), load_calibration(args.calibration)
    memory_gb = args.gpu_memory_gb or (hw.hbm_gb if hw else 80.0)
    plan = make_plan(recipe, memory_gb)
    plan["recipe"] = str(args.recipe)
    model = layouts = None
    if args.predict:
        from megatron_dualpipe.planning.predict.model import StepModel, predict

        model = StepModel(recipe, hw, cal)
        plan["predict"] = predict(recipe, hw, cal, model)
        plan["predict"]["max_memory_per_gpu_gb"] = max(plan["per_rank_memory_gb"])
    if args.search:
        from megatron_dualpipe.planning.predict.search import search

        layouts = search(args.recipe, args.overrides, recipe, args.gpus, hw, cal,
                         validate_plan_recipe)
        plan["search"] = {"gpus": args.gpus, "hardware": hw.name,
                          "layouts": [c.to_json() for c in layouts]}
    if args.png:
        from megatron_dualpipe.planning.predict.draw import draw_prediction, draw_search

        if model is not None:
            draw_prediction(model, {**plan["predict"], "name": recipe.name}, args.png,
                            layouts=layouts)
        else:
            draw_search(layouts, args.png, f"{recipe.name}: {args.gpus} x {hw.name}")
    if args.json:
        print(json.dumps(plan, indent=1))
    else:
        from megatron_dualpipe.planning.predict.report import format_prediction, format_search

        text = [format_plan(plan)]
        if "predict" in plan:
            text.append(format_prediction(plan["predict"]))
        if layouts is not None:
            text.append(format_search(layouts, args.gpus, hw.name))
        print("\n".join(text))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="megatron-dualpipe plan", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except UserError as err:
        print(f"megatron-dualpipe plan: error: {err}", file=sys.stderr)
        return err.exit_code


# ---------------------------------------------------------------------------- text output


def _b(n: float) -> str:
    """A count with a unit: 671.03B, 12.5M, 3.2K."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:g}"


def _gb(x: float, width: int) -> str:
    return f"{x:{width}.1f}" if x >= 0.1 or x == 0 else f"{x:{width}.1e}"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _span(pair: list[int]) -> str:
    return str(pair[0]) if pair[0] == pair[1] else f"{pair[0]}-{pair[1]}"


def _chunk_text(c: dict, mtp: int) -> str:
    parts = ["embedding"] if c["embedding"] else []
    if c["layers"]:
        parts.append(f"L{_span(c['layers'])}")
    if c["head_and_mtp"]:
        parts += ([f"MTP x{mtp}"] if mtp else []) + ["head"]
    return f"s{c['stage']}: " + ("+".join(parts) or "-")


def _expert_ranges(e: dict, ep: int) -> str:
    n = e["per_ep_rank"]
    shown = [0, 1, ep - 1] if ep > 3 else list(range(ep))
    items = [f"{r}: {r * n}-{(r + 1) * n - 1}" if n > 1 else f"{r}: {r}" for r in shown]
    if ep > 3:
        items.insert(2, "...")
    return ", ".join(items)


def format_plan(plan: dict) -> str:
    """The human-readable report."""
    p, prm, mtp = plan["parallel"], plan["params"], plan["params"]["mtp"]
    mtp_layers = plan["mtp_num_layers"]
    stages = plan["stages"]
    copies = " (each held by 2 mirror ranks)" if SPECS[p["schedule"]].bidirectional else ""
    lines = [f"recipe {plan['name']} ({plan['recipe']}): valid"]
    lines.append(
        f"world size {plan['world_size']} = {_plural(plan['num_nodes'], 'node')} x "
        f"{_plural(plan['gpus_per_node'], 'GPU')}; tp {p['tp']}, pp {p['pp']}, ep {p['ep']} "
        f"(an EP group spans "
        f"{plan['experts']['ep_group_nodes']} node(s)), dp {p['dp']}"
        f"{' (ZeRO-1)' if p['zero1'] else ''}, expert dp {p['expert_dp']}"
    )
    lines.append(
        f"schedule {p['schedule']}: {_plural(stages['count'], 'stage')}{copies}, "
        f"{plan['num_microbatches']} micro-batches per step; decoder layers per stage "
        f"{stages['layers_per_stage']}"
    )
    ramp = plan.get("batch_ramp")
    lines.append(f"training: {_b(plan['training_tokens'])} tokens" + (
        f"; batch ramp {ramp['start']}"
        + (f" (runs as {ramp['first_batch']})" if ramp["first_batch"] != ramp["start"] else "")
        + f" -> {ramp['final_batch']} (+{ramp['increment']}) "
        f"over {ramp['ramp_steps']:,} steps, {_b(ramp['ramp_tokens'])} tokens" if ramp else ""))
    lines.append("parameters (main model = embedding + decoder layers + final norm + output head):")
    lines.append(
        f"  total      {_b(prm['total'])}  (embedding {_b(prm['embedding'])}, head "
        f"{_b(prm['output_head'])}, decoder layers {_b(prm['decoder_layers'])})"
    )
    lines.append(
        f"  activated  {_b(prm['activated'])} per training token = main model "
        f"{_b(prm['activated_main'])} + MTP {_b(prm['mtp_activated'])} (weights a token is "
        f"multiplied with: output head included once, embedding table not, a lookup; with the "
        f"table {_b(prm['activated_main_with_embedding'])} main)"
    )
    if mtp:
        lines.append(
            f"  MTP        {_b(mtp)} unique (embedding and head shared); main + MTP: "
            f"{_b(prm['total_with_mtp'])} total"
        )
    e = plan["experts"]
    lines.append(f"experts: {e['physical']} slots, {e['per_ep_rank']} per EP rank "
                 f"(ep rank: experts) {_expert_ranges(e, p['ep'])}")
    lines.append("pipeline ranks (every GPU of a pipeline rank holds the same stages; GB = 1e9 B):")
    lines.append(f"  {'pp':>3} {'ranks':>10} {'nodes':>8}  {'chunks':<44} {'params':>7} "
                 f"{'weight':>6} {'grad':>6} {'optim':>6} {'fp8':>5} {'act':>6} {'(mb)':>4} "
                 f"{'total':>6}")
    for r, m in zip(plan["pipeline_ranks"], plan["memory"]):
        chunks = " | ".join(_chunk_text(c, mtp_layers) for c in r["chunks"])
        lines.append(
            f"  {r['pp_rank']:>3} {_span(r['global_ranks']):>10} {_span(r['nodes']):>8}  "
            f"{chunks:<44} {_b(m['params']):>7} {_gb(m['weights'], 6)} {_gb(m['grads'], 6)} "
            f"{_gb(m['optimizer'], 6)} {_gb(m['fp8_weights'], 5)} {_gb(m['activations'], 6)} "
            f"{m['peak_microbatches']:>4} {_gb(m['total'], 6)}"
        )
    worst = max(plan["per_rank_memory_gb"])
    lines.append(f"  max per GPU: {worst:.3g} GB of {plan['gpu_memory_gb']:g} GB "
                 "(not counted: CUDA context, NCCL/DeepEP buffers, transient workspaces)")
    closed = plan["closed_form_bubble"]
    c = plan["costs"]
    lines.append(
        f"bubble (simulator, F={c['f']:g} B={c['b']:g} W={c['w']:g} F&B={c['fb']:g}): "
        f"{plan['bubble']:g} of makespan {plan['makespan']:g} ({plan['bubble_fraction']:.1%})"
        + (f"; DeepSeek closed form {closed:g}" if closed is not None else "")
    )
    lines.append(f"memory model: {plan['memory_assumptions']} (planning/memory.py)")
    lines += [f"warning: {w}" for w in plan["warnings"]]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
