"""Tests for the pipeline-schedule action generators and stage-graph helpers."""

import re

import pytest

from megatron_dualpipe.schedules.actions import (
    Action,
    build_actions,
    check_actions,
    dualpipe_actions,
    dualpipev_actions,
    interleaved_actions,
    next_rank,
    one_f_one_b_actions,
    rank_chunk_of_stage,
    stage_of,
    validate,
    zb1p_actions,
)
from megatron_dualpipe.schedules.spec import SCHEDULES


def _valid(schedule, num_ranks, num_microbatches):
    try:
        validate(schedule, num_ranks, num_microbatches)
    except ValueError:
        return False
    return True


def _grid():
    for schedule in SCHEDULES:
        for num_ranks in (1, 2, 3, 4, 6, 8):
            for num_microbatches in (1, 2, 4, 5, 8, 12, 16, 18, 24):
                if _valid(schedule, num_ranks, num_microbatches):
                    yield schedule, num_ranks, num_microbatches


def _flat(actions):
    return [p for act in actions for p in act.parts()]


@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("zero_bubble", [True, False])
def test_check_actions_on_grid(overlap, zero_bubble):
    count = 0
    for schedule, n, m in _grid():
        acts = build_actions(schedule, n, m, overlap=overlap, zero_bubble=zero_bubble)
        check_actions(schedule, acts, n, m)
        count += 1
    assert count > 40


@pytest.mark.parametrize("num_chunks", [2, 3, 4])
def test_interleaved_chunks(num_chunks):
    for n in (2, 4):
        for m in (n, 2 * n, 3 * n):
            check_actions("interleaved", interleaved_actions(n, m, num_chunks), n, m, num_chunks)


def test_action_str_and_parts():
    assert str(Action("F", 0, 3)) == "F0.3"
    assert str(Action("B", 1, 2, split_wgrad=True)) == "B1.2w"
    assert str(Action("B", 1, 2)) == "B1.2"
    assert str(Action("W", 1, 2)) == "W1.2"
    pair = Action("FB", 0, 5, bwd_chunk=1, bwd_microbatch=1)
    assert str(pair) == "F0.5&B1.1"
    assert pair.parts() == (Action("F", 0, 5), Action("B", 1, 1))
    with pytest.raises(ValueError):
        Action("FB", 0, 5)
    with pytest.raises(ValueError):
        Action("X", 0, 0)


def test_check_actions_rejects_broken_lists():
    n, m = 2, 4
    good = one_f_one_b_actions(n, m)
    bad = [list(good[0]), list(good[1])]
    bad[1][0], bad[1][1] = bad[1][1], bad[1][0]  # B before its F
    with pytest.raises(AssertionError):
        check_actions("1f1b", bad, n, m)
    with pytest.raises(AssertionError):
        check_actions("1f1b", [good[0][:-1], good[1]], n, m)  # missing B
    zb = zb1p_actions(n, m)
    ws = [i for i, a in enumerate(zb[0]) if a.kind == "W"]
    swapped = list(zb[0])
    swapped[ws[0]], swapped[ws[1]] = swapped[ws[1]], swapped[ws[0]]  # W not FIFO
    with pytest.raises(AssertionError):
        check_actions("zb1p", [swapped, zb[1]], n, m)
    with pytest.raises(AssertionError):
        check_actions("zb1p", [[a for a in zb[0] if a.kind != "W"], zb[1]], n, m)


@pytest.mark.parametrize(
    "args, field, nearest",
    [
        (("dualpipe", 3, 12), "parallel.pp=3", "nearest valid: 2 or 4"),
        (("dualpipe", 1, 12), "parallel.pp=1", "nearest valid: 2"),
        (("dualpipe", 4, 7), "micro-batches 7 (train.global_batch_size", "nearest valid: 8"),
        (("dualpipe", 4, 11), "micro-batches 11 (train.global", "nearest valid: 10 or 12"),
        (("dualpipev", 4, 6), "micro-batches 6 (train.global_batch_size", "nearest valid: 8"),
        (("interleaved", 4, 6), "micro-batches 6 (train.global", "nearest valid: 4 or 8"),
        (("1f1b", 4, 0), "micro-batches 0 (train.global_batch_size", "nearest valid: 1"),
        (("dualpipev", 4, 8, 30), "model.num_layers=30", "nearest valid: 24 or 32"),
        (("dualpipe", 4, 8, 30), "model.num_layers=30", "nearest valid: 28 or 32"),
        (("1f1b", 4, 8, 6), "model.num_layers=6", "nearest valid: 4 or 8"),
        (("interleaved", 2, 4, 6), "model.num_layers=6", "nearest valid: 4 or 8"),
    ],
)
def test_validate_errors(args, field, nearest):
    with pytest.raises(ValueError, match=re.escape(field)) as info:
        validate(*args)
    assert nearest in str(info.value)


def test_validate_accepts_and_rejects_schedule():
    validate("dualpipe", 4, 8, num_layers=16)
    validate("dualpipev", 4, 8, num_layers=16)
    validate("interleaved", 4, 8, num_layers=16, num_chunks=4)
    with pytest.raises(ValueError, match="schedule"):
        validate("gpipe", 4, 8)
    with pytest.raises(ValueError, match="parallel.pp"):
        dualpipe_actions(3, 12)


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_stage_maps_are_inverse(schedule):
    n = 4
    chunks = 1 if schedule in ("1f1b", "zb1p") else 2
    seen = set()
    for rank in range(n):
        for chunk in range(chunks):
            stage = stage_of(schedule, n, rank, chunk)
            direction = chunk if schedule == "dualpipe" else 0
            assert rank_chunk_of_stage(schedule, n, stage, direction) == (rank, chunk)
            seen.add((direction, stage))
    per_direction = n if schedule == "dualpipe" else n * chunks
    assert {s for _, s in seen} == set(range(per_direction))


def test_dualpipev_layout():
    n = 4
    assert [stage_of("dualpipev", n, r, 0) for r in range(n)] == [0, 1, 2, 3]
    assert [stage_of("dualpipev", n, r, 1) for r in range(n)] == [7, 6, 5, 4]
    assert next_rank("dualpipev", n, n - 1, 0, "forward") == (n - 1, 1)  # turn, same rank
    assert next_rank("dualpipev", n, n - 1, 1, "backward") == (n - 1, 0)
    assert next_rank("dualpipev", n, 1, 1, "forward") == (0, 1)
    assert next_rank("dualpipev", n, 0, 1, "forward") is None  # loss on rank 0
    assert next_rank("dualpipev", n, 0, 0, "backward") is None
    assert next_rank("dualpipev", n, 1, 0, "backward") == (0, 0)


def test_dualpipe_layout_is_mirrored():
    n = 8
    for r in range(n):
        # chunk 1 of rank r holds the layers of chunk 0 of rank n-1-r
        assert stage_of("dualpipe", n, r, 1) == stage_of("dualpipe", n, n - 1 - r, 0)
        fwd1 = next_rank("dualpipe", n, r, 1, "forward")
        assert fwd1 == ((r - 1, 1) if r > 0 else None)
        assert next_rank("dualpipe", n, r, 1, "backward") == ((r + 1, 1) if r < n - 1 else None)
        assert next_rank("dualpipe", n, r, 0, "forward") == ((r + 1, 0) if r < n - 1 else None)
    with pytest.raises(ValueError):
        next_rank("dualpipe", n, 0, 0, "sideways")


def test_interleaved_and_1f1b_next_rank():
    assert next_rank("interleaved", 4, 3, 0, "forward") == (0, 1)
    assert next_rank("interleaved", 4, 3, 1, "forward") is None
    assert next_rank("interleaved", 4, 0, 1, "backward") == (3, 0)
    assert next_rank("1f1b", 4, 2, 0, "forward") == (3, 0)
    assert next_rank("zb1p", 4, 3, 0, "forward") is None


@pytest.mark.parametrize("n, m", [(4, 8), (4, 12), (8, 16), (8, 20)])
def test_dualpipe_ranks_mirror_each_other(n, m):
    acts = dualpipe_actions(n, m)
    half = m // 2

    def mirror(a):
        swap = {0: 1, 1: 0}
        shift = {0: half, 1: -half}
        kw = {}
        if a.kind == "FB":
            kw = {"bwd_chunk": swap[a.bwd_chunk],
                  "bwd_microbatch": a.bwd_microbatch + shift[a.bwd_chunk],
                  "bwd_split_wgrad": a.bwd_split_wgrad}
        return Action(a.kind, swap[a.chunk], a.microbatch + shift[a.chunk], a.split_wgrad, **kw)

    for r in range(n):
        assert [mirror(a) for a in acts[r]] == acts[n - 1 - r]
    # direction-0 micro-batches only go through chunk 0, direction-1 through chunk 1
    for p in _flat(acts[0]):
        assert (p.microbatch < half) == (p.chunk == 0)


@pytest.mark.parametrize("n, m", [(2, 4), (4, 8), (4, 10), (8, 16), (8, 21)])
def test_dualpipev_phase_counts(n, m):
    acts = dualpipev_actions(n, m)
    for r, rank_acts in enumerate(acts):
        main = m - 2 * n + r + 1
        expected_fb = 2 * main - (1 if r == n - 1 else 0) + (n - r - 1)
        assert sum(a.kind == "FB" for a in rank_acts) == expected_fb
        # W pops: step 3 (n-r-1) + step 7 (n-r-1) + step 8 (r+1)
        assert sum(a.kind == "W" for a in rank_acts) == 2 * n - r - 1
        # the first (n-r-1)*2 + 1 actions are chunk-0 forwards (steps 1 and 2)
        head = rank_acts[: 2 * (n - r - 1) + 1]
        assert all(a.kind == "F" and a.chunk == 0 for a in head)
    # the last rank starts its main phase with an un-overlapped F0 then B1
    last = acts[n - 1]
    i = next(k for k, a in enumerate(last) if a.kind == "B")
    assert (last[i - 1].kind, last[i - 1].chunk, last[i].chunk) == ("F", 0, 1)
    assert not last[i].split_wgrad


@pytest.mark.parametrize("generator", [dualpipe_actions, dualpipev_actions])
def test_overlap_and_zero_bubble_switches(generator):
    n, m = 4, 12
    base = generator(n, m)
    no_overlap = generator(n, m, overlap=False)
    no_zb = generator(n, m, zero_bubble=False)
    for r in range(n):
        assert not any(a.kind == "FB" for a in no_overlap[r])
        assert _flat(base[r]) == no_overlap[r]
        assert not any(a.kind == "W" or a.split_wgrad for a in _flat(no_zb[r]))
        unsplit = [Action(p.kind, p.chunk, p.microbatch) for p in _flat(base[r]) if p.kind != "W"]
        assert unsplit == _flat(no_zb[r])
        assert any(a.kind == "FB" for a in base[r]) and any(a.kind == "W" for a in base[r])


def test_one_f_one_b_order():
    n, m = 4, 8
    for r, acts in enumerate(one_f_one_b_actions(n, m)):
        warmup = n - r - 1
        assert all(a.kind == "F" for a in acts[:warmup])
        steady = acts[warmup: warmup + 2 * (m - warmup)]
        assert [a.kind for a in steady] == ["F", "B"] * (m - warmup)
        assert all(a.kind == "B" for a in acts[warmup + 2 * (m - warmup):])


def test_zb1p_splits_every_backward():
    n, m = 4, 8
    one_f = one_f_one_b_actions(n, m)
    for r, acts in enumerate(zb1p_actions(n, m)):
        assert all(a.split_wgrad for a in acts if a.kind == "B")
        assert sum(a.kind == "W" for a in acts) == m
        # same F/B order as 1F1B
        fb_only = [Action(a.kind, a.chunk, a.microbatch) for a in acts if a.kind != "W"]
        assert fb_only == one_f[r]


def test_interleaved_order_matches_megatron():
    n, m, v = 2, 4, 2
    acts = interleaved_actions(n, m, v)
    # rank 0 warm-up: (n-1)*2 + (v-1)*n = 4 forwards: mb 0,1 on chunk 0 then mb 0,1 on chunk 1
    assert [str(a) for a in acts[0][:4]] == ["F0.0", "F0.1", "F1.0", "F1.1"]
    # the first backward runs the last chunk of micro-batch 0
    first_b = next(a for a in acts[0] if a.kind == "B")
    assert (first_b.chunk, first_b.microbatch) == (v - 1, 0)
