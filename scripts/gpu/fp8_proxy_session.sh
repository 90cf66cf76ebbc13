#!/usr/bin/env bash
# FP8 whole-proxy session on one Hopper GPU, after Transformer Engine + megatron-core are
# installed. Two parts, one GPU call each (each fits the 10-minute limit), logs under $OUT:
#   PART=a  python -m pytest -q -s -m gpu tests/test_te_wgrad_gpu.py tests/test_gpu_training.py
#           tests/test_fp8_gpu.py (TE W split under the DDP hook; DualPipeV vs 1F1B in FP8;
#           fused vs unfused kernels; blockwise FP8 within 0.25% of BF16 over 200 steps)
#   PART=probe  scripts/gpu/train_probe.py: DualPipeV pp=1 variants vs 1F1B (losses, non-finite
#           gradients after step 0), the diagnosis of the NaN fixed in schedules/te_wgrad.py
#   PART=b  benchmarks/fp8_bench.py --parts proxy: kernel fusions, BF16 moments, current scaling
#   PART=c  benchmarks/fp8_bench.py --parts proxy: MLA attention, 16 micro-batches per step
#           (with fusions and BF16 moments)
#   Each bench run writes $OUT/proxy_<part>.json (docs untouched); render the section with
#     python benchmarks/fp8_bench.py --from-json <gemm run>.json proxy_b.json proxy_c.json
#
#   PART=a OUT=/path/to/out bash scripts/gpu/fp8_proxy_session.sh
#
# Expected on one H200: part a ~6 min (9 training runs x (build ~10 s + 50 steps), then 2 x 200
# steps), probe ~2 min, parts b and c ~5 min each (5 proxy workers of 45-70 s).
SESSION=fp8_proxy_session_${PART:-a}
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
versions transformer-engine megatron-core pytest
BENCH=("$PY" benchmarks/fp8_bench.py --parts proxy --no-write --worker-timeout-s 150)

case "${PART:-a}" in
  a)
    log "pytest TE W split, DualPipeV/fusion training, FP8 accuracy (expected ~6 min)"
    run_part pytest 560 gpu_training_pytest.log env MDP_GPU_TRAIN_STEPS=50 \
      MDP_FP8_TEST_OUT="$OUT/fp8_losses.json" "$PY" -m pytest -q -s -rsx -m gpu \
      -p no:cacheprovider tests/test_te_wgrad_gpu.py tests/test_gpu_training.py \
      tests/test_fp8_gpu.py
    ;;
  probe)
    log "train_probe: DualPipeV pp=1 variants vs 1F1B, BF16 (expected ~2 min)"
    run_part probe 240 train_probe.log "$PY" scripts/gpu/train_probe.py --steps 4 \
      --set fp8.recipe=none --variant "1f1b=" --variant "dv=parallel.schedule=dualpipev" \
      --variant "dv_nozb=parallel.schedule=dualpipev;parallel.zero_bubble=false" \
      --variant "dv_noov=parallel.schedule=dualpipev;parallel.overlap_fb=false" \
      --variant "dv_nogg=parallel.schedule=dualpipev;moe.grouped_gemm=false" \
      --variant "dv_fp32=parallel.schedule=dualpipev;model.dtype=fp32"
    ;;
  b)
    log "fp8_bench proxy b: kernel fusions, BF16 Adam moments, current scaling (~5 min)"
    run_part proxy_b 540 proxy_b.log "${BENCH[@]}" --json "$OUT/proxy_b.json" \
      --proxy-variants "bf16+fusions,blockwise+fusions,current+fusions,bf16+fusions+bf16moments,\
blockwise+fusions+bf16moments"
    ;;
  c)
    log "fp8_bench proxy c: MLA attention, 16 micro-batches per step (~5 min)"
    run_part proxy_c 540 proxy_c.log "${BENCH[@]}" --json "$OUT/proxy_c.json" \
      --proxy-variants "bf16+mla+fusions+bf16moments,blockwise+mla+fusions+bf16moments,\
blockwise+mla+fusions+bf16moments+bf16mla,bf16+fusions+bf16moments+gbs16,\
blockwise+fusions+bf16moments+gbs16"
    ;;
  *) log "PART must be a, probe, b or c"; status=2 ;;
esac
log "done: exit $status; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
