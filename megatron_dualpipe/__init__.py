"""megatron_dualpipe: DeepSeek-V3 training parallelism (DualPipe, EPLB, FP8) for Megatron-Core."""

__version__ = "0.1.0"
