"""``python -m megatron_dualpipe trace``: communication/compute overlap of profiler traces.

    python -m megatron_dualpipe trace runs/x/traces            # a directory: one trace a rank
    python -m megatron_dualpipe trace rank0.json.gz --json     # one trace, JSON report
    python -m megatron_dualpipe trace runs/x/traces --png overlap.png --window 0:40

Each argument (a trace file, ``.json`` or ``.json.gz``, or a directory of per-rank traces)
gives one report: per communication kind the busy time, the part overlapped by compute on
another stream of the same device and the exposed rest, compute and idle time, per rank, per
step, and the most exposed communication kernels (docs/overlap.md explains how to read it).
"""

from __future__ import annotations

import json
import re

from megatron_dualpipe.errors import UserError
from megatron_dualpipe.trace import draw
from megatron_dualpipe.trace.load import read_all
from megatron_dualpipe.trace.report import format_report, origin, ranks_of, report

_NUM = r"\s*(-?(?:\d+(?:\.\d*)?|\.\d+))\s*"
_RANGE_RE = re.compile(f"^{_NUM}:{_NUM}$")


def parse_window(text: str | None) -> tuple[str | None, tuple[float, float] | None]:
    """``--window``: ``START:END`` (ms from the first profiled step) or an annotation name."""
    if text is None:
        return None, None
    m = _RANGE_RE.match(text)
    if m:
        start, end = float(m.group(1)), float(m.group(2))
        if end <= start:
            raise UserError(f"--window {text}: END must be greater than START (ms)")
        return None, (start, end)
    if ":" in text and re.fullmatch(r"[\d\s.:+-]*", text):
        raise UserError(f"--window {text!r}: expected START:END in ms (e.g. 0:25.5) or an "
                        "annotation name (e.g. dualpipe.FB)")
    if not text.strip():
        raise UserError("--window: empty; give START:END in ms or an annotation name")
    return text, None


def add_arguments(parser) -> None:
    parser.add_argument("traces", nargs="+",
                        help="Chrome trace(s) (.json or .json.gz), or directories of per-rank "
                        "traces")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--window", default=None, metavar="START:END|NAME",
                        help="START:END: also report (and draw) this time range, in ms from "
                        "the start of the first profiled step; NAME: also report inside the "
                        "annotations whose name contains NAME (e.g. 'dualpipe.FB')")
    parser.add_argument("--png", default=None, metavar="FILE",
                        help="draw a timeline (one lane per stream) of --window START:END, "
                        "default the first profiled step, into FILE")


def run(args) -> int:
    name, time_range = parse_window(args.window)
    if args.png and not args.png.lower().endswith(".png"):
        raise UserError(f"--png {args.png}: the file name must end in .png")
    tables = {path: read_all([path]) for path in args.traces}
    reports = {path: report(t, name, time_range) for path, t in tables.items()}
    if args.json:
        print(json.dumps(reports if len(reports) > 1 else reports[args.traces[0]], indent=1))
    else:
        print("\n".join(format_report(p, r) for p, r in reports.items()))
    if args.png:
        ranks = [r for t in tables.values() for _, r in ranks_of(t)]
        zero = origin(ranks)
        window = draw.default_window(ranks) if time_range is None else \
            (zero + time_range[0] * 1e3, zero + time_range[1] * 1e3)
        title = (f"{', '.join(args.traces)}: {(window[0] - zero) / 1e3:.2f} to "
                 f"{(window[1] - zero) / 1e3:.2f} ms")
        draw.draw(ranks, args.png, window, zero, title)
        print(f"timeline written to {args.png}")
    return 0
