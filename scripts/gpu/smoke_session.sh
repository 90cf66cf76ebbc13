#!/usr/bin/env bash
# GPU smoke runs for the foundation, the proxies and the DualPipe schedules (2 GPUs).
# Run on the GPU machine from the repo root after Transformer Engine and megatron-core are
# installed (scripts in ../shared/device). Logs go to $OUT (or ./runs/gpu_smoke).
set -uo pipefail
OUT=${OUT:-runs/gpu_smoke}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 CUDA_DEVICE_MAX_CONNECTIONS=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1
# RUNS="name name ..." runs only those (default: all).
T() { local name=$1; shift; local t0=$(date +%s)
      [[ -z "${RUNS:-}" || " $RUNS " == *" $name "* ]] || return 0
      echo "=== $name: $*"; timeout "${RUN_TIMEOUT:-300}" "$@" 2>&1 | grep --line-buffered -v -i "warn" | tee "$OUT/$name.log" | grep -E "^step|error|Error|megatron_dualpipe\]" | tail -40
      echo "=== $name: exit ${PIPESTATUS[0]} in $(( $(date +%s) - t0 )) s"; }
nvidia-smi -L
python3 -c "import torch, transformer_engine, megatron.core as m; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'mcore', m.__version__, 'gpus', torch.cuda.device_count())"
TRAIN="python3 -m megatron_dualpipe train"
# Issue 2: the tiny GPU recipe (1 GPU, BF16, TE specs).
T tiny_gpu $TRAIN recipes/tiny_moe_gpu.yaml --set train.steps=60 --set train.log_dir=$OUT/tiny_gpu
# Issue 8: the proxies, BF16 and blockwise FP8 (1 GPU), EP=2 (2 GPUs).
T proxy1_bf16 $TRAIN recipes/deepseek_v3_proxy_1gpu.yaml --set train.steps=20 --set fp8.recipe=none --set train.log_dir=$OUT/proxy1_bf16
T proxy1_fp8 $TRAIN recipes/deepseek_v3_proxy_1gpu.yaml --set train.steps=20 --set train.log_dir=$OUT/proxy1_fp8
T proxy2_ep2 $TRAIN recipes/deepseek_v3_proxy_2gpu.yaml --set train.steps=20 --set train.log_dir=$OUT/proxy2_ep2
# Issue 3 on GPU: DualPipeV and DualPipe (PP=2) vs 1F1B (PP=2), same model and data, BF16.
SMALL="--set model.num_layers=8 --set parallel.ep=1 --set parallel.pp=2 --set parallel.nproc_per_node=2 --set fp8.recipe=none --set model.mtp_num_layers=0 --set train.steps=12"
T pp2_1f1b $TRAIN recipes/deepseek_v3_proxy_2gpu.yaml $SMALL --set parallel.schedule=1f1b --set train.log_dir=$OUT/pp2_1f1b
T pp2_dualpipev $TRAIN recipes/deepseek_v3_proxy_2gpu.yaml $SMALL --set parallel.schedule=dualpipev --set train.log_dir=$OUT/pp2_dualpipev
T pp2_dualpipe $TRAIN recipes/deepseek_v3_proxy_2gpu.yaml $SMALL --set parallel.schedule=dualpipe --set train.log_dir=$OUT/pp2_dualpipe
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
runs = {}
for d in sorted(out.iterdir()):
    f = d / "metrics.jsonl"
    if f.exists():
        recs = [json.loads(l) for l in f.read_text().splitlines()]
        runs[d.name] = recs
        tail = recs[len(recs) // 2:]
        print(f"{d.name:16s} steps {len(recs):3d} loss {recs[0]['loss']:.4f} -> {recs[-1]['loss']:.4f}"
              f"  tokens/s (2nd half) {sum(r['tokens_per_s'] for r in tail) / len(tail):,.0f}"
              f"  step {sum(r['step_time_s'] for r in tail) / len(tail):.3f} s")
ref = runs.get("pp2_1f1b")
for name in ("pp2_dualpipev", "pp2_dualpipe"):
    if ref and name in runs:
        rel = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(runs[name], ref))
        print(f"{name} vs pp2_1f1b: max relative loss difference {rel:.2e} over {len(ref)} steps")
PY
