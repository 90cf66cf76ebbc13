"""An analytic stand-in for a measured calibration: FLOPs over measured GEMM rates.

    python benchmarks/calibration_analytic.py [--recipe R] [--gemm J] [--out FILE]

Every GEMM of a part runs at the forward+backward TFLOP/s that `benchmarks/fp8_bench.py`
measured on one H200 for the nearest DeepSeek-V3 shape (`benchmarks/results/fp8_gemm_h200.json`:
BF16, and blockwise FP8 with a cached FP8 weight, as from the second micro-batch on); the same
rate is used for forward, input-gradient and weight-gradient GEMMs. Core attention (BF16 in
both precisions, as in DeepSeek-V3) runs at the FlashAttention-3 rates below; elementwise work
(norms, RoPE, SwiGLU, permutation, FP8 quantization, residuals) moves its bytes at the HBM
peak. The output is labelled `"source": "analytic placeholder"`; `calibrate_layer.py` measures
the real thing on the GPU and writes the same format.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from megatron_dualpipe.plan import load_plan_recipe  # noqa: E402
from megatron_dualpipe.planning.predict import flops as FL  # noqa: E402
from megatron_dualpipe.planning.predict.calibration import DEFAULT_CALIBRATION  # noqa: E402
from megatron_dualpipe.planning.predict.hardware import load_hardware  # noqa: E402

V3 = ROOT / "recipes" / "deepseek_v3_671b_ep64_tp1_pp16_h800.yaml"
GEMM_RESULTS = ROOT / "benchmarks" / "results" / "fp8_gemm_h200.json"
# FlashAttention-3 (Shah et al. 2024, arXiv:2407.08608, Figs. 4-5 and 8): BF16, causal, head
# dimension 128, 4K sequence on an H100 SXM: about 600 TFLOP/s forward and about 450 backward
# (read off the plots, rounded; MLA's 192/128 head dims are not in the paper).
ATTENTION_FWD_TFLOPS = 600.0
ATTENTION_BWD_TFLOPS = 450.0
FP8_VARIANT = "blockwise cachedW"
BF16_VARIANT = "bf16"


def gemm_rates(path: Path) -> dict[str, dict[str, float]]:
    """{shape name: {"bf16": TFLOP/s, "fp8": TFLOP/s}} from an fp8_bench GEMM result file."""
    data = json.loads(path.read_text())["gemm"]
    out: dict[str, dict[str, float]] = {}
    for e in data["dense"]:
        out[e["shape"]] = {"bf16": e["cells"][BF16_VARIANT]["tflops"],
                           "fp8": e["cells"][FP8_VARIANT]["tflops"]}
    for e in data["grouped"]:
        key = {BF16_VARIANT: "bf16", FP8_VARIANT: "fp8"}.get(e["variant"])
        if key:
            out.setdefault(e["shape"], {})[key] = e["tflops"]
    return out


def gemms(recipe) -> dict[str, list[tuple[str, float]]]:
    """Per part: (measured shape whose rate it uses, weights k*n per token) of each GEMM."""
    m, moe = recipe.model, recipe.moe
    h, a = m.hidden_size, m.mla
    heads = m.num_attention_heads
    f, fs = moe.ffn_hidden_size, moe.shared_expert_ffn_hidden_size
    return {
        "attention": [
            ("MLA q_down 7168->1536", h * a.q_lora_rank),
            ("MLA kv_down 7168->576", h * (a.kv_lora_rank + a.qk_pos_emb_head_dim)),
            ("MLA q_up 1536->24576",
             a.q_lora_rank * heads * (a.qk_head_dim + a.qk_pos_emb_head_dim)),
            ("MLA kv_up 512->32768", a.kv_lora_rank * heads * (a.qk_head_dim + a.v_head_dim)),
            ("attn out 16384->7168", heads * a.v_head_dim * h),
        ],
        "moe": [
            ("MLA kv_down 7168->576", moe.num_experts * h),  # router: a narrow GEMM
            ("expert fc1 7168->2048", 2 * h * fs), ("expert fc2 2048->7168", fs * h),  # shared
            ("expert fc1 7168->2048", moe.topk * 2 * h * f),
            ("expert fc2 2048->7168", moe.topk * f * h),
        ],
        "dense_mlp": [("dense/shared FFN fc1 7168->18432", 2 * h * m.ffn_hidden_size),
                      ("dense/shared FFN fc2 18432->7168", m.ffn_hidden_size * h)],
        "head": [("dense/shared FFN fc1 7168->18432", m.vocab_size * h)],
    }


def elementwise_bytes(recipe, part: str, fp8: bool) -> float:
    """Bytes per token the forward's elementwise kernels move (backward: twice as many)."""
    m, moe = recipe.model, recipe.moe
    h, k, f, fs = m.hidden_size, moe.topk, moe.ffn_hidden_size, moe.shared_expert_ffn_hidden_size
    q = 3 if fp8 else 0  # quantize a GEMM input: read 2 B, write 1 B per element
    act = 1 if fp8 else 2
    if part == "attention":
        a = m.mla
        rope = m.num_attention_heads * a.qk_pos_emb_head_dim * 2 * 2 * 2  # q and k, read+write
        inputs = h + a.q_lora_rank + a.kv_lora_rank + m.num_attention_heads * a.v_head_dim
        return 4 * h + rope + 6 * h + q * inputs  # norm, RoPE, residual add, quantization
    if part == "moe":
        permute = 2 * h + k * h * act  # read the token, write k copies
        swiglu = k * (2 * f * 2 + f * act) + (2 * fs * 2 + fs * act)
        combine = k * h * 2 + 2 * h
        return 4 * h + permute + swiglu + combine + 6 * h + q * (h + k * f + fs)
    if part == "dense_mlp":
        ff = m.ffn_hidden_size
        return 4 * h + 2 * ff * 2 + ff * act + 6 * h + q * (h + ff)
    return 4 * h + m.vocab_size * 4 * 2  # final norm, fp32 logits through the cross-entropy


def analytic_calibration(recipe, rates: dict, hardware: str = "h200") -> dict:
    hw = load_hardware(hardware)
    tokens = recipe.model.seq_length * recipe.train.micro_batch_size
    hbm = hw.hbm_gb_per_s * 1e9
    out = {}
    for prec in ("bf16", "fp8"):
        out[prec] = {}
        for part, items in gemms(recipe).items():
            rate_key = "bf16" if part == "head" else prec
            gemm_s = sum(2 * w * tokens / (rates[shape][rate_key] * 1e12) for shape, w in items)
            fl = FL.PART_FLOPS[part](recipe)
            core_f = fl.core * tokens / (ATTENTION_FWD_TFLOPS * 1e12)
            core_b = FL.ATTENTION_BACKWARD_RATIO * fl.core * tokens / (ATTENTION_BWD_TFLOPS * 1e12)
            elem = elementwise_bytes(recipe, part, prec == "fp8" and part != "head") * tokens / hbm
            out[prec][part] = {
                "f_ms": (gemm_s + core_f + elem) * 1e3,
                "b_ms": (gemm_s + core_b + 2 * elem) * 1e3,
                "w_ms": gemm_s * 1e3,
                "f_flops": fl.forward * tokens, "b_flops": fl.backward_input * tokens,
                "w_flops": fl.backward_weight * tokens,
            }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default=str(V3))
    ap.add_argument("--gemm", default=str(GEMM_RESULTS), help="fp8_bench GEMM results (JSON)")
    ap.add_argument("--out", default=str(DEFAULT_CALIBRATION))
    args = ap.parse_args(argv)
    recipe = load_plan_recipe(args.recipe)
    gemm_json = json.loads(Path(args.gemm).read_text())
    doc = {
        "source": "analytic placeholder",
        "description": "FLOPs over GEMM rates measured on one H200 (fp8_bench), FlashAttention-3 "
                       "attention rates and HBM-peak elementwise traffic; not a layer "
                       "measurement. Replace with benchmarks/calibrate_layer.py on the GPU.",
        "hardware": "h200",
        "machine": gemm_json["gemm"]["machine"],
        "command": "python benchmarks/calibration_analytic.py",
        "recipe": str(Path(args.recipe).resolve().relative_to(ROOT)),
        "micro_batch_tokens": recipe.model.seq_length * recipe.train.micro_batch_size,
        "precisions": analytic_calibration(recipe, gemm_rates(Path(args.gemm))),
    }
    Path(args.out).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
