#!/usr/bin/env bash
# Overlapped F&B chunks session on a GPU machine with 2 GPUs (4 also works), after Transformer
# Engine + megatron-core are installed. Runs, in order, with logs under $OUT:
#   1. python -m pytest -q -s -m gpu tests/test_overlap_gpu.py
#        DualPipeV overlap on vs off (PP=2 x EP=1 on 2 GPUs; + PP=2 x EP=2 with 4 GPUs)
#   2. python benchmarks/overlap_bench.py --gpus 2
#        (a) Megatron 1F1B, (b) Megatron combined 1F1B, (c) DualPipeV, (d) DualPipeV + fused
#        F&B; step time, tokens/s/GPU, peak memory, all-to-all overlap from a profiled step;
#        writes the overlap_bench section of docs/benchmarks.md
#   3. with >= 4 GPUs also --gpus 4 (DualPipeV PP=2 x EP=2 vs interleaved PP=2 VPP=2 EP=2,
#      the layout where (c)/(d) have all-to-alls); copies docs/benchmarks.md, the JSON
#      results, the worker logs and the rank-0 traces to $OUT
#
#   OUT=/path/to/out bash scripts/gpu/overlap_session.sh        # default OUT: ./out
#   PARTS=pytest bash scripts/gpu/overlap_session.sh            # only part 1 (or PARTS=bench)
#
# Expected on 2 H100/H200: pytest ~4 min (3 tests x 2 runs x (spawn + build ~25 s + 5 calls)),
# benchmark ~3-4 min (4 torchrun jobs of ~35-50 s: imports + build ~25 s, 2 + 5 + 1 steps of
# < 1 s). Each part is capped at 7 min. Exit status: non-zero if a part failed (the later
# parts still run).
SESSION=overlap_session
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PARTS="${PARTS:-pytest bench}"  # which parts to run (one GPU call each fits the 10-min limit)
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
versions transformer-engine megatron-core pytest pydantic PyYAML

if [[ " $PARTS " == *" pytest "* ]]; then
  log "1/2 pytest tests/test_overlap_gpu.py (expected ~4 min)"
  run_part pytest 420 overlap_pytest.log \
    "$PY" -m pytest -q -s -rsx -m gpu -p no:cacheprovider tests/test_overlap_gpu.py
fi

if [[ " $PARTS " == *" bench "* ]]; then
  log "2/2 benchmarks/overlap_bench.py --gpus 2 (expected ~3-4 min)"
  run_part "overlap_bench --gpus 2" 420 overlap_bench.log "$PY" benchmarks/overlap_bench.py \
    --gpus 2 --timeout-s 110 --workdir "$OUT/bench2" --json "$OUT/overlap_bench_2gpu.json"
fi

if [ "$NGPU" -ge 4 ]; then
  log "extra: benchmarks/overlap_bench.py --gpus 4 (DualPipeV PP=2 x EP=2; ~4 min)"
  run_part "overlap_bench --gpus 4" 330 overlap_bench_4gpu.log "$PY" benchmarks/overlap_bench.py \
    --gpus 4 --timeout-s 120 --workdir "$OUT/bench4" --json "$OUT/overlap_bench_4gpu.json"
fi

for dir in "$OUT"/bench*/traces_*/traces; do  # keep rank 0's trace of each variant
  [ -d "$dir" ] || continue
  find "$dir" -name 'rank*.json' ! -name 'rank0.json' -delete
  [ -f "$dir/rank0.json" ] && gzip -f "$dir/rank0.json"
done
for trace in "$OUT"/bench*/traces_d/traces/rank0.json.gz; do
  [ -f "$trace" ] && "$PY" -m megatron_dualpipe trace "$trace" --window dualpipe.FB 2>&1 \
    | tee -a "$OUT/overlap_session.log"
done
cp docs/benchmarks.md "$OUT/benchmarks.md"
log "done: exit $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
