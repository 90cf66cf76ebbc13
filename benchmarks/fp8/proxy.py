"""fp8_bench worker `proxy`: the whole proxy model through megatron_dualpipe.train (variants,
recipe overrides, model FLOPs, one profiled step with GPU kernel time per category)."""

from __future__ import annotations

import statistics
import time

from megatron_dualpipe.in_process import run_training

from .common import ROOT, _short, machine_info

PROXY_RECIPE = "recipes/fp8_proxy_1gpu.yaml"
# DeepSeek-V3 layer shapes on one GPU: hidden 7168, dense FFN 18432, expert FFN 2048 (8 experts,
# top-4: ~2048 tokens per expert and micro-batch), 4096-token micro-batches. ~2B parameters,
# ~50 GB on an 80 GB H100.
DEFAULT_PROXY_SET = [
    "model.num_layers=3", "model.num_dense_layers=1", "model.hidden_size=7168",
    "model.ffn_hidden_size=18432", "model.num_attention_heads=56", "model.vocab_size=16384",
    "model.seq_length=4096", "moe.num_experts=8", "moe.topk=4", "moe.num_groups=4",
    "moe.group_topk=2", "moe.ffn_hidden_size=2048", "moe.shared_expert_ffn_hidden_size=2048",
    "train.micro_batch_size=1", "train.global_batch_size=4",
]
BF16_MLA = ("['*self_attention.linear_q_down_proj', '*self_attention.linear_kv_down_proj', "
            "'*self_attention.linear_q_up_proj', '*self_attention.linear_kv_up_proj']")
# A variant is a precision and modifiers joined by "+", e.g. "blockwise+mla+fusions".
PROXY_PRECISIONS = {
    "bf16": ["fp8.recipe=none"],
    "blockwise": ["fp8.recipe=blockwise"],
    "current": ["fp8.recipe=current"],
    "delayed": ["fp8.recipe=delayed"],
}
PROXY_MODIFIERS = {
    # DeepSeek-V3's MLA (q_lora 1536, kv_lora 512, qk 128+64, v 128) instead of MHA.
    "mla": ["model.attention=mla"],
    # Megatron's fused RoPE, cross-entropy, router top-k and token permute kernels, and TE's
    # weight-gradient accumulation into main_grad.
    "fusions": ["model.rope_fusion=true", "model.cross_entropy_fusion=true",
                "moe.router_fusion=true", "moe.permute_fusion=true",
                "model.gradient_accumulation_fusion=true"],
    # BF16 Adam moments (DeepSeek-V3 §3.3.4), Megatron's precision-aware optimizer.
    "bf16moments": ["optimizer.moment_dtype=bf16"],
    # 16 micro-batches per optimizer step instead of 4.
    "gbs16": ["train.global_batch_size=16"],
    # FP8 only: TE's single-launch grouped GEMM for the experts.
    "fused": ["fp8.grouped_gemm_fused=true"],
    # FP8 only: MLA's low-rank projections (small N or K) stay BF16.
    "bf16mla": ["fp8.bf16_modules=" + BF16_MLA],
}
FP8_ONLY_MODIFIERS = ("fused", "bf16mla")


def variant_overrides(variant: str) -> list[str]:
    """Recipe overrides of a proxy variant ("precision+modifier+..."); ValueError if unknown."""
    precision, *modifiers = variant.split("+")
    if precision not in PROXY_PRECISIONS:
        raise ValueError(f"proxy variant {variant!r}: precision {precision!r} is not one of "
                         f"{', '.join(PROXY_PRECISIONS)}")
    unknown = [m for m in modifiers if m not in PROXY_MODIFIERS]
    if unknown:
        raise ValueError(f"proxy variant {variant!r}: unknown modifier(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(PROXY_MODIFIERS)}")
    if precision == "bf16" and any(m in FP8_ONLY_MODIFIERS for m in modifiers):
        raise ValueError(f"proxy variant {variant!r}: {', '.join(FP8_ONLY_MODIFIERS)} apply to "
                         "FP8 variants only")
    return [*PROXY_PRECISIONS[precision], *(o for m in modifiers for o in PROXY_MODIFIERS[m])]


def baseline_variant(variant: str) -> str:
    """The BF16 variant with the same model/training modifiers (what "x BF16" divides by)."""
    _, *modifiers = variant.split("+")
    return "+".join(["bf16", *(m for m in modifiers if m not in FP8_ONLY_MODIFIERS)])


# First match wins (lower-case substrings of CUDA kernel names).
KERNEL_CATEGORIES = (
    ("communication", ("nccl",)),
    ("attention", ("flash", "fmha", "fused_attn", "attn_fwd", "attn_bwd", "cudnn")),
    ("GEMM", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "grouped_mm")),
    ("FP8 quantize/cast", ("quantize", "cast_transpose", "amax", "compute_scale", "fp8",
                           "block_scaled", "dequant")),
    ("optimizer", ("multi_tensor", "adam")),
    ("norm", ("rmsnorm", "layernorm", "layer_norm", "rms_norm")),
    ("MoE routing/permute", ("permute", "topk", "sort", "scatter", "gather", "index", "histc",
                             "bincount", "cumsum", "radix")),
)


def kernel_category(name: str) -> str:
    lower = name.lower()
    for category, keys in KERNEL_CATEGORIES:
        if any(k in lower for k in keys):
            return category
    return "elementwise/other"


def is_annotation(event) -> bool:
    """A `record_function` range mirrored on the GPU timeline (e.g. `Optimizer.step#...`): its
    device time is that of the kernels inside it, which are counted on their own."""
    return bool(getattr(event, "is_user_annotation", False)) or "#" in event.key or \
        event.key.startswith("ProfilerStep")


def kernel_breakdown(events) -> dict[str, float]:
    """GPU kernel time (ms) per category from `torch.profiler` key averages of CUDA kernels
    (`events`: objects with `.key` and `.self_device_time_total` in microseconds)."""
    totals: dict[str, float] = {}
    for e in events:
        us = getattr(e, "self_device_time_total", 0) or 0
        if us <= 0:
            continue
        category = kernel_category(e.key)
        totals[category] = totals.get(category, 0.0) + us / 1e3
    return dict(sorted(totals.items(), key=lambda kv: -kv[1]))


def profile_one_step(state, source, step: int) -> dict:
    """Wall time and per-category GPU kernel time of one extra training step."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from megatron_dualpipe import train as T

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        T.train_step(state, source, step)
        torch.cuda.synchronize()
        wall_ms = (time.perf_counter() - start) * 1e3
    kernels = [e for e in prof.key_averages()
               if str(getattr(e, "device_type", "")).endswith("CUDA")
               and not is_annotation(e)]
    breakdown = kernel_breakdown(kernels)
    top = sorted(kernels, key=lambda e: -(getattr(e, "self_device_time_total", 0) or 0))[:25]
    return {"wall_ms": wall_ms, "kernels_ms": breakdown, "busy_ms": sum(breakdown.values()),
            "num_kernel_launches": sum(getattr(e, "count", 0) for e in kernels),
            "top_kernels": [(e.key[:120], e.self_device_time_total / 1e3, e.count,
                             kernel_category(e.key)) for e in top]}


def proxy_overrides(args, variant: str) -> list[str]:
    base = DEFAULT_PROXY_SET if args.proxy_default_set else []
    return [*base, *args.proxy_set, *variant_overrides(variant),
            f"train.steps={args.proxy_warmup + args.proxy_steps}",
            "train.log_dir=runs/fp8_bench_proxy"]


def _activated_flops_per_token(recipe, chunk) -> float:
    """Approximate training FLOPs per token: 6 x activated parameters (embedding lookup
    excluded, routed experts scaled by topk/num_experts) + causal attention."""
    m, moe = recipe.model, recipe.moe
    total = experts = embed = 0
    for name, p in chunk.named_parameters():
        total += p.numel()
        if ".experts." in name:
            experts += p.numel()
        elif "word_embeddings" in name:
            embed += p.numel()
    active = total - embed - experts + experts * moe.topk / moe.num_experts
    if m.attention == "mla":
        qk = m.num_attention_heads * (m.mla.qk_head_dim + m.mla.qk_pos_emb_head_dim)
        v = m.num_attention_heads * m.mla.v_head_dim
    else:
        qk = v = m.hidden_size
    attention = 3.0 * m.seq_length * (qk + v) * m.num_layers  # fwd+bwd, causal half
    return 6.0 * active + attention


def worker_proxy(args) -> dict:
    import torch

    from megatron_dualpipe.config import load_recipe
    from megatron_dualpipe.fp8 import fp8_module_report

    overrides = proxy_overrides(args, args.variant)
    recipe = load_recipe(ROOT / args.proxy_recipe, overrides)
    steps = args.proxy_warmup + args.proxy_steps

    def after(state, source):
        report = fp8_module_report(state.model)
        profiled = None
        try:  # one extra step (the last step's data again) under the profiler
            profiled = profile_one_step(state, source, steps - 1)
        except Exception as err:  # the timing above stands without it
            profiled = {"error": _short(err)}
        bf16_gemms = [n for n, m in report["modules"].items()
                      if m["kind"] in ("linear", "grouped_linear") and m["precision"] == "bf16"]
        return {"flops_per_token": _activated_flops_per_token(recipe, state.model[0].module),
                "fp8_summary": report["summary"], "bf16_gemms": bf16_gemms, "profile": profiled,
                "params": sum(p.numel() for c in state.model for p in c.parameters())}

    run = run_training(recipe, steps, cache=True, after=after)
    timed = run["step_times_s"][args.proxy_warmup:]
    step_s = statistics.median(timed)
    tokens = recipe.train.global_batch_size * recipe.model.seq_length
    info = run["after"]
    return {
        "machine": machine_info(), "variant": args.variant, "overrides": overrides,
        "step_s": step_s, "step_min_s": min(timed), "step_max_s": max(timed),
        "tokens_per_step": tokens, "tokens_per_s": tokens / step_s,
        "tflops": info["flops_per_token"] * tokens / step_s / 1e12,
        "params": info["params"], "fp8_summary": info["fp8_summary"],
        "bf16_gemms": info["bf16_gemms"],
        "profile": info.get("profile"),
        "max_memory_gb": run["max_memory_gb"], "losses": run["losses"],
        "cuda_mem_total_gb": torch.cuda.get_device_properties(0).total_memory / 2**30,
    }
