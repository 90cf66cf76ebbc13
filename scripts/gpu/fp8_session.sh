#!/usr/bin/env bash
# FP8 session on the GPU machine (one Hopper GPU), after Transformer Engine + megatron-core are
# installed (shared/device/install_on_gpu.sh). Runs, in order, with logs under $OUT:
#   1. python -m pytest -q -s -m gpu tests/test_fp8_gpu.py   BF16 vs blockwise FP8, 200 steps each
#   2. python benchmarks/fp8_bench.py                        GEMMs + proxy step, BF16 vs FP8
#   3. copies docs/benchmarks.md (with the new fp8_bench section) to $OUT
#
#   OUT=/path/to/out bash scripts/gpu/fp8_session.sh          # default OUT: ./out
#
# Expected on one H100 (80 GB): pytest ~2-3 min (imports ~20 s, 2 x (build ~10 s + 200 steps at
# ~0.15-0.25 s)), benchmark ~3 min (GEMM worker ~40 s, DeepGEMM ~10 s if not installed and up to
# +2.5 min of JIT if it is, 2 proxy workers ~60 s each). Total ~5-6 min, under 8; the timeouts
# below cap it at 9.5 min. Exit status: non-zero if a part failed (the later parts still run).
SESSION=fp8_session
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
versions transformer-engine megatron-core pytest pydantic PyYAML numpy sgl-deep-gemm
"$PY" -c "import pytest" 2>/dev/null || log "pytest is not installed: stage its wheel (pytest, pluggy, iniconfig)"

log "1/2 pytest tests/test_fp8_gpu.py (expected ~2-3 min)"
run_part pytest 270 fp8_pytest.log env MDP_FP8_TEST_OUT="$OUT/fp8_losses.json" \
  "$PY" -m pytest -q -s -rsx -m gpu -p no:cacheprovider tests/test_fp8_gpu.py

log "2/2 benchmarks/fp8_bench.py (expected ~3 min)"
run_part fp8_bench 300 fp8_bench.log "$PY" benchmarks/fp8_bench.py \
  --json "$OUT/fp8_bench.json" --deepgemm-budget-s 150 --worker-timeout-s 200

cp docs/benchmarks.md "$OUT/benchmarks.md"
log "done: exit $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
