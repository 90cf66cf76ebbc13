"""FP8 recipe rules, environment checks (injected probes), Megatron mapping and the static
module report, all on CPU (the GPU side is tests/test_fp8_gpu.py)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from megatron_dualpipe.config import load_recipe, parse_recipe
from megatron_dualpipe.config.load import load_raw
from megatron_dualpipe.config.to_megatron import transformer_config_kwargs
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.fp8 import (
    check_fp8_environment,
    check_fp8_recipe,
    fp8_environment_problems,
    fp8_environment_variables,
    fp8_module_report,
)
from megatron_dualpipe.fp8.env_check import version_at_least
from megatron_dualpipe.plan import load_plan_recipe

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
PROXY = RECIPES / "fp8_proxy_1gpu.yaml"
HOPPER = {"te_version": "2.20.2", "capability": (9, 0), "cuda_version": "13.0"}
CUDA = torch.device("cuda")


def proxy(*overrides):
    return load_recipe(PROXY, list(overrides))


def raw_proxy(**sections):
    raw = load_raw(PROXY)
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return raw


# --- config.validate.check_fp8 (recipe loading) -----------------------------------------------


def test_fp8_on_cpu_is_rejected_at_load():
    with pytest.raises(ValueError, match=r"fp8.recipe=blockwise needs a GPU.*fp8.recipe=none"):
        proxy("train.device=cpu")


@pytest.mark.parametrize("field, value", [
    ("model.hidden_size", 1000), ("model.ffn_hidden_size", 3000), ("moe.ffn_hidden_size", 520),
])
def test_blockwise_needs_128_multiples(field, value):
    overrides = [f"{field}={value}"]
    if field == "model.hidden_size":
        overrides.append("model.num_attention_heads=8")
    with pytest.raises(ValueError, match=rf"{field}={value} must be a multiple of 128"):
        proxy(*overrides)


def test_current_scaling_allows_non_128_dims():
    recipe = proxy("fp8.recipe=current", "moe.ffn_hidden_size=528")
    check_fp8_recipe(recipe)


def test_bf16_layers_cannot_exceed_the_model():
    with pytest.raises(ValueError, match="exceeds model.num_layers"):
        proxy("fp8.bf16_layers_at_start=3", "fp8.bf16_layers_at_end=2")


def test_shipped_fp8_recipes_pass_the_fp8_rules():
    for name in ("fp8_proxy_1gpu", "deepseek_v3_proxy_1gpu", "deepseek_v3_proxy_2gpu",
                 "deepseek_v3_671b_ep64_tp1_pp16_h800"):
        recipe = load_plan_recipe(RECIPES / f"{name}.yaml")
        assert recipe.fp8.recipe == "blockwise"
        check_fp8_recipe(recipe)


# --- fp8.check_fp8_recipe (rules beyond check_fp8) --------------------------------------------


def test_delayed_scaling_rejects_bf16_layers_and_fp8_recompute():
    with pytest.raises(ValueError, match="bf16_layers_at_start/end need a per-layer recipe"):
        check_fp8_recipe(proxy("fp8.recipe=delayed", "fp8.bf16_layers_at_start=1"))
    with pytest.raises(ValueError, match="layernorm or moe_act cannot be combined"):
        check_fp8_recipe(proxy("fp8.recipe=delayed", "model.recompute_modules=[moe_act]"))
    check_fp8_recipe(proxy("fp8.recipe=blockwise", "fp8.bf16_layers_at_start=1",
                           "model.recompute_modules=[moe_act, layernorm]"))


def test_bf16_layers_per_pipeline_stage():
    raw = raw_proxy(parallel={"pp": 2, "nproc_per_node": 2}, fp8={"bf16_layers_at_end": 3})
    # Recipe validation runs check_fp8_recipe, so parsing already rejects it.
    with pytest.raises(ValueError, match=r"bf16_layers_at_end=3 exceeds .* = 2"):
        parse_recipe(raw)


def test_mla_gemm_dims_must_be_multiples_of_16():
    raw = raw_proxy(model={"attention": "mla",
                           "mla": {"q_lora_rank": 512, "kv_lora_rank": 256,
                                   "qk_head_dim": 128, "qk_pos_emb_head_dim": 60,
                                   "v_head_dim": 128}})
    with pytest.raises(ValueError, match=r"kv_lora_rank \+ qk_pos_emb_head_dim = 316"):
        check_fp8_recipe(parse_recipe(raw))
    raw["model"]["mla"]["qk_pos_emb_head_dim"] = 64  # V3: 512 + 64 = 576 = 36 x 16
    check_fp8_recipe(parse_recipe(raw))


def test_tokens_per_micro_batch_multiple_of_16():
    with pytest.raises(ValueError, match="tokens per micro-batch"):
        check_fp8_recipe(proxy("model.seq_length=2047", "train.micro_batch_size=1",
                               "train.global_batch_size=8"))


def test_no_fp8_no_rules():
    check_fp8_recipe(proxy("fp8.recipe=none", "model.seq_length=2047"))


# --- fp8.check_fp8_environment with injected probes -------------------------------------------


@pytest.mark.parametrize("fp8", ["blockwise", "current", "delayed"])
def test_hopper_with_te_runs_every_hopper_recipe(fp8):
    check_fp8_environment(proxy(f"fp8.recipe={fp8}"), CUDA, **HOPPER)


def test_no_fp8_needs_nothing():
    recipe = proxy("fp8.recipe=none")
    check_fp8_environment(recipe, "cpu", te_version=None, capability=None, cuda_version=None)


def test_missing_te():
    probes = {**HOPPER, "te_version": None}
    with pytest.raises(ValueError) as err:
        check_fp8_environment(proxy(), CUDA, **probes)
    assert str(err.value) == ("fp8.recipe=blockwise needs Transformer Engine >= 2.3 "
                              "(pip install 'megatron_dualpipe[gpu]'); it is not installed")


@pytest.mark.parametrize("fp8, te, ok", [
    ("blockwise", "2.2.0", False), ("blockwise", "2.3.0.dev0+5fdd7bb", True),
    ("current", "2.1.0", False), ("current", "2.2.0", True),
    ("delayed", "1.10.0", False), ("delayed", "1.11.0", True),
])
def test_te_version_per_recipe(fp8, te, ok):
    recipe = proxy(f"fp8.recipe={fp8}")
    problems = fp8_environment_problems(recipe, CUDA, **{**HOPPER, "te_version": te})
    assert (problems == []) == ok
    if not ok:
        assert problems[0].startswith(f"fp8.recipe={fp8} needs Transformer Engine >= ")
        assert f"found {te}" in problems[0]


def test_fp8_recompute_needs_te_2_6():
    recipe = proxy("model.recompute_modules=[layernorm]")
    with pytest.raises(ValueError, match=r">= 2.6 \(FP8 with layernorm/moe_act recompute\)"):
        check_fp8_environment(recipe, CUDA, **{**HOPPER, "te_version": "2.5.0"})


def test_gpu_without_fp8():
    with pytest.raises(ValueError, match=r"compute capability >= 8.9.*this GPU is .* 8.0"):
        check_fp8_environment(proxy("fp8.recipe=current"), CUDA,
                              **{**HOPPER, "capability": (8, 0)})


def test_blockwise_needs_hopper():
    with pytest.raises(ValueError, match=r"blockwise needs a Hopper GPU.*compute capability 8.9"):
        check_fp8_environment(proxy(), CUDA, **{**HOPPER, "capability": (8, 9)})
    check_fp8_environment(proxy("fp8.recipe=current"), CUDA, **{**HOPPER, "capability": (8, 9)})


def test_mxfp8_needs_blackwell():
    recipe = proxy("fp8.recipe=mxfp8")
    with pytest.raises(ValueError, match="mxfp8 needs a Blackwell"):
        check_fp8_environment(recipe, CUDA, **HOPPER)
    check_fp8_environment(recipe, CUDA, **{**HOPPER, "capability": (10, 0)})


def test_blockwise_needs_cuda_12_9():
    with pytest.raises(ValueError, match=r"blockwise needs CUDA >= 12.9 .*CUDA 12.8"):
        check_fp8_environment(proxy(), CUDA, **{**HOPPER, "cuda_version": "12.8"})
    check_fp8_environment(proxy(), CUDA, **{**HOPPER, "cuda_version": "12.9"})


def test_ada_needs_cuda_12_1():
    with pytest.raises(ValueError, match=r"on Ada needs CUDA >= 12.1"):
        check_fp8_environment(proxy("fp8.recipe=current"), CUDA,
                              **{**HOPPER, "capability": (8, 9), "cuda_version": "12.0"})


def test_cpu_lists_every_problem_in_one_error():
    with pytest.raises(ValueError) as err:
        check_fp8_environment(proxy(), "cpu", te_version=None, capability=None,
                              cuda_version=None)
    text = str(err.value)
    assert text.startswith("fp8.recipe=blockwise cannot run here:")
    assert "needs a CUDA GPU (compute capability >= 9.0), but the device is cpu" in text
    assert "needs Transformer Engine >= 2.3" in text


def test_no_visible_gpu():
    with pytest.raises(ValueError, match=r"no CUDA GPU is visible"):
        check_fp8_environment(proxy(), CUDA, **{**HOPPER, "capability": None})


def test_real_environment_of_this_machine():
    """Defaults read the machine: this CPU box has neither a GPU nor Transformer Engine."""
    if torch.cuda.is_available():
        pytest.skip("a GPU machine: see tests/test_fp8_gpu.py")
    problems = fp8_environment_problems(proxy())
    assert any("needs a CUDA GPU" in p for p in problems)


def test_versions_compare_numerically():
    assert version_at_least("2.20.2", "2.3") and not version_at_least("2.2.9", "2.3")
    assert version_at_least("13.0", "12.9") and version_at_least("2.6.0rc1", "2.6")


def test_fused_grouped_gemm_environment():
    assert fp8_environment_variables(proxy()) == {}
    assert fp8_environment_variables(proxy("fp8.grouped_gemm_fused=true")) == {
        "NVTE_GROUPED_LINEAR_USE_FUSED_GROUPED_GEMM": "1"}


# --- config.to_megatron: fp8 fields ------------------------------------------------------------


def test_blockwise_maps_onto_megatron():
    kw = transformer_config_kwargs(proxy(), CUDA)
    assert (kw["fp8"], kw["fp8_recipe"], kw["fp8_param"]) == ("e4m3", "blockwise", False)
    assert kw["moe_router_padding_for_quantization"] is True
    assert kw["first_last_layers_bf16"] is False
    assert kw["activation_func_fp8_input_store"] is False


@pytest.mark.parametrize("ours, megatron", [
    ("delayed", "delayed"), ("current", "tensorwise"), ("blockwise", "blockwise"),
    ("mxfp8", "mxfp8"),
])
def test_recipe_names_map_onto_megatron(ours, megatron):
    from megatron.core.enums import Fp8Recipe

    kw = transformer_config_kwargs(proxy(f"fp8.recipe={ours}"), CUDA)
    assert kw["fp8_recipe"] == megatron and Fp8Recipe(kw["fp8_recipe"])


def test_bf16_layers_and_format_map_onto_megatron():
    kw = transformer_config_kwargs(
        proxy("fp8.format=hybrid", "fp8.bf16_layers_at_start=1", "fp8.bf16_layers_at_end=1",
              "fp8.param_gather=true"), CUDA)
    assert kw["fp8"] == "hybrid" and kw["fp8_param"] is True
    assert kw["first_last_layers_bf16"] is True
    assert (kw["num_layers_at_start_in_bf16"], kw["num_layers_at_end_in_bf16"]) == (1, 1)


def test_router_padding_only_where_megatron_supports_it():
    deepep = proxy("moe.token_dispatcher=deepep", "parallel.ep=2", "parallel.nproc_per_node=2")
    assert transformer_config_kwargs(deepep, CUDA)["moe_router_padding_for_quantization"]
    assert not transformer_config_kwargs(proxy("moe.token_dispatcher=allgather"), CUDA)[
        "moe_router_padding_for_quantization"]
    assert not transformer_config_kwargs(proxy("model.num_dense_layers=4"), CUDA)[
        "moe_router_padding_for_quantization"]


def test_no_fp8_fields_without_fp8():
    kw = transformer_config_kwargs(proxy("fp8.recipe=none"), CUDA)
    assert not any(k.startswith("fp8") for k in kw)
    assert "moe_router_padding_for_quantization" not in kw


def test_megatron_accepts_the_mapped_fields():
    """TransformerConfig itself validates our FP8 fields (dense model: no TE needed on CPU)."""
    from megatron.core.transformer import TransformerConfig

    recipe = proxy("fp8.recipe=current", "model.num_dense_layers=4", "fp8.bf16_layers_at_end=1",
                   "moe.num_groups=null", "moe.group_topk=null")
    config = TransformerConfig(**transformer_config_kwargs(recipe, torch.device("cpu")))
    assert config.fp8 == "e4m3" and config.fp8_recipe == "tensorwise"
    from megatron.core.fp8_utils import is_first_last_bf16_layer

    assert [is_first_last_bf16_layer(config, n) for n in range(4)] == [False] * 3 + [True]


# --- fp8.modules: static report on a fake module tree ------------------------------------------


def _cls(name, module, base=nn.Module):
    return type(name, (base,), {"__module__": module})


TE = "transformer_engine.pytorch.module"
TELinear = _cls("Linear", f"{TE}.linear")
TELayerNormLinear = _cls("LayerNormLinear", f"{TE}.layernorm_linear")
TEGroupedLinear = _cls("GroupedLinear", f"{TE}.grouped_linear")
TERMSNorm = _cls("RMSNorm", f"{TE}.rmsnorm")
MegatronTELinear = _cls("TERowParallelLinear", "megatron.core.extensions.transformer_engine",
                        TELinear)
ColumnParallelLinear = _cls("ColumnParallelLinear", "megatron.core.tensor_parallel.layers")
VocabParallelEmbedding = _cls("VocabParallelEmbedding", "megatron.core.tensor_parallel.layers")
TopKRouter = _cls("TopKRouter", "megatron.core.transformer.moe.router")
TransformerLayer = _cls("TransformerLayer", "megatron.core.transformer.transformer_layer")
MTPLayer = _cls("MultiTokenPredictionLayer", "megatron.core.transformer.multi_token_prediction")


def _leaf(cls):
    m = cls()
    m.weight = nn.Parameter(torch.zeros(2))
    return m


def _layer(number: int, moe: bool) -> nn.Module:
    layer = TransformerLayer()
    layer.layer_number = number
    layer.input_layernorm = _leaf(TERMSNorm)
    layer.self_attention = nn.Module()
    layer.self_attention.linear_qkv = _leaf(TELayerNormLinear)
    layer.self_attention.linear_proj = _leaf(MegatronTELinear)
    layer.pre_mlp_layernorm = _leaf(TERMSNorm)
    layer.mlp = nn.Module()
    if moe:
        layer.mlp.router = _leaf(TopKRouter)
        layer.mlp.experts = nn.Module()
        layer.mlp.experts.linear_fc1 = _leaf(TEGroupedLinear)
        layer.mlp.shared_experts = nn.Module()
        layer.mlp.shared_experts.linear_fc1 = _leaf(TELinear)
    else:
        layer.mlp.linear_fc1 = _leaf(TELayerNormLinear)
    return layer


def fake_gpt(num_layers=4, mtp=True) -> nn.Module:
    model = nn.Module()
    model.embedding = nn.Module()
    model.embedding.word_embeddings = _leaf(VocabParallelEmbedding)
    model.decoder = nn.Module()
    model.decoder.layers = nn.ModuleList(_layer(n + 1, moe=n > 0) for n in range(num_layers))
    model.decoder.final_layernorm = _leaf(TERMSNorm)
    if mtp:
        model.mtp = nn.Module()
        mtp_layer = MTPLayer()
        mtp_layer.eh_proj = _leaf(TELinear)
        mtp_layer.enorm = _leaf(TERMSNorm)
        mtp_layer.transformer_layer = _layer(num_layers + 1, moe=True)
        model.mtp.layers = nn.ModuleList([mtp_layer])
    model.output_layer = _leaf(ColumnParallelLinear)
    ddp = nn.Module()
    ddp.module = model
    return ddp


def fp8_config(fp8="e4m3", start=0, end=0, num_layers=4):
    return SimpleNamespace(fp8=fp8, fp8_recipe="blockwise",
                           first_last_layers_bf16=bool(start or end),
                           num_layers_at_start_in_bf16=start, num_layers_at_end_in_bf16=end,
                           num_layers=num_layers, moe_router_dtype="fp32")


def test_report_keeps_deepseek_high_precision_modules():
    report = fp8_module_report([fake_gpt()], fp8_config())
    mods = report["modules"]
    for name in ("embedding.word_embeddings", "output_layer", "decoder.final_layernorm",
                 "decoder.layers.1.mlp.router", "decoder.layers.0.input_layernorm",
                 "mtp.layers.0.enorm"):
        assert mods[name]["precision"] == "bf16", name
    assert mods["output_layer"]["kind"] == "output_layer"
    assert mods["decoder.layers.2.mlp.router"]["kind"] == "router"
    assert mods["decoder.layers.2.mlp.router"]["reason"].endswith("fp32")
    assert mods["embedding.word_embeddings"]["kind"] == "embedding"
    for n in range(4):
        for gemm in ("self_attention.linear_qkv", "self_attention.linear_proj"):
            assert mods[f"decoder.layers.{n}.{gemm}"]["precision"] == "fp8"
    assert mods["decoder.layers.3.mlp.experts.linear_fc1"]["kind"] == "grouped_linear"
    assert mods["decoder.layers.3.mlp.experts.linear_fc1"]["precision"] == "fp8"
    assert mods["mtp.layers.0.eh_proj"]["precision"] == "fp8"
    assert mods["mtp.layers.0.transformer_layer.mlp.experts.linear_fc1"]["precision"] == "fp8"
    assert report["summary"]["norm"] == {"fp8": 0, "bf16": 12}
    assert set(report["fp8_modules"]) == {n for n, m in mods.items()
                                          if m["kind"] in ("linear", "grouped_linear")}


def test_report_honours_bf16_layers():
    report = fp8_module_report([fake_gpt()], fp8_config(start=1, end=1))
    mods = report["modules"]
    assert mods["decoder.layers.0.mlp.linear_fc1"]["precision"] == "bf16"
    assert "bf16_layers_at_start/end" in mods["decoder.layers.0.mlp.linear_fc1"]["reason"]
    assert mods["decoder.layers.3.mlp.experts.linear_fc1"]["precision"] == "bf16"
    assert mods["decoder.layers.1.mlp.experts.linear_fc1"]["precision"] == "fp8"
    assert mods["decoder.layers.2.self_attention.linear_qkv"]["layer"] == 2
    # MTP uses Megatron's global FP8 context: no bf16 exemption
    assert mods["mtp.layers.0.eh_proj"]["precision"] == "fp8"


def test_report_without_fp8_is_all_bf16():
    report = fp8_module_report([fake_gpt()], fp8_config(fp8=None))
    assert report["fp8"] is False and report["fp8_modules"] == []


def test_report_prefixes_chunks():
    report = fp8_module_report([fake_gpt(2, mtp=False), fake_gpt(2, mtp=False)], fp8_config())
    assert "chunk1.decoder.layers.1.mlp.router" in report["modules"]


def _local_model_report(recipe_dict):
    """In a gloo world of one: a real Megatron-Core model (local spec, CPU) and its report."""
    from megatron_dualpipe.config import parse_recipe
    from megatron_dualpipe.distributed import destroy_distributed
    from megatron_dualpipe.train import setup

    recipe = parse_recipe(recipe_dict)
    state = setup(recipe)
    try:
        config = SimpleNamespace(**{**vars(state.config), "fp8": "e4m3",
                                    "fp8_recipe": "blockwise"})
        return fp8_module_report(state.model, config)
    finally:
        destroy_distributed()


def test_report_on_a_real_megatron_model_without_te():
    """Real Megatron classes are recognised; with no TE GEMMs nothing can run FP8."""
    from megatron_dualpipe.testing import run_distributed

    raw = load_raw(RECIPES / "tiny_moe_cpu.yaml")
    raw["parallel"].update(pp=1, ep=1, nproc_per_node=1)
    raw["train"].update(micro_batch_size=2, global_batch_size=2)
    (report,) = run_distributed(_local_model_report, world_size=1, args=(raw,))
    kinds = report["summary"]
    assert report["fp8_modules"] == []
    assert kinds["embedding"]["bf16"] == 1 and kinds["output_layer"]["bf16"] == 1
    assert kinds["router"]["bf16"] == 3  # 3 MoE layers
    assert kinds["norm"]["bf16"] >= 4 and kinds["linear_local"]["bf16"] > 0
    layers = {m["layer"] for m in report["modules"].values() if m["layer"] is not None}
    assert layers == {0, 1, 2, 3}


# --- fp8.bf16_modules (per-module BF16 override) -----------------------------------------------


class _FakeTELinear(nn.Linear):
    """Carries Megatron's TE-wrapper quantization hook: `finish_init` as Megatron defines it."""

    def __init__(self):
        super().__init__(4, 4)
        self.te_quant_params = None

    def finish_init(self, quantization_config):
        from megatron.core.extensions.transformer_engine import TEQuantizationParams

        self.te_quant_params = TEQuantizationParams.parse_from_config(quantization_config)


def _fake_layer():
    attn = nn.Module()
    attn.linear_q_down_proj, attn.linear_kv_down_proj = _FakeTELinear(), _FakeTELinear()
    attn.linear_proj = _FakeTELinear()
    layer = nn.Module()
    layer.self_attention = attn
    layer.norm = nn.LayerNorm(4)  # no quantization hook: never matched
    return layer


def test_bf16_modules_override_only_the_matching_te_gemms():
    from megatron_dualpipe.fp8.overrides import apply_bf16_modules, is_bf16_override

    chunk = nn.Module()
    chunk.decoder = nn.Module()
    chunk.decoder.layers = nn.ModuleList([_fake_layer(), _fake_layer()])
    names = apply_bf16_modules(chunk, ["*_down_proj", "*.norm"])
    assert names == [f"decoder.layers.{i}.self_attention.linear_{p}_down_proj"
                     for i in (0, 1) for p in ("q", "kv")]
    for name, module in chunk.named_modules():
        if hasattr(module, "te_quant_params"):
            assert is_bf16_override(module) == (name in names)
    recipe = chunk.decoder.layers[1].self_attention.linear_kv_down_proj.te_quant_params
    assert recipe.evaluation_recipe is None and recipe.training_recipe.override_quantized_autocast
    assert apply_bf16_modules(chunk, []) == []


def test_bf16_modules_appear_in_the_static_report():
    from megatron_dualpipe.fp8.overrides import apply_bf16_modules

    chunk = nn.Module()
    chunk.decoder = nn.Module()
    chunk.decoder.layers = nn.ModuleList([_fake_layer()])
    apply_bf16_modules(chunk, ["*linear_q_down_proj"])
    q = chunk.decoder.layers[0].self_attention.linear_q_down_proj
    from megatron_dualpipe.fp8.modules import _decide

    config = SimpleNamespace(fp8="e4m3", fp8_recipe="blockwise")
    layer_ctx = ("layer", SimpleNamespace(layer_number=1))
    precision, _, reason = _decide("linear", q, layer_ctx, config)
    assert precision == "bf16" and "bf16_modules" in reason


def test_bf16_modules_cannot_combine_with_fp8_params():
    with pytest.raises(ValueError, match="fp8.bf16_modules.*fp8.param_gather"):
        parse_recipe(raw_proxy(fp8={"bf16_modules": ["*down_proj"], "param_gather": True}))


# --- fp8.expert_gemm (DeepGEMM behind the routed experts) ---------------------------------------

def test_deepgemm_experts_are_refused_where_they_cannot_run():
    from megatron_dualpipe.config.expert_gemm import check_expert_gemm

    rank = RECIPES / "deepseek_v3_rank_1gpu.yaml"
    ok = load_recipe(rank, ["fp8.expert_gemm=deepgemm"])
    check_expert_gemm(ok)  # V3's rank shapes, blockwise, TE, grouped experts, TP 1
    for sets, needle in ((["fp8.recipe=current"], "fp8.recipe=blockwise (got current)"),
                         (["model.spec=local"], "model.spec=te (got local)"),
                         (["moe.grouped_gemm=false"], "moe.grouped_gemm=true"),
                         (["fp8.param_gather=true"], "fp8.param_gather=false")):
        with pytest.raises(UserError) as err:
            load_recipe(rank, ["fp8.expert_gemm=deepgemm", *sets])
        message = str(err.value)
        assert "fp8.expert_gemm=deepgemm needs" in message and needle in message, message
        assert "fp8.expert_gemm=te" in message and "\n" not in message


def test_deepgemm_experts_need_deep_gemm_at_train_time():
    from megatron_dualpipe.config.expert_gemm import check_expert_gemm_installed

    recipe = load_recipe(RECIPES / "deepseek_v3_rank_1gpu.yaml",
                         ["fp8.expert_gemm=deepgemm"])
    try:
        import deep_gemm  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="needs DeepGEMM .* set fp8.expert_gemm=te"):
            check_expert_gemm_installed(recipe)
    else:
        check_expert_gemm_installed(recipe)
    check_expert_gemm_installed(load_recipe(RECIPES / "deepseek_v3_rank_1gpu.yaml"))


def test_triton_quantizer_needs_triton_at_train_time(monkeypatch):
    import importlib.util
    import sys
    from types import SimpleNamespace

    from megatron_dualpipe.config.expert_gemm import check_expert_gemm_installed

    monkeypatch.setitem(sys.modules, "deep_gemm", SimpleNamespace())  # DeepGEMM "installed"
    recipe = load_recipe(RECIPES / "deepseek_v3_rank_1gpu.yaml",
                         ["fp8.expert_gemm=deepgemm", "fp8.deepgemm_quantizer=triton"])
    check_expert_gemm_installed(recipe)  # triton is installed here (scripts/install.sh)
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "triton" else real(name, *a))
    with pytest.raises(UserError, match="deepgemm_quantizer=triton needs the triton package"):
        check_expert_gemm_installed(recipe)
    with pytest.raises(UserError, match="deepgemm_quantizer.*triton"):
        load_recipe(RECIPES / "deepseek_v3_rank_1gpu.yaml", ["fp8.deepgemm_quantizer=tritn"])
