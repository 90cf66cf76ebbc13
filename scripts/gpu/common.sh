# Shared by the GPU session scripts (source it with SESSION=<name> set): repo root as cwd,
# $OUT, $PY, the lent machines' environment, `log`, `versions` and `run_part`.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-$PWD/out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# Never let NCCL/PyTorch/NVSHMEM use NVLink multicast on the lent machines.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# DeepEP built by benchmarks/deepep/build_on_gpu.sh (intranode kernels), when present.
[ -d .deepep/site ] && export PYTHONPATH="$PWD/.deepep/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHONWARNINGS="${PYTHONWARNINGS:-ignore}"
T0=$(date +%s)
status=0

log() { echo "[$SESSION +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/$SESSION.log"; }

# GPUs, torch/CUDA and the versions of the given distributions, into the session log.
versions() {
  log "GPUs: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    2>&1 | tr '\n' ' ')"
  "$PY" - "$@" <<'PY' 2>&1 | grep -v -i warn | tee -a "$OUT/$SESSION.log"
import importlib.metadata as md, sys, torch
def v(d):
    try:
        return md.version(d)
    except md.PackageNotFoundError:
        return "MISSING"
print("torch", torch.__version__, "cuda", torch.version.cuda, "capability",
      torch.cuda.get_device_capability(0) if torch.cuda.is_available() else None)
for d in sys.argv[1:]:
    print(d, v(d))
PY
}

# run_part NAME TIMEOUT_S LOG_FILE CMD...: run CMD under a timeout, tee its output to $OUT/LOG_FILE,
# log its exit status and time; a failure sets status=1 (later parts still run).
run_part() {
  local name=$1 limit=$2 file=$3; shift 3
  local t=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$file"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && status=1
  log "$name: exit $rc after $(( $(date +%s) - t )) s"
}
