#!/usr/bin/env bash
# EPLB + FP8 session on a GPU machine with 2 GPUs, after Transformer Engine + megatron-core are
# installed. Runs, in order, with logs under $OUT:
#   1. python benchmarks/eplb_train_bench.py   (2 GPUs, EP=2, V3 rank shapes: scenarios static /
#      drift / burst / uniform x {none, bias, eplb, bias+eplb}, interleaved; writes the
#      eplb_train_bench section of docs/benchmarks.md; ~6-8 min)
#   2. python benchmarks/fp8_bench.py   (GPU 0 only: dense/grouped GEMMs, DeepGEMM if it imports,
#      the proxy step: BF16 vs blockwise vs blockwise with BF16 MLA projections; fp8_bench section)
#   3. copies docs/benchmarks.md to $OUT
#
#   OUT=/path/to/out bash scripts/gpu/eplb_fp8_session.sh      # default OUT: ./out
#   PARTS=eplb bash scripts/gpu/eplb_fp8_session.sh             # only part 1 (or PARTS=fp8)
#
# Expected on 2 H100/H200: FP8 ~4 min (GEMM worker ~40 s, 3 proxy workers ~60 s each). Each
# part fits one 10-min device call. Exit status: non-zero if a part failed.
SESSION=eplb_fp8_session
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
versions transformer-engine megatron-core sgl-deep-gemm

PARTS="${PARTS:-eplb fp8}"

if [[ " $PARTS " == *" eplb "* ]]; then
  log "1/2 benchmarks/eplb_train_bench.py (expected 6-8 min)"
  run_part eplb_train_bench 570 eplb_train_bench.log "$PY" benchmarks/eplb_train_bench.py
fi

if [[ " $PARTS " == *" fp8 "* ]]; then
  log "2/2 benchmarks/fp8_bench.py (expected ~4-5 min)"
  run_part fp8_bench 420 fp8_bench.log env CUDA_VISIBLE_DEVICES=0 "$PY" benchmarks/fp8_bench.py \
    --deepgemm-budget-s 100 --json "$OUT/fp8_bench.json" --worker-timeout-s 150
fi

cp docs/benchmarks.md "$OUT/benchmarks.md"
log "done: exit $status"
exit $status
