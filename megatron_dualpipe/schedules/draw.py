"""Draw a simulated schedule as a PNG in the style of DeepSeek's DualPipe figure.

One row per pipeline rank (rank 0 on top), time on the x axis, one cell per action with the
micro-batch id inside.  Colours distinguish F (forward), B (backward for the input
gradient), W (weight gradient) and the chunk (= direction for DualPipe); an overlapped F&B
pair is drawn as two half cells inside one black border. The legend names all of them.
For DualPipe, direction-1 micro-batches are numbered within their direction (``mb - M/2``).
"""

from __future__ import annotations

from megatron_dualpipe.schedules.actions import Action
from megatron_dualpipe.schedules.simulator import SimResult
from megatron_dualpipe.schedules.spec import get_spec

# (chunk 0, chunk 1, further chunks) per kind.
_COLOURS = {
    "F": ("#f4b183", "#ffe699", "#f8cbad"),
    "B": ("#a9d18e", "#9dc3e6", "#c5e0b4"),
    "W": ("#b58ad0", "#e8daef", "#d9d2e9"),
}


def _matplotlib():
    try:
        import matplotlib
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "drawing schedules needs matplotlib: run `pip install matplotlib`") from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch, Rectangle

    return plt, Patch, Rectangle


_KIND_NAMES = {"F": "F: forward", "B": "B: backward (input grad)", "W": "W: weight grad"}


def _colour(kind: str, chunk: int) -> str:
    return _COLOURS[kind][min(chunk, 2)]


def _label(result: SimResult, part: Action) -> str:
    mb = part.microbatch
    if get_spec(result.schedule).bidirectional and part.chunk == 1:
        mb -= result.num_microbatches // 2
    return str(mb)


def draw_timeline(result: SimResult, path: str, title: str | None = None) -> None:
    """Write the timeline of ``result`` to the PNG file ``path``."""
    plt, _, _ = _matplotlib()
    fig = timeline_figure(result, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timeline_figure(result: SimResult, title: str | None = None):
    """The matplotlib figure of ``draw_timeline``."""
    plt, Patch, Rectangle = _matplotlib()
    width = min(40.0, max(8.0, result.makespan * 0.22))
    fig, ax = plt.subplots(figsize=(width, 0.55 * result.num_ranks + 1.6))
    font = 7 if result.makespan > 60 else 8
    for rank, timeline in enumerate(result.timelines):
        y = rank
        for entry in timeline:
            act, start, end = entry.action, entry.start, entry.end
            parts = act.parts()
            step = (end - start) / len(parts)
            for i, part in enumerate(parts):
                x = start + i * step
                ax.add_patch(Rectangle((x, y - 0.4), step, 0.8, facecolor=_colour(
                    part.kind, part.chunk), edgecolor="#606060", linewidth=0.4))
                ax.text(x + step / 2, y, _label(result, part), ha="center", va="center",
                        fontsize=font)
            if act.kind == "FB":
                ax.add_patch(Rectangle((start, y - 0.4), end - start, 0.8, fill=False,
                                       edgecolor="black", linewidth=1.6))
    ax.set_xlim(0, result.makespan)
    ax.set_ylim(result.num_ranks - 0.5, -0.5)
    ax.set_yticks(range(result.num_ranks))
    ax.set_yticklabels([f"rank {r}" for r in range(result.num_ranks)])
    ax.set_xlabel("time  (number in a cell: its micro-batch id"
                  + (", counted within its direction)" if result.schedule == "dualpipe" else ")"))
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    names = ("direction 0", "direction 1") if get_spec(result.schedule).bidirectional else (
        "chunk 0", "chunk 1")
    chunks = {p.chunk for tl in result.timelines for e in tl for p in e.action.parts()}
    handles = [Patch(facecolor=_colour(kind, c), edgecolor="#606060",
                     label=f"{_KIND_NAMES[kind]}, {names[c] if c < 2 else f'chunk {c}'}")
               for kind in ("F", "B", "W") for c in sorted(chunks)
               if any(p.kind == kind and p.chunk == c
                      for tl in result.timelines for e in tl for p in e.action.parts())]
    if any(e.action.kind == "FB" for tl in result.timelines for e in tl):
        handles.append(Patch(facecolor="white", edgecolor="black", linewidth=1.6,
                             label="F&B: a forward and a backward overlapped"))
    ncol = max(1, min(len(handles), 4, int(width // 3.3)))  # about 3.3 inches per entry
    fig.legend(handles=handles, loc="lower center", ncol=ncol, frameon=False, fontsize=8)
    c = result.costs
    ax.set_title(title or (
        f"{result.schedule}: PP={result.num_ranks}, {result.num_microbatches} micro-batches "
        f"(F={c.f:g}, B={c.b:g}, W={c.w:g}, F&B={c.fb:g}); makespan {result.makespan:g}, "
        f"bubble {result.bubble:g}"))
    rows = -(-len(handles) // ncol)
    height = 0.55 * result.num_ranks + 1.6 + 0.25 * rows
    fig.set_figheight(height)
    fig.tight_layout(rect=(0, (0.1 + 0.25 * rows) / height, 1, 1))
    return fig
