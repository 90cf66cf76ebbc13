#!/bin/bash
# One torchrun per node for `python -m megatron_dualpipe train RECIPE`, called by train.sbatch.
#
#   launch.sh [options] RECIPE [--set KEY=VALUE ...]
#
# Options (all optional; inside a Slurm job they default to the allocation):
#   --dry-run            print the command each node would run and exit; needs no Slurm
#   --nodes N            nodes (default: SLURM_JOB_NUM_NODES, else 1)
#   --gpus-per-node G    processes per node (default: SLURM_GPUS_ON_NODE, else 8)
#   --master-addr HOST   rendezvous host (default: MASTER_ADDR, else the job's first node)
#   --master-port PORT   rendezvous port (default: MASTER_PORT, else 29500)
#   --exec-node          internal: run this node's command (what srun starts on every node)
#
# Every node runs
#   torchrun --nnodes=N --nproc-per-node=G --node-rank=<SLURM_NODEID> --master-addr=HOST
#            --master-port=PORT -m megatron_dualpipe train RECIPE [--set ...]
#            --set parallel.num_nodes=N --set parallel.nproc_per_node=G
# so global ranks are node-major (node i holds ranks i*G .. i*G+G-1), which is what Megatron's
# rank order expects: an expert-parallel group of 64 ranks is 8 whole nodes. The trailing
# --set pair comes from the allocation and wins over the recipe and earlier --set values.
#
# Environment knobs (exported to every rank; set them before sbatch to change them):
#   CUDA_DEVICE_MAX_CONNECTIONS=1   one hardware queue: kernels start in issue order, which
#                                   Megatron relies on to overlap TP/SP communication. With
#                                   TP=1 and DualPipe's all-to-all overlap a larger value
#                                   (e.g. 32) lets the compute and communication streams run
#                                   side by side; measure both.
#   NCCL_DEBUG=WARN                 INFO to debug NCCL topology/transport selection.
#   TORCH_NCCL_AVOID_RECORD_STREAMS=1  frees NCCL buffers promptly (less memory fragmentation).
#   PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True  less fragmentation for MoE's
#                                   variable-size buffers.
#   OMP_NUM_THREADS=8               CPU threads per rank.
#   MDP_DIST_TIMEOUT_MIN=10         torch.distributed timeout (minutes); raise for big jobs.
# Cluster-specific, not set here: NCCL_SOCKET_IFNAME (bootstrap interface), NCCL_IB_HCA (the
# InfiniBand HCAs to use), NCCL_IB_GID_INDEX (RoCE), NCCL_IB_TIMEOUT, NCCL_NVLS_ENABLE.
# Launcher knobs: TORCHRUN (default torchrun), PYTHON (default python, for the pre-flight
# plan), SRUN_ARGS (extra srun flags, e.g. container options), MDP_SKIP_PLAN=1 (skip the
# pre-flight `plan`), MDP_SRUN_GPUS=0 (do not pass --gpus-per-node to srun).
set -euo pipefail

die() { echo "launch.sh: error: $*" >&2; exit 2; }

dry_run=0
exec_node=0
nodes="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
gpus="${SLURM_GPUS_ON_NODE:-8}"
master_addr="${MASTER_ADDR:-}"
master_port="${MASTER_PORT:-29500}"

while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) dry_run=1; shift ;;
        --exec-node) exec_node=1; shift ;;
        --nodes) nodes="${2:?--nodes needs a value}"; shift 2 ;;
        --nodes=*) nodes="${1#*=}"; shift ;;
        --gpus-per-node) gpus="${2:?--gpus-per-node needs a value}"; shift 2 ;;
        --gpus-per-node=*) gpus="${1#*=}"; shift ;;
        --master-addr) master_addr="${2:?--master-addr needs a value}"; shift 2 ;;
        --master-addr=*) master_addr="${1#*=}"; shift ;;
        --master-port) master_port="${2:?--master-port needs a value}"; shift 2 ;;
        --master-port=*) master_port="${1#*=}"; shift ;;
        -h|--help) sed -n '2,40p' "${BASH_SOURCE[0]}"; exit 0 ;;
        --) shift; break ;;
        -*) die "unknown option $1 (options come before the recipe)" ;;
        *) break ;;
    esac
done
[[ $# -ge 1 ]] || die "usage: launch.sh [--dry-run] [--nodes N] RECIPE [--set KEY=VALUE ...]"
recipe="$1"; shift
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer (got '$nodes')"
[[ "$gpus" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer (got '$gpus')"

overrides=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --set) [[ $# -ge 2 ]] || die "--set needs KEY=VALUE"; overrides+=(--set "$2"); shift 2 ;;
        --set=*) overrides+=(--set "${1#*=}"); shift ;;
        *) die "unexpected argument '$1' (pass recipe changes as --set KEY=VALUE)" ;;
    esac
done

if [[ -z "$master_addr" ]]; then
    if [[ -n "${SLURM_JOB_NODELIST:-}" ]] && command -v scontrol >/dev/null; then
        # awk, not head: it reads all of scontrol's output (no SIGPIPE under pipefail)
        master_addr="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | awk 'NR == 1')"
    elif [[ "$nodes" -eq 1 ]]; then
        master_addr="127.0.0.1"
    else
        master_addr="$(hostname)"
    fi
fi

export CUDA_DEVICE_MAX_CONNECTIONS="${CUDA_DEVICE_MAX_CONNECTIONS:-1}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
export TORCH_NCCL_AVOID_RECORD_STREAMS="${TORCH_NCCL_AVOID_RECORD_STREAMS:-1}"
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"
export MDP_DIST_TIMEOUT_MIN="${MDP_DIST_TIMEOUT_MIN:-10}"
knobs=(CUDA_DEVICE_MAX_CONNECTIONS NCCL_DEBUG TORCH_NCCL_AVOID_RECORD_STREAMS
       PYTORCH_CUDA_ALLOC_CONF OMP_NUM_THREADS MDP_DIST_TIMEOUT_MIN)

# The command of node $1, one word per line of the array `cmd`.
node_command() {
    cmd=("${TORCHRUN:-torchrun}" "--nnodes=$nodes" "--nproc-per-node=$gpus" "--node-rank=$1"
         "--master-addr=$master_addr" "--master-port=$master_port"
         -m megatron_dualpipe train "$recipe" ${overrides[@]+"${overrides[@]}"}
         --set "parallel.num_nodes=$nodes" --set "parallel.nproc_per_node=$gpus")
}

if [[ "$exec_node" -eq 1 ]]; then
    node_rank="${SLURM_NODEID:?--exec-node runs under srun (SLURM_NODEID is not set)}"
    node_command "$node_rank"
    # Slurm's SIGTERM (preemption, scancel) and --signal=USR1 reach every process of the step.
    # The workers catch both and checkpoint at the next step end (megatron_dualpipe/lifetime.py)
    # with no deadline but Slurm's KillWait. torchrun would die of USR1, and on SIGTERM would
    # SIGKILL the workers 30 s later, possibly mid-save: it ignores both (a disposition that
    # survives exec; the workers install their own handlers) and exits when the workers do.
    trap '' USR1 TERM
    export TORCHELASTIC_SIGNALS_TO_HANDLE="${TORCHELASTIC_SIGNALS_TO_HANDLE:-SIGINT,SIGHUP,SIGQUIT}"
    exec "${cmd[@]}"
fi

if [[ "$dry_run" -eq 1 ]]; then
    env_line=""
    for k in "${knobs[@]}"; do env_line+=" $k=${!k}"; done
    echo "# $nodes node(s) x $gpus GPU(s) = $((nodes * gpus)) ranks;" \
         "rendezvous $master_addr:$master_port"
    echo "# environment:$env_line"
    echo "# under Slurm: srun --nodes=$nodes --ntasks-per-node=1 launch.sh --exec-node ..."
    for ((i = 0; i < nodes; i++)); do
        node_command "$i"
        printf '%q ' "${cmd[@]}" | sed 's/ $//'
        echo
    done
    exit 0
fi

[[ -n "${SLURM_JOB_ID:-}" ]] || die "not inside a Slurm job: submit with sbatch, or use --dry-run"
if [[ "${MDP_SKIP_PLAN:-0}" != 1 ]]; then
    # Fail fast on the batch host: validates the recipe for this allocation, no GPU needed.
    "${PYTHON:-python}" -m megatron_dualpipe plan "$recipe" ${overrides[@]+"${overrides[@]}"} \
        --set "parallel.num_nodes=$nodes" --set "parallel.nproc_per_node=$gpus" >&2
fi
srun_args=(--nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1)
[[ -n "${SLURM_CPUS_ON_NODE:-}" ]] && srun_args+=(--cpus-per-task="$SLURM_CPUS_ON_NODE")
[[ "${MDP_SRUN_GPUS:-1}" != 0 ]] && srun_args+=(--gpus-per-node="$gpus")
# shellcheck disable=SC2086  # SRUN_ARGS is a list of flags
self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
exec srun "${srun_args[@]}" ${SRUN_ARGS:-} bash "$self" --exec-node \
    --nodes "$nodes" --gpus-per-node "$gpus" --master-addr "$master_addr" \
    --master-port "$master_port" "$recipe" ${overrides[@]+"${overrides[@]}"}
