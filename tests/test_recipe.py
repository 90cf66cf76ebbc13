"""Recipes: defaults, `include:`, `--set` overrides, every error message, Megatron mapping."""

from pathlib import Path

import pytest
import torch

from megatron_dualpipe.config import (
    Recipe,
    apply_overrides,
    data_parallel_size,
    load_recipe,
    num_microbatches,
    parse_recipe,
    world_size,
)
from megatron_dualpipe.config.load import MAX_INCLUDE_DEPTH, load_raw
from megatron_dualpipe.config.to_megatron import transformer_config, transformer_config_kwargs

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
TINY = RECIPES / "tiny_moe_cpu.yaml"
CPU = torch.device("cpu")


def tiny(*overrides: str) -> Recipe:
    return load_recipe(TINY, list(overrides))


def error_of(*overrides: str, path: Path = TINY) -> str:
    with pytest.raises(ValueError) as err:
        load_recipe(path, list(overrides))
    return str(err.value)


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# --- defaults and shipped recipes --------------------------------------------------------------


def test_defaults_load():
    recipe = parse_recipe({})
    assert recipe == Recipe()
    assert (recipe.model.num_layers, recipe.moe.num_experts, recipe.parallel.schedule) == (
        4, 8, "1f1b")
    assert world_size(recipe) == 1 and data_parallel_size(recipe) == 1
    assert num_microbatches(recipe) == recipe.train.global_batch_size // (
        recipe.train.micro_batch_size)


def test_empty_file_is_an_error_but_an_empty_mapping_is_the_defaults(tmp_path):
    empty = write(tmp_path / "empty.yaml", "# nothing yet\n")
    with pytest.raises(ValueError, match=f"recipe {empty}: the file is empty"):
        load_recipe(empty)
    assert load_recipe(write(tmp_path / "defaults.yaml", "{}\n")) == Recipe()


def test_tiny_cpu_recipe():
    recipe = tiny()
    p = recipe.parallel
    assert (p.pp, p.ep, p.tp, world_size(recipe), data_parallel_size(recipe)) == (2, 2, 1, 4, 2)
    assert num_microbatches(recipe) == 4
    assert recipe.train.device == "cpu" and recipe.model.dtype == "fp32"


def test_tiny_gpu_recipe_loads():
    recipe = load_recipe(RECIPES / "tiny_moe_gpu.yaml")
    m, moe, p = recipe.model, recipe.moe, recipe.parallel
    assert (m.spec, m.dtype, recipe.train.device) == ("te", "bf16", "cuda")
    assert (p.pp, p.ep, p.tp, world_size(recipe)) == (1, 1, 1, 1)
    assert m.num_layers == 4 and 256 <= m.hidden_size <= 512
    assert 8 <= moe.num_experts <= 16 and moe.topk == 2
    assert moe.num_groups and moe.group_topk and moe.shared_expert_ffn_hidden_size
    assert moe.score_function == "sigmoid" and moe.expert_bias
    for dim in (m.hidden_size, m.ffn_hidden_size, moe.ffn_hidden_size,
                moe.shared_expert_ffn_hidden_size, m.hidden_size // m.num_attention_heads,
                m.seq_length, m.vocab_size):
        assert dim % 128 == 0, dim
    # Its dims also pass the blockwise-FP8 rules.
    load_recipe(RECIPES / "tiny_moe_gpu.yaml", ["fp8.recipe=blockwise"])


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_recipe_loads(path):
    load_recipe(path)


# --- include: ---------------------------------------------------------------------------------


def test_include_merges_base_and_override(tmp_path):
    write(tmp_path / "base.yaml", """
name: base
model: {num_layers: 4, hidden_size: 64, num_attention_heads: 4, recompute_modules: [mlp]}
moe: {num_experts: 8, topk: 2}
train: {steps: 10, global_batch_size: 8}
""")
    override = write(tmp_path / "override.yaml", """
include: base.yaml
name: override
model: {hidden_size: 128, recompute_modules: [moe_act]}
train: {steps: 20}
""")
    recipe = load_recipe(override)
    assert recipe.name == "override"
    assert recipe.model.hidden_size == 128  # overridden
    assert recipe.model.num_layers == 4  # kept from the base (sections merge key by key)
    assert recipe.model.recompute_modules == ["moe_act"]  # lists replace, not append
    assert recipe.moe.num_experts == 8
    assert (recipe.train.steps, recipe.train.global_batch_size) == (20, 8)


def test_include_list_later_files_win_and_paths_are_relative(tmp_path):
    (tmp_path / "parts").mkdir()
    write(tmp_path / "parts" / "a.yaml", "train: {steps: 1, seed: 7}\n")
    write(tmp_path / "parts" / "b.yaml", "train: {steps: 2}\n")
    top = write(tmp_path / "top.yaml", "include: [parts/a.yaml, parts/b.yaml]\n")
    recipe = load_recipe(top)
    assert (recipe.train.steps, recipe.train.seed) == (2, 7)


def test_include_of_a_shipped_recipe(tmp_path):
    mine = write(tmp_path / "mine.yaml", f"include: {TINY}\ntrain: {{steps: 5}}\n")
    recipe = load_recipe(mine)
    assert recipe.train.steps == 5 and recipe.parallel.pp == 2


def test_include_cycle_is_an_error(tmp_path):
    a = write(tmp_path / "a.yaml", "include: b.yaml\n")
    write(tmp_path / "b.yaml", "include: a.yaml\n")
    msg = error_of(path=a)
    assert "include: cycle" in msg
    assert "a.yaml -> " in msg and "b.yaml -> " in msg and msg.endswith("a.yaml")


def test_self_include_is_a_cycle(tmp_path):
    me = write(tmp_path / "me.yaml", "include: me.yaml\n")
    assert "include: cycle" in error_of(path=me)


def test_include_depth_is_limited(tmp_path):
    n = MAX_INCLUDE_DEPTH + 2
    for i in range(n):
        write(tmp_path / f"r{i}.yaml", f"include: r{i + 1}.yaml\n")
    write(tmp_path / f"r{n}.yaml", "train: {steps: 3}\n")
    msg = error_of(path=tmp_path / "r0.yaml")
    assert f"nested deeper than {MAX_INCLUDE_DEPTH}" in msg
    # Exactly MAX_INCLUDE_DEPTH levels are fine.
    assert load_recipe(tmp_path / f"r{n - MAX_INCLUDE_DEPTH}.yaml").train.steps == 3


def test_include_of_a_missing_file_names_the_including_recipe(tmp_path):
    top = write(tmp_path / "top.yaml", "include: nope.yaml\n")
    msg = error_of(path=top)
    assert "top.yaml" in msg and "include: file not found" in msg and "nope.yaml" in msg


def test_include_must_be_paths(tmp_path):
    top = write(tmp_path / "top.yaml", "include: {a: 1}\n")
    assert "include: must be a path or a list of paths" in error_of(path=top)


# --- --set overrides --------------------------------------------------------------------------


def test_set_parses_values_as_yaml():
    recipe = tiny(
        "train.steps=3",  # int
        "train.resume=false",  # bool
        "optimizer.lr=1e-4",  # float
        "model.mla.kv_lora_rank=256",  # nested section
        "parallel.layers_per_stage=[1, 3]",  # list
        "model.recompute_modules=[mlp, moe_act]",  # list of literals
        "train.ckpt_dir=/tmp/ckpt",  # string
        "moe.num_groups=null", "moe.group_topk=null",  # None
    )
    assert recipe.train.steps == 3 and isinstance(recipe.train.steps, int)
    assert recipe.train.resume is False
    assert recipe.optimizer.lr == 1e-4
    assert recipe.model.mla.kv_lora_rank == 256
    assert recipe.parallel.layers_per_stage == [1, 3]
    assert recipe.model.recompute_modules == ["mlp", "moe_act"]
    assert recipe.train.ckpt_dir == "/tmp/ckpt"
    assert recipe.moe.num_groups is None and recipe.moe.group_topk is None


def test_later_set_wins_and_set_wins_over_includes(tmp_path):
    base = write(tmp_path / "base.yaml", "train: {steps: 10}\n")
    top = write(tmp_path / "top.yaml", f"include: {base.name}\ntrain: {{steps: 20}}\n")
    assert load_recipe(top, ["train.steps=30", "train.steps=40"]).train.steps == 40


def test_apply_overrides_creates_sections_and_leaves_its_input_alone():
    raw = {"train": {"steps": 1}}
    out = apply_overrides(raw, ["parallel.pp=2", "train.steps=5", "model.mla.v_head_dim=64"])
    assert raw == {"train": {"steps": 1}}
    assert out == {"train": {"steps": 5}, "parallel": {"pp": 2},
                   "model": {"mla": {"v_head_dim": 64}}}


def test_parallel_override_changes_the_derived_sizes():
    recipe = tiny("parallel.pp=1", "parallel.ep=1")
    assert (world_size(recipe), data_parallel_size(recipe), num_microbatches(recipe)) == (1, 1, 8)


# --- errors: each names the field path and what is allowed ---------------------------------------


def test_unknown_key():
    msg = error_of("model.hiden_size=128")
    assert "model.hiden_size" in msg and "unknown field" in msg
    assert "allowed fields" in msg and "hidden_size" in msg and "num_layers" in msg


def test_unknown_key_in_a_file(tmp_path):
    bad = write(tmp_path / "bad.yaml", "modle: {num_layers: 2}\ntrain: {stepz: 3}\n")
    msg = error_of(path=bad)
    assert str(bad) in msg
    assert "modle: unknown field; allowed fields: name, description, model, moe" in msg
    assert "train.stepz: unknown field; allowed fields:" in msg and "steps" in msg


def test_unknown_nested_key():
    msg = error_of("model.mla.kv_rank=3")
    assert "model.mla.kv_rank: unknown field" in msg and "kv_lora_rank" in msg


def test_wrong_type():
    msg = error_of("model.num_layers=abc")
    assert "model.num_layers: expected an integer, got 'abc'" in msg


def test_wrong_type_for_a_section():
    msg = error_of("model=3")
    assert "model:" in msg and "valid dictionary" in msg


def test_out_of_range():
    msg = error_of("model.num_layers=0")
    assert "model.num_layers" in msg and "greater than or equal to 1" in msg


def test_bad_literal():
    msg = error_of("parallel.schedule=foo")
    assert "parallel.schedule" in msg and "'foo'" in msg
    assert "allowed values: 1f1b, interleaved, dualpipe, dualpipev" in msg


def test_bad_literal_in_a_list():
    msg = error_of("model.recompute_modules=[mlp, attn]")
    assert "model.recompute_modules" in msg and "'attn'" in msg and "moe_act" in msg


def test_world_size_not_divisible_by_tp_times_pp():
    msg = error_of("parallel.nproc_per_node=3")
    assert "world size 3" in msg and "parallel.nproc_per_node" in msg
    assert "parallel.tp x parallel.pp = 2" in msg
    assert "nearest valid parallel.nproc_per_node: 2 or 4" in msg


def test_ep_must_divide_a_pipeline_stage():
    msg = error_of("parallel.nproc_per_node=6", "parallel.ep=4")
    assert "parallel.ep=4" in msg and "valid: [1, 3]" in msg


def test_experts_not_divisible_by_ep():
    msg = error_of("moe.num_experts=7")
    assert "moe.num_experts = 7 is not divisible by parallel.ep=2" in msg
    assert "valid parallel.ep: [1, 7]" in msg


def test_physical_experts_with_eplb_not_divisible_by_ep():
    msg = error_of("eplb.enabled=true", "eplb.num_redundant_experts=1")
    assert "moe.num_experts + eplb.num_redundant_experts = 9" in msg
    assert "parallel.ep=2" in msg and "valid parallel.ep: [1, 3, 9]" in msg


def test_layers_not_divisible_by_1f1b_stages():
    msg = error_of("model.num_layers=5")
    assert "model.num_layers=5" in msg and "2 pipeline stages" in msg
    assert "parallel.schedule=1f1b, parallel.pp=2" in msg
    assert "nearest valid model.num_layers: 4 or 6" in msg


def test_layers_not_divisible_by_dualpipev_stages():
    # DualPipeV cuts the model into 2 x pp stages (a V over the pipeline ranks).
    msg = error_of("parallel.schedule=dualpipev", "model.num_layers=6")
    assert "model.num_layers=6" in msg and "4 pipeline stages" in msg
    assert "parallel.schedule=dualpipev" in msg
    assert "nearest valid model.num_layers: 4 or 8" in msg
    tiny("parallel.schedule=dualpipev", "model.num_layers=8")


def test_explicit_layer_split_must_sum_to_the_layers():
    msg = error_of("parallel.layers_per_stage=[1, 2]")
    assert "parallel.layers_per_stage sums to 3" in msg and "model.num_layers=4" in msg
    msg = error_of("parallel.layers_per_stage=[4]")
    assert "parallel.layers_per_stage has 1 entries" in msg and "2 pipeline stages" in msg


def test_global_batch_not_a_multiple_of_micro_times_dp():
    msg = error_of("train.global_batch_size=6")
    assert "train.global_batch_size=6" in msg
    assert "train.micro_batch_size x data-parallel size = 2 x 2 = 4" in msg
    assert "nearest valid train.global_batch_size: 4 or 8" in msg


def test_too_few_microbatches_for_dualpipe():
    msg = error_of("parallel.schedule=dualpipe", "train.global_batch_size=8")
    assert "parallel.schedule=dualpipe" in msg and "micro-batches >= 4" in msg
    assert "nearest valid train.global_batch_size: 16" in msg


def test_set_on_a_non_section():
    msg = error_of("modle.x=1")
    assert "--set modle.x" in msg and "'modle' is not a section" in msg
    assert "sections: model, moe, parallel, fp8, eplb, optimizer, data, train" in msg


def test_set_below_a_field():
    msg = error_of("parallel.pp.x=1")
    assert "'parallel.pp' is not a section" in msg


@pytest.mark.parametrize("item", ["x", "=3", "parallel.pp"])
def test_set_needs_key_equals_value(item):
    msg = error_of(item)
    assert "expected KEY=VALUE" in msg and "parallel.pp=2" in msg


def test_missing_file(tmp_path):
    msg = error_of(path=tmp_path / "nope.yaml")
    assert msg == f"recipe file not found: {tmp_path / 'nope.yaml'}"


def test_directory_instead_of_a_file(tmp_path):
    assert "cannot read" in error_of(path=tmp_path)


def test_invalid_yaml(tmp_path):
    bad = write(tmp_path / "bad.yaml", "model: {num_layers: [\n")
    assert f"recipe {bad}: invalid YAML" in error_of(path=bad)


def test_top_level_must_be_a_mapping(tmp_path):
    bad = write(tmp_path / "bad.yaml", "- 1\n- 2\n")
    assert "top level must be a mapping, got list" in error_of(path=bad)


def test_all_field_errors_are_reported_at_once():
    msg = error_of("model.num_layers=abc", "parallel.schedule=foo", "train.stepz=1")
    for field in ("model.num_layers", "parallel.schedule", "train.stepz"):
        assert field in msg


# --- Megatron mapping -------------------------------------------------------------------------


def test_transformer_config_kwargs_map_the_moe_fields():
    kw = transformer_config_kwargs(tiny(), CPU)
    assert kw["num_layers"] == 4 and kw["hidden_size"] == 64
    assert kw["num_moe_experts"] == 8
    assert kw["moe_layer_freq"] == [0, 1, 1, 1]  # the dense first layer
    assert kw["moe_router_topk"] == 2
    assert (kw["moe_router_num_groups"], kw["moe_router_group_topk"]) == (4, 2)
    assert kw["moe_router_score_function"] == "sigmoid"
    assert kw["moe_router_topk_scaling_factor"] == 2.5
    assert kw["moe_router_enable_expert_bias"] is True
    assert kw["moe_router_bias_update_rate"] == 0.001
    assert kw["moe_router_load_balancing_type"] == "seq_aux_loss"
    assert kw["moe_aux_loss_coeff"] == 0.0001
    assert kw["moe_ffn_hidden_size"] == 32 and kw["moe_shared_expert_intermediate_size"] == 32
    assert (kw["pipeline_model_parallel_size"], kw["expert_model_parallel_size"]) == (2, 2)
    assert kw["params_dtype"] == torch.float32 and kw["use_cpu_initialization"] is True


def test_transformer_config_kwargs_variants():
    kw = transformer_config_kwargs(
        tiny("moe.seq_aux_loss_coeff=0", "moe.expert_bias=false", "model.num_dense_layers=2",
             "moe.num_groups=null", "moe.group_topk=null", "moe.shared_expert_ffn_hidden_size=0",
             "moe.score_function=softmax"), CPU)
    assert kw["moe_router_load_balancing_type"] == "none"
    assert kw["moe_router_enable_expert_bias"] is False
    assert kw["moe_layer_freq"] == [0, 0, 1, 1]
    assert kw["moe_router_num_groups"] is None and kw["moe_router_group_topk"] is None
    assert kw["moe_shared_expert_intermediate_size"] is None
    assert kw["moe_router_score_function"] == "softmax"
    # EPLB's redundant experts are physical experts for Megatron.
    kw = transformer_config_kwargs(
        tiny("eplb.enabled=true", "eplb.num_redundant_experts=2"), CPU)
    assert kw["num_moe_experts"] == 10
    # All-dense: no MoE at all.
    kw = transformer_config_kwargs(tiny("model.num_dense_layers=4"), CPU)
    assert kw["num_moe_experts"] is None and kw["moe_layer_freq"] == [0, 0, 0, 0]


def test_megatron_accepts_the_mapped_config():
    config = transformer_config(tiny(), CPU)
    assert config.num_moe_experts == 8
    assert config.moe_router_load_balancing_type == "seq_aux_loss"
    assert config.moe_layer_freq == [0, 1, 1, 1]


def test_load_raw_resolves_includes_without_validation(tmp_path):
    write(tmp_path / "base.yaml", "train: {steps: 10}\n")
    top = write(tmp_path / "top.yaml", "include: base.yaml\nmodel: {hiden_size: 1}\n")
    assert load_raw(top) == {"train": {"steps": 10}, "model": {"hiden_size": 1}}


def test_expert_capacity_maps_onto_megatron():
    kw = transformer_config_kwargs(tiny("moe.capacity_factor=1.25", "moe.pad_to_capacity=true"),
                                   CPU)
    assert kw["moe_expert_capacity_factor"] == 1.25 and kw["moe_pad_expert_input_to_capacity"]
    default = transformer_config_kwargs(tiny(), CPU)
    assert default["moe_expert_capacity_factor"] is None  # DeepSeek-V3 drops no tokens
    assert not default["moe_pad_expert_input_to_capacity"]


@pytest.mark.parametrize("overrides,match", [
    (["moe.pad_to_capacity=true"], "moe.pad_to_capacity=true needs moe.capacity_factor"),
    (["moe.capacity_factor=1.0", "moe.token_dispatcher=allgather"],
     "moe.capacity_factor needs moe.token_dispatcher=alltoall"),
    (["moe.capacity_factor=0"], "capacity_factor"),
])
def test_expert_capacity_rules(overrides, match):
    assert match in error_of(*overrides)
