#!/usr/bin/env bash
# Build DeepEP (intranode kernels only: NVLink, no NVSHMEM, no RDMA) on a GPU machine from a
# source tarball under .deepep/, install it under .deepep/site, and run DeepEP's own intranode
# test on 2 GPUs. Needs nvcc, torch with CUDA and 2 GPUs; no network (a machine without one can
# take the tarball along in the ignored folder .deepep/). Make the tarball where git can reach
# GitHub:
#
#   git clone https://github.com/deepseek-ai/DeepEP /tmp/DeepEP && mkdir -p .deepep && \
#     git -C /tmp/DeepEP archive --format=tar.gz --prefix=DeepEP/ \
#       -o "$PWD/.deepep/DeepEP-567632d.tar.gz" 567632d
#
# Why commit 567632d (the last one before "EPv2", #605; version 1.2.1 plus fixes): Megatron-Core
# 0.19's flex dispatcher (megatron/core/transformer/moe/fused_a2a.py) calls the v1 API
# (`deep_ep.Buffer(group, num_nvl_bytes, num_rdma_bytes)`, `get_dispatch_layout`, `dispatch`,
# `combine`, `Buffer.set_num_sms`), and v1's setup.py builds the intranode kernels alone
# (-DDISABLE_NVSHMEM) and links no NCCL of its own (it uses torch's process group). EPv2
# (HEAD) always builds NVSHMEM + NCCL (>= 2.30.4) backends: not possible offline unless those
# wheels are already installed. v1's setup.py switches NVSHMEM on as soon as the Python module
# `nvidia.nvshmem` imports (torch's CUDA wheels pull in nvidia-nvshmem-cu13), so this script
# patches it to honour DEEPEP_INTRANODE_ONLY=1 (the default here).
#
# From the repository root:
#
#   bash benchmarks/deepep/build_on_gpu.sh            # build (~4-6 min with 32 cores) + test
#   PARTS=build bash benchmarks/deepep/build_on_gpu.sh  # build only; PARTS=test: test only
#   bash benchmarks/deepep/build_on_gpu.sh --check    # CPU: unpack + patch + print the plan
#   export PYTHONPATH=$PWD/.deepep/site${PYTHONPATH:+:$PYTHONPATH}   # then deep_ep imports
#
# A second run reuses .deepep/site (DEEPEP_REBUILD=1 rebuilds). Logs go to $OUT (default
# .deepep/logs): deepep_build.log, deepep_test.log. Exit status: non-zero if the build, the
# import or the test failed.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
SESSION=deepep_build
OUT="${OUT:-$PWD/.deepep/logs}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
# DeepEP's intranode test needs no NVLink SHARP (multicast): keep NCCL and torch off it.
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
export TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
status=0

log() { echo "[$SESSION +$(( $(date +%s) - T0 ))s] $*" | tee -a "$OUT/$SESSION.log"; }

# GPUs, torch/CUDA and the versions of the given distributions, into the log.
versions() {
  log "GPUs: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader \
    2>&1 | tr '\n' ' ')"
  "$PY" - "$@" <<'PY' 2>&1 | tee -a "$OUT/$SESSION.log"
import importlib.metadata as md, sys, torch
def v(d):
    try:
        return md.version(d)
    except md.PackageNotFoundError:
        return "MISSING"
print("torch", torch.__version__, "cuda", torch.version.cuda)
for d in sys.argv[1:]:
    print(d, v(d))
PY
}

# run_part NAME TIMEOUT_S LOG_FILE CMD...: CMD under a timeout, output to $OUT/LOG_FILE; a
# failure sets status=1.
run_part() {
  local name=$1 limit=$2 file=$3; shift 3
  local t=$(date +%s)
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$file"
  local rc=${PIPESTATUS[0]}
  [ "$rc" -ne 0 ] && status=1
  log "$name: exit $rc after $(( $(date +%s) - t )) s"
}

TARBALL="${DEEPEP_TARBALL:-$(ls .deepep/DeepEP-*.tar.gz 2>/dev/null | head -1)}"
SRC="${DEEPEP_SRC:-/tmp/deepep_src}"
SITE="$PWD/.deepep/site"
PARTS="${PARTS:-build test}"
CHECK=0
[ "${1:-}" = "--check" ] && CHECK=1

if [ -z "$TARBALL" ] || [ ! -f "$TARBALL" ]; then
  log "no DeepEP tarball under .deepep/ (see this script's header for how to make one)"
  exit 2
fi

unpack_and_patch() {
  rm -rf "$SRC" && mkdir -p "$SRC"
  tar -xzf "$TARBALL" -C "$SRC" --strip-components=1 || return 1
  # Intranode only (DEEPEP_INTRANODE_ONLY=1, the default), three edits of v1's setup.py:
  # 1. no NVSHMEM even when nvidia.nvshmem imports;
  # 2. no -rdc=true: v1 adds the nvcc device-link step only with NVSHMEM, so relocatable objects
  #    leave __cudaRegisterLinkedBinary_* undefined at import (DeepEP issue #429); the three
  #    kernel files compile without it (no cross-file device code; checked with CUDA 13.0);
  # 3. "-lcuda" (deep_ep.cpp calls the driver's cuMem* API) from where this machine has it: the
  #    toolkit's stub, else the driver's libcuda.so.1 by path (often no unversioned libcuda.so).
  "$PY" - "$SRC/setup.py" <<'PY'
import sys
path = sys.argv[1]
src = open(path).read()
edits = [
    ("    if not disable_nvshmem:\n        assert os.path.exists(nvshmem_dir)",
     "    if os.getenv('DEEPEP_INTRANODE_ONLY', '1') == '1':\n"
     "        disable_nvshmem, nvshmem_dir = True, None\n"),
    ("    # Put them together\n",
     "    if os.getenv('DEEPEP_INTRANODE_ONLY', '1') == '1':\n"
     "        nvcc_flags[:] = [f for f in nvcc_flags if f != '-rdc=true']\n"
     "        extra_link_args[:] = [a for a in extra_link_args if a != '-lcuda'] + \\\n"
     "            os.getenv('DEEPEP_LIBCUDA', '-lcuda').split()\n\n"),
]
for anchor, patch in edits:
    if anchor not in src:
        sys.exit(f"setup.py: {anchor.strip()!r} not found (not a DeepEP v1 tree?)")
    src = src.replace(anchor, patch + anchor, 1)
open(path, "w").write(src)
print("patched setup.py: DEEPEP_INTRANODE_ONLY (no NVSHMEM, no -rdc, libcuda linked)")
PY
}

# The driver library to link: the toolkit's stub, else the driver's own libcuda.so.1.
find_libcuda() {
  local stub
  stub=$(find "$CUDA_HOME" -path '*stubs*' -name 'libcuda.so' 2>/dev/null | head -1)
  if [ -n "$stub" ]; then echo "-L$(dirname "$stub") -lcuda"; return; fi
  stub=$(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 / {print $NF; exit}')
  echo "${stub:--lcuda}"
}

if [ "$CHECK" = 1 ]; then
  CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}"
  unpack_and_patch || exit 1
  log "check: libcuda link argument: $(find_libcuda)"
  log "check: sources in $SRC from $TARBALL; nvcc: $(command -v nvcc || echo none); the"
  log "build would run: (cd $SRC && TORCH_CUDA_ARCH_LIST=9.0 DEEPEP_INTRANODE_ONLY=1" \
      "$PY -m pip install --no-build-isolation --no-deps --no-index --target $SITE .)"
  grep -n -A2 "DEEPEP_INTRANODE_ONLY" "$SRC/setup.py" | tee -a "$OUT/$SESSION.log"
  # setup.py itself up to its build summary (needs torch; no nvcc run, no GPU):
  (cd "$SRC" && DEEPEP_LIBCUDA="$(find_libcuda)" "$PY" setup.py --name 2>&1 | grep -A8 "Build summary" \
    | tee -a "$OUT/$SESSION.log")
  exit 0
fi

versions torch nvidia-nccl-cu13 nvidia-nvshmem-cu13 setuptools
export TORCH_CUDA_ARCH_LIST=9.0 DEEPEP_INTRANODE_ONLY=1 DISABLE_SM90_FEATURES=0
export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)")")}"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# torch's CUDA headers include cusparse.h/cublas.h etc.: take them from the pip CUDA wheels when
# the toolkit lacks them (on the CPU machine the kernels compiled, deep_ep.cpp stopped there).
for inc in $("$PY" -c "import glob, site; print(' '.join(glob.glob(site.getsitepackages()[0] \
    + '/nvidia/*/include')))" 2>/dev/null); do CPATH="${CPATH:+$CPATH:}$inc"; done
# CUDA 13 keeps CCCL (cuda/std/...) under include/cccl (DeepEP issue #568).
CPATH="${CPATH:+$CPATH:}$CUDA_HOME/include/cccl"
export CPATH
export DEEPEP_LIBCUDA="${DEEPEP_LIBCUDA:-$(find_libcuda)}"

if [[ " $PARTS " == *" build "* ]]; then
  if "$PY" -c "import deep_ep" 2>/dev/null && [ -z "${DEEPEP_REBUILD:-}" ]; then
    log "deep_ep already importable from $("$PY" -c 'import deep_ep; print(deep_ep.__file__)'); skip build"
  else
    unpack_and_patch || { log "unpack/patch failed"; exit 1; }
    log "building DeepEP ($TARBALL, nvcc $(nvcc --version | tail -1), MAX_JOBS=$MAX_JOBS)"
    rm -rf "$SITE" && mkdir -p "$SITE"
    # pip --target installs the package and the deep_ep_cpp extension side by side.
    # Fallback: setup.py build, then copy the build tree (if this pip cannot build offline).
    run_part "deepep build" 540 deepep_build.log bash -c "cd '$SRC' && { '$PY' -m pip install \
      --no-build-isolation --no-deps --no-index --target '$SITE' -v . || { '$PY' setup.py build \
      && cp -r build/lib.*/* '$SITE'/; }; }"
  fi
  run_part "deepep import" 60 deepep_import.log "$PY" -c \
    "import deep_ep, deep_ep_cpp; print('deep_ep', deep_ep.__file__, deep_ep_cpp.__file__)"
fi

if [[ " $PARTS " == *" test "* ]]; then
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
  if [ "$NGPU" -lt 2 ]; then
    log "DeepEP intranode test needs 2 GPUs, found $NGPU"; exit 1
  fi
  [ -d "$SRC/tests" ] || unpack_and_patch
  # DeepEP's own test: dispatch/combine correctness (BF16 and FP8, with/without top-k) and
  # its tuning sweep, at V3 sizes (hidden 7168, top-8, 256 experts), 4096 tokens per rank.
  log "DeepEP tests/test_intranode.py --num-processes 2"
  run_part "deepep intranode test" 420 deepep_test.log bash -c \
    "cd '$SRC/tests' && MASTER_PORT=\${MASTER_PORT:-8361} '$PY' test_intranode.py --num-processes 2"
fi
log "done: exit $status"
exit $status
