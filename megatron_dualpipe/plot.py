"""`plot RUN_DIR`: a run's metrics.jsonl as one PNG.

Panels over steps: training loss with validation loss, tokens/s (the first step left out: it
warms up), and with EPLB the mean balancedness (with the replanning steps marked).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from megatron_dualpipe.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR",
                        help="a run's train.log_dir (holding metrics.jsonl)")
    parser.add_argument("--output", "-o", default=None, metavar="FILE",
                        help="PNG to write (default: RUN_DIR/metrics.png)")


def read_metrics(run_dir: str) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (give a run's train.log_dir)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number}: not a JSON line") from None
    if not records:
        raise UserError(f"{path}: no steps logged yet")
    return records


def _run_name(run_dir: str) -> str:
    config = Path(run_dir) / "config.yaml"
    if config.is_file():
        import yaml

        data = yaml.safe_load(config.read_text()) or {}
        if isinstance(data, dict) and data.get("name"):
            return str(data["name"])
    return Path(run_dir).name


def _throughput_points(records: list[dict]) -> tuple[list[int], list[float], float | None]:
    """(steps, tokens/s, overall tokens/s) without the first step, which warms up."""
    timed = [r for r in records[1:] if "tokens_per_s" in r]
    steps = [r["step"] + 1 for r in timed]
    values = [r["tokens_per_s"] for r in timed]
    seconds = sum(r["step_time_s"] for r in timed)
    tokens = sum(r["tokens_per_s"] * r["step_time_s"] for r in timed)
    return steps, values, (tokens / seconds if seconds else None)


def draw(records: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    eplb = any("eplb_balancedness" in r for r in records)
    panels = 3 if eplb else 2
    fig, axes = plt.subplots(panels, 1, figsize=(8, 2.6 * panels + 0.6), sharex=True)
    steps = [r["step"] + 1 for r in records]

    ax = axes[0]
    ax.plot(steps, [r["loss"] for r in records], label="loss (training batch)", linewidth=1.2)
    validated = [r for r in records if "val_loss" in r]
    if validated:
        ax.plot([r["step"] + 1 for r in validated], [r["val_loss"] for r in validated], "o-",
                label="val_loss", linewidth=1.5, markersize=4)
        last = validated[-1]
        ax.annotate(f"{last['val_loss']:.3f}", (last["step"] + 1, last["val_loss"]),
                    textcoords="offset points", xytext=(4, 6), fontsize=8)
    ax.set_ylabel("loss (nats/token)")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)

    ax = axes[1]
    tp_steps, tp, overall = _throughput_points(records)
    ax.plot(tp_steps, tp, color="tab:green", linewidth=1.2)
    if overall:
        ax.axhline(overall, color="tab:green", linestyle=":", linewidth=1)
        ax.set_title(f"{overall:,.0f} tokens/s over steps {tp_steps[0]}-{tp_steps[-1]} "
                     "(the first step warms up and is left out)", fontsize=9)
    ax.set_ylabel("tokens/s")
    ax.grid(alpha=0.3)

    if eplb:
        ax = axes[2]
        bal = [r for r in records if "eplb_balancedness" in r]
        ax.plot([r["step"] + 1 for r in bal], [r["eplb_balancedness"] for r in bal],
                color="tab:purple", linewidth=1.2, label="balancedness (mean/max GPU load)")
        replans = [r["step"] + 1 for r in bal if r.get("eplb_replanned")]
        for i, step in enumerate(replans):
            ax.axvline(step, color="grey", linestyle="--", linewidth=0.8,
                       label="EPLB replan" if i == 0 else None)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("EPLB balancedness")
        ax.legend(frameon=False, fontsize=8, loc="lower right")
        ax.grid(alpha=0.3)

    axes[-1].set_xlabel("step")
    axes[-1].xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    records = read_metrics(args.run_dir)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("plot needs matplotlib: pip install matplotlib") from None
    output = args.output or str(Path(args.run_dir) / "metrics.png")
    first, last = records[0], records[-1]
    title = f"{_run_name(args.run_dir)}: steps {first['step'] + 1}-{last['step'] + 1}"
    draw(records, output, title)
    print(f"wrote {output}")
    return 0
