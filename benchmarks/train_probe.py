#!/usr/bin/env python
"""Diagnose a training configuration on one GPU: per-step losses and, after the first step,
which parameters have non-finite gradients (`main_grad`) or values.

    python benchmarks/train_probe.py --recipe recipes/fp8_proxy_1gpu.yaml --steps 4 \
        --variant "1f1b=fp8.recipe=none" \
        --variant "dualpipev=fp8.recipe=none;parallel.schedule=dualpipev"

Each --variant is NAME=OVERRIDE;OVERRIDE;... (recipe overrides as for `--set`). Trains in this
process (world size 1) with `megatron_dualpipe.in_process.run_training`.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_dualpipe.in_process import run_training  # noqa: E402


def nonfinite(state) -> dict:
    """Names of parameters whose main_grad / value holds NaN or Inf, and the grad norm."""
    bad_grad, bad_param, total = [], [], 0.0
    for i, chunk in enumerate(state.model):
        for name, p in chunk.named_parameters():
            g = getattr(p, "main_grad", None)
            if g is None:
                g = p.grad
            if g is not None:
                norm = float(g.float().norm())
                if not math.isfinite(norm):
                    bad_grad.append(f"chunk{i}.{name}")
                else:
                    total += norm ** 2
            if not bool(p.detach().isfinite().all()):
                bad_param.append(f"chunk{i}.{name}")
    return {"nonfinite_grads": bad_grad, "nonfinite_params": bad_param,
            "finite_grad_norm": total ** 0.5}


def main() -> int:
    from megatron_dualpipe.config import load_recipe
    from megatron_dualpipe.distributed import destroy_distributed

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", default="recipes/fp8_proxy_1gpu.yaml")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--set", action="append", default=[], help="override for every variant")
    p.add_argument("--variant", action="append", required=True, metavar="NAME=OV;OV")
    args = p.parse_args()
    try:
        for spec in args.variant:
            name, _, overrides = spec.partition("=")
            extra = [o for o in overrides.split(";") if o]
            recipe = load_recipe(ROOT / args.recipe, [*args.set, *extra,
                                                      f"train.log_dir=runs/probe/{name}"])
            try:
                first = run_training(recipe, 1, after=lambda state, source: nonfinite(state))
                run = run_training(recipe, args.steps)
            except Exception as err:  # noqa: BLE001 - report and go on with the next variant
                print(f"[probe] {name}: {type(err).__name__}: {str(err)[:300]}", flush=True)
                continue
            info = first["after"]
            print(f"[probe] {name}: losses {[round(x, 4) for x in run['losses']]}", flush=True)
            print(f"[probe] {name}: after step 0: grad norm (finite part) "
                  f"{info['finite_grad_norm']:.4g}; non-finite grads "
                  f"{len(info['nonfinite_grads'])}: {info['nonfinite_grads'][:12]}; non-finite "
                  f"params {len(info['nonfinite_params'])}: {info['nonfinite_params'][:6]}",
                  flush=True)
    finally:
        destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
