"""Megatron-Core's per-layer CUDA graphs (`model.cuda_graphs`, docs/fp8.md): the RNG tracker
they need at the start of a run, and their end with the run.

Megatron keeps its graphs, their capture order and its RNG tracker in process-global state, so
a second model in the same process (the in-process test and benchmark runs) could not capture
its own until the first model's graphs are dropped.
"""

from __future__ import annotations


def seed_rng(seed: int, graphs: bool) -> None:
    """Megatron's model-parallel RNG states for a run. CUDA graphs capture the RNG too:
    Megatron's CudaGraphManager takes only a graph-safe tracker, and TE's attention under
    capture only TE's (Megatron's TECudaRNGStatesTracker, graph-safe), so a graphed run seeds
    that one (`use_te_rng_tracker`, which Megatron's docs say graphs need). Megatron creates
    its tracker once per process, so a graphed run replaces the plain tracker of an earlier
    run in the same process; a graph-safe tracker also serves eager runs, which keep whatever
    exists."""
    from megatron.core import tensor_parallel

    from megatron_dualpipe.te import te_available

    tensor_parallel.model_parallel_cuda_manual_seed(
        seed, te_rng_tracker=graphs and te_available(), use_cudagraphable_rng=graphs,
        force_reset_rng=graphs)


def release_cuda_graphs(config) -> None:
    """Drop the graphs captured with `config` (a TransformerConfig with cuda_graph_impl local);
    nothing for other configs."""
    if getattr(config, "cuda_graph_impl", "none") != "local":
        return
    from megatron.core.transformer.cuda_graphs import delete_cuda_graphs

    delete_cuda_graphs()
