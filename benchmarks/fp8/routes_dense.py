"""Dense GEMM routes of `gemm_routes`: y = x W^T (fwd), dx = dy W (dgrad), dW = dy^T x (wgrad)
for one Linear [N, K] and M tokens, through BF16 torch.matmul, Transformer Engine, DeepGEMM and
torch's blockwise scaled_mm.

Each builder returns {part: spec}; a spec is a dict with `run` (the timed call), `check` (relative
error of its result against the float64 reference), `bound` (largest error accepted), `flops` and
optionally `check_dequant` (error against the float64 product of the dequantized FP8 operands:
the kernel's own error, quantization excluded) and `note`.
"""

from __future__ import annotations

from .blockwise_quant import (
    dequant_1x128,
    dequant_128x128,
    quant_1x128,
    quant_128x128,
    te_block_quantizer,
    te_quantize_1x128,
)
from .common import rel_err

BF16_BOUND = 1e-2  # BF16 output rounding is ~2e-3
# E4M3 has 3 mantissa bits: quantizing both operands of a product of Gaussian data alone gives a
# relative error of about 3.5%; 6% leaves room without hiding a wrong scale layout (>> 10%).
FP8_BOUND = 0.06
KERNEL_BOUND = 1e-2  # FP8 kernel vs the product of its own dequantized operands


class DenseCase:
    """Operands and float64 references of one dense shape (weights scaled by 1/sqrt(K))."""

    def __init__(self, M: int, K: int, N: int, seed: int, refs: bool = True):
        import torch

        g = torch.Generator(device="cuda").manual_seed(seed)
        self.M, self.K, self.N = M, K, N
        self.W = (torch.randn(N, K, device="cuda", generator=g) / K**0.5).to(torch.bfloat16)
        self.x = torch.randn(M, K, device="cuda", generator=g, dtype=torch.bfloat16)
        self.dy = torch.randn(M, N, device="cuda", generator=g, dtype=torch.bfloat16)
        self.flops = 2.0 * M * K * N
        if refs:  # float64 products stored as float32 (plenty for 1e-3 comparisons)
            x64, w64, dy64 = self.x.double(), self.W.double(), self.dy.double()
            self.y_ref = (x64 @ w64.t()).float()
            self.dx_ref = (dy64 @ w64).float()
            self.dw_ref = (dy64.t() @ x64).float()


def _spec(run, check, flops, bound, **extra) -> dict:
    return {"run": run, "check": check, "flops": flops, "bound": bound, **extra}


def bf16_torch(c: DenseCase) -> dict:
    import torch

    out = {}

    def fwd():
        out["y"] = torch.matmul(c.x, c.W.t())

    def dgrad():
        out["dx"] = torch.matmul(c.dy, c.W)

    def wgrad():
        out["dw"] = torch.matmul(c.dy.t(), c.x)

    return {
        "fwd": _spec(fwd, lambda: rel_err(out["y"], c.y_ref), c.flops, BF16_BOUND),
        "dgrad": _spec(dgrad, lambda: rel_err(out["dx"], c.dx_ref), c.flops, BF16_BOUND),
        "wgrad": _spec(wgrad, lambda: rel_err(out["dw"], c.dw_ref), c.flops, BF16_BOUND),
    }


def te_linear(c: DenseCase, recipe_name: str, args) -> dict:
    """TE Linear under the recipe's autocast (gemm._bench_te_linear for the total)."""
    import torch
    import transformer_engine.pytorch as te

    from .gemm import _bench_te_linear

    layer = te.Linear(c.K, c.N, bias=False, params_dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        layer.weight.copy_(c.W)
    x = c.x.detach().clone().requires_grad_(True)
    return te_specs(c, recipe_name, lambda first: layer(c.x, is_first_microbatch=first),
                    lambda: _bench_te_linear(te, c.W, x, c.dy, recipe_name, True, args))


def te_specs(c, recipe_name: str, forward, bench_total) -> dict:
    """`fwd`: `forward(is_first_microbatch)` without grad under the recipe's autocast, weights
    cached after the first call (activation quantization + GEMM); `total`: fwd+bwd as measured
    by `bench_total()` (weights cached too)."""
    import torch

    from .common import te_autocast, te_recipe

    recipe = te_recipe(recipe_name)
    calls = {"n": 0}
    out, total = {}, {}

    def fwd():
        first = calls["n"] == 0
        calls["n"] += 1
        with torch.no_grad(), te_autocast(recipe):
            out["y"] = forward(first)

    def run_total():  # one full fwd+bwd measurement; the runner takes its result as it is
        total.update(bench_total())

    bound = BF16_BOUND if recipe is None else FP8_BOUND
    return {
        "fwd": _spec(fwd, lambda: rel_err(out["y"], c.y_ref), c.flops, bound),
        "total": _spec(None, None, 3 * c.flops, bound, measure=run_total, result=total),
    }


def _with_scale_view(dg, pair):
    """DeepGEMM wants 1x128 scales MN-major and TMA-aligned; transform once, outside timing."""
    fn = getattr(dg, "get_mn_major_tma_aligned_tensor", None)
    if fn is None:
        fn = dg.utils.get_mn_major_tma_aligned_tensor
    return pair[0], fn(pair[1])


def deepgemm(c: DenseCase, dg, use_te_quantizer: bool = True) -> dict:
    """DeepGEMM SM90 kernels: fwd and dgrad 1x128 x 128x128 (1D2D kernel, BF16 out), wgrad
    1x128 x 1x128 along the tokens (1D1D kernel) accumulating into an FP32 main_grad. Parts
    `fwd`, `dgrad`, `wgrad` time the GEMMs on pre-quantized operands; `fwd+quant` and
    `dgrad+quant` add the quantization of x resp. dy (rowwise and the transposed copy for wgrad,
    by TE's fused quantizer when available, else by the plain torch quantizer)."""
    import torch

    flags = {"disable_ue8m0_cast": True}
    wq = quant_128x128(c.W)
    wtq = (wq[0].t().contiguous(), wq[1].t().contiguous())  # W^T's 128x128 blocks: same scales
    x1 = _with_scale_view(dg, quant_1x128(c.x))
    dy1 = _with_scale_view(dg, quant_1x128(c.dy))
    xt1 = _with_scale_view(dg, quant_1x128(c.x.t().contiguous()))
    dyt1 = _with_scale_view(dg, quant_1x128(c.dy.t().contiguous()))
    y = torch.empty(c.M, c.N, device="cuda", dtype=torch.bfloat16)
    dx = torch.empty(c.M, c.K, device="cuda", dtype=torch.bfloat16)
    dw = torch.zeros(c.N, c.K, device="cuda", dtype=torch.float32)

    def fwd():
        dg.fp8_gemm_nt(x1, wq, y, **flags)

    def dgrad():
        dg.fp8_gemm_nt(dy1, wtq, dx, **flags)

    def wgrad():  # accumulates: D = C + A B^T with C = D
        dg.fp8_gemm_nt(dyt1, xt1, dw, c=dw, recipe=(1, 1, 128), **flags)

    def wgrad_check():
        dw.zero_()
        wgrad()
        torch.cuda.synchronize()
        return rel_err(dw, c.dw_ref)

    def deq_ref(a, b, out):
        return rel_err(out, (a.double() @ b.double().t()).float())

    specs = {
        "fwd": _spec(fwd, lambda: rel_err(y, c.y_ref), c.flops, FP8_BOUND,
                     check_dequant=lambda: deq_ref(dequant_1x128(*x1), dequant_128x128(*wq), y)),
        "dgrad": _spec(dgrad, lambda: rel_err(dx, c.dx_ref), c.flops, FP8_BOUND,
                       check_dequant=lambda: deq_ref(dequant_1x128(*dy1),
                                                     dequant_128x128(*wtq), dx)),
        "wgrad": _spec(wgrad, wgrad_check, c.flops, FP8_BOUND,
                       check_dequant=lambda: deq_ref(dequant_1x128(*dyt1),
                                                     dequant_1x128(*xt1), dw)),
    }
    specs.update(_deepgemm_quant_parts(c, dg, wq, wtq, y, dx, flags, use_te_quantizer))
    return specs


def _deepgemm_quant_parts(c, dg, wq, wtq, y, dx, flags, use_te_quantizer) -> dict:
    if use_te_quantizer:
        try:
            quantizer = te_block_quantizer(columnwise=True)

            def quant(t):
                return te_quantize_1x128(quantizer, t)["row"]

            note = "activation quantization: TE Float8BlockQuantizer (rowwise + transposed)"
        except Exception as err:  # noqa: BLE001
            use_te_quantizer, note = False, f"TE quantizer unavailable ({type(err).__name__})"
    if not use_te_quantizer:
        def quant(t):  # rowwise here; the transposed copy costs as much again
            quant_1x128(t.t().contiguous())
            return _with_scale_view(dg, quant_1x128(t))

        note = "activation quantization: plain torch ops (slow reference quantizer)"

    def fwd_q():
        dg.fp8_gemm_nt(quant(c.x), wq, y, **flags)

    def dgrad_q():
        dg.fp8_gemm_nt(quant(c.dy), wtq, dx, **flags)

    return {
        "fwd+quant": _spec(fwd_q, lambda: rel_err(y, c.y_ref), c.flops, FP8_BOUND, note=note),
        "dgrad+quant": _spec(dgrad_q, lambda: rel_err(dx, c.dx_ref), c.flops, FP8_BOUND,
                             note=note),
    }


def torch_scaled_mm(c: DenseCase) -> dict:
    """torch.nn.functional.scaled_mm (torch >= 2.10) with DeepSeek's blockwise recipes on
    pre-quantized operands: fwd/dgrad BlockWise1x128 x BlockWise128x128, wgrad 1x128 x 1x128
    (BF16 out: scaled_mm cannot accumulate into an FP32 main_grad)."""
    import torch
    import torch.nn.functional as F

    if not hasattr(F, "scaled_mm"):
        raise RuntimeError(f"torch {torch.__version__} has no torch.nn.functional.scaled_mm")
    ST, SW = F.ScalingType, F.SwizzleType

    def col_major(sf):  # [rows, k/128] with stride (1, rows)
        return sf.t().contiguous().t()

    def block_b(sf):  # [n/128, k/128] -> [roundup(k/128, 4), n/128] with stride (1, L4)
        n_b, k_b = sf.shape
        padded = torch.zeros(n_b, -(-k_b // 4) * 4, device=sf.device, dtype=sf.dtype)
        padded[:, :k_b] = sf
        return padded.t()

    def mm(a, sa, ra, b, sb, rb):
        return F.scaled_mm(a, b, sa, ra, sb, rb, swizzle_a=SW.NO_SWIZZLE,
                           swizzle_b=SW.NO_SWIZZLE, output_dtype=torch.bfloat16)

    xq, xs = quant_1x128(c.x)
    dyq, dys = quant_1x128(c.dy)
    wq, ws = quant_128x128(c.W)
    dytq, dyts = quant_1x128(c.dy.t().contiguous())
    xtq, xts = quant_1x128(c.x.t().contiguous())
    args = {
        "fwd": (xq, col_major(xs), ST.BlockWise1x128, wq.t(), block_b(ws), ST.BlockWise128x128),
        "dgrad": (dyq, col_major(dys), ST.BlockWise1x128, wq.t().contiguous().t(),
                  block_b(ws.t().contiguous()), ST.BlockWise128x128),
        "wgrad": (dytq, col_major(dyts), ST.BlockWise1x128, xtq.t(), col_major(xts),
                  ST.BlockWise1x128),
    }
    refs = {"fwd": c.y_ref, "dgrad": c.dx_ref, "wgrad": c.dw_ref}
    out = {}
    specs = {}
    for part, a in args.items():
        def run(part=part, a=a):
            out[part] = mm(*a)

        specs[part] = _spec(run, lambda part=part: rel_err(out[part], refs[part]), c.flops,
                            FP8_BOUND)
    return specs
