"""`model.*_fusion` / `moe.*_fusion` -> Megatron's kernel-fusion fields (GPU only).

The GPU side (fused vs unfused training) is in tests/test_gpu_training.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_dualpipe.config import load_recipe
from megatron_dualpipe.config.to_megatron import FUSIONS, fusion_kwargs, transformer_config_kwargs

ALL_ON = ["model.rope_fusion=true", "model.cross_entropy_fusion=true",
          "moe.router_fusion=true", "moe.permute_fusion=true"]
NO_TE = importlib.util.find_spec("transformer_engine") is None


def _recipe(*overrides):
    return load_recipe("recipes/tiny_moe_cpu.yaml", list(overrides))


def test_defaults_are_off_like_megatron():
    kw = transformer_config_kwargs(_recipe(), torch.device("cpu"))
    assert all(kw[field] is False for field in FUSIONS.values())


def test_cpu_ignores_them():
    kw = transformer_config_kwargs(_recipe(*ALL_ON), torch.device("cpu"))
    assert all(kw[field] is False for field in FUSIONS.values())
    assert "cross_entropy_fusion_impl" not in kw


@pytest.mark.skipif(not NO_TE, reason="checks the error raised without Transformer Engine")
def test_gpu_without_transformer_engine_names_the_fields():
    with pytest.raises(ValueError) as err:
        fusion_kwargs(_recipe(*ALL_ON), on_gpu=True)
    message = str(err.value)
    for field in ("model.rope_fusion", "moe.router_fusion", "moe.permute_fusion"):
        assert field in message
    assert "cross_entropy_fusion" not in message  # Megatron's own kernel, no TE needed
    assert "Transformer Engine" in message and "false" in message


def test_gpu_mla_rope_and_cross_entropy_need_no_transformer_engine():
    # MLA's fused RoPE is Megatron's Triton kernel; the native cross-entropy fusion is torch.
    recipe = _recipe("model.attention=mla", "model.rope_fusion=true",
                     "model.cross_entropy_fusion=true")
    kw = fusion_kwargs(recipe, on_gpu=True)
    assert kw == {"apply_rope_fusion": True, "cross_entropy_loss_fusion": True,
                  "moe_router_fusion": False, "moe_permute_fusion": False,
                  "cross_entropy_fusion_impl": "native"}


def test_train_setup_checks_before_any_process_group(monkeypatch):
    """The error comes from setup's pre-checks, before init_distributed."""
    from megatron_dualpipe import train as T

    if not NO_TE:
        pytest.skip("checks the error raised without Transformer Engine")
    monkeypatch.setattr(T, "resolve_device", lambda recipe: torch.device("cuda"))
    monkeypatch.setattr(T, "check_recipe", lambda recipe, **kwargs: [])
    monkeypatch.setattr("megatron_dualpipe.fp8.check_fp8_environment", lambda *a: None)

    def fail(*args, **kwargs):
        raise AssertionError("init_distributed must not be reached")

    monkeypatch.setattr(T, "init_distributed", fail)
    with pytest.raises(ValueError, match="moe.permute_fusion"):
        T.setup(_recipe("moe.permute_fusion=true"))


# --- model.gradient_accumulation_fusion (TE modules accumulate into main_grad) ----------------

def _fake_te_class(name: str):
    """A stand-in whose class looks like a Transformer Engine GEMM module to `is_te_gemm`."""
    cls = type(name, (torch.nn.Module,), {"__module__": "transformer_engine.pytorch.module.x"})

    def __init__(self, main_grad=True):
        torch.nn.Module.__init__(self)
        self.weight = torch.nn.Parameter(torch.zeros(2, 2))
        if main_grad:
            self.weight.main_grad = torch.zeros(2, 2)
        self.fuse_wgrad_accumulation = False

    cls.__init__ = __init__
    return cls


def test_wgrad_fusion_switches_te_gemms_with_main_grad_only():
    from megatron_dualpipe.model.wgrad_fusion import fuse_te_wgrad_accumulation

    Linear, GroupedLinear = _fake_te_class("Linear"), _fake_te_class("GroupedLinear")
    chunk = torch.nn.ModuleDict({"a": Linear(), "b": GroupedLinear(), "c": Linear(False),
                                 "d": torch.nn.Linear(2, 2)})
    names = fuse_te_wgrad_accumulation([chunk])
    assert names == ["chunk0.a", "chunk0.b"]
    assert chunk["a"].fuse_wgrad_accumulation and chunk["b"].fuse_wgrad_accumulation
    assert chunk["c"].fuse_wgrad_accumulation is False  # no main_grad buffer: left alone
    assert not hasattr(chunk["d"], "fuse_wgrad_accumulation")


@pytest.mark.parametrize("schedule", ["dualpipe", "dualpipev"])
def test_wgrad_fusion_refused_with_the_zero_bubble_split(schedule):
    from megatron_dualpipe.config.validate import check_fusions

    recipe = _recipe("model.gradient_accumulation_fusion=true")
    recipe.parallel.schedule = schedule
    with pytest.raises(ValueError, match="parallel.zero_bubble=false"):
        check_fusions(recipe)
    recipe.parallel.zero_bubble = False
    check_fusions(recipe)
    recipe.parallel.schedule = "1f1b"
    recipe.parallel.zero_bubble = True
    check_fusions(recipe)


def test_wgrad_fusion_allowed_with_dualpipev_at_pp1():
    """PP=1 has no bubble, so DualPipeV runs without the W split and fused accumulation works."""
    from megatron_dualpipe.config.validate import check_fusions

    recipe = _recipe("model.gradient_accumulation_fusion=true", "parallel.schedule=dualpipev",
                     "parallel.pp=1")
    assert recipe.parallel.zero_bubble
    check_fusions(recipe)
