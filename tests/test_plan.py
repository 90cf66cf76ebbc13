"""`plan`: parameter counts, layout, memory model, bubble, CLI and error messages."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from megatron_dualpipe import cli, plan
from megatron_dualpipe.config.load import parse_recipe
from megatron_dualpipe.planning import check_plan_rules, make_plan, memory, simulate_recipe
from megatron_dualpipe.planning.layout import ep_group_nodes, pipeline_ranks, rank_coords
from megatron_dualpipe.planning.params import count_params

ROOT = Path(__file__).resolve().parent.parent
V3 = ROOT / "recipes" / "deepseek_v3_671b_ep64_tp1_pp16_h800.yaml"


@pytest.fixture(scope="module")
def v3_recipe():
    return plan.load_plan_recipe(V3)


@pytest.fixture(scope="module")
def v3_plan(v3_recipe):
    return make_plan(v3_recipe)


def within(value, target, rel=0.01):
    return abs(value / target - 1) <= rel


def deepseek_v3_count() -> dict[str, int]:
    """DeepSeek-V3's parameters from its published shapes (report §4.2 / HF config.json), per
    HF weight name, written out independently of `planning/params.py`."""
    h, vocab, heads = 7168, 129280, 128
    mla = (h  # input_layernorm
           + h * 1536 + 1536  # q_a_proj, q_a_layernorm
           + 1536 * heads * (128 + 64)  # q_b_proj: nope + rope parts of every head
           + h * (512 + 64) + 512  # kv_a_proj_with_mqa (latent + shared rope key), kv_a_layernorm
           + 512 * heads * (128 + 128)  # kv_b_proj: k_nope and v of every head
           + heads * 128 * h)  # o_proj
    assert mla == 187_114_496
    swiglu = 3 * h * 2048  # gate, up, down of one expert
    dense_ffn = 3 * h * 18432
    router = 256 * h + 256  # gate.weight + e_score_correction_bias
    dense_layer = mla + h + dense_ffn  # + post_attention_layernorm
    moe_layer = mla + h + router + swiglu + 256 * swiglu  # shared + routed
    moe_active = mla + h + router + swiglu + 8 * swiglu
    embed = head = vocab * h
    final_norm = h
    mtp_own = 2 * h + 2 * h * h + h  # enorm, hnorm, eh_proj, shared_head.norm
    return {
        "total": embed + 3 * dense_layer + 58 * moe_layer + final_norm + head,
        "activated_main": 3 * dense_layer + 58 * moe_active + final_norm + head,
        "mtp": mtp_own + moe_layer,
        "mtp_activated": mtp_own + moe_active,
        "embedding": embed,
    }


def test_v3_totals_match_deepseeks_published_numbers(v3_plan):
    # Report §4.2: "671B total parameters, of which 37B are activated for each token";
    # README_WEIGHTS.md: main model 671B, 36.7B activated; MTP 11.5B unique parameters.
    ref = deepseek_v3_count()
    p = v3_plan["params"]
    assert v3_plan["total_params"] == p["total"] == ref["total"]
    assert p["activated_main"] == ref["activated_main"]
    assert (p["mtp"], p["mtp_activated"]) == (ref["mtp"], ref["mtp_activated"])
    # Our convention: per training token = main model + MTP, output head counted once,
    # embedding table not (a lookup).
    assert v3_plan["activated_params"] == p["activated"] == (
        ref["activated_main"] + ref["mtp_activated"])
    assert p["activated_main_with_embedding"] == ref["activated_main"] + ref["embedding"]
    assert within(v3_plan["total_params"], 671e9)
    assert within(v3_plan["activated_params"], 37e9)
    assert within(p["activated_main"], 36.7e9)  # README_WEIGHTS.md's main-model number
    # The alternatives miss 37B by more: main model only (-1.0%), with the table (+1.5%).
    miss = [abs(x / 37e9 - 1) for x in (p["activated"], p["activated_main"],
                                         p["activated_main_with_embedding"])]
    assert miss[0] == min(miss)
    assert within(p["total_with_mtp"] + p["embedding"] + p["output_head"], 685e9)
    assert within(p["mtp"], 11.5e9, rel=0.02)  # README_WEIGHTS: 11.5B unique MTP parameters


def _v2_recipe(lite: bool):
    """DeepSeek-V2 (236B, 21B activated) and V2-Lite (15.7B, 2.4B), from their reports."""
    model = {"num_layers": 27 if lite else 60, "num_dense_layers": 1,
             "hidden_size": 2048 if lite else 5120, "ffn_hidden_size": 10944 if lite else 12288,
             "num_attention_heads": 16 if lite else 128, "attention": "mla", "vocab_size": 102400,
             "mla": {"q_lora_rank": None if lite else 1536, "kv_lora_rank": 512,
                     "qk_head_dim": 128, "qk_pos_emb_head_dim": 64, "v_head_dim": 128}}
    moe = {"num_experts": 64 if lite else 160, "topk": 6, "expert_bias": False,
           "ffn_hidden_size": 1408 if lite else 1536,
           "shared_expert_ffn_hidden_size": 2 * (1408 if lite else 1536)}
    return parse_recipe({"model": model, "moe": moe,
                         "train": {"micro_batch_size": 1, "global_batch_size": 1}})


@pytest.mark.parametrize("lite, total, activated", [(False, 236e9, 21e9), (True, 15.7e9, 2.4e9)])
def test_activated_convention_matches_deepseek_v2(lite, total, activated):
    # The same count (one vocabulary matrix, no MTP in V2) lands on DeepSeek-V2's numbers;
    # with the embedding table it would give 21.38B and 2.66B.
    counts = count_params(_v2_recipe(lite))
    assert within(counts.total, total)
    assert within(counts.activated, activated, rel=0.025)
    assert abs(counts.activated / activated - 1) < abs(
        counts.activated_main_with_embedding / activated - 1)


def test_v3_world_layout_and_memory(v3_plan):
    assert (v3_plan["world_size"], v3_plan["num_nodes"]) == (2048, 256)
    assert v3_plan["parallel"]["dp"] == 128 and v3_plan["parallel"]["expert_dp"] == 2
    mem = v3_plan["per_rank_memory_gb"]
    assert len(mem) == 16 and max(mem) < 80
    assert mem == mem[::-1]  # DualPipe: rank r and its mirror 15-r hold the same two stages
    stages = [[c["stage"] for c in r["chunks"]] for r in v3_plan["pipeline_ranks"]]
    assert stages[0] == [0, 15] and stages[15] == [15, 0] and stages[7] == [7, 8]
    assert v3_plan["experts"]["per_ep_rank"] == 4 and v3_plan["experts"]["ep_group_nodes"] == 8
    assert v3_plan["bubble"] == pytest.approx(v3_plan["closed_form_bubble"])


def test_rank_coordinates_follow_megatron_order(v3_recipe):
    first, last = rank_coords(v3_recipe, 0), rank_coords(v3_recipe, 2047)
    assert (first["pp"], first["ep"], first["node"]) == (0, 0, 0)
    assert (last["pp"], last["ep"], last["edp"], last["node"]) == (15, 63, 1, 255)
    group = {rank_coords(v3_recipe, r)["node"] for r in range(64)}  # one EP group
    assert group == set(range(8)) == set(range(ep_group_nodes(v3_recipe)))
    ranks = pipeline_ranks(v3_recipe)
    assert ranks[1].global_ranks == range(128, 256) and ranks[1].nodes == range(16, 32)


MEGATRON_COUNT = textwrap.dedent("""
    import json, os, sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    from megatron_dualpipe.config import parse_recipe
    from megatron_dualpipe.patches import apply_cpu_patches
    apply_cpu_patches()
    from megatron_dualpipe.distributed import destroy_distributed, init_distributed
    from megatron_dualpipe.model import build

    class NoCoreAttention(torch.nn.Module):  # MLA's core attention has no CPU kernel (and no
        def __init__(self, *args, **kwargs):  # parameters): leave it out of the count
            super().__init__()

    def layer_specs(*args, _orig=build.layer_specs, **kwargs):
        block, mtp = _orig(*args, **kwargs)
        layers = list(block.layer_specs) + (
            [s.submodules.mtp_model_layer for s in mtp.layer_specs] if mtp else [])
        for spec in layers:
            spec.submodules.self_attention.submodules.core_attention = NoCoreAttention
        return block, mtp

    build.layer_specs = layer_specs
    out = []
    for raw in json.loads(sys.argv[1]):
        recipe = parse_recipe(raw)
        init_distributed(recipe, torch.device("cpu"))
        config, chunks = build.build_model(recipe, torch.device("cpu"), wrap_ddp=False)
        params = sum(p.numel() for c in chunks for p in c.parameters())
        bias = sum(b.numel() for c in chunks for k, b in c.named_buffers()
                   if k.endswith("expert_bias"))
        out.append([params, bias, bool(config.qk_layernorm)])
        destroy_distributed()
    print(json.dumps(out))
""")


def tiny(attention):
    model = {"num_layers": 3, "num_dense_layers": 1, "hidden_size": 64, "ffn_hidden_size": 96,
             "num_attention_heads": 4, "vocab_size": 128, "seq_length": 16, "mtp_num_layers": 1}
    if attention == "mla":
        model["attention"] = "mla"
        model["mla"] = {"q_lora_rank": 48, "kv_lora_rank": 32, "qk_head_dim": 16,
                        "qk_pos_emb_head_dim": 8, "v_head_dim": 16}
    else:
        model["num_query_groups"] = 2
    return {"model": model,
            "train": {"device": "cpu", "micro_batch_size": 1, "global_batch_size": 1},
            "moe": {"num_experts": 8, "topk": 2, "ffn_hidden_size": 32,
                    "shared_expert_ffn_hidden_size": 32, "num_groups": 4, "group_topk": 2}}


def test_formulas_match_a_megatron_model_built_on_cpu():
    raws = [tiny("gqa"), tiny("mla")]
    env = dict(os.environ, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(29400 + os.getpid() % 500), PYTHONPATH=str(ROOT),
               OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", MEGATRON_COUNT, json.dumps(raws)], env=env,
                          check=False, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    for raw, (params, bias_buffers, qk_norm) in zip(raws, results):
        recipe = parse_recipe(raw)
        counts = count_params(recipe)
        # Megatron keeps the router's expert bias as a buffer; DeepSeek's checkpoint (and our
        # count) as a parameter. The MLA latent norms (q_a/kv_a_layernorm in DeepSeek-V3) exist
        # in Megatron only with qk_layernorm=True.
        missing = 0
        if recipe.model.attention == "mla" and not qk_norm:
            per_layer = recipe.model.mla.q_lora_rank + recipe.model.mla.kv_lora_rank
            missing = per_layer * (recipe.model.num_layers + recipe.model.mtp_num_layers)
        assert params + bias_buffers + missing == counts.total_with_mtp


def test_dualpipe_holds_twice_the_parameters_of_1f1b(v3_recipe):
    one = v3_recipe.model_copy(deep=True)
    one.parallel.schedule = "1f1b"
    one.parallel.layers_per_stage = None
    one.model.num_layers = 64
    one.model.num_dense_layers = 0
    one.model.mtp_num_layers = 0
    dual = one.model_copy(deep=True)
    dual.parallel.schedule = "dualpipe"
    ranks_1f1b, ranks_dual = pipeline_ranks(one), pipeline_ranks(dual)
    middle = 5  # no embedding/head on it
    params = [sum(memory.chunk_params(r, c).dense + memory.chunk_params(r, c).expert
                  for c in ranks[middle].chunks)
              for r, ranks in ((one, ranks_1f1b), (dual, ranks_dual))]
    assert params[1] == pytest.approx(2 * params[0])


def test_zero1_and_recompute_shrink_memory(v3_recipe):
    actions, sim = simulate_recipe(v3_recipe)
    prank = pipeline_ranks(v3_recipe)[3]
    base = memory.rank_memory(v3_recipe, prank, actions[3], sim.peak_activations_per_rank[3])
    no_zero = v3_recipe.model_copy(deep=True)
    no_zero.parallel.distributed_optimizer = False
    full = memory.rank_memory(no_zero, prank, actions[3], 0)
    parts = [memory.chunk_params(v3_recipe, c) for c in prank.chunks]
    dense, expert = sum(c.dense for c in parts), sum(c.expert for c in parts)
    # ZeRO-1: dense weights' state over dp = 128 ranks, experts' over expert dp = 2
    assert full.optimizer / base.optimizer == pytest.approx(
        (dense + expert) / (dense / 128 + expert / 2))
    no_rc = v3_recipe.model_copy(deep=True)
    no_rc.model.recompute_modules = []
    assert memory.rank_memory(no_rc, prank, actions[3], 0).activations > base.activations
    cached = v3_recipe.model_copy(deep=True)
    cached.fp8.param_gather = False
    assert memory.rank_memory(cached, prank, actions[3], 0).fp8_weights > 0 == base.fp8_weights


def test_activation_peak_walks_the_schedule():
    recipe = parse_recipe({"parallel": {"pp": 4}, "model": {"num_layers": 8},
                           "train": {"micro_batch_size": 1, "global_batch_size": 16}})
    actions, sim = simulate_recipe(recipe)
    for rank, acts in enumerate(actions):
        assert memory.peak_activation_bytes(acts, [1.0]) == sim.peak_activations_per_rank[rank]


def test_cli_text_and_json(capsys):
    assert cli.main(["plan", str(V3), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    for key in ("world_size", "num_nodes", "total_params", "activated_params",
                "per_rank_memory_gb", "bubble"):
        assert key in data
    assert plan.main([str(V3)]) == 0
    text = capsys.readouterr().out
    assert "world size 2048 = 256 nodes x 8 GPUs" in text
    assert "671.03B" in text and "36.63B" in text
    assert text.count("\n   ") >= 16  # one line per pipeline rank


@pytest.mark.parametrize("overrides, needles", [
    (["parallel.num_nodes=192", "parallel.ep=96"], ["moe.num_experts", "parallel.ep=96"]),
    (["parallel.schedule=dualpipev", "model.num_layers=61", "parallel.layers_per_stage=null"],
     ["model.num_layers=61", "32 pipeline stages"]),
    (["parallel.schedule=dualpipev"], ["layers_per_stage has 16 entries", "32"]),
    (["train.batch_ramp=[3072,7680,1000]"], ["train.batch_ramp", "15360"]),
])
def test_bad_recipes_are_rejected_with_one_line(capsys, overrides, needles):
    args = ["plan", str(V3)] + [a for o in overrides for a in ("--set", o)]
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("megatron-dualpipe plan: error: ") and "\n" not in err
    for needle in needles:
        assert needle in err


def test_v3_batch_ramp_start_is_flagged(v3_recipe):
    warnings = check_plan_rules(v3_recipe)
    assert any("3072" in w and "32" in w for w in warnings)
