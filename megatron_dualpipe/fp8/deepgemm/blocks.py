"""DeepSeek-V3's blockwise FP8 constants as DeepGEMM's SM90 kernels take them, shared by the
torch quantizers (quantize.py) and the Triton kernel (triton_quant.py)."""

FP8_MAX = 448.0  # E4M3's largest finite value
BLOCK = 128  # 1x128 activation tiles, 128x128 weight blocks
AMAX_FLOOR = 1e-4  # an all-zero tile gets scale AMAX_FLOOR / FP8_MAX


def tma_aligned(n: int) -> int:
    """FP32 scale rows padded to 16 bytes (TMA alignment)."""
    return -(-n // 4) * 4
