"""The Triton kernel behind triton_quant.py (imported at its first use). `triton.jit` picks
compiled or interpreted at decoration time, for this kernel and for Triton's own library
functions (`tl.max`) alike, so the interpreter runs it only in a process that had
TRITON_INTERPRET=1 before importing triton (tests/triton_interpret_checks.py)."""

import triton
import triton.language as tl


@triton.jit
def quantize_tiles(x_ptr, q_ptr, sf_ptr, qk_ptr, sfk_ptr, base_ptr, ld_ptr, sfrow_ptr,
                   K, sf_ld, amax_floor, inv_fp8_max,
                   WITH_K: tl.constexpr, STORE_FP32: tl.constexpr, BLOCK: tl.constexpr,
                   TRANSPOSE_BF16: tl.constexpr):
    rb = tl.program_id(0)
    cb = tl.program_id(1)
    rows = (rb * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)  # rows * K may pass 2**31
    cols = cb * BLOCK + tl.arange(0, BLOCK)
    # The tile stays BF16 in registers (half an FP32 copy's): |x| and its maxima are exact in
    # BF16. blocks.scales' arithmetic: scale = amax * fl32(1/448), x * (1 / scale) with an
    # IEEE reciprocal per tile row (torch's), one multiplication per element.
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :])
    ax = tl.abs(x)
    s_row = tl.maximum(tl.max(ax, axis=1).to(tl.float32), amax_floor) * inv_fp8_max
    q = x.to(tl.float32) * tl.div_rn(1.0, s_row)[:, None]
    if not STORE_FP32:
        q = q.to(tl.float8e4nv)
    tl.store(q_ptr + rows[:, None] * K + cols[None, :], q)
    tl.store(sf_ptr + cb * sf_ld + rows, s_row)
    if WITH_K:
        base = tl.load(base_ptr + rb)
        ld = tl.load(ld_ptr + rb)
        sf_row = tl.load(sfrow_ptr + rb)
        # The wgrad copy is stored transposed, so that each thread's stores run along the
        # tokens, which are contiguous in the K-major block ([cols, local], local fastest):
        # either the BF16 tile is transposed before scaling (TRANSPOSE_BF16: 16-bit layout
        # conversions) or the FP8 result after it (a quarter of FP32's shared memory). Same
        # values either way.
        if TRANSPOSE_BF16:
            xt = tl.trans(x)
            s_col = tl.maximum(tl.max(tl.abs(xt), axis=1).to(tl.float32), amax_floor) \
                * inv_fp8_max
            qc = xt.to(tl.float32) * tl.div_rn(1.0, s_col)[:, None]
        else:
            s_col = tl.maximum(tl.max(ax, axis=0).to(tl.float32), amax_floor) * inv_fp8_max
            qc = x.to(tl.float32) * tl.div_rn(1.0, s_col)[None, :]
        if not STORE_FP32:
            qc = qc.to(tl.float8e4nv)
        if not TRANSPOSE_BF16:
            qc = tl.trans(qc)
        local = tl.arange(0, BLOCK)
        tl.store(qk_ptr + base + cols[:, None] * ld + local[None, :], qc)
        tl.store(sfk_ptr + sf_row * K + cols, s_col)
