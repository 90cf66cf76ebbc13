"""What `benchmarks.speed` can vary: system modifiers (recipe overrides) and precisions."""

from __future__ import annotations

# "+modifier" on a system: recipe overrides (e.g. ours_dualpipev+plain, ours_1f1b+gaf+padcap).
MODIFIERS = {
    "plain": ["parallel.overlap_fb=false", "parallel.zero_bubble=false"],
    "nofuse": ["parallel.overlap_fb=false"],
    "nozb": ["parallel.zero_bubble=false"],
    # TE GEMMs accumulate weight gradients into main_grad (ours only: plain Megatron-Core
    # needs apex for its output layer to do this).
    "gaf": ["model.gradient_accumulation_fusion=true"],
    # Every expert's input padded to a fixed capacity: the token counts are known on the host,
    # so the MoE layer has no device-to-host sync. Drops nothing only when every token goes to
    # every local expert (moe.topk == moe.num_experts, as in the rank recipe): `build` checks.
    "padcap": ["moe.capacity_factor=1.0", "moe.pad_to_capacity=true"],
    # The routed experts' blockwise FP8 GEMMs on DeepGEMM (fp8.expert_gemm; experimental), with
    # TE's fused quantizer, TE's for the GEMM operand only, plain torch ops (slow), or our
    # Triton kernel for both operands.
    "deepgemm": ["fp8.expert_gemm=deepgemm"],
    "deepgemm-terows": ["fp8.expert_gemm=deepgemm", "fp8.deepgemm_quantizer=te-rows"],
    "deepgemm-torchq": ["fp8.expert_gemm=deepgemm", "fp8.deepgemm_quantizer=torch"],
    "deepgemm-triton": ["fp8.expert_gemm=deepgemm", "fp8.deepgemm_quantizer=triton"],
    # The decoder layers in CUDA graphs (model.cuda_graphs=local; experimental): one such
    # system and one precision per run (`check_graphed`).
    "graphs": ["model.cuda_graphs=local"],
    # MLA's rope without the fused kernel (graphs capture it without the rope_cache_copy
    # patch; docs/fp8.md has what it costs).
    "unfusedrope": ["model.rope_fusion=false"],
    # MLA's q and kv down projections as one GEMM with the input RMSNorm inside it (Megatron's
    # mla_down_proj_fusion; plain Megatron-Core takes it too).
    "mladown": ["model.mla_down_proj_fusion=true"],
}
MCORE_MODIFIERS = ("padcap", "mladown")
# Modifiers the report also measures against the same system without them (no target).
COMPARED_MODIFIERS = ("graphs", "mladown")
# The DualPipeV modifiers that only change the schedule (its 1F1B counterpart lacks them).
SCHEDULE_MODIFIERS = ("plain", "nofuse", "nozb")
# `--precisions`: bf16, fp8 (the recipe's fp8.bf16_modules), or fp8:GROUP[+GROUP]: these TE
# GEMMs stay BF16 (ours only). MLA's low-rank projections have a small N or K, where TE's
# blockwise FP8 loses to BF16 (docs/fp8.md, "Blockwise GEMM routes").
BF16_GROUPS = {
    "none": [],
    "mla": ["*self_attention.linear_q_down_proj", "*self_attention.linear_kv_down_proj",
            "*self_attention.linear_qkv_down_proj", "*self_attention.linear_kv_up_proj"],
    "shared": ["*shared_experts.linear_fc1", "*shared_experts.linear_fc2"],
}


def precision_setting(precision: str, fp8_format: str | None):
    """(fp8 format or None, BF16 patterns or None for the recipe's) of a `--precisions` item."""
    kind, _, groups = precision.partition(":")
    if kind == "bf16" and not groups:
        return None, None
    if kind != "fp8" or any(g not in BF16_GROUPS for g in groups.split("+") if groups):
        raise SystemExit(f"--precisions: unknown {precision!r}; allowed: bf16, fp8, "
                         f"fp8:GROUP[+GROUP] with GROUP in {', '.join(BF16_GROUPS)}")
    if not groups:
        return fp8_format, None
    return fp8_format, [p for g in groups.split("+") for p in BF16_GROUPS[g]]


def runs_precision(name: str, precision: str) -> bool:
    """Plain Megatron-Core runs bf16 and fp8 only (no per-module BF16 override)."""
    return not name.startswith("mcore_1f1b") or precision in ("bf16", "fp8")
