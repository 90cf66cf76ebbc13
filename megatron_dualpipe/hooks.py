"""`TrainHook`: how optional features (EPLB, profiling, metrics, tests' probes) join the
training loop.

The loop (`train.py`) and the checkpoint (`checkpoint.py`) call these methods on every hook in
`TrainState.hooks`, in order, and know nothing else about the features. `features.py` decides
which hooks a recipe needs: the model's (EPLB) at setup, the run's (profiler, metrics) when
`train` starts its loop. Every method is optional.
"""

from __future__ import annotations

from pathlib import Path


class TrainHook:
    """Extension points of the training loop and the checkpoint."""

    def on_build(self, state) -> None:
        """Model, optimizer and scheduler exist; checkpoint not yet loaded."""

    def on_step_begin(self, state, step: int) -> None:
        """A training step `step` starts (before its data and forward-backward)."""

    def on_grads_ready(self, state) -> None:
        """Gradients are final (after Megatron's finalize_model_grads), before the step."""

    def on_step_end(self, state, record: dict) -> None:
        """The optimizer stepped; may add keys to the step's metrics `record`."""

    def on_record(self, state, record: dict) -> None:
        """`train` completed the step's record (validation loss included): log it."""

    def on_train_end(self, state) -> None:
        """`train`'s loop ended (its last step or an early stop)."""

    def checkpoint_state_dict(self, state, sharded: dict) -> dict:
        """The sharded state dict dist-checkpointing saves and loads (may drop entries)."""
        return sharded

    def on_save(self, state, path: Path) -> None:
        """dist-checkpointing wrote `path`; save what `checkpoint_state_dict` dropped."""

    def load_state_dict(self, state, loaded: dict) -> bool:
        """Restore model and optimizer from `loaded` in place; False: the default load."""
        return False

    def on_load(self, state, path: Path) -> None:
        """Model, optimizer and Adam steps are restored from `path`."""
