"""`model.cuda_graphs` (Megatron-Core's per-layer CUDA graphs): the recipe rules name the field
and what is allowed before any worker starts, and agree with Megatron-Core's own checks
(`TransformerConfig.__post_init__`, run here on CPU as the independent reference); the mapping
to Megatron's fields; the machine rule. The graphs themselves run in tests/test_cuda_graphs_gpu.py
(one H200: both passed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_dualpipe.config import load_recipe
from megatron_dualpipe.config.to_megatron import cuda_graph_kwargs
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.te import te_available

RANK = Path(__file__).resolve().parent.parent / "recipes" / "deepseek_v3_rank_1gpu.yaml"
PADCAP = ["moe.capacity_factor=1.0", "moe.pad_to_capacity=true"]
NO_ROPE_FUSION = "model.rope_fusion=false"  # graphs over MLA attention (see the MLA test)


def _rank(*overrides):
    return load_recipe(RANK, list(overrides))


def _megatron_accepts(recipe) -> bool:
    """Megatron-Core's own verdict on the graph settings of `recipe` (a small config with the
    recipe's MoE and graph fields)."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    m, moe = recipe.model, recipe.moe
    try:
        TransformerConfig(
            num_layers=2, hidden_size=64, num_attention_heads=4, num_moe_experts=moe.num_experts,
            moe_router_topk=min(moe.topk, moe.num_experts),
            moe_layer_freq=[0] * m.num_dense_layers + [1] * (2 - m.num_dense_layers),
            moe_expert_capacity_factor=moe.capacity_factor,
            moe_pad_expert_input_to_capacity=moe.pad_to_capacity,
            moe_token_dispatcher_type="alltoall", **cuda_graph_kwargs(recipe, on_gpu=True))
    except (AssertionError, ValueError):
        return False
    return True


@pytest.mark.parametrize("overrides", [
    [*PADCAP],                                          # whole layers, fixed expert inputs
    ["model.cuda_graph_modules=[attn]"],                # attention only: MoE stays eager
    ["model.cuda_graph_modules=[attn,moe_router]"],
    [*PADCAP, "model.cuda_graph_modules=[attn,moe]"],
], ids=["whole-layer", "attn", "attn+router", "attn+moe"])
def test_allowed_settings_pass_ours_and_megatrons_checks(overrides):
    recipe = _rank("model.cuda_graphs=local", NO_ROPE_FUSION, *overrides)
    assert cuda_graph_kwargs(recipe, on_gpu=True) == {
        "cuda_graph_impl": "local", "cuda_graph_modules": list(recipe.model.cuda_graph_modules),
        "use_te_rng_tracker": te_available()}  # TE's attention needs TE's tracker in graphs
    assert _megatron_accepts(recipe)


def test_whole_dropless_moe_layers_are_refused_where_megatrons_config_is_silent():
    """Megatron's config check passes whole-layer graphs over dropless MoE layers; their
    capture would then fail on the layer's device-to-host token-count sync, in every worker."""
    with pytest.raises(UserError, match="moe.capacity_factor and moe.pad_to_capacity=true"):
        _rank("model.cuda_graphs=local")
    unchecked = _rank()
    unchecked.model.cuda_graphs = "local"
    assert _megatron_accepts(unchecked)


@pytest.mark.parametrize(("overrides", "needle"), [
    (["model.cuda_graph_modules=[moe]"], "moe.capacity_factor and moe.pad_to_capacity=true"),
    ([*PADCAP, "model.cuda_graph_modules=[moe,moe_router]"], "both moe and moe_router"),
    ([*PADCAP, "model.cuda_graph_modules=[mlp]"], "model.num_dense_layers=0"),
], ids=["dropless-moe", "moe+router", "mlp-without-dense"])
def test_what_megatron_refuses_is_refused_first_with_the_field(overrides, needle):
    with pytest.raises(UserError, match="model.cuda_graph") as err:
        _rank("model.cuda_graphs=local", *overrides)
    assert needle in str(err.value) and "\n" not in str(err.value)
    # Megatron-Core refuses the same settings, but inside every worker
    unchecked = _rank(*(o for o in overrides if o.startswith("moe.")))
    unchecked.model.cuda_graphs = "local"
    unchecked.model.cuda_graph_modules = [
        v for o in overrides if o.startswith("model.cuda_graph_modules")
        for v in o.split("=[")[1].rstrip("]").split(",")]
    assert not _megatron_accepts(unchecked)


@pytest.mark.parametrize(("overrides", "needle"), [
    (["parallel.schedule=dualpipev", "parallel.pp=1", *PADCAP],
     "parallel.schedule: 1f1b, interleaved); got parallel.schedule=dualpipev"),
    (["train.device=cpu", "fp8.recipe=none", *PADCAP], "allowed on CPU: model.cuda_graphs=none"),
], ids=["our-schedule", "cpu"])
def test_what_only_we_know_is_refused(overrides, needle):
    with pytest.raises(UserError, match="model.cuda_graphs=local needs") as err:
        _rank("model.cuda_graphs=local", *overrides)
    assert needle in str(err.value)


@pytest.mark.parametrize("modules", [[], ["attn"], ["attn", "moe_router"]],
                         ids=["whole-layer", "attn", "attn+router"])
def test_mla_attention_with_rope_fusion_in_graphs_gets_the_rope_cache_copy(modules):
    """Capturing MLA layers with Megatron's fused rope failed on the H200 (a rope tensor
    modified in place, patches/rope_cache_copy.py); such recipes load and `train.setup` turns
    on the copy. Without graphs over attention, or without the fused rope, it stays off."""
    from megatron_dualpipe.patches import needs_rope_cache_copy

    graphed = [f"model.cuda_graph_modules=[{','.join(modules)}]"] if modules else []
    assert needs_rope_cache_copy(_rank("model.cuda_graphs=local", *PADCAP, *graphed))
    assert not needs_rope_cache_copy(_rank("model.cuda_graphs=local", *PADCAP, NO_ROPE_FUSION,
                                           *graphed))
    assert not needs_rope_cache_copy(_rank("model.cuda_graphs=local",
                                           "model.cuda_graph_modules=[moe_router]"))
    assert not needs_rope_cache_copy(_rank())


def test_modules_without_graphs_and_a_typo_are_refused():
    with pytest.raises(UserError, match="model.cuda_graphs=none"):
        _rank("model.cuda_graph_modules=[attn]")
    with pytest.raises(UserError, match="cuda_graphs"):
        _rank("model.cuda_graphs=lokal")
    assert cuda_graph_kwargs(_rank(), on_gpu=True) == {}
    assert cuda_graph_kwargs(_rank("model.cuda_graphs=local", NO_ROPE_FUSION, *PADCAP),
                             on_gpu=False) == {}


def test_machine_rule_without_a_gpu(monkeypatch):
    from megatron_dualpipe.config import preflight

    recipe = _rank("model.cuda_graphs=local", "train.device=auto", NO_ROPE_FUSION, *PADCAP)
    monkeypatch.setattr(preflight, "_gpu_memory_gb", lambda: [])
    with pytest.raises(UserError, match="this machine has none"):
        preflight.check_cuda_graph_device(recipe)
    monkeypatch.setattr(preflight, "_gpu_memory_gb", lambda: [141.0])
    preflight.check_cuda_graph_device(recipe)
    preflight.check_cuda_graph_device(_rank())  # no graphs: nothing to check
