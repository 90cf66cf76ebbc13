"""Tests for the schedule simulator, its CLI and the timeline drawing."""

import itertools
import json

import pytest

from megatron_dualpipe.schedules import simulate_cli
from megatron_dualpipe.schedules.actions import (
    Action,
    build_actions,
    validate,
)
from megatron_dualpipe.schedules.simulator import (
    Costs,
    DeadlockError,
    simulate,
    simulate_schedule,
)
from megatron_dualpipe.schedules.spec import SCHEDULES


def expected_bubble(schedule, n, c):
    """DeepSeek README closed forms, written out independently of the simulator."""
    return {
        "1f1b": (n - 1) * (c.f + c.b),
        "zb1p": (n - 1) * (c.f + c.b - 2 * c.w),
        "dualpipe": (n / 2 - 1) * (c.fb + c.b - 3 * c.w),
        # README row: PP = 2n stages on n = PP/2 devices
        "dualpipev": (2 * n / 2 - 1) * (c.fb + c.b - 3 * c.w),
    }[schedule]


COSTS = [Costs(), Costs(f=2, b=3, w=1, fb=4), Costs(f=1, b=1.5, w=0.5, fb=2.25)]


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p", "dualpipe", "dualpipev"])
@pytest.mark.parametrize("n", [4, 8, 16])
def test_bubble_matches_closed_form(schedule, n):
    for k in (1, 2):
        m = 2 * n * k
        for costs in COSTS:
            result = simulate_schedule(schedule, n, m, costs)
            assert result.bubble == pytest.approx(expected_bubble(schedule, n, costs))
            assert max(result.bubble_per_rank) == pytest.approx(result.bubble)


def test_1f1b_makespan_and_any_costs():
    for f, b in [(1, 2), (1.5, 1), (3, 7)]:
        costs = Costs(f=f, b=b, w=0.5, fb=f + b)
        for n, m in [(3, 5), (5, 9)]:
            result = simulate_schedule("1f1b", n, m, costs)
            assert result.makespan == pytest.approx((m + n - 1) * (f + b))
            assert result.bubble_per_rank == pytest.approx([(n - 1) * (f + b)] * n)


@pytest.mark.parametrize("schedule", ["1f1b", "zb1p"])
def test_1f1b_peak_activations(schedule):
    for n, m in [(4, 8), (8, 16), (8, 5)]:
        result = simulate_schedule(schedule, n, m)
        assert result.peak_activations_per_rank == [min(n - r, m) for r in range(n)]


def test_dualpipev_peak_activations():
    # steps 1-2 leave 2(n-r-1) + 2(r+1) = 2n chunk forwards in flight on every rank, step 3
    # keeps that, and the first F of step 4 comes before its B frees one: 2n + 1 chunks,
    # i.e. README's PP + 1 with PP = 2n stages, or n + 1/2 stages of L/n layers.
    for n, m in [(2, 4), (4, 8), (4, 16), (8, 20)]:
        result = simulate_schedule("dualpipev", n, m)
        assert result.peak_activations_per_rank == [2 * n + 1] * n
        assert result.peak_activations_stage_units == pytest.approx([n + 0.5] * n)


def test_dualpipe_peak_activations():
    for n, m in [(4, 8), (8, 20)]:
        result = simulate_schedule("dualpipe", n, m)
        assert result.peak_activations_per_rank == [n + 1] * n  # README: PP + 1
        assert result.peak_activations_stage_units == pytest.approx([n + 1.0] * n)


def _valid_grid():
    for schedule in SCHEDULES:
        for n in (1, 2, 3, 4, 6, 8):
            for m in (1, 2, 3, 4, 6, 8, 9, 12, 16, 17, 24):
                try:
                    validate(schedule, n, m)
                except ValueError:
                    continue
                yield schedule, n, m


@pytest.mark.parametrize("overlap, zero_bubble", [(True, True), (False, True), (True, False)])
def test_no_deadlock_on_valid_grid(overlap, zero_bubble):
    count = 0
    for schedule, n, m in _valid_grid():
        for p2p in (0.0, 0.25):
            actions = build_actions(schedule, n, m, overlap=overlap, zero_bubble=zero_bubble)
            result = simulate(schedule, actions, m, Costs(p2p=p2p))
            assert result.makespan >= max(result.compute_per_rank) - 1e-9
            assert all(len(t) == len(a) for t, a in zip(result.timelines, actions))
            for timeline in result.timelines:
                for prev, cur in itertools.pairwise(timeline):
                    assert cur.start >= prev.end - 1e-9
            count += 1
    assert count > 100


def test_p2p_latency_lengthens_1f1b():
    base = simulate_schedule("1f1b", 4, 8)
    slow = simulate_schedule("1f1b", 4, 8, Costs(p2p=0.5))
    assert slow.makespan > base.makespan


def test_deadlock_is_reported():
    # rank 0 waits for rank 1's B of mb 0, which waits behind rank 1's F of mb 1, which needs
    # rank 0's F of mb 1, scheduled after that B.
    actions = [
        [Action("F", 0, 0), Action("B", 0, 0), Action("F", 0, 1), Action("B", 0, 1)],
        [Action("F", 0, 1), Action("B", 0, 1), Action("F", 0, 0), Action("B", 0, 0)],
    ]
    with pytest.raises(DeadlockError, match=r"rank 0: B0\.0.*rank 1: F0\.1"):
        simulate("1f1b", actions, 2)


def test_cli_json(capsys):
    code = simulate_cli.main(["--schedule", "dualpipev", "--pp", "4", "--microbatches", "8",
                              "--json"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"schedule", "pp", "microbatches", "makespan", "bubble",
                        "bubble_per_rank", "peak_activations_per_rank"}
    assert (out["schedule"], out["pp"], out["microbatches"]) == ("dualpipev", 4, 8)
    assert out["bubble"] == pytest.approx(expected_bubble("dualpipev", 4, Costs()))
    assert len(out["bubble_per_rank"]) == 4 == len(out["peak_activations_per_rank"])


def test_cli_text_and_costs(capsys):
    code = simulate_cli.main(["--schedule", "1f1b", "--pp", "4", "--microbatches", "8",
                              "--f", "2", "--b", "3", "--w", "1"])
    assert code == 0
    text = capsys.readouterr().out
    assert "rank 3: F0.0 B0.0" in text
    assert f"bubble (idle time of the most idle rank): {3 * (2 + 3):g}" in text


def test_cli_invalid_input(capsys):
    code = simulate_cli.main(["--schedule", "dualpipe", "--pp", "3", "--microbatches", "12"])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "parallel.pp=3" in err and "2 or 4" in err


def test_cli_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "dualpipe.png"
    code = simulate_cli.main(["--schedule", "dualpipe", "--pp", "4", "--microbatches", "8",
                              "--png", str(path)])
    assert code == 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
