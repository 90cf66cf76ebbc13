"""ScheduleSpec: the one table of schedules gives each schedule's stage geometry."""

import pytest

from megatron_dualpipe.errors import UserError
from megatron_dualpipe.model.layout import chunk_placements
from megatron_dualpipe.schedules.spec import OURS, SCHEDULES, SPECS, TRAIN_SCHEDULES, get_spec


def reference_placements(schedule, pp, rank, vpp):
    """(chunk, stage, num_stages, stage_rank, vp_stage) as written out per schedule."""
    if schedule == "1f1b":
        return [(0, rank, pp, rank, None)]
    if schedule == "interleaved":
        return [(v, v * pp + rank, pp * vpp, rank, v) for v in range(vpp)]
    if schedule == "dualpipev":
        return [(0, rank, 2 * pp, rank, 0), (1, 2 * pp - 1 - rank, 2 * pp, pp - 1 - rank, 1)]
    return [(0, rank, pp, rank, None), (1, pp - 1 - rank, pp, pp - 1 - rank, None)]


@pytest.mark.parametrize("schedule", TRAIN_SCHEDULES)
@pytest.mark.parametrize("pp", [1, 2, 4, 8])
def test_chunk_placements_match_the_written_out_layouts(schedule, pp):
    if schedule == "dualpipe" and pp == 1:
        pytest.skip("dualpipe needs a mirror rank")
    vpp = 3 if schedule == "interleaved" else None
    for rank in range(pp):
        got = [(c.chunk, c.stage, c.num_stages, c.stage_rank, c.vp_stage)
               for c in chunk_placements(schedule, pp, rank, vpp)]
        assert got == reference_placements(schedule, pp, rank, vpp)


def test_names_and_questions():
    assert SCHEDULES == ("1f1b", "interleaved", "zb1p", "dualpipe", "dualpipev")
    assert TRAIN_SCHEDULES == ("1f1b", "interleaved", "dualpipe", "dualpipev")
    assert OURS == ("dualpipe", "dualpipev")
    assert [SPECS[n].megatron_vpp(4) for n in SCHEDULES] == [None, 4, None, None, 2]
    assert [SPECS[n].num_stages(4, 3) for n in SCHEDULES] == [4, 12, 4, 4, 8]
    assert [SPECS[n].fuses_fb for n in SCHEDULES] == [False, False, False, True, True]
    assert list(SPECS["dualpipe"].microbatches_of_chunk(8, 1)) == [4, 5, 6, 7]
    assert list(SPECS["dualpipev"].microbatches_of_chunk(8, 1)) == list(range(8))


def test_unknown_schedule_is_a_user_error_naming_the_field():
    with pytest.raises(UserError, match=r"parallel.schedule='zb1p' must be one of 1f1b, "):
        get_spec("zb1p", TRAIN_SCHEDULES, field="parallel.schedule")


def test_run_options_keep_each_feature_only_where_it_has_work():
    """(zero_bubble, overlap) as executed: W split needs PP > 1 (bubbles), the fused F&B
    needs EP > 1 (an all-to-all to hide) and a GPU; Megatron's schedules take neither."""
    dpv, dp = SPECS["dualpipev"], SPECS["dualpipe"]
    assert dpv.run_options(1, 1, True, True) == (False, False)
    assert dpv.run_options(1, 2, True, True) == (False, True)
    assert dpv.run_options(2, 1, True, True) == (True, False)
    assert dpv.run_options(2, 2, True, True, on_gpu=False) == (True, False)
    assert dp.run_options(4, 8, True, True) == (True, True)
    assert dp.run_options(4, 8, False, False) == (False, False)
    assert SPECS["1f1b"].run_options(4, 8, True, True) == (False, False)
