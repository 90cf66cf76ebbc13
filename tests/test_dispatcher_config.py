"""`moe.token_dispatcher` (config/dispatcher.py): the Megatron-Core mapping and the one-line
errors for DeepEP where it cannot run."""

from __future__ import annotations

import sys

import pytest
import torch

from megatron_dualpipe.config import load_recipe
from megatron_dualpipe.config.dispatcher import check_dispatcher, check_dispatcher_installed
from megatron_dualpipe.config.to_megatron import transformer_config_kwargs
from megatron_dualpipe.errors import UserError

RANK = "recipes/deepseek_v3_rank_1gpu.yaml"  # BF16, CUDA, EP=1
BASE = ["fp8.recipe=none", "moe.permute_fusion=false", "model.rope_fusion=false",
        "model.cross_entropy_fusion=false"]  # no Transformer Engine kernels needed here
EP2 = ["parallel.ep=2", "parallel.nproc_per_node=2"]
CUDA = torch.device("cuda")


def rank(*overrides):
    return load_recipe(RANK, [*BASE, *overrides])


@pytest.mark.parametrize("value,expected", [
    ("alltoall", {"moe_token_dispatcher_type": "alltoall"}),
    ("allgather", {"moe_token_dispatcher_type": "allgather"}),
    ("deepep", {"moe_token_dispatcher_type": "flex", "moe_flex_dispatcher_backend": "deepep"}),
])
def test_mapping_to_megatron(value, expected):
    kw = transformer_config_kwargs(rank(f"moe.token_dispatcher={value}", *EP2), CUDA)
    assert {k: kw[k] for k in expected} == expected
    if value != "deepep":
        assert "moe_flex_dispatcher_backend" not in kw  # Megatron's default stays untouched


def test_megatron_accepts_the_deepep_mapping():
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = transformer_config_kwargs(rank("moe.token_dispatcher=deepep", *EP2), CUDA)
    fields = {k: v for k, v in kw.items()
              if k in ("moe_token_dispatcher_type", "moe_flex_dispatcher_backend")}
    config = TransformerConfig(num_layers=1, hidden_size=64, num_attention_heads=4,
                               num_moe_experts=8, moe_ffn_hidden_size=32, **fields)
    assert (config.moe_token_dispatcher_type, config.moe_flex_dispatcher_backend) == (
        "flex", "deepep")


@pytest.mark.parametrize("overrides,message", [
    (["model.dtype=fp32", *EP2],
     "moe.token_dispatcher=deepep needs model.dtype=bf16 (DeepEP's combine kernel is BF16 only; "
     "got fp32); allowed with fp32: alltoall, allgather"),
    (["train.device=cpu", *EP2],
     "moe.token_dispatcher=deepep needs CUDA GPUs (train.device=cpu); allowed on CPU: "
     "alltoall, allgather"),
    ([], "moe.token_dispatcher=deepep needs an expert-parallel group (parallel.ep x parallel.tp)"
         " of 2, 4, 8 ranks (DeepEP's intranode kernels); got ep=1 x tp=1 = 1"),
    (["parallel.ep=8", "parallel.nproc_per_node=4", "parallel.num_nodes=2"],
     "moe.token_dispatcher=deepep: the expert-parallel group (8 ranks) spans nodes "
     "(parallel.nproc_per_node=4)"),
])
def test_deepep_combinations_it_cannot_run(overrides, message):
    recipe = rank(*overrides)  # the dispatcher rule alone (load_recipe may run it too)
    recipe.moe.token_dispatcher = "deepep"
    with pytest.raises(UserError) as err:
        check_dispatcher(recipe)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_deepep_allowed_shape_passes():
    recipe = rank(*EP2)
    recipe.moe.token_dispatcher = "deepep"
    check_dispatcher(recipe)
    check_dispatcher(rank())  # alltoall: nothing to check


def test_flex_is_no_longer_a_value():
    with pytest.raises(ValueError, match="moe.token_dispatcher") as err:
        rank("moe.token_dispatcher=flex")
    assert "deepep" in str(err.value)


def test_not_installed_is_one_line_naming_the_field(monkeypatch):
    monkeypatch.setitem(sys.modules, "deep_ep", None)  # import deep_ep -> ImportError
    recipe = rank(*EP2)
    recipe.moe.token_dispatcher = "deepep"
    with pytest.raises(UserError) as err:
        check_dispatcher_installed(recipe)
    msg = str(err.value)
    assert msg.startswith("moe.token_dispatcher=deepep needs DeepEP (the deep_ep package), "
                          "which does not import here (")
    assert "benchmarks/deepep/build_on_gpu.sh" in msg and msg.endswith("alltoall, allgather")
    assert "\n" not in msg
    check_dispatcher_installed(rank(*EP2))  # alltoall needs nothing


@pytest.mark.parametrize("sets,expected", [
    # recipe rule (load): DeepEP on a CPU/FP32 recipe
    (["moe.token_dispatcher=deepep"], "moe.token_dispatcher=deepep needs model.dtype=bf16"),
    # train rule (launcher, before any worker): valid recipe, deep_ep not importable here
    (["moe.token_dispatcher=deepep", *(f"{k}" for k in EP2), "model.dtype=bf16",
      "train.device=cuda"], "moe.token_dispatcher=deepep needs DeepEP (the deep_ep package)"),
])
def test_train_command_stops_with_one_line(capsys, monkeypatch, sets, expected):
    from pathlib import Path

    from megatron_dualpipe import cli

    monkeypatch.chdir(Path(__file__).resolve().parent.parent)
    monkeypatch.setitem(sys.modules, "deep_ep", None)
    args = ["train", "recipes/tiny_moe_cpu.yaml", "--set", "parallel.pp=1"]
    for item in sets:
        args += ["--set", item]
    assert cli.main(args) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert out == "" and len(lines) == 1 and expected in lines[0], err
