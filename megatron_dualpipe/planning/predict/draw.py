"""The prediction as a picture: one pipeline rank's step, and the searched layouts' throughput.

Top: the predicted step of one pipeline rank on a time axis: each action's compute (F, B, W;
an F&B pair in one cell), the all-to-all time each action carries (hidden under an F&B pair's
compute or added to a lone F/B), the idle gaps (pipeline bubble) and the step's tail
(exposed data-parallel reduce, optimizer, parameter all-gather). Bottom (with a search):
predicted tokens/s per GPU of the fastest searched layouts that fit in memory.
"""

from __future__ import annotations

from megatron_dualpipe.schedules.draw import _matplotlib

_COLOURS = {"F": "#f4b183", "B": "#a9d18e", "W": "#b58ad0", "FB": "#9dc3e6",
            "comm": "#7f7f7f", "tail": "#c00000"}


def draw_prediction(model, prediction: dict, path: str, rank: int | None = None,
                    layouts: list | None = None) -> None:
    """Write a PNG of `model.sim` (a `StepModel` after `run()`) and optionally of `layouts`
    (`search.Candidate`s) to `path`."""
    plt, Patch, Rectangle = _matplotlib()
    rank = prediction["breakdown_rank"] if rank is None else rank
    rows = 2 if layouts else 1
    fig, axes = plt.subplots(rows, 1, figsize=(16, 3.2 + 4.5 * (rows - 1)), squeeze=False)
    ax = axes[0][0]
    sim = model.sim
    for e in sim.timelines[rank]:
        c = model.action_cost(rank, e.action)
        ax.add_patch(Rectangle((e.start / 1e3, 0.45), (e.end - e.start) / 1e3, 0.45,
                               facecolor=_COLOURS[e.action.kind], edgecolor="black",
                               linewidth=0.2))
        if c.a2a:
            ax.add_patch(Rectangle((e.start / 1e3, 0.05), c.a2a / 1e3, 0.3,
                                   facecolor=_COLOURS["comm"], linewidth=0))
    tail_start = sim.makespan / 1e3
    tail = prediction["step_time_s"] - tail_start
    ax.add_patch(Rectangle((tail_start, 0.45), tail, 0.45, facecolor=_COLOURS["tail"]))
    ax.set_xlim(0, prediction["step_time_s"] * 1.01)
    ax.set_ylim(0, 1)
    ax.set_yticks([0.2, 0.67], ["all-to-all", "compute"])
    ax.set_xlabel("seconds")
    ax.set_title(
        f"{prediction.get('name', '')} on {prediction['world_size']} x {prediction['hardware']}:"
        f" pipeline rank {rank}, step {prediction['step_time_s']:.2f} s, bubble "
        f"{prediction['bubble_fraction']:.1%}, {prediction['tokens_per_s_per_gpu']:.0f} "
        f"tokens/s/GPU, {prediction['gpu_hours_per_trillion_tokens'] / 1e3:.0f}K GPU-h per T "
        f"tokens (calibration: {prediction['calibration']['source']})", fontsize=9)
    names = {"F": "forward", "B": "backward", "W": "weight grad", "FB": "F&B overlapped",
             "comm": "all-to-all (dispatch/combine)", "tail": "DP reduce + optimizer + gather"}
    ax.legend(handles=[Patch(color=_COLOURS[k], label=v) for k, v in names.items()],
              loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=6, fontsize=8)
    if layouts:
        _layouts_axis(axes[1][0], layouts)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _layouts_axis(ax, layouts: list, title: str = "") -> None:
    shown = [c for c in layouts if c.feasible][:40]
    labels = [f"pp{c.pp} ep{c.ep} {c.schedule} mb{c.micro_batch_size}" for c in shown]
    ax.bar(range(len(shown)), [c.tokens_per_s_per_gpu for c in shown], color="#4472c4",
           edgecolor="black", linewidth=0.3)
    ax.set_xticks(range(len(shown)), labels, rotation=70, ha="right", fontsize=7)
    ax.set_ylabel("tokens/s per GPU")
    ax.set_title(title or f"searched layouts: the {len(shown)} fastest that fit in memory",
                 fontsize=9)


def draw_search(layouts: list, path: str, title: str) -> None:
    """Write a PNG of the feasible `layouts`' predicted throughput to `path`."""
    plt, _, _ = _matplotlib()
    fig, ax = plt.subplots(figsize=(16, 5))
    _layouts_axis(ax, layouts, title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
