#!/usr/bin/env bash
# FP8 whole-proxy session on one Hopper GPU, after Transformer Engine + megatron-core are
# installed. Two parts, one GPU call each (each fits the 10-minute limit), logs under $OUT:
#   PART=a  1. python -m pytest -q -s -m gpu tests/test_gpu_training.py
#              DualPipeV vs 1F1B in FP8 (the weight-cache fix) and fused vs unfused kernels
#           2. benchmarks/fp8_bench.py --parts proxy: bf16, blockwise, with/without fusions
#   PART=b  3. benchmarks/fp8_bench.py --parts proxy: MLA attention, 16 micro-batches per step
#   Each bench run writes $OUT/proxy_<part>.json (docs untouched); render the section with
#     python benchmarks/fp8_bench.py --from-json <gemm run>.json proxy_a.json proxy_b.json
#
#   PART=a OUT=/path/to/out bash scripts/gpu/fp8_proxy_session.sh
#
# Expected on one H200: part a ~7 min (pytest ~3 min: 7 runs x (build ~10 s + 50 steps);
# 4 proxy workers of ~50 s), part b ~5 min (5 workers of 50-70 s).
SESSION=fp8_proxy_session_${PART:-a}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
versions transformer-engine megatron-core pytest
BENCH=("$PY" benchmarks/fp8_bench.py --parts proxy --no-write --worker-timeout-s 150)

case "${PART:-a}" in
  a)
    log "pytest tests/test_gpu_training.py (expected ~3 min)"
    run_part pytest 300 gpu_training_pytest.log env MDP_GPU_TRAIN_STEPS=50 \
      "$PY" -m pytest -q -s -rsx -m gpu -p no:cacheprovider tests/test_gpu_training.py
    log "fp8_bench proxy a (expected ~3.5 min)"
    run_part proxy_a 280 proxy_a.log "${BENCH[@]}" --json "$OUT/proxy_a.json" \
      --proxy-variants bf16,blockwise,bf16+fusions,blockwise+fusions
    ;;
  b)
    log "fp8_bench proxy b (expected ~5 min)"
    run_part proxy_b 540 proxy_b.log "${BENCH[@]}" --json "$OUT/proxy_b.json" \
      --proxy-variants "bf16+mla+fusions,blockwise+mla+fusions,blockwise+mla+fusions+bf16mla,\
bf16+fusions+gbs16,blockwise+fusions+gbs16"
    ;;
  *) log "PART must be a or b"; status=2 ;;
esac
log "done: exit $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
