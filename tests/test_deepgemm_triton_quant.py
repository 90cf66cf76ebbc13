"""The Triton quantizer of the DeepGEMM experts (fp8/deepgemm/triton_quant.py) on CPU, in
Triton's interpreter (tests/triton_interpret_checks.py, run in a child process that enables
the interpreter before triton is imported): both operands' layouts and scales bit for bit the
torch path's (quantize.quantize_rows / quantize_k_major) for uneven, empty and reversed expert
groups, and the `triton` quantizer inside the experts' autograd function against the float64
reference. The tables and the input checks run here, in this process."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="needs the triton package")

TESTS = Path(__file__).resolve().parent
CHECKS = ["layout uneven-reversed", "layout natural", "layout empty",
          "layout uneven-reversed bf16-transpose", "layout natural bf16-transpose",
          "inside the expert gemm"]


@pytest.fixture(scope="module")
def interpreted():
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS),
                                          os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(TESTS / "triton_interpret_checks.py")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("check", CHECKS)
def test_in_the_interpreter(interpreted, check):
    assert interpreted.get(check) == "ok", interpreted.get(check)


def test_tables_place_each_tile_in_its_experts_transposed_block():
    from megatron_dualpipe.fp8.deepgemm.triton_quant import k_major_tables

    base, ld, sfrow = k_major_tables([256, 0, 128], [2, 0, 1], 512, "cpu")
    # order 2, 0, 1: expert 2 first (rows 0..127 of the flat operand), then expert 0
    assert base.tolist() == [128 * 512, 128 * 512 + 128, 0]
    assert ld.tolist() == [256, 256, 128] and sfrow.tolist() == [1, 2, 0]


def test_unaligned_groups_are_refused():
    from megatron_dualpipe.fp8.deepgemm.triton_quant import quantize_rows_k_major

    with pytest.raises(ValueError, match="multiples of 128"):
        quantize_rows_k_major(torch.zeros(200, 256).bfloat16(), [100, 100], [0, 1])
