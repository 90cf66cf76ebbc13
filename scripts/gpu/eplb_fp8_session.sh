#!/usr/bin/env bash
# EPLB + FP8 session on a GPU machine with 2 GPUs, after Transformer Engine + megatron-core are
# installed. Runs, in order, with logs under $OUT:
#   1. python benchmarks/eplb_train_bench.py         (2 GPUs, EP=2: no EPLB vs EPLB vs bias only;
#      one live rebalance timed; writes the eplb_train_bench section of docs/benchmarks.md)
#   2. python benchmarks/fp8_bench.py   (GPU 0 only: dense/grouped GEMMs, DeepGEMM if it imports,
#      the proxy step: BF16 vs blockwise vs blockwise with BF16 MLA projections; fp8_bench section)
#   3. copies docs/benchmarks.md to $OUT
#
#   OUT=/path/to/out bash scripts/gpu/eplb_fp8_session.sh      # default OUT: ./out
#
# Expected on 2 H100/H200: EPLB ~1.5 min (2 processes: imports + build ~30 s, 3 variants of
# warm-up + 10 timed iterations), FP8 ~4 min (GEMM worker ~40 s, 3 proxy workers ~60 s each).
# The timeouts below cap it at 10 min. Exit status: non-zero if a part failed.
SESSION=eplb_fp8_session
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
versions transformer-engine megatron-core sgl-deep-gemm

log "1/2 benchmarks/eplb_train_bench.py (expected ~1.5 min)"
run_part eplb_train_bench 150 eplb_train_bench.log "$PY" benchmarks/eplb_train_bench.py

log "2/2 benchmarks/fp8_bench.py (expected ~4-5 min)"
run_part fp8_bench 420 fp8_bench.log env CUDA_VISIBLE_DEVICES=0 "$PY" benchmarks/fp8_bench.py \
  --deepgemm-budget-s 100 --json "$OUT/fp8_bench.json" --worker-timeout-s 150

cp docs/benchmarks.md "$OUT/benchmarks.md"
log "done: exit $status"
exit $status
