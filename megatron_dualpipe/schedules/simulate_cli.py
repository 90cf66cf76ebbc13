"""``python -m megatron_dualpipe simulate``: simulate a pipeline schedule and report bubbles.

Example::

    python -m megatron_dualpipe simulate --schedule dualpipev --pp 4 --microbatches 16 --json
"""

from __future__ import annotations

import argparse
import json
import sys

from megatron_dualpipe.cli_args import non_negative_float, positive_int, writable_file
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.schedules.actions import build_actions, validate
from megatron_dualpipe.schedules.simulator import (
    Costs,
    SimResult,
    closed_form_bubble,
    simulate,
)
from megatron_dualpipe.schedules.spec import SCHEDULES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``simulate`` options to ``parser``."""
    parser.add_argument("--schedule", choices=SCHEDULES, required=True)
    parser.add_argument("--pp", type=positive_int, required=True, help="pipeline ranks")
    parser.add_argument("--microbatches", type=positive_int, required=True)
    parser.add_argument("--chunks", type=positive_int, default=2,
                        help="model chunks (interleaved)")
    parser.add_argument("--f", type=non_negative_float, default=1.0,
                        help="forward cost of one chunk")
    parser.add_argument("--b", type=non_negative_float, default=2.0, help="full backward cost")
    parser.add_argument("--w", type=non_negative_float, default=1.0,
                        help="weight-grad part of B")
    parser.add_argument("--fb", type=non_negative_float, default=2.5,
                        help="overlapped F&B pair cost")
    parser.add_argument("--p2p", type=non_negative_float, default=0.0,
                        help="cross-rank latency")
    parser.add_argument("--no-overlap", action="store_true", help="run F&B pairs as F then B")
    parser.add_argument("--no-zero-bubble", action="store_true", help="never split B into B+W")
    parser.add_argument("--png", metavar="FILE", type=writable_file,
                        help="draw the timeline to FILE")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


# The simulator walks every action in Python: about 0.2 ms per pipeline rank x micro-batch
# (dualpipev, pp 16 x 2000 micro-batches: 6 s on a busy core), so 50,000 is about 10 s. The
# bubble stops changing once microbatches >= 2 x pp.
MAX_RANK_MICROBATCHES = 50_000


def check_size(pp: int, microbatches: int) -> None:
    """Refuse simulations that would run for minutes (the bubble does not need them)."""
    if pp * microbatches > MAX_RANK_MICROBATCHES:
        raise UserError(
            f"--pp {pp} x --microbatches {microbatches} = {pp * microbatches:,} is above the "
            f"limit of {MAX_RANK_MICROBATCHES:,} (the simulation would take minutes); the "
            f"bubble no longer changes once --microbatches >= 2 x --pp: use at most "
            f"{MAX_RANK_MICROBATCHES // pp:,} micro-batches"
        )


def _report(result: SimResult, closed_form: float | None) -> str:
    head = (f"{result.schedule}: pp={result.num_ranks} microbatches={result.num_microbatches} "
            f"makespan={result.makespan:g}")
    lines = [head]
    lines.append(f"{'rank':>4} {'compute':>9} {'idle':>8} {'peak_act':>8}")
    for r in range(result.num_ranks):
        lines.append(f"{r:>4} {result.compute_per_rank[r]:>9g} "
                     f"{result.bubble_per_rank[r]:>8g} {result.peak_activations_per_rank[r]:>8}")
    if result.num_ranks <= 8:
        for r, timeline in enumerate(result.timelines):
            lines.append(f"rank {r}: " + " ".join(str(e.action) for e in timeline))
    suffix = "" if closed_form is None else f" (closed form {closed_form:g})"
    lines.append(f"bubble (idle time of the most idle rank): {result.bubble:g}{suffix}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the ``simulate`` command; returns the process exit code."""
    try:
        check_size(args.pp, args.microbatches)
        validate(args.schedule, args.pp, args.microbatches, num_chunks=args.chunks)
        costs = Costs(args.f, args.b, args.w, args.fb, args.p2p)
        if not 0 <= costs.w <= costs.b:
            raise UserError(f"--w={args.w:g} must be between 0 and --b={args.b:g}")
    except UserError as exc:
        print(f"megatron-dualpipe simulate: error: {exc}", file=sys.stderr)
        return exc.exit_code
    actions = build_actions(args.schedule, args.pp, args.microbatches,
                            overlap=not args.no_overlap, zero_bubble=not args.no_zero_bubble,
                            num_chunks=args.chunks)
    result = simulate(args.schedule, actions, args.microbatches, costs, args.chunks)
    if args.json:
        print(json.dumps(result.to_json()))
    else:
        default_variant = not (args.no_overlap or args.no_zero_bubble)
        closed = closed_form_bubble(args.schedule, args.pp, costs) if default_variant else None
        print(_report(result, closed))
    if args.png:
        from megatron_dualpipe.schedules.draw import draw_timeline

        try:
            draw_timeline(result, args.png)
        except RuntimeError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if not args.json:
            print(f"wrote {args.png}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Standalone entry point (``python -m megatron_dualpipe.schedules.simulate_cli``)."""
    parser = argparse.ArgumentParser(prog="megatron_dualpipe simulate", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
