"""Batch ramp, token-based LR/config schedules and the new Megatron mappings (no processes)."""

import math
import re
from pathlib import Path

import pytest
import torch

from megatron_dualpipe import te
from megatron_dualpipe.config import parse_recipe
from megatron_dualpipe.config import to_megatron as TM
from megatron_dualpipe.config.validate_training import (
    check_training_rules,
    unsupported_for_training,
)
from megatron_dualpipe.data import MicrobatchSource, SyntheticTokens
from megatron_dualpipe.plan import load_plan_recipe
from megatron_dualpipe.token_schedules import (
    BatchSchedule,
    config_values,
    lr_at,
    step_source,
    tokens_before,
)

V3 = Path(__file__).resolve().parent.parent / "recipes" / "deepseek_v3_671b_ep64_tp1_pp16_h800.yaml"
CPU = torch.device("cpu")


def recipe(schedule="1f1b", pp=1, ramp=(2, 8, 12), gbs=8, mbs=1, nodes=1, **extra):
    raw = {"model": {"num_layers": 4 * pp, "num_dense_layers": 0, "vocab_size": 64,
                     "seq_length": 16},
           "parallel": {"pp": pp, "schedule": schedule, "num_nodes": nodes,
                        "nproc_per_node": pp},
           "train": {"micro_batch_size": mbs, "global_batch_size": gbs,
                     "batch_ramp": list(ramp) if ramp else None, "device": "cpu"}}
    for key, value in extra.items():
        section, field = key.split("__")
        raw.setdefault(section, {})[field] = value
    return parse_recipe(raw)


def megatron_lm_ramp(start, end, increment, samples, floor, steps):
    """Megatron-LM's RampupBatchsizeNumMicroBatchesCalculator, step by step: the batch is
    start + k * increment with k = int(consumed / (samples / n)), end once consumed > samples;
    raised to `floor` (the schedule's minimum). Returns [(samples_before, batch)]."""
    n = (end - start) // increment
    out, consumed = [], 0
    for _ in range(steps):
        if consumed > samples:
            batch = end
        else:
            batch = min(end, start + (consumed * n // samples) * increment)  # exact int(c/(s/n))
        batch = max(batch, floor)
        out.append((consumed, batch))
        consumed += batch
    return out


@pytest.mark.parametrize("schedule, pp, nodes, ramp, gbs, mbs", [
    ("1f1b", 1, 1, (2, 8, 12), 8, 1),  # increments shorter than a step: some are skipped
    ("1f1b", 1, 1, (4, 32, 1000), 32, 2),
    ("dualpipe", 2, 1, (2, 8, 12), 8, 1),  # even micro-batch counts, raised to 2 x pp = 4
    ("dualpipev", 2, 2, (2, 20, 333), 20, 1),  # dp 2, raised to 2 x pp x dp = 8
    ("dualpipe", 4, 2, (16, 96, 5000), 96, 1),
])
def test_batch_schedule_is_megatrons_ramp(schedule, pp, nodes, ramp, gbs, mbs):
    r = recipe(schedule, pp, ramp, gbs, mbs, nodes)
    b = BatchSchedule(r)
    dp = nodes
    unit = mbs * dp
    increment = 2 * unit if schedule == "dualpipe" else unit
    floor = 2 * pp * unit if schedule.startswith("dualpipe") else unit
    steps = b.ramp_steps + 5
    expected = megatron_lm_ramp(*ramp[:2], increment, ramp[2], floor, steps)
    got = [(b.samples_before(s), b.global_batch(s)) for s in range(steps)]
    assert got == expected
    assert got[b.ramp_steps][1] == gbs and got[b.ramp_steps - 1][1] < gbs
    for s in range(steps):
        n = b.num_microbatches(s)
        assert n * unit == b.global_batch(s)
        if schedule.startswith("dualpipe"):
            assert n >= 2 * pp
        if schedule == "dualpipe":
            assert n % 2 == 0


def test_batch_schedule_matches_megatron_core_calculator():
    from megatron.core.num_microbatches_calculator import StepBatchsizeNumMicroBatchesCalculator

    r = recipe("dualpipev", 2, (2, 20, 333), 20, 1, 2)
    b = BatchSchedule(r)
    calc = StepBatchsizeNumMicroBatchesCalculator(1, 2, False, 1, b.megatron_schedule())
    for step in range(b.ramp_steps + 3):
        calc.update(b.samples_before(step), consistency_check=True)
        assert calc.get_current_global_batch_size() == b.global_batch(step)
        assert calc.get() == b.num_microbatches(step)


def test_v3_ramp():
    v3 = load_plan_recipe(V3)
    b = BatchSchedule(v3)
    # 3072 -> 15360 in steps of 256 (an even number of micro-batches over dp 128); the first
    # four values (24..30 micro-batches) are raised to DualPipe's minimum of 2 x pp = 32.
    assert [s.batch for s in b.segments[:3]] == [4096, 4352, 4608]
    assert b.num_microbatches(0) == 32 and b.num_microbatches(b.ramp_steps) == 120
    assert {b.num_microbatches(s.first_step) % 2 for s in b.segments} == {0}
    ramp_tokens = b.samples_before(b.ramp_steps) * 4096
    assert ramp_tokens == pytest.approx(469e9, rel=1e-5)  # §4.2: the first 469B tokens
    assert tokens_before(v3, b, v3.train.steps) == pytest.approx(14.8e12, rel=1e-5)
    (warning,) = check_training_rules(v3)
    assert "3072" in warning and "4096" in warning and ">= 32" in warning


def test_step_source_continues_the_sample_stream():
    r = recipe("1f1b", 1, (2, 8, 12), 8, 1, nodes=2)  # dp 2
    b = BatchSchedule(r)
    tokens = SyntheticTokens(64, 16, seed=3)
    seen = []
    for step in range(b.ramp_steps + 2):
        for rank in range(2):
            base = MicrobatchSource(tokens, 1, 99, 2, rank, CPU)
            src = step_source(base, b, step)
            assert src.num_microbatches == b.num_microbatches(step)
            for mb in src.iterator(step):
                seen.append(mb["tokens"][0])
    total = b.samples_before(b.ramp_steps + 2)
    assert len(seen) == total
    # rank-major within a step, steps back to back: sample i of the run exactly once
    expected = []
    for step in range(b.ramp_steps + 2):
        first, n = b.samples_before(step), b.num_microbatches(step)
        expected += [first + rank * n + j for rank in range(2) for j in range(n)]
    assert sorted(expected) == list(range(total))
    for index, got in zip(expected, seen):
        assert torch.equal(got, tokens.sample(index)[:-1])


def test_no_ramp_keeps_the_source():
    r = recipe(ramp=None)
    b = BatchSchedule(r)
    source = MicrobatchSource(SyntheticTokens(64, 16, 1), 1, 8, 1, 0, CPU)
    assert step_source(source, b, 5) is source
    assert b.samples_before(5) == 40 and b.ramp_steps == 0


def test_v3_learning_rate_schedule():
    v3 = load_plan_recipe(V3)
    peak, mid = 2.2e-4, 2.2e-5
    # §4.2: 0 -> 2.2e-4 linearly over 2K steps; constant to 10T tokens; cosine to 2.2e-5 by
    # 14.3T; 2.2e-5 for 333B tokens; 7.3e-6 for the last 167B.
    assert lr_at(v3, 0, 0) == 0.0
    assert lr_at(v3, 500, 1e9) == pytest.approx(peak / 4)
    assert lr_at(v3, 2000, 20e9) == pytest.approx(peak)
    assert lr_at(v3, 100_000, 9.99e12) == peak
    for frac in (0.0, 0.25, 0.5, 0.9):
        tokens = 10e12 + frac * 4.3e12
        cosine = mid + (peak - mid) * 0.5 * (1 + math.cos(math.pi * frac))
        assert lr_at(v3, 200_000, tokens) == pytest.approx(cosine, rel=1e-12)
    assert lr_at(v3, 230_000, 14.4e12) == mid
    assert lr_at(v3, 240_000, 14.7e12) == 7.3e-6
    assert lr_at(v3, 250_000, 15e12) == 7.3e-6


def test_linear_phase_and_scheduler_resume():
    from megatron_dualpipe.lr_scheduler import TokenLRScheduler, build_scheduler

    r = recipe(ramp=(2, 8, 12), optimizer__lr=1e-3, optimizer__lr_warmup_steps=1,
               optimizer__weight_decay=0.1,
               optimizer__lr_schedule_tokens=[[150, 1e-3, "constant"], [500, 1e-4, "linear"]])
    b = BatchSchedule(r)
    # batches 2, 3, 4, 6, 8, 8 (Megatron ramp, increment 1): 0, 32, 80, 144, 240, 368 tokens
    assert [tokens_before(r, b, s) for s in range(6)] == [0, 32, 80, 144, 240, 368]

    class Opt:  # what Megatron's scheduler touches: param_groups
        def __init__(self):
            self.param_groups = [{"lr": 0.0, "weight_decay": 0.0}, {"lr": 0.0, "max_lr": 5e-4}]

    opt = Opt()
    sched = build_scheduler(r, opt)
    assert isinstance(sched, TokenLRScheduler)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        sched.step(increment=1)
    expected = [0.0, 1e-3, 1e-3, 1e-3, 1e-3 - 9e-4 * 90 / 350, 1e-3 - 9e-4 * 218 / 350]
    assert lrs == pytest.approx(expected, rel=1e-12)
    assert opt.param_groups[1]["lr"] == pytest.approx(lr_at(r, 6, 496) / 2)
    assert opt.param_groups[0]["weight_decay"] == 0.1
    resumed_opt = Opt()
    resumed = build_scheduler(r, resumed_opt)
    resumed.load_state_dict(sched.state_dict())
    assert resumed_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


def test_config_schedules_switch_at_their_token_boundary():
    v3 = load_plan_recipe(V3)
    assert config_values(v3, 9.99e12) == {"mtp_loss_scaling_factor": 0.3,
                                          "moe_router_bias_update_rate": 0.001}
    assert config_values(v3, 10e12) == {"mtp_loss_scaling_factor": 0.1,
                                        "moe_router_bias_update_rate": 0.001}
    assert config_values(v3, 14.3e12)["moe_router_bias_update_rate"] == 0.0
    assert config_values(recipe(ramp=None), 1e12) == {}


@pytest.mark.parametrize("extra, needle", [
    ({"optimizer__lr_schedule_tokens": [[2e9, 1e-4, "cosine"], [1e9, 0, "constant"]]},
     "optimizer.lr_schedule_tokens: token boundaries must be > 0 and increase"),
    ({"model__mtp_loss_scaling_schedule": [[1e9, -0.1]]},
     "model.mtp_loss_scaling_schedule: values must be >= 0"),
    ({"moe__bias_update_rate_schedule": [[0, 0.0]]}, "moe.bias_update_rate_schedule"),
    ({"optimizer__moment_dtype": "bf16", "optimizer__name": "sgd"},
     "optimizer.moment_dtype=bf16 needs optimizer.name=adam"),
    ({"optimizer__moment_dtype": "bf16", "parallel__distributed_optimizer": False},
     "needs parallel.distributed_optimizer=true"),
    ({"model__recompute_modules": ["mla_up_proj"]}, "mla_up_proj needs model.attention=mla"),
    ({"model__recompute_modules": ["moe_act"]}, "moe_act needs moe.grouped_gemm=true"),
])
def test_training_rule_errors_name_the_field(extra, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        check_training_rules(recipe(ramp=None, **extra))


@pytest.mark.parametrize("ramp, needle", [
    ((2, 6, 10), "ends at 6 but train.global_batch_size=8"),
    ((3, 8, 10), "start = 3 must be a multiple of 2 x train.micro_batch_size x data-parallel"),
    ((0, 8, 10), "need 0 < start <= end"),
    ((2, 8, 0), "ramp_samples > 0"),
])
def test_batch_ramp_errors(ramp, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        check_training_rules(recipe("dualpipe", 2, ramp))


# --- Megatron mappings --------------------------------------------------------------------


def test_recompute_maps_to_selective_recompute():
    kw = TM.transformer_config_kwargs(recipe(ramp=None, model__recompute_modules=[
        "core_attn", "mlp", "moe", "shared_experts"]), CPU)
    assert kw["recompute_granularity"] == "selective"
    assert kw["recompute_modules"] == ["core_attn", "mlp", "moe", "shared_experts"]
    config = TM.transformer_config(recipe(ramp=None, model__recompute_modules=["mlp"]), CPU)
    assert (config.recompute_granularity, config.recompute_modules) == ("selective", ["mlp"])
    none = TM.transformer_config_kwargs(recipe(ramp=None), CPU)
    assert none["recompute_granularity"] is None


def test_v3_recompute_maps_with_transformer_engine(monkeypatch):
    v3 = load_plan_recipe(V3)
    monkeypatch.setattr(te, "te_available", lambda: True)
    kw = TM.recompute_kwargs(v3, on_gpu=True)
    assert kw == {"recompute_granularity": "selective",
                  "recompute_modules": ["layernorm", "mla_up_proj"]}
    monkeypatch.setattr(te, "te_available", lambda: False)
    with pytest.raises(ValueError, match="model.recompute_modules: layernorm, mla_up_proj need "
                                         "Transformer Engine"):
        TM.recompute_kwargs(v3, on_gpu=True)


def test_moe_act_recompute_needs_grouped_gemm_on_gpu():
    r = recipe(ramp=None, model__recompute_modules=["moe_act"], moe__grouped_gemm=True)
    with pytest.raises(ValueError, match="moe_act needs moe.grouped_gemm=true on a GPU"):
        TM.transformer_config_kwargs(r, CPU)


def test_bf16_moments_map_to_the_precision_aware_optimizer(monkeypatch):
    v3 = load_plan_recipe(V3)
    monkeypatch.setattr(te, "te_fused_adam_available", lambda: True)
    assert TM.moment_kwargs(v3) == {
        "use_precision_aware_optimizer": True, "main_params_dtype": torch.float32,
        "main_grads_dtype": torch.float32, "exp_avg_dtype": torch.bfloat16,
        "exp_avg_sq_dtype": torch.bfloat16}
    assert TM.moment_kwargs(recipe(ramp=None)) == {}


def test_bf16_moments_are_refused_without_transformer_engine():
    if te.te_fused_adam_available():
        pytest.skip("Transformer Engine is installed")
    r = recipe(ramp=None, optimizer__moment_dtype="bf16")
    with pytest.raises(ValueError, match="optimizer.moment_dtype=bf16 needs Transformer "
                                         "Engine's FusedAdam.*allowed values without"):
        TM.optimizer_config(r)
    assert TM.optimizer_config(recipe(ramp=None)).exp_avg_dtype == torch.float32


def test_optimizer_config_carries_the_fp8_recipe():
    r = recipe(ramp=None)
    assert TM.optimizer_config(r).fp8_recipe is None
    fp8 = r.model_copy(deep=True)
    fp8.fp8.recipe = "current"
    assert TM.optimizer_config(fp8).fp8_recipe == "tensorwise"


def test_fp8_dispatch_is_refused_by_train_and_flagged_by_plan():
    from megatron_dualpipe.planning import check_plan_rules
    from megatron_dualpipe.train import setup

    v3 = load_plan_recipe(V3)
    (problem,) = unsupported_for_training(v3)
    assert problem.startswith("fp8.dispatch=true") and "allowed values: false" in problem
    assert any(w.startswith("train refuses: fp8.dispatch=true") for w in check_plan_rules(v3))
    with pytest.raises(ValueError, match="fp8.dispatch=true"):
        setup(v3)  # refused before any process group or model exists
    off = v3.model_copy(deep=True)
    off.fp8.dispatch = False
    assert unsupported_for_training(off) == []
