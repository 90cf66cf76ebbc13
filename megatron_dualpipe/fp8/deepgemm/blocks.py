"""DeepSeek-V3's blockwise FP8 constants as DeepGEMM's SM90 kernels take them, shared by the
torch quantizers (quantize.py) and the Triton kernel (triton_quant.py)."""

FP8_MAX = 448.0  # E4M3's largest finite value
BLOCK = 128  # 1x128 activation tiles, 128x128 weight blocks
AMAX_FLOOR = 1e-4  # an all-zero tile gets scale AMAX_FLOOR / FP8_MAX


def scales(amax):
    """FP32 scales of tile maxima, as DeepGEMM's reference casts (deep_gemm/utils/math.py:
    `sf = amax / 448`; the data is then `x * (1 / sf)`), written as the multiplication by
    fl32(1/448) that torch's GPU division by a scalar performs, so the CPU, the GPU and the
    Triton kernel round alike (torch's CPU division would round differently)."""
    return amax.clamp(min=AMAX_FLOOR) * (1.0 / FP8_MAX)


def tma_aligned(n: int) -> int:
    """FP32 scale rows padded to 16 bytes (TMA alignment)."""
    return -(-n // 4) * 4
