"""MLA recipes: refused where Megatron-Core 0.19 cannot build them, and the fused q/kv down
projection (`model.mla_down_proj_fusion`) mapped, checked and initialized like the unfused one.

The GPU side (fused against unfused training) is in tests/test_gpu_training.py."""

from __future__ import annotations

import pytest
import torch

from megatron_dualpipe.config import load_recipe, preflight
from megatron_dualpipe.config.rules import check_recipe
from megatron_dualpipe.config.to_megatron import transformer_config_kwargs
from megatron_dualpipe.config.validate_training import unsupported_for_training
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.model.init import init_chunk

RANK = "recipes/deepseek_v3_rank_1gpu.yaml"
TINY = "recipes/tiny_moe_cpu.yaml"


def test_the_field_reaches_megatrons_config():
    on = load_recipe(RANK, ["model.mla_down_proj_fusion=true"])
    assert transformer_config_kwargs(on, torch.device("cpu"))["mla_down_proj_fusion"] is True
    off = load_recipe(RANK)
    assert transformer_config_kwargs(off, torch.device("cpu"))["mla_down_proj_fusion"] is False


@pytest.mark.parametrize("overrides,needle", [
    (["model.attention=mha"], "got model.attention=mha"),
    (["model.mla.q_lora_rank=null"], "got model.mla.q_lora_rank=null"),
])
def test_fusion_without_mla_down_projections_is_refused(overrides, needle):
    with pytest.raises(UserError) as err:
        load_recipe(RANK, ["model.mla_down_proj_fusion=true", *overrides])
    assert "model.mla_down_proj_fusion=true" in str(err.value) and needle in str(err.value)


@pytest.mark.parametrize("source,overrides,field", [
    (TINY, ["model.attention=mla"], "train.device=cpu"),
    (RANK, ["model.spec=local"], "model.spec=local"),
])
def test_mla_on_local_layers_is_one_line_before_any_worker(source, overrides, field):
    # Megatron-Core 0.19's local attention fails with "unexpected keyword argument
    # 'k_channels'" in every worker; `train` refuses it in the launcher instead.
    recipe = load_recipe(source, overrides)
    problems = unsupported_for_training(recipe)
    assert len(problems) == 1 and "model.attention=mla" in problems[0] and field in problems[0]
    assert "allowed values" in problems[0] and "mha" in problems[0]
    with pytest.raises(UserError, match="model.attention=mla"):
        check_recipe(recipe)
    assert unsupported_for_training(load_recipe(TINY)) == []


def test_mla_machine_rule(monkeypatch):
    recipe = load_recipe(RANK, ["train.device=auto"])
    monkeypatch.setattr(preflight, "_gpu_memory_gb", lambda: [])
    with pytest.raises(UserError, match="this machine has no GPU"):
        preflight.check_mla_device(recipe)
    monkeypatch.setattr(preflight, "_gpu_memory_gb", lambda: [141.0])
    monkeypatch.setattr(preflight.te, "te_installed", lambda: False)
    with pytest.raises(UserError, match="transformer_engine is not installed"):
        preflight.check_mla_device(recipe)
    monkeypatch.setattr(preflight.te, "te_installed", lambda: True)
    preflight.check_mla_device(recipe)
    preflight.check_mla_device(load_recipe(TINY))  # MHA: nothing to check


class _Chunk(torch.nn.Module):
    """Parameters named like one MLA layer of a Megatron GPTModel, fused or not."""

    def __init__(self, fused: bool, q_lora_rank: int = 6, kv_rows: int = 5, hidden: int = 8):
        super().__init__()
        self.config = type("Config", (), {"q_lora_rank": q_lora_rank})()
        attn = torch.nn.Module()
        if fused:
            attn.linear_qkv_down_proj = torch.nn.Linear(hidden, q_lora_rank + kv_rows, bias=False)
        else:
            attn.linear_q_down_proj = torch.nn.Linear(hidden, q_lora_rank, bias=False)
            attn.linear_kv_down_proj = torch.nn.Linear(hidden, kv_rows, bias=False)
        layer = torch.nn.Module()
        layer.self_attention, layer.layer_number = attn, 1
        self.decoder = torch.nn.Module()
        self.decoder.layers = torch.nn.ModuleList([layer])


def test_fused_down_projection_starts_as_the_unfused_ones_stacked():
    kwargs = dict(seed=3, std=0.02, num_layers=2, tp=1, tp_rank=0, ep_rank=0,
                  num_local_experts=1)
    unfused, fused = _Chunk(fused=False), _Chunk(fused=True)
    init_chunk(unfused, **kwargs)
    init_chunk(fused, **kwargs)
    attn = unfused.decoder.layers[0].self_attention
    stacked = torch.cat([attn.linear_q_down_proj.weight, attn.linear_kv_down_proj.weight])
    weight = fused.decoder.layers[0].self_attention.linear_qkv_down_proj.weight
    assert torch.equal(weight, stacked)
    assert weight.std() > 0.01  # drawn, not zeros or ones
