"""A calibration whose layer times are measured: `benchmarks.speed` on the V3 rank recipe.

    python benchmarks/calibration_from_speed.py \
        [--speed benchmarks/results/speed_h200_l9.json] [--out FILE]

`benchmarks.speed` timed our 1F1B on recipes/deepseek_v3_rank_1gpu.yaml (one V3 GPU's per-layer
shapes and FLOPs, EP1: no all-to-all) in BF16 and FP8 on one H200. Its median step divided by
layers x micro-batches is the measured time of one MoE layer's forward + backward for one
4096-token micro-batch, with whatever the GPU waited on the host; it also carries the rank
recipe's optimizer step and small (vocabulary 8192) head, about 3% of the 9-layer step, so it is
an upper bound. How that time splits over the parts (attention vs experts) and passes (F, B, W)
is not measured: it follows the analytic model (`calibration_analytic.py`), scaled so that
attention + MoE equal the measurement, per precision; the dense-MLP and head entries get the
same factor. `calibrate_layer.py` measures the split itself and replaces this file.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.calibration_analytic import (  # noqa: E402
    GEMM_RESULTS,  # noqa: E402
    V3,
    analytic_calibration,
    gemm_rates,
)
from megatron_dualpipe.plan import load_plan_recipe  # noqa: E402
from megatron_dualpipe.planning.predict.calibration import DEFAULT_CALIBRATION  # noqa: E402

SPEED = ROOT / "benchmarks" / "results" / "speed_h200_l9.json"
LAYER_PARTS = ("attention", "moe")
PASSES = ("f_ms", "b_ms", "w_ms")


def measured_layer_ms(speed: dict, precision: str) -> float:
    """ms of one layer and micro-batch (forward + backward) in our 1F1B run of `precision`."""
    row = speed["rows"][f"ours_1f1b/{precision}"]
    layers = next(int(o.split("=")[1]) for o in speed["overrides"]
                  if o.startswith("model.num_layers="))
    microbatches = speed["tokens_per_step"] // 4096
    return row["step_s"] * 1e3 / (layers * microbatches)


def scaled(analytic: dict, speed: dict) -> tuple[dict, dict]:
    """The analytic entries scaled per precision to the measured layer time; the factors."""
    out, factors = {}, {}
    for precision, parts in analytic.items():
        model_ms = sum(parts[p][k] for p in LAYER_PARTS for k in PASSES)
        factor = measured_layer_ms(speed, precision) / model_ms
        factors[precision] = factor
        out[precision] = {part: {k: (v * factor if k in PASSES else v) for k, v in e.items()}
                          for part, e in parts.items()}
    return out, factors


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--speed", default=str(SPEED), help="a benchmarks.speed --json result")
    ap.add_argument("--out", default=str(DEFAULT_CALIBRATION))
    args = ap.parse_args(argv)
    recipe = load_plan_recipe(V3)
    speed = json.loads(Path(args.speed).read_text())
    analytic = analytic_calibration(recipe, gemm_rates(GEMM_RESULTS))
    precisions, factors = scaled(analytic, speed)
    doc = {
        "source": "measured layer time, analytic split",
        "description": "one MoE layer's forward+backward per 4096-token micro-batch measured by "
                       f"benchmarks.speed ({speed['command']}) on the V3 rank recipe; split over "
                       "parts and passes as benchmarks/calibration_analytic.py (factors "
                       + ", ".join(f"{p} x{f:.3f}" for p, f in factors.items())
                       + "). Replace with benchmarks/calibrate_layer.py on the GPU.",
        "hardware": "h200",
        "machine": speed["machine"],
        "command": "python benchmarks/calibration_from_speed.py --speed "
                   + str(Path(args.speed).resolve().relative_to(ROOT)),
        "recipe": str(V3.relative_to(ROOT)),
        "micro_batch_tokens": recipe.model.seq_length * recipe.train.micro_batch_size,
        "precisions": precisions,
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}: factors " + ", ".join(f"{p} {f:.3f}" for p, f in factors.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
