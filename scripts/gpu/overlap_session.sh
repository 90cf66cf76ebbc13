#!/usr/bin/env bash
# Issue 21 session on a GPU machine with 2 GPUs (nvidia-h200-x2), after Transformer Engine +
# megatron-core are installed. Parts (PARTS, default all three; each fits one 10-min device call):
#   deepep  benchmarks/deepep/build_on_gpu.sh: DeepEP intranode kernels from the carried tarball
#           (.deepep/DeepEP-*.tar.gz, see its header) into .deepep/site + DeepEP's own intranode
#           test on 2 GPUs (~5-8 min); later parts find it through common.sh's PYTHONPATH
#   pytest  python -m pytest -q -s -m gpu tests/test_overlap_gpu.py: (c) DualPipeV vs (d) fused
#           F&B, equal losses, NCCL all-to-all and (when deep_ep imports) DeepEP (~5 min)
#   bench   python benchmarks/overlap_bench.py: (a)-(d) x {alltoall, deepep}, interleaved, at V3
#           rank shapes, NVLink then the slowed link; tokens/s and the trace-measured hidden
#           share of the all-to-all; writes the overlap_bench section of docs/benchmarks.md and
#           keeps rank 0's trace of each (d) (~5-7 min)
#
#   device call 1: OUT=$OUT PARTS=deepep bash scripts/gpu/overlap_session.sh   (carry .deepep)
#   device call 2: OUT=$OUT PARTS=bench  bash scripts/gpu/overlap_session.sh   (same warm machine)
#   device call 3: OUT=$OUT PARTS=pytest bash scripts/gpu/overlap_session.sh
# A machine that went cold in between has lost .deepep/site: run PARTS="deepep bench" then.
# Exit status: non-zero if a part failed (the later parts still run).
SESSION=overlap_session
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PARTS="${PARTS:-deepep pytest bench}"
versions transformer-engine megatron-core deep_ep pytest

if [[ " $PARTS " == *" deepep "* ]]; then
  log "deepep: benchmarks/deepep/build_on_gpu.sh (expected 5-8 min)"
  run_part deepep 560 deepep_session.log bash benchmarks/deepep/build_on_gpu.sh
  [ -d .deepep/site ] && export PYTHONPATH="$PWD/.deepep/site${PYTHONPATH:+:$PYTHONPATH}"
fi

if [[ " $PARTS " == *" pytest "* ]]; then
  log "pytest tests/test_overlap_gpu.py (expected ~5 min)"
  run_part pytest 560 overlap_pytest.log \
    "$PY" -m pytest -q -s -rsx -m gpu -p no:cacheprovider tests/test_overlap_gpu.py
fi

if [[ " $PARTS " == *" bench "* ]]; then
  log "benchmarks/overlap_bench.py (expected 5-7 min)"
  run_part overlap_bench 570 overlap_bench.log "$PY" benchmarks/overlap_bench.py \
    --timeout-s 270 --workdir "$OUT/bench" --json "$OUT/overlap_bench.json"
  for trace in "$OUT"/bench/traces_*_d/traces/rank0.json; do  # keep rank 0's trace of (d)
    [ -f "$trace" ] || continue
    "$PY" -m megatron_dualpipe trace "$trace" --window dualpipe.FB 2>&1 | tee -a "$OUT/$SESSION.log"
    name=$(basename "$(dirname "$(dirname "$trace")")")
    gzip -c "$trace" > "$OUT/$name.rank0.json.gz"
  done
  rm -rf "$OUT"/bench/traces_*
  cp docs/benchmarks.md "$OUT/benchmarks.md"
fi
log "done: exit $status"
# At most 8 files come back from a device call: everything but the session log and the docs
# page goes into one tarball.
tar -C "$OUT" -czf "/tmp/$SESSION.tgz" --exclude "$SESSION.log" --exclude benchmarks.md . \
  && find "$OUT" -mindepth 1 ! -name "$SESSION.log" ! -name benchmarks.md -delete \
  && mv "/tmp/$SESSION.tgz" "$OUT/"
exit $status
