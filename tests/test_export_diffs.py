"""The top-level patches/*.diff: generated from the runtime patches, apply to the installed
Megatron-Core, and the patched source behaves like the runtime patches."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dualpipe.patches.export_diffs import export_order, render_series

ROOT = Path(__file__).resolve().parent.parent
DIFFS = ROOT / "patches"


def _megatron_copy(tmp_path: Path) -> Path:
    import megatron.core

    source = Path(megatron.core.__file__).resolve().parent.parent
    shutil.copytree(source, tmp_path / "megatron",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return tmp_path


def test_committed_diffs_are_what_the_script_writes():
    series = render_series()
    assert sorted(p.name for p in DIFFS.glob("*.diff")) == sorted(series)
    for name, text in series.items():
        assert (DIFFS / name).read_text() == text, (
            f"patches/{name} is stale: run python -m megatron_dualpipe.patches.export_diffs "
            "patches/")
    order = export_order()
    assert order[0].condition == "feature" and {e.name for e in order} >= {
        "pad_routing_map", "deferred_wgrad_linear", "cuda_calls", "clip_grads"}


@pytest.mark.skipif(shutil.which("patch") is None, reason="needs the `patch` program")
def test_diffs_apply_cleanly_and_behave_like_the_runtime_patches(tmp_path):
    root = _megatron_copy(tmp_path)
    features = [f"{i:02d}-{e.name}.diff" for i, e in enumerate(export_order(), 1)
                if e.condition == "feature"]
    for name in features:  # each feature diff alone applies to the pristine release...
        run = subprocess.run(["patch", "-p1", "--dry-run", "-i", str(DIFFS / name)], cwd=root,
                             capture_output=True, text=True)
        assert run.returncode == 0, f"{name}: {run.stdout}{run.stderr}"
    for diff in sorted(DIFFS.glob("*.diff")):  # ... and the series, in order
        run = subprocess.run(["patch", "-p1", "--no-backup-if-mismatch", "-i", str(diff)],
                             cwd=root, capture_output=True, text=True)
        assert run.returncode == 0 and "FAILED" not in run.stdout, f"{diff.name}: {run.stdout}"
    # The patched copy, imported without the runtime patches, does what they do on CPU.
    check = r"""
import numpy, torch
from megatron.core.transformer.moe import token_dispatcher as td, router
from megatron.core.tensor_parallel import random as R
assert td.__file__.startswith(ROOT), td.__file__
assert isinstance(td.maybe_move_tensor_to_cpu(torch.tensor([1, 2]), as_numpy=True), numpy.ndarray)
routing_map = torch.rand(64, 8, generator=torch.Generator().manual_seed(0)) < 0.3
before = routing_map.clone()
padded = td.pad_routing_map(routing_map, 16)
assert torch.equal(routing_map, before) and (padded.sum(0) % 16 == 0).all()
assert router.torch.cuda.current_device() == torch.device("cpu")
assert torch.equal(R._get_cuda_rng_state(), torch.get_rng_state())
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
assert DistributedOptimizer.__init__.__code__.co_name == "_DistributedOptimizer___init__"
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron_dualpipe.patches.forward_backward_func import select
select(lambda: "ours")
assert get_forward_backward_func() == "ours"
print("ok")
"""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), str(ROOT)]),
               CUDA_VISIBLE_DEVICES="")
    run = subprocess.run([sys.executable, "-c", check.replace("ROOT", repr(str(root)))],
                         env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.strip().endswith("ok"), run.stderr[-3000:]
