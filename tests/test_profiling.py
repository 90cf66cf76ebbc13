"""`--profile-steps a:b`: the StepProfiler in-process, and `train` end to end on CPU."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_dualpipe import trace_analysis
from megatron_dualpipe.cli import main
from megatron_dualpipe.profiling import StepProfiler, parse_steps, trace_path


def test_parse_steps():
    assert parse_steps("2:4") == (2, 4)
    assert parse_steps(" 0 : 1 ") == (0, 1)
    for bad in ("4:2", "3:3", "2", "a:b", "-1:2", "1:2:3"):
        with pytest.raises(ValueError):
            parse_steps(bad)


def test_cli_rejects_bad_window(capsys):
    assert main(["train", "recipes/tiny_moe_cpu.yaml", "--profile-steps", "5:1"]) == 2
    assert "END must be greater" in capsys.readouterr().err


def test_recipe_field_needs_a_quoted_window():
    from megatron_dualpipe.config import load_recipe

    assert load_recipe("recipes/tiny_moe_cpu.yaml",
                       ["train.profile_steps='1:3'"]).train.profile_steps == "1:3"
    with pytest.raises(ValueError, match="profile_steps"):
        load_recipe("recipes/tiny_moe_cpu.yaml", ["train.profile_steps=1:3"])  # YAML: 63


def _work():
    x = torch.randn(64, 64)
    return (x @ x).sum()


def test_step_profiler_window(tmp_path):
    prof = StepProfiler("1:3", tmp_path, rank=5, verbose=False)
    for step in range(5):
        with prof.step(step):
            _work()
        assert prof.path.exists() == (step >= 2)
    assert prof.path == trace_path(tmp_path, 5) == tmp_path / "traces" / "rank5.json"
    assert prof.steps == [1, 2]
    steps = [s["step"] for s in trace_analysis.analyze(prof.path)["steps"]]
    assert steps == [1, 2]


def test_step_profiler_cut_short_and_disabled(tmp_path):
    prof = StepProfiler("1:10", tmp_path / "a", rank=0, verbose=False)
    for step in range(3):
        with prof.step(step):
            _work()
    assert not prof.path.exists()
    assert prof.close() == prof.path and prof.path.exists()
    assert prof.close() is None
    off = StepProfiler(None, tmp_path / "b", rank=0)
    with off.step(0):
        _work()
    assert off.close() is None and not (tmp_path / "b").exists()



def test_profiler_hook_profiles_the_window_of_the_loop(tmp_path, capsys):
    """What `train` does with `ProfilerHook`: on_step_begin/on_step_end around each step
    (on_step_end sees the step's record), on_train_end after the loop."""
    from megatron_dualpipe.profiling import ProfilerHook

    hook = ProfilerHook("1:3", tmp_path, rank=0, device=torch.device("cpu"))
    for step in range(4):
        hook.on_step_begin(None, step)
        _work()
        hook.on_step_end(None, {"step": step})
        assert hook.profiler.path.exists() == (step >= 2)
    hook.on_train_end(None)
    steps = [s["step"] for s in trace_analysis.analyze(hook.profiler.path)["steps"]]
    assert steps == [1, 2]
    assert "profiled steps 1..2" in capsys.readouterr().out

    cut = ProfilerHook("1:10", tmp_path / "cut", rank=0, device=torch.device("cpu"))
    for step in range(2):
        cut.on_step_begin(None, step)
        _work()
        cut.on_step_end(None, {"step": step})
    assert not cut.profiler.path.exists()
    cut.on_train_end(None)  # the window was cut short: export what was profiled
    assert [s["step"] for s in trace_analysis.analyze(cut.profiler.path)["steps"]] == [1]

@pytest.mark.slow
def test_train_writes_traces_per_rank(tmp_path):
    log_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "megatron_dualpipe", "train", "recipes/tiny_moe_cpu.yaml",
           "--set", "train.steps=3", "--set", "parallel.schedule=dualpipev",
           "--set", f"train.log_dir={log_dir}", "--profile-steps", "1:3"]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "profiled steps 1..2" in proc.stdout
    for rank in range(4):  # pp=2 x ep=2
        report = trace_analysis.analyze(trace_path(log_dir, rank))
        assert report["device"] == "cpu"
        assert [s["step"] for s in report["steps"]] == [1, 2]
        assert report["comm"]["alltoall"]["count"] > 0  # gloo MoE dispatch/combine
        assert report["comm"]["p2p"]["count"] > 0  # pipeline send/recv
        assert report["comm"]["alltoall"]["time_us"] > 0
    assert main(["trace", str(trace_path(log_dir, 0))]) == 0
