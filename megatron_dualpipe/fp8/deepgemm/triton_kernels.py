"""The Triton kernel behind triton_quant.py (imported at its first use). `triton.jit` picks
compiled or interpreted at decoration time, for this kernel and for Triton's own library
functions (`tl.max`) alike, so the interpreter runs it only in a process that had
TRITON_INTERPRET=1 before importing triton (tests/triton_interpret_checks.py)."""

import triton
import triton.language as tl


@triton.jit
def quantize_tiles(x_ptr, q_ptr, sf_ptr, qk_ptr, sfk_ptr, base_ptr, ld_ptr, sfrow_ptr,
                   K, sf_ld, amax_floor, fp8_max,
                   WITH_K: tl.constexpr, STORE_FP32: tl.constexpr, BLOCK: tl.constexpr):
    rb = tl.program_id(0)
    cb = tl.program_id(1)
    rows = (rb * BLOCK + tl.arange(0, BLOCK)).to(tl.int64)  # rows * K may pass 2**31
    cols = cb * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + rows[:, None] * K + cols[None, :]).to(tl.float32)
    ax = tl.abs(x)
    s_row = tl.div_rn(tl.maximum(tl.max(ax, axis=1), amax_floor), fp8_max)
    q = tl.div_rn(x, s_row[:, None])  # IEEE division, as torch's
    if STORE_FP32:
        tl.store(q_ptr + rows[:, None] * K + cols[None, :], q)
    else:
        tl.store(q_ptr + rows[:, None] * K + cols[None, :], q.to(tl.float8e4nv))
    tl.store(sf_ptr + cb * sf_ld + rows, s_row)
    if WITH_K:
        base = tl.load(base_ptr + rb)
        ld = tl.load(ld_ptr + rb)
        sf_row = tl.load(sfrow_ptr + rb)
        s_col = tl.div_rn(tl.maximum(tl.max(ax, axis=0), amax_floor), fp8_max)
        # transposed in registers, so that each thread's stores run along the tokens, which
        # are contiguous in the K-major block ([cols, local] with local fastest)
        qc = tl.trans(tl.div_rn(x, s_col[None, :]))
        local = tl.arange(0, BLOCK)
        dest = qk_ptr + base + cols[:, None] * ld + local[None, :]
        if STORE_FP32:
            tl.store(dest, qc)
        else:
            tl.store(dest, qc.to(tl.float8e4nv))
        tl.store(sfk_ptr + sf_row * K + cols, s_col)

