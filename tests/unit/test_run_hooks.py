"""The hooks of a `train` run (features.run_hooks): the profiler window and the metrics."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from megatron_dualpipe.config import load_recipe
from megatron_dualpipe.features import run_hooks
from megatron_dualpipe.metrics import MetricsHook
from megatron_dualpipe.profiling import ProfilerHook

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "tiny_moe_cpu.yaml"
CPU = torch.device("cpu")


def test_metrics_always_and_the_profiler_first_when_a_window_is_set(tmp_path):
    log = f"train.log_dir={tmp_path}"
    plain = run_hooks(load_recipe(RECIPE, [log]), 0, CPU, resume_step=0)
    assert [type(h) for h in plain] == [MetricsHook]
    assert plain[0].logger.enabled and plain[0].logger.path == tmp_path / "metrics.jsonl"
    profiled = run_hooks(load_recipe(RECIPE, [log, "train.profile_steps='2:4'"]), 3, CPU,
                         resume_step=0)
    assert [type(h) for h in profiled] == [ProfilerHook, MetricsHook]
    assert profiled[0].profiler.window == (2, 4)
    assert profiled[0].profiler.path == tmp_path / "traces" / "rank3.json"
    assert not profiled[1].logger.enabled  # only global rank 0 writes metrics


class _State:
    def __init__(self, history):
        self.history = history


def test_metrics_hook_writes_each_record_and_the_summary(tmp_path, capsys):
    hook = MetricsHook(str(tmp_path), total_steps=2, enabled=True)
    records = [{"step": s, "loss": 5.0 - s, "lr": 1e-3, "grad_norm": 1.0,
                "tokens_per_s": 100.0, "step_time_s": 0.5} for s in range(2)]
    state = _State(records)
    for record in records:
        hook.on_record(state, record)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == records
    hook.on_train_end(state)
    out = capsys.readouterr().out
    assert "step    2/2 | loss 4.0000" in out
    assert out.strip().splitlines()[-1].endswith(
        f"done: steps 1-2, loss 5.0000 -> 4.0000; metrics: {tmp_path / 'metrics.jsonl'}")
