"""`plan --predict` / `--search`: the performance model's parts on hand-checkable cases."""

import json
import re
from pathlib import Path

import pytest
import yaml

from megatron_dualpipe import plan
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.planning.predict.calibration import load_calibration
from megatron_dualpipe.planning.predict.hardware import (
    HARDWARE_DIR,
    Hardware,
    hardware_names,
    load_hardware,
)
from megatron_dualpipe.planning.predict.model import StepModel, predict
from megatron_dualpipe.planning.predict.search import balanced_split, search
from megatron_dualpipe.schedules.simulator import Costs, closed_form_bubble, simulate_schedule

ROOT = Path(__file__).resolve().parent.parent
V3 = ROOT / "recipes" / "deepseek_v3_671b_ep64_tp1_pp16_h800.yaml"
TINY = ROOT / "recipes" / "tiny_moe_cpu.yaml"
# V3 with 32 instead of 120 micro-batches per step: the same stages, a quicker simulation.
V3_SHORT = ["train.global_batch_size=4096", "train.batch_ramp=null"]

# The tiny recipe's FLOPs per micro-batch, written out by hand (h 64, 4 heads of 16, seq 32,
# 2 sequences = 64 tokens; dense FFN 128; 8 experts of 32, top-2, shared expert 32; vocab 256).
T, H, S = 64, 64, 32
ATT_GEMM = 2 * 4 * H * H * T  # q, k, v, out projections
ATT_CORE = 4 * S * (16 + 16) * T  # causal QK^T and PV
MOE_GEMM = 2 * (8 * H + 3 * H * 32 + 2 * 3 * H * 32) * T  # router, shared, 2 routed
DENSE_GEMM = 2 * 3 * H * 128 * T
HEAD_GEMM = 2 * 256 * H * T
HAND_FLOPS = {  # part: (forward, backward-input, backward-weight)
    "attention": (ATT_GEMM + ATT_CORE, ATT_GEMM + 2.5 * ATT_CORE, ATT_GEMM),
    "moe": (MOE_GEMM,) * 3,
    "dense_mlp": (DENSE_GEMM,) * 3,
    "head": (HEAD_GEMM,) * 3,
}
# Milliseconds the test calibration gives each part per micro-batch of the tiny recipe.
MS = {"attention": (1.0, 2.0, 0.5), "moe": (3.0, 4.0, 2.5), "dense_mlp": (2.0, 2.5, 1.5),
      "head": (0.7, 0.9, 0.4)}


def write_calibration(path: Path, ms=MS, hardware="h200") -> Path:
    parts = {k: {"f_ms": ms[k][0], "b_ms": ms[k][1], "w_ms": ms[k][2],
                 "f_flops": HAND_FLOPS[k][0], "b_flops": HAND_FLOPS[k][1],
                 "w_flops": HAND_FLOPS[k][2]} for k in MS}
    path.write_text(json.dumps({"source": "test", "hardware": hardware,
                                "precisions": {"bf16": parts, "fp8": parts}}))
    return path


def fast_memory_hw(**changes) -> Hardware:
    """An H200 whose optimizer time is negligible (HBM 1e12 GB/s)."""
    d = load_hardware("h200").to_json()
    d.update(hbm_gb_per_s=1e12, **changes)
    return Hardware(**d)


def test_one_stage_without_communication_is_the_sum_of_its_layer_times(tmp_path):
    recipe = plan.load_plan_recipe(TINY, ["parallel.pp=1", "parallel.ep=1"])
    cal = load_calibration(write_calibration(tmp_path / "cal.json"))
    model = StepModel(recipe, fast_memory_hw(), cal)
    out = model.run()
    per_mb = sum(MS["attention"]) * 4 + sum(MS["dense_mlp"]) + sum(MS["moe"]) * 3 + sum(MS["head"])
    assert model.m == 8 and out["dp"] == 1
    assert out["pipeline_makespan_s"] * 1e3 == pytest.approx(model.m * per_mb, rel=1e-12)
    assert out["pipeline_bubble_s"] == pytest.approx(0.0, abs=1e-9)
    assert out["step_time_s"] == pytest.approx(model.m * per_mb / 1e3, rel=1e-6)


def test_hardware_peak_ratio_scales_compute(tmp_path):
    recipe = plan.load_plan_recipe(TINY, ["parallel.pp=1", "parallel.ep=1"])
    cal = load_calibration(write_calibration(tmp_path / "cal.json"))
    base = StepModel(recipe, fast_memory_hw(), cal).run()["pipeline_makespan_s"]
    twice = StepModel(recipe, fast_memory_hw(bf16_tflops=2 * 989.4), cal).run()
    assert twice["pipeline_makespan_s"] == pytest.approx(base / 2, rel=1e-12)


@pytest.mark.parametrize("schedule,extra", [("1f1b", []),
                                            ("dualpipe", ["train.global_batch_size=32"]),
                                            ("dualpipev", ["train.global_batch_size=32"])])
def test_bubble_is_the_simulators(tmp_path, schedule, extra):
    """Uniform stages (no head cost, all MoE, no EP/PP traffic): the model's pipeline equals
    `simulate_schedule` with F, B, W, F&B from the calibration, and DeepSeek's closed form."""
    ms = dict(MS, head=(0.0, 0.0, 0.0))
    cal = load_calibration(write_calibration(tmp_path / "cal.json", ms))
    pp = 4
    sets = [f"parallel.pp={pp}", "parallel.ep=1", f"parallel.schedule={schedule}",
            "model.num_dense_layers=0", "model.num_layers=8", *extra]
    recipe = plan.load_plan_recipe(TINY, sets)
    hw = fast_memory_hw(ib_gb_per_s=1e12, nvlink_gb_per_s=1e12)  # p2p ~ 0
    model = StepModel(recipe, hw, cal)
    out = model.run()
    layers = 8 // (2 * pp if schedule == "dualpipev" else pp)
    f, b, w = (layers * (ms["attention"][i] + ms["moe"][i]) for i in range(3))
    costs = Costs(f=f, b=b + w, w=w, fb=f + b + w)
    ref = simulate_schedule(schedule, pp, model.m, costs)
    assert out["pipeline_bubble_s"] * 1e3 == pytest.approx(ref.bubble, rel=1e-6)
    assert out["bubble_fraction"] == pytest.approx(ref.bubble / ref.makespan, rel=1e-6)
    closed = closed_form_bubble(schedule, pp, costs)
    if schedule == "1f1b":
        assert ref.bubble == pytest.approx(closed)


@pytest.mark.parametrize("recipe_path,sets", [
    (V3, V3_SHORT),
    (V3, [*V3_SHORT, "parallel.schedule=1f1b", "parallel.layers_per_stage=null",
          "model.num_layers=64"]),
    (TINY, []),
])
def test_doubling_bandwidth_never_slows_a_step(recipe_path, sets):
    recipe = plan.load_plan_recipe(recipe_path, sets)
    cal = load_calibration()
    times = [StepModel(recipe, load_hardware("h800").with_bandwidth_scale(k), cal).run()[
        "step_time_s"] for k in (0.5, 1, 2, 4)]
    assert all(b <= a for a, b in zip(times, times[1:])), times
    if recipe_path == V3:
        assert times[-1] < times[0]  # EP traffic matters for V3


def test_breakdown_adds_up_to_the_pipeline():
    recipe = plan.load_plan_recipe(V3, V3_SHORT)
    out = StepModel(recipe, load_hardware("h800"), load_calibration()).run()
    b = out["breakdown_s"]
    on_rank = sum(b[k]["exposed"] for k in ("attention", "experts", "dense_mlp", "head",
                                             "dispatch_combine", "bubble"))
    assert on_rank == pytest.approx(out["pipeline_makespan_s"], rel=1e-9)
    assert b["dispatch_combine"]["exposed"] <= b["dispatch_combine"]["total"]


def test_v3_prediction_fields_and_units():
    recipe = plan.load_plan_recipe(V3, V3_SHORT)
    out = predict(recipe, load_hardware("h800"), load_calibration())
    tokens = 4096 * 4096
    assert out["tokens_per_step"] == tokens and out["world_size"] == 2048
    assert out["tokens_per_s_per_gpu"] == pytest.approx(tokens / 2048 / out["step_time_s"])
    assert out["gpu_hours_per_trillion_tokens"] == pytest.approx(
        1e12 / (out["tokens_per_s_per_gpu"] * 2048) * 2048 / 3600)
    assert 0 < out["exposed_comm_fraction"] < 1 and 0 < out["bubble_fraction"] < 1
    assert 0 < out["mfu"] < 1


def test_balanced_split_gives_the_head_its_share():
    recipe = plan.load_plan_recipe(V3)
    # Head + MTP of V3: 2 output heads (2 x 0.93B weights) + MTP projection + one MoE layer,
    # about 4 MoE layers of FLOPs; 61 + 4 over 16 stages, the last gives 4 back.
    split = balanced_split(recipe, 16)
    assert sum(split) == 61 and split[-1] == 0 and split[0] == 5 and set(split[1:-1]) == {4}


def test_search_ranks_feasible_layouts_and_matches_predict():
    recipe = plan.load_plan_recipe(TINY)
    found = search(TINY, [], recipe, 8, load_hardware("h200"), load_calibration(),
                   plan.validate_plan_recipe)
    ok = [c for c in found if c.feasible]
    assert ok and all(c.feasible for c in found[:len(ok)])
    rates = [c.tokens_per_s_per_gpu for c in ok]
    assert rates == sorted(rates, reverse=True)
    best = ok[0]
    sets = [f"parallel.pp={best.pp}", f"parallel.ep={best.ep}",
            f"parallel.schedule={best.schedule}", f"train.micro_batch_size={best.micro_batch_size}",
            "parallel.num_nodes=1", "parallel.nproc_per_node=8",
            f"parallel.vpp={2 if best.schedule == 'interleaved' else 'null'}",
            f"parallel.layers_per_stage={best.layers_per_stage or 'null'}"]
    again = StepModel(plan.load_plan_recipe(TINY, sets), load_hardware("h200"),
                      load_calibration()).run()
    assert again["step_time_s"] == pytest.approx(best.step_time_s, rel=1e-12)


def test_search_rejects_bad_gpu_counts():
    recipe = plan.load_plan_recipe(TINY)
    for gpus in (0, -8, 12):
        with pytest.raises(UserError, match="--gpus"):
            search(TINY, [], recipe, gpus, load_hardware("h800"), load_calibration(),
                   plan.validate_plan_recipe)


def test_hardware_files_name_a_source_for_every_number():
    assert hardware_names() == ["h100", "h200", "h800"]
    for name in hardware_names():
        hw = load_hardware(name)
        assert hw.name == name
        lines = (HARDWARE_DIR / f"{name}.yaml").read_text().splitlines()
        fields = [ln for ln in lines if re.match(r"^[a-z_0-9]+:\s*[0-9]", ln)]
        assert len(fields) == 8
        assert all(re.search(r"#\s*\[[a-z0-9 .§-]+\]", ln) for ln in fields), name
    h800 = load_hardware("h800")
    assert (h800.nvlink_gb_per_s, h800.ib_gb_per_s) == (160, 50)  # DeepSeek-V3 §3.2.2


def test_default_calibration_is_labelled():
    cal = load_calibration()
    assert cal.source == "measured layer time, analytic split" and cal.hardware == "h200"


def test_bad_hardware_and_calibration_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="h100, h200, h800"):
        load_hardware("a100")
    bad = tmp_path / "hw.yaml"
    bad.write_text(yaml.safe_dump({"name": "x"}))
    with pytest.raises(UserError, match="missing"):
        load_hardware(bad)
    cal = tmp_path / "cal.json"
    cal.write_text("{}")
    with pytest.raises(UserError, match="source"):
        load_calibration(cal)


def test_cli_predict_json_and_errors(capsys, tmp_path):
    png = tmp_path / "timeline.png"
    args = [str(V3), "--predict", "--json", "--png", str(png),
            *(x for s in V3_SHORT for x in ("--set", s))]
    assert plan.main(args) == 0
    p = json.loads(capsys.readouterr().out)["predict"]
    for key in ("step_time_s", "tokens_per_s_per_gpu", "mfu", "bubble_fraction",
                "exposed_comm_fraction", "gpu_hours_per_trillion_tokens"):
        assert p[key] > 0
    assert png.stat().st_size > 10_000
    for args, needle in ((["--search", "--gpus", "0"], "--gpus 0"),
                         (["--predict", "--hardware", "tpu"], "h100, h200, h800"),
                         (["--search"], "--gpus"),
                         (["--predict", "--calibration", "/nonexistent.json"], "--calibration")):
        assert plan.main([str(TINY), *args]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and needle in err, err


def test_measured_parts_calibration_times_the_default_calibrations_shapes():
    """The H200 run of benchmarks/calibrate_layer.py: every part and pass measured, on the
    shapes (FLOPs) the default calibration describes; the prediction uses its times."""
    cal_dir = ROOT / "megatron_dualpipe" / "planning" / "calibration"
    parts = load_calibration(cal_dir / "h200_v3_rank_parts.json")
    default = load_calibration()
    assert parts.source == "measured"
    for prec in ("bf16", "fp8"):
        for part in ("attention", "dense_mlp", "head", "moe"):
            e = parts.entry(prec, part)
            assert min(e["f_ms"], e["b_ms"], e["w_ms"]) > 0, (prec, part)
            if part != "moe":  # the MoE part's FLOPs count the router/dispatch differently
                d = default.entry(prec, part)
                assert e["f_flops"] == pytest.approx(d["f_flops"], rel=1e-9), (prec, part)
    recipe = plan.load_plan_recipe(V3, V3_SHORT)
    slow, fast = (StepModel(recipe, load_hardware("h800"), c).run()["step_time_s"]
                  for c in (parts, default))
    assert slow > fast  # its layer is 21% slower (passes timed alone between syncs)
