"""Whole-step training speed at DeepSeek-V3's per-GPU shapes on one GPU.

`python -m benchmarks.speed` builds, in ONE process, plain Megatron-Core (its own model builder,
1F1B schedule and optimizer), our 1F1B and our DualPipeV at PP=1 from the same recipe
(recipes/deepseek_v3_rank_1gpu.yaml), and times them interleaved (A B C A B C ...), in BF16 and
FP8. See `python -m benchmarks.speed --help` and docs/benchmarks.md (section `speed`).
"""
