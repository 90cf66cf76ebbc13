"""The DeepGEMM experts' activation quantizers, kernel against kernel, on one GPU: both operands
(1x128 rows for forward/dgrad, the per-expert K-major wgrad copy) of an expert-grouped
activation x [experts x rows, K] at one V3 GPU's shapes (K 7168: fc1's input; 4096: fc1's
output gradient; 2048: fc2's input).

    python -m benchmarks.fp8.quantizer --json runs/quantizer.json

Variants (megatron_dualpipe/fp8/deepgemm/quantize.py): `te` (TE's fused quantizer plus the
per-expert regrouping copy of its columnwise output), `te-kernel` (TE's kernel alone, no
regrouping: a lower bound for that route), `triton@W` (our Triton kernel with W warps per
128x128 tile; 4 spill), `triton-tbf16@W` (the wgrad copy transposed as BF16 input instead of
FP8 output), `triton-rows@W` (no wgrad copy: the transposed store's cost).
Each is first checked against the torch path (`quantize_rows` / `quantize_k_major`):
mismatching FP8 bytes and scales are counted (`triton` is meant to be bit for bit; TE rounds its
scales differently). Timing: interleaved rounds of CUDA-event medians; GB/s counts one BF16
read and the FP8 writes.
"""

from __future__ import annotations

import argparse
import statistics
import sys

from benchmarks.fp8.common import time_cuda
from benchmarks.portable import command_line

KS = (7168, 4096, 2048)
VARIANTS = ("te", "te-kernel", "triton@8", "triton@16", "triton-tbf16@8", "triton-tbf16@16",
            "triton-rows@8")


def parse_args(argv=None) -> argparse.Namespace:
    from benchmarks.docs_section import add_result_args

    p = argparse.ArgumentParser(prog="python -m benchmarks.fp8.quantizer", description=__doc__)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--rows", type=int, default=4096, help="rows per expert")
    p.add_argument("--ks", default=",".join(map(str, KS)))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--iters", type=int, default=10, help="calls per variant and round")
    add_result_args(p, "quantizer")
    return p.parse_args(argv)


def quantizer(variant: str):
    """call(x, ks, order) -> (rows pair, k-major pair) for a variant name."""
    from megatron_dualpipe.fp8.deepgemm import quantize, triton_quant

    if variant == "te":
        return quantize.ActivationQuantizer("te")
    if variant == "te-kernel":
        q = quantize.make_te_block_quantizer(True)
        return lambda x, ks, order: (q.quantize(x), None)
    if variant.startswith(("triton@", "triton-rows@", "triton-tbf16@")):
        warps, rows_only = int(variant.split("@")[1]), variant.startswith("triton-rows")
        transpose_bf16 = variant.startswith("triton-tbf16")

        def call(x, ks, order):
            triton_quant.NUM_WARPS, triton_quant.TRANSPOSE_BF16 = warps, transpose_bf16
            return triton_quant.quantize_rows_k_major(x, ks, None if rows_only else order)
        return call
    raise SystemExit(f"--variants: unknown {variant!r}; allowed: {', '.join(VARIANTS)}")


def mismatches(out, ref) -> dict:
    """Counts of differing FP8 bytes and scales, rows and k-major operands."""
    import torch

    (q, sf), (qk, sfk) = out
    (rq, rsf), (kq, ksf) = ref
    count = lambda a, b: int((a != b).sum())  # noqa: E731
    kq_bytes, qk_bytes = kq.view(torch.uint8), qk.view(torch.uint8)
    first = (qk_bytes != kq_bytes).nonzero().flatten()[:4].tolist()
    return {"rows_data": count(q.view(torch.uint8), rq.view(torch.uint8)),
            "rows_scales": count(sf, rsf), "kmajor_data": count(qk_bytes, kq_bytes),
            "kmajor_scales": count(sfk, ksf), "elements": q.numel(),
            "first_kmajor": [(i, int(qk_bytes[i]), int(kq_bytes[i])) for i in first]}


def run(args) -> dict:
    import torch

    from megatron_dualpipe.fp8.deepgemm.quantize import quantize_k_major, quantize_rows

    variants = args.variants.split(",")
    calls = {v: quantizer(v) for v in variants}
    ks_groups = [args.rows] * args.experts
    order = list(range(args.experts))[::-1]  # Megatron's main_grad order (fp8/deepgemm/grads)
    g = torch.Generator(device="cuda").manual_seed(0)
    out = {"command": command_line("-m benchmarks.fp8.quantizer", sys.argv[1:]),
           "device": torch.cuda.get_device_name(), "torch": torch.__version__, "shapes": []}
    for k in map(int, args.ks.split(",")):
        m = sum(ks_groups)
        x = (torch.randn(m, k, device="cuda", generator=g)
             * torch.rand(m, 1, device="cuda", generator=g) * 4).bfloat16()
        ref = (quantize_rows(x), quantize_k_major(x, ks_groups, order))
        checks = {v: mismatches(calls[v](x, ks_groups, order), ref)
                  for v in variants if v != "te-kernel" and "rows@" not in v}
        del ref
        times = {v: [] for v in variants}
        for _ in range(args.rounds):
            for v in variants:
                times[v].append(time_cuda(lambda v=v: calls[v](x, ks_groups, order),
                                          warmup=2, iters=args.iters)["ms"])
        rows = []
        for v in variants:
            moved = m * k * (3 if "rows@" in v else 4)  # BF16 read, one or two FP8 copies
            ms = statistics.median(times[v])
            rows.append({"variant": v, "ms": ms, "min_ms": min(times[v]),
                         "max_ms": max(times[v]), "GB_s": moved / ms / 1e6,
                         "check": checks.get(v)})
        out["shapes"].append({"m": m, "k": k, "rows": rows})
    return out


def render(result: dict) -> str:
    lines = [f"Machine: {result['device']}, torch {result['torch']}. Command: "
             f"`{result['command']}`", ""]
    for shape in result["shapes"]:
        lines += [f"x [{shape['m']}, {shape['k']}] (BF16), both operands:", "",
                  "| variant | ms (median) | range | GB/s | vs torch path: differing bytes "
                  "rows / k-major, scales rows / k-major |", "| --- | --- | --- | --- | --- |"]
        for r in shape["rows"]:
            c = r["check"]
            check = "-" if c is None else (f"{c['rows_data']} / {c['kmajor_data']}, "
                                           f"{c['rows_scales']} / {c['kmajor_scales']}")
            lines.append(f"| {r['variant']} | {r['ms']:.3f} | {r['min_ms']:.3f}-"
                         f"{r['max_ms']:.3f} | {r['GB_s']:.0f} | {check} |")
        lines.append("")
    return "\n".join(lines)


START, END = "<!-- quantizer:start -->", "<!-- quantizer:end -->"


def section(results: list[dict]) -> str:
    """The docs section: each run's machine, command and tables."""
    return ("## DeepGEMM experts' activation quantizers, kernel against kernel "
            "(`python -m benchmarks.fp8.quantizer`)\n\n"
            + "".join(render(r) + "\n" for r in results))


def main(argv=None) -> int:
    from benchmarks.docs_section import read_json, write_benchmark_section, write_json

    args = parse_args(argv)
    if args.from_json:
        write_benchmark_section(section, read_json(args.from_json), START, END)
        return 0
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.fp8.quantizer needs a CUDA GPU")
    result = run(args)
    print(render(result), flush=True)
    write_json(args.json, result)
    if args.write_docs:
        write_benchmark_section(section, [result], START, END)
    return 0


if __name__ == "__main__":
    sys.exit(main())
