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
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# Never let NCCL/PyTorch/NVSHMEM use NVLink multicast on the lent machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
T0=$(date +%s)
status=0
log() { echo "[fp8_session +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/fp8_session.log"; }

log "GPU: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1)"
"$PY" - <<'EOF' 2>&1 | grep -v -i warn | tee -a "$OUT/fp8_session.log"
import importlib.metadata as md, torch
def v(d):
    try:
        return md.version(d)
    except md.PackageNotFoundError:
        return "MISSING"
print("torch", torch.__version__, "cuda", torch.version.cuda, "capability",
      torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None)
for d in ("transformer-engine", "megatron-core", "pytest", "pydantic", "PyYAML", "numpy",
          "sgl-deep-gemm"):
    print(d, v(d))
EOF
"$PY" -c "import pytest" 2>/dev/null || log "pytest is not installed: stage its wheel (pytest, pluggy, iniconfig)"

log "1/2 pytest tests/test_fp8_gpu.py (expected ~2-3 min)"
t=$(date +%s)
MDP_FP8_TEST_OUT="$OUT/fp8_losses.json" timeout 270 "$PY" -m pytest -q -s -rsx -m gpu \
  -p no:cacheprovider tests/test_fp8_gpu.py 2>&1 | tee "$OUT/fp8_pytest.log"
rc=$?
[ $rc -ne 0 ] && status=1
log "pytest: exit $rc after $(( $(date +%s) - t )) s"

log "2/2 benchmarks/fp8_bench.py (expected ~3 min)"
t=$(date +%s)
timeout 300 "$PY" benchmarks/fp8_bench.py --json "$OUT/fp8_bench.json" \
  --deepgemm-budget-s 150 --worker-timeout-s 200 2>&1 | tee "$OUT/fp8_bench.log"
rc=$?
[ $rc -ne 0 ] && status=1
log "fp8_bench: exit $rc after $(( $(date +%s) - t )) s"

cp docs/benchmarks.md "$OUT/benchmarks.md"
log "done: exit $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
