"""FP8-vs-BF16 loss error of repeated runs of tests/test_fp8_gpu.py, against the randomness of
the runs themselves (BF16 vs BF16 and FP8 vs FP8 of different runs: same seed and data).

    python -m benchmarks.fp8.accuracy_report benchmarks/results/fp8_accuracy_h200.json
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

from megatron_dualpipe.fp8.accuracy import loss_comparison

STATS = (("rel_err_of_means", "tail-mean error (criterion)"),
         ("mean_rel_err", "per-step mean"), ("curve_rel_err_max", "20-step smoothed, max"))


def _row(label: str, stats: list[dict]) -> str:
    cells = []
    for key, _ in STATS:
        values = [s[key] * 100 for s in stats]
        cells.append(f"{min(values):.3f}-{max(values):.3f}%")
    return f"| {label} | {len(stats)} | " + " | ".join(cells) + " |"


def report(result: dict) -> str:
    runs = result["runs"]
    paired = [loss_comparison(r["bf16"], r["fp8"]) for r in runs]
    lines = [f"{len(runs)} runs of {result['steps']} steps, {result['recipe']}, "
             f"{result['machine']}; statistics over the last 20% of the steps.", "",
             "| run | FP8 vs BF16: " + " | ".join(label for _, label in STATS) + " |",
             "| --- " * (len(STATS) + 1) + "|"]
    for i, s in enumerate(paired, 1):
        lines.append(f"| {i} | " + " | ".join(f"{s[k] * 100:.3f}%" for k, _ in STATS) + " |")
    lines += ["", "| pairs | count | " + " | ".join(label for _, label in STATS) + " |",
              "| --- " * (len(STATS) + 2) + "|"]
    pairs = list(itertools.combinations(runs, 2))
    lines.append(_row("FP8 vs BF16, same run", paired))
    lines.append(_row("BF16 vs BF16, two runs", [loss_comparison(a["bf16"], b["bf16"])
                                                  for a, b in pairs]))
    lines.append(_row("FP8 vs FP8, two runs", [loss_comparison(a["fp8"], b["fp8"])
                                                for a, b in pairs]))
    return "\n".join(lines)


def main(argv=None) -> int:
    (path,) = argv if argv is not None else sys.argv[1:]
    print(report(json.loads(Path(path).read_text())))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
