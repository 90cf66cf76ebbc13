#!/usr/bin/env bash
# Install megatron_dualpipe and everything it needs, on a CPU dev machine or a GPU machine.
#
#   bash scripts/install.sh           # the package, Megatron-Core, PyTorch (if missing)
#   bash scripts/install.sh --test    # ... and the test tools (pytest, hypothesis, matplotlib)
#
# CPU machine (no usable CUDA; e.g. Python 3.11, which megatron-core 0.19 does not declare):
#   1. torch, only if it is not importable: pip install torch==2.13.0 (on this project's dev
#      machines that is a CPU wheel already on disk). It is installed first and on its own so
#      that nothing later can pull a CUDA build of torch in as a dependency.
#   2. numpy, packaging>=24.2, pyyaml, pydantic>=2, psutil, triton (megatron.core imports it),
#      tqdm and ijson (`trace`: progress bar, streamed JSON), tokenizers (`data prepare`;
#      none of them pulls in torch).
#   3. megatron-core>=0.19.2,<0.20 with --no-deps --ignore-requires-python.
#   4. this package, editable, with --no-deps.
#   Transformer Engine is never installed here: Megatron-Core switches to TE layers whenever
#   it can import it.
# GPU machine (torch sees CUDA and Python >= 3.12, e.g. an NGC PyTorch container with torch
# preinstalled): pip install -e ".[gpu]" (Transformer Engine), or ".[gpu,test]" with --test.
#
# Idempotent: whatever is already installed (at a suitable version) is skipped, so a second run
# takes seconds. Environment: PYTHON (default python3); TORCH_SPEC (default torch==2.13.0) for
# the CPU torch, e.g. on another machine preinstall a CPU build from PyTorch's CPU index.
# Options: --cpu / --gpu force the mode instead of detecting it.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
MEGATRON_SPEC="megatron-core>=0.19.2,<0.20"
CPU_DEPS=(numpy "packaging>=24.2" pyyaml "pydantic>=2" psutil triton tqdm ijson tokenizers)
TEST_DEPS=(pytest hypothesis matplotlib)

with_test=0
mode=auto
for arg in "$@"; do
  case "$arg" in
    --test) with_test=1 ;;
    --cpu) mode=cpu ;;
    --gpu) mode=gpu ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option '$arg' (use --test, --cpu, --gpu or --help)" >&2; exit 2 ;;
  esac
done

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
T0=$SECONDS

say() { echo "[install] $*"; }
run() { say "\$ $*"; "$@"; }
pip_install() { run "$PYTHON" -m pip install "$@"; }

# Prints the requirements (one per argument) that the environment does not satisfy yet.
# "." stands for this package installed in editable mode from this checkout.
missing() {
  (cd / && "$PYTHON" - "$ROOT" "$@") <<'PY'
import json
import sys
from pathlib import Path

# Look at the installed distributions only, not at build leftovers of the checkout
# (e.g. megatron_dualpipe.egg-info beside setup.cfg).
root = Path(sys.argv[1]).resolve()
sys.path = [p for p in sys.path if p not in ("", ".") and Path(p).resolve() != root]
from importlib import metadata  # noqa: E402

try:
    from packaging.requirements import Requirement
except ImportError:  # a fresh interpreter: pip's own copy
    from pip._vendor.packaging.requirements import Requirement


def editable_here() -> bool:
    try:
        text = metadata.distribution("megatron-dualpipe").read_text("direct_url.json")
    except metadata.PackageNotFoundError:
        return False
    info = json.loads(text or "{}")
    url = info.get("url", "")
    return info.get("dir_info", {}).get("editable", False) and url == root.as_uri()


for spec in sys.argv[2:]:
    if spec == ".":
        ok = editable_here()
    else:
        req = Requirement(spec)
        try:
            version = metadata.version(req.name)
        except metadata.PackageNotFoundError:
            ok = False
        else:  # an installed pre-release (e.g. NGC's torch 2.x.0a0+nv) counts, as for pip
            ok = req.specifier.contains(version, prereleases=True)
    if not ok:
        print(spec)
PY
}

# Installs the given requirements that are missing, with the given pip options first:
#   ensure [pip options --] REQ...
ensure() {
  local opts=() reqs=() todo
  if [[ " $* " == *" -- "* ]]; then
    while [[ "$1" != "--" ]]; do opts+=("$1"); shift; done
    shift
  fi
  reqs=("$@")
  mapfile -t todo < <(missing "${reqs[@]}")
  if ((${#todo[@]} == 0)); then
    say "ok: ${reqs[*]/#./megatron-dualpipe (editable, this checkout)}"
    return
  fi
  pip_install "${opts[@]}" "${todo[@]}"
}

command -v "$PYTHON" >/dev/null || { echo "install.sh: PYTHON=$PYTHON not found" >&2; exit 1; }
py_version="$("$PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')"
"$PYTHON" -m pip --version >/dev/null 2>&1 || {
  echo "install.sh: $PYTHON has no pip (try: $PYTHON -m ensurepip)" >&2; exit 1; }

if [[ "$mode" == auto ]]; then
  mode=cpu
  if "$PYTHON" -c 'import sys, torch; sys.exit(not (torch.cuda.is_available() and sys.version_info >= (3, 12)))' \
      >/dev/null 2>&1; then
    mode=gpu
  fi
fi
say "python $py_version ($("$PYTHON" -c 'import sys; print(sys.executable)')), mode: $mode$( ((with_test)) && echo ', with test tools')"

# The editable install builds with the setuptools already here when it can (no download, and
# it works offline); otherwise pip fetches one into an isolated build environment.
build_opts=()
if [[ -z "$(missing "setuptools>=70.1")" || -z "$(missing "setuptools>=64" wheel)" ]]; then
  build_opts=(--no-build-isolation)
fi

if [[ "$mode" == gpu ]]; then
  extras="gpu"
  ((with_test)) && extras="gpu,test"
  deps=("$MEGATRON_SPEC" "torch>=2.6" pyyaml "pydantic>=2" numpy packaging psutil tqdm ijson
        tokenizers "transformer-engine>=2.6" .)
  ((with_test)) && deps+=("${TEST_DEPS[@]}")
  if [[ -z "$(missing "${deps[@]}")" ]]; then
    say "ok: megatron-dualpipe[$extras] (editable) and its requirements"
  else
    pip_install "${build_opts[@]}" -e ".[$extras]"
  fi
else
  # 1. torch first, alone: a CPU build.
  torch_probe='import torch; print(torch.__version__, torch.version.cuda or "cpu")'
  if torch_info="$("$PYTHON" -c "$torch_probe" 2>/dev/null)"; then
    say "ok: torch ${torch_info% *} (already importable; not reinstalled)"
  else
    pip_install "$TORCH_SPEC"
    torch_info="$("$PYTHON" -c "$torch_probe")"
  fi
  if [[ "${torch_info##* }" != cpu ]]; then
    say "note: torch ${torch_info% *} is a CUDA ${torch_info##* } build, but CUDA is unusable here"
    say "      (or Python < 3.12): installing for the CPU"
  fi
  # 2. Megatron-Core's and our runtime dependencies (torch is satisfied by now).
  ensure "${CPU_DEPS[@]}"
  # 3. Megatron-Core itself: its metadata asks for Python >= 3.12 and pulls torch; neither
  #    applies here.
  ensure --no-deps --ignore-requires-python -- "$MEGATRON_SPEC"
  # 4. This package, editable.
  ensure --no-deps "${build_opts[@]}" -e -- .
  if ((with_test)); then
    ensure "${TEST_DEPS[@]}"
  fi
  if "$PYTHON" -c 'import transformer_engine' >/dev/null 2>&1; then
    say "warning: transformer_engine is installed; on a CPU machine Megatron-Core would use its"
    say "         kernels. Remove it: $PYTHON -m pip uninstall transformer-engine transformer-engine-torch"
  fi
fi

# Import what training imports (megatron.core pulls in triton), from outside the checkout so
# that the installed package is what gets imported.
say "checking imports"
if ! report="$(cd / && PYTHONWARNINGS=ignore "$PYTHON" - 2>&1 <<'PY'
import torch
import megatron.core
from megatron.core import package_info
import megatron_dualpipe
print(f"[install] torch {torch.__version__} (CUDA available: {torch.cuda.is_available()}), "
      f"megatron-core {package_info.__version__}, "
      f"megatron_dualpipe {megatron_dualpipe.__version__} ({megatron_dualpipe.__path__[0]})")
PY
)"; then
  echo "$report" >&2
  echo "install.sh: importing torch, megatron.core or megatron_dualpipe failed (above)" >&2
  exit 1
fi
grep '^\[install\]' <<<"$report"
say "done in $((SECONDS - T0)) s"
