"""The DeepSeek-V3 recipe is DeepSeek-V3's pre-training setup; the proxies keep its architecture."""

import re
from pathlib import Path

import pytest
import torch

from megatron_dualpipe.config.stage_split import (
    layers_of_stage,
    megatron_layout,
    num_stages,
)
from megatron_dualpipe.config.to_megatron import transformer_config_kwargs
from megatron_dualpipe.config.validate import check_stage_split, world_size
from megatron_dualpipe.plan import load_plan_recipe
from megatron_dualpipe.planning import make_plan, simulate_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
V3 = RECIPES / "deepseek_v3_671b_ep64_tp1_pp16_h800.yaml"
PROXIES = ["deepseek_v3_proxy_1gpu", "deepseek_v3_proxy_2gpu", "deepseek_v3_proxy_8gpu"]


@pytest.fixture(scope="module")
def v3():
    return load_plan_recipe(V3)


def test_v3_architecture_matches_the_report(v3):
    m, moe = v3.model, v3.moe
    assert (m.num_layers, m.num_dense_layers, m.hidden_size, m.ffn_hidden_size) == (
        61, 3, 7168, 18432)
    assert (m.num_attention_heads, m.attention) == (128, "mla")
    assert (m.mla.q_lora_rank, m.mla.kv_lora_rank, m.mla.qk_head_dim,
            m.mla.qk_pos_emb_head_dim, m.mla.v_head_dim) == (1536, 512, 128, 64, 128)
    assert (moe.num_experts, moe.ffn_hidden_size, moe.shared_expert_ffn_hidden_size) == (
        256, 2048, 2048)
    assert (moe.topk, moe.score_function, moe.num_groups, moe.group_topk) == (
        8, "sigmoid", 8, 4)
    assert moe.topk_scaling_factor == 2.5
    assert moe.expert_bias and moe.bias_update_rate == 0.001
    assert [tuple(r) for r in moe.bias_update_rate_schedule] == [(14.3e12, 0.0)]
    assert moe.seq_aux_loss_coeff == 0.0001
    assert m.mtp_num_layers == 1 and m.mtp_loss_scaling_factor == 0.3
    assert [tuple(r) for r in m.mtp_loss_scaling_schedule] == [(10e12, 0.1)]
    assert (m.vocab_size, m.seq_length, m.untie_embeddings) == (129280, 4096, True)


def test_v3_training_matches_the_report(v3):
    o, t, p = v3.optimizer, v3.train, v3.parallel
    assert (o.name, o.adam_beta1, o.adam_beta2, o.weight_decay, o.clip_grad) == (
        "adam", 0.9, 0.95, 0.1, 1.0)
    assert o.lr == 2.2e-4 and o.lr_warmup_steps == 2000
    phases = [tuple(r) for r in o.lr_schedule_tokens]
    assert phases[0] == (10e12, 2.2e-4, "constant")
    assert phases[1] == (14.3e12, 2.2e-5, "cosine")
    assert phases[-1][0] == 14.8e12 and phases[-1][1] == 7.3e-6
    assert t.global_batch_size == 15360 and tuple(t.batch_ramp[:2]) == (3072, 15360)
    assert t.batch_ramp[2] * v3.model.seq_length == pytest.approx(469e9, rel=1e-6)
    assert (v3.fp8.recipe, o.moment_dtype) == ("blockwise", "bf16")
    assert (p.schedule, p.pp, p.ep, p.tp, p.distributed_optimizer) == (
        "dualpipe", 16, 64, 1, True)
    assert (p.num_nodes, p.nproc_per_node, world_size(v3)) == (256, 8, 2048)
    plan = make_plan(v3)
    assert plan["training_tokens"] == pytest.approx(14.8e12, rel=1e-3)


def test_every_v3_value_has_a_comment_and_the_model_cites_the_report():
    section = None
    for line in V3.read_text().splitlines():
        text = line.split("#")[0].rstrip()
        if not text.strip() or text.strip().startswith("-"):
            continue
        if re.fullmatch(r"\w+:", text):
            section = text[:-1]
            continue
        if re.fullmatch(r"\s+\w+:", text):
            continue  # a nested mapping (model.mla) or a list follows
        assert "#" in line, f"value without a comment: {line!r}"
        if section in ("model", "moe") and "spec" not in text and "grouped_gemm" not in text:
            assert re.search(r"§\d|HF ", line), f"no report/HF citation: {line!r}"


def test_v3_maps_onto_megatron(v3, monkeypatch):
    from megatron_dualpipe import te

    # V3's recompute (layernorm, mla_up_proj) needs Transformer Engine, as V3 itself does
    monkeypatch.setattr(te, "te_available", lambda: True)
    kw = transformer_config_kwargs(v3, torch.device("cuda"))
    assert kw["num_layers"] == 61 and kw["multi_latent_attention"]
    assert kw["moe_layer_freq"] == [0] * 3 + [1] * 58
    assert kw["num_moe_experts"] == 256 and kw["moe_router_topk"] == 8
    assert (kw["moe_router_num_groups"], kw["moe_router_group_topk"]) == (8, 4)
    assert kw["moe_router_score_function"] == "sigmoid"
    assert kw["moe_router_topk_scaling_factor"] == 2.5
    assert kw["moe_router_enable_expert_bias"] and kw["moe_aux_loss_coeff"] == 0.0001
    assert (kw["q_lora_rank"], kw["kv_lora_rank"], kw["qk_pos_emb_head_dim"]) == (1536, 512, 64)
    assert kw["mtp_num_layers"] == 1
    assert (kw["pipeline_model_parallel_size"], kw["expert_model_parallel_size"]) == (16, 64)
    assert kw["fp8_recipe"] == "blockwise"
    assert kw["recompute_granularity"] == "selective"
    assert kw["recompute_modules"] == ["layernorm", "mla_up_proj"]
    assert kw["mtp_loss_scaling_factor"] == 0.3 and kw["moe_router_bias_update_rate"] == 0.001


def test_v3_stage_split(v3):
    assert num_stages(v3) == 16
    ranges = [layers_of_stage(v3, s) for s in range(16)]
    assert ranges[0] == range(3) and ranges[-1] == range(59, 61)
    assert [i for r in ranges for i in r] == list(range(61))


def test_v3_stage_split_is_a_valid_megatron_layout(v3):
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )

    rows = megatron_layout(v3)
    assert rows[0][0] == "embedding" and rows[-1][-2:] == ["mtp", "loss"]
    layout = PipelineParallelLayerLayout(rows, v3.parallel.pp)
    layout.validate_layer_layout(num_layers=61, mtp_num_layers=1)


@pytest.mark.parametrize("split, match", [
    ([4] * 15, "16 pipeline stages"),
    ([4] * 16, "sums to 64"),
    ([-1] + [4] * 14 + [6], ">= 0"),
])
def test_bad_stage_splits_are_rejected(v3, split, match):
    bad = v3.model_copy(deep=True)
    bad.parallel.layers_per_stage = split
    with pytest.raises(ValueError, match=match):
        check_stage_split(bad)


@pytest.mark.parametrize("name", PROXIES)
def test_proxies_keep_the_architecture_and_fit_80gb(name):
    recipe = load_plan_recipe(RECIPES / f"{name}.yaml")
    m, moe = recipe.model, recipe.moe
    assert m.attention == "mla" and m.mtp_num_layers == 1 and m.num_dense_layers >= 1
    assert moe.score_function == "sigmoid" and moe.expert_bias
    assert moe.num_groups and moe.group_topk and moe.shared_expert_ffn_hidden_size
    dims = [m.hidden_size, m.ffn_hidden_size, moe.ffn_hidden_size,
            moe.shared_expert_ffn_hidden_size, m.mla.q_lora_rank, m.mla.kv_lora_rank]
    assert all(d % 128 == 0 for d in dims), dims
    assert m.seq_length in (2048, 4096) and m.dtype == "bf16"
    assert recipe.fp8.recipe == "blockwise"
    plan = make_plan(recipe)
    assert max(plan["per_rank_memory_gb"]) < 80
    assert plan["world_size"] == int(name.split("_")[-1].removesuffix("gpu"))


def test_2gpu_proxy_uses_expert_parallelism():
    recipe = load_plan_recipe(RECIPES / "deepseek_v3_proxy_2gpu.yaml")
    assert recipe.parallel.ep == 2
    v = load_plan_recipe(RECIPES / "deepseek_v3_proxy_2gpu.yaml", [
        "parallel.ep=1", "parallel.pp=2", "parallel.schedule=dualpipev"])
    assert max(make_plan(v)["per_rank_memory_gb"]) < 80


@pytest.mark.parametrize("overrides, pp, ep", [
    ([], 4, 2),
    (["parallel.pp=8", "parallel.ep=1"], 8, 1),
    (["model.num_layers=15", "parallel.layers_per_stage=[3,4,4,4]"], 4, 2),
])
def test_8gpu_proxy_dualpipe_variants(overrides, pp, ep):
    recipe = load_plan_recipe(RECIPES / "deepseek_v3_proxy_8gpu.yaml", overrides)
    assert (recipe.parallel.schedule, recipe.parallel.pp, recipe.parallel.ep) == (
        "dualpipe", pp, ep)
    plan = make_plan(recipe)
    assert plan["world_size"] == 8 and max(plan["per_rank_memory_gb"]) < 80
    if ep > 1:
        assert plan["bubble"] == pytest.approx(plan["closed_form_bubble"])
    else:  # nothing to overlap at EP=1: F and B run one after the other, off DeepSeek's table
        assert plan["closed_form_bubble"] is None
        _, sim = simulate_recipe(recipe)
        assert plan["bubble"] == sim.bubble > 0
