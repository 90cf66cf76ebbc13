"""Megatron-Core's per-layer CUDA graphs (`model.cuda_graphs`, docs/fp8.md) end with the run.

Megatron keeps its graphs and their capture order in process-global state, so a second model in
the same process (the in-process test and benchmark runs) could not capture its own until the
first model's graphs are dropped.
"""

from __future__ import annotations


def release_cuda_graphs(config) -> None:
    """Drop the graphs captured with `config` (a TransformerConfig with cuda_graph_impl local);
    nothing for other configs."""
    if getattr(config, "cuda_graph_impl", "none") != "local":
        return
    from megatron.core.transformer.cuda_graphs import delete_cuda_graphs

    delete_cuda_graphs()
