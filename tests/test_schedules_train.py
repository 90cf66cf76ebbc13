"""Short CPU gloo runs: the batch ramp, token schedules and selective recompute in `train`.

Token counts before each step are derived by hand from Megatron-LM's ramp rule (batch =
start + k * increment, k = int(consumed / (ramp_samples / n)), raised to the schedule's
minimum), independently of `token_schedules.py`.
"""

from __future__ import annotations

import pytest

from megatron_dualpipe.testing import run_distributed

pytestmark = pytest.mark.slow  # multi-process training

TINY = {
    "model": {"num_layers": 4, "num_dense_layers": 1, "hidden_size": 32, "ffn_hidden_size": 64,
              "num_attention_heads": 4, "vocab_size": 64, "seq_length": 16, "dtype": "fp32"},
    "moe": {"num_experts": 4, "topk": 2, "ffn_hidden_size": 16,
            "shared_expert_ffn_hidden_size": 16, "bias_update_rate": 0.01},
    "optimizer": {"lr": 1e-3, "lr_warmup_steps": 1,
                  "lr_schedule_tokens": [[150, 1e-3, "constant"], [500, 1e-4, "linear"]]},
    "train": {"steps": 6, "micro_batch_size": 1, "global_batch_size": 8,
              "batch_ramp": [2, 8, 12], "device": "cpu"},
}


def expected_lr(tokens: list[int], warmup_steps: int = 1) -> list[float]:
    """Warm-up 0 -> 1e-3 over 1 step, 1e-3 until 150 tokens, linear to 1e-4 at 500."""
    out = []
    for step, t in enumerate(tokens):
        if step <= warmup_steps:
            out.append(1e-3 * step / warmup_steps)
        elif t < 150:
            out.append(1e-3)
        else:
            out.append(1e-3 + (1e-4 - 1e-3) * (t - 150) / (500 - 150))
    return out


def run_recipe(raw: dict, log_dir: str, overrides=(), stop_after=None):
    """Worker: train (or resume); every rank returns (history, probe rows, recompute flags)."""
    import torch

    torch.set_num_threads(1)
    from megatron.core.utils import get_model_config

    from megatron_dualpipe import train as T
    from megatron_dualpipe.config import apply_overrides, parse_recipe
    from megatron_dualpipe.hooks import TrainHook

    class Probe(TrainHook):
        def __init__(self):
            self.rows, self.flags = [], {}

        def on_build(self, state):
            layers = [m for c in state.model for m in c.modules()
                      if type(m).__name__ == "TransformerLayer"]
            self.flags = {
                "core_attn": [m.self_attention.checkpoint_core_attention for m in layers],
                "moe": [getattr(m.mlp, "moe_layer_recompute", None) for m in layers],
                "mlp": [m.recompute_mlp for m in layers],
            }

        def on_step_end(self, state, record):
            # the configs Megatron reads: GPTModel's (MTP loss), finalize_model_grads' (bias)
            self.rows.append({
                "mtp": [c.module.config.mtp_loss_scaling_factor for c in state.model],
                "rate": [get_model_config(c).moe_router_bias_update_rate for c in state.model],
                "bias": torch.cat([m.expert_bias.detach().clone() for c in state.model
                                   for m in c.modules() if hasattr(m, "expert_bias")]),
                "microbatches": len(record["microbatch_losses"]),
            })

    probe = Probe()
    extensions = T.extensions

    def with_probe(recipe):
        router_cls, hooks = extensions(recipe)
        return router_cls, [*hooks, probe]

    T.extensions = with_probe
    recipe = parse_recipe(apply_overrides(raw, [*overrides, f"train.log_dir={log_dir}"]))
    try:
        state = T.train(recipe, stop_after=stop_after)
        return state.history, probe.rows, probe.flags
    finally:
        from megatron_dualpipe.distributed import destroy_distributed

        destroy_distributed()


def _with(**sections) -> dict:
    raw = {k: dict(v) for k, v in TINY.items()}
    for key, value in sections.items():
        section, field = key.split("__")
        raw.setdefault(section, {})[field] = value
    return raw


def test_token_schedules_apply_at_their_step(tmp_path):
    # One process (MTP runs on CPU only without pipeline parallelism), increment 1:
    # batches 2, 3, 4, 6, 8, 8 (increments of 2 samples; 5 -> k=2, 9 -> k=4, 15 -> end),
    # i.e. 0, 32, 80, 144, 240, 368 tokens before the steps.
    tokens = [0, 32, 80, 144, 240, 368]
    base = {"model__mtp_num_layers": 1, "model__mtp_loss_scaling_factor": 0.3}
    scheduled = _with(**base, model__mtp_loss_scaling_schedule=[[200, 0.05]],
                      moe__bias_update_rate_schedule=[[300, 0.0]])
    hist, rows, _ = run_distributed(run_recipe, 1, (scheduled, str(tmp_path / "a")))[0]
    ref, ref_rows, _ = run_distributed(run_recipe, 1, (_with(**base), str(tmp_path / "b")))[0]

    assert [r["global_batch"] for r in hist] == [2, 3, 4, 6, 8, 8]
    assert [r["lr"] for r in hist] == pytest.approx(expected_lr(tokens), rel=1e-12)
    mtp = [0.3] * 4 + [0.05] * 2  # from 200 tokens: step 4
    rate = [0.01] * 5 + [0.0]  # from 300 tokens: step 5
    assert [r["mtp_loss_scaling_factor"] for r in hist] == mtp
    assert [r["moe_router_bias_update_rate"] for r in hist] == rate
    assert [row["mtp"] for row in rows] == [[v] for v in mtp]  # what Megatron read
    assert [row["rate"] for row in rows] == [[v] for v in rate]
    # Against the same run without the schedules: identical until step 3; step 4 has the same
    # loss (same weights) but another gradient (MTP loss weight 0.05, not 0.3).
    for step in range(4):
        assert (hist[step]["loss"], hist[step]["grad_norm"]) == (
            ref[step]["loss"], ref[step]["grad_norm"])
    assert hist[4]["loss"] == ref[4]["loss"] and hist[4]["grad_norm"] != ref[4]["grad_norm"]
    # Bias update rate 0 at step 5: the expert bias stops moving there, and only there.
    moved = [not row["bias"].equal(prev["bias"]) for prev, row in zip(rows, rows[1:])]
    assert moved == [True, True, True, True, False]
    assert not ref_rows[5]["bias"].equal(ref_rows[4]["bias"])
    # Stopped after step 2 and resumed (the schedules follow from the step): same steps 3-5.
    ckpt = [f"train.ckpt_dir={tmp_path / 'ckpt'}", "train.save_interval=3"]
    run_distributed(run_recipe, 1, (scheduled, str(tmp_path / "c"), ckpt, 3))
    resumed = run_distributed(run_recipe, 1, (scheduled, str(tmp_path / "c"), ckpt))[0][0]
    assert [r["step"] for r in resumed] == [3, 4, 5]
    keys = ("loss", "grad_norm", "lr", "global_batch", "mtp_loss_scaling_factor",
            "moe_router_bias_update_rate")
    assert [[r[k] for k in keys] for r in resumed] == [[r[k] for k in keys] for r in hist[3:]]


def test_batch_ramp_on_dualpipe_and_recompute(tmp_path):
    # DualPipe, pp=2: increment 2 (even micro-batch counts), minimum 2 x pp = 4 micro-batches.
    # Ramp 2 -> 8 over 12 samples: 2 (raised to 4), 4, 6, then 8: 4, 4, 6, 8, 8, 8;
    # 0, 64, 128, 224, 352, 480 tokens before the steps.
    tokens = [0, 64, 128, 224, 352, 480]
    raw = _with(parallel__pp=2, parallel__schedule="dualpipe",
                moe__bias_update_rate_schedule=[[300, 0.0]])
    recompute = _with(parallel__pp=2, parallel__schedule="dualpipe",
                      moe__bias_update_rate_schedule=[[300, 0.0]],
                      model__recompute_modules=["core_attn", "mlp", "moe", "shared_experts"])
    plain = run_distributed(run_recipe, 2, (raw, str(tmp_path / "plain")))
    rc = run_distributed(run_recipe, 2, (recompute, str(tmp_path / "rc")))
    hist = plain[0][0]
    batches = [4, 4, 6, 8, 8, 8]
    assert [r["global_batch"] for r in hist] == batches
    # every micro-batch's loss is computed on one of the two ranks
    for step, n in enumerate(batches):
        assert sum(rank[1][step]["microbatches"] for rank in plain) == n
    assert [r["lr"] for r in hist] == pytest.approx(expected_lr(tokens), rel=1e-12)
    rows = plain[0][1]
    moved = [not row["bias"].equal(prev["bias"]) for prev, row in zip(rows, rows[1:])]
    assert moved == [True, True, True, False, False]  # rate 0 from 300 tokens: step 4
    # Selective recompute is on in every layer and changes no number.
    flags, no_flags = rc[0][2], plain[0][2]
    assert all(flags["core_attn"]) and not any(no_flags["core_attn"])
    assert [f for f in flags["moe"] if f is not None] and all(
        f for f in flags["moe"] if f is not None)
    assert any(flags["mlp"]) and not any(no_flags["mlp"])  # the dense layer's MLP
    for a, b in zip(hist, rc[0][0]):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])
