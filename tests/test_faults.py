"""Faults as a user meets them, driven through the command line a user runs.

- kill -9 of the launcher leaves no worker process;
- Ctrl-C ends every rank with one line and no traceback;
- SIGTERM (Slurm preemption) checkpoints at the next step end, and the same command resumes
  bit-identically to an uninterrupted run; running it once more says the job is complete;
- corrupting any file of a real checkpoint is reported by that file's path.

The launcher is started in its own session so that a test can signal it as a terminal or Slurm
would; its workers run in their own process groups (see launch.py).
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from megatron_dualpipe import checkpoint_files as files

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4
TIMEOUT_S = 240


def train_command(run_dir: Path, *extra: str) -> list[str]:
    """tiny_moe_cpu as 2 data-parallel processes (the smallest multi-rank job)."""
    return [
        sys.executable, "-m", "megatron_dualpipe", "train", "recipes/tiny_moe_cpu.yaml",
        "--set", "parallel.pp=1", "--set", "parallel.ep=1", "--nproc-per-node", "2",
        "--set", f"train.steps={STEPS}",
        "--set", f"train.ckpt_dir={run_dir / 'ckpt'}",
        "--set", f"train.log_dir={run_dir / 'logs'}",
        *extra,
    ]


def start(run_dir: Path, name: str, *extra: str) -> tuple[subprocess.Popen, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / f"{name}.log"
    with log.open("w") as out:
        proc = subprocess.Popen(train_command(run_dir, *extra), cwd=ROOT, stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, env=_env())
    return proc, log


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]))


def finish(proc: subprocess.Popen, log: Path, expect_rc: int = 0) -> str:
    try:
        rc = proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        _kill_all(proc)
        pytest.fail(f"no exit within {TIMEOUT_S} s:\n{log.read_text()[-3000:]}")
    text = log.read_text()
    assert rc == expect_rc, f"exit status {rc}, expected {expect_rc}:\n{text[-3000:]}"
    return text


def _kill_all(proc: subprocess.Popen) -> None:
    """Test clean-up: the launcher and every process it started."""
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        family = []
    for p in [*family]:
        p.kill()
    if proc.poll() is None:
        proc.kill()
    proc.wait()


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "logs" / "metrics.jsonl"
    out = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # being written
            break
    return out


def wait_for_step(proc: subprocess.Popen, log: Path, run_dir: Path, step: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while not any(r["step"] >= step for r in records(run_dir)):
        if proc.poll() is not None or time.monotonic() > deadline:
            _kill_all(proc)
            pytest.fail(f"no step {step} (exit {proc.returncode}):\n{log.read_text()[-3000:]}")
        time.sleep(0.05)


def workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    return psutil.Process(proc.pid).children(recursive=True)


def assert_gone(procs: list[psutil.Process], within_s: float = 10.0) -> None:
    _gone, alive = psutil.wait_procs(procs, timeout=within_s)
    alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in alive:
        p.kill()
    assert not alive, f"worker processes still running: {[p.pid for p in alive]}"


def test_die_with_parent_kills_the_child_of_a_sigkilled_parent(tmp_path):
    """The kernel mechanism alone (no torch): a child that asked for PR_SET_PDEATHSIG dies
    with its SIGKILLed parent."""
    parent_code = textwrap.dedent("""
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c",
            "from megatron_dualpipe.lifetime import die_with_parent; import os, time; "
            "assert die_with_parent(os.getppid()); print('armed', flush=True); time.sleep(120)"],
            stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "armed"
        print(child.pid, flush=True)
        time.sleep(120)
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], stdout=subprocess.PIPE,
                              text=True, env=_env(), start_new_session=True)
    try:
        child = psutil.Process(int(parent.stdout.readline()))
        parent.kill()
        parent.wait()
        assert_gone([child], within_s=5.0)
    finally:
        _kill_all(parent)


@pytest.mark.slow
def test_kill_9_of_the_launcher_leaves_no_worker(tmp_path):
    proc, log = start(tmp_path, "run")
    try:
        wait_for_step(proc, log, tmp_path, 0)  # the workers are training
        workers = workers_of(proc)
        assert len(workers) == 2, workers
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert_gone(workers)
    finally:
        _kill_all(proc)


@pytest.mark.slow
def test_ctrl_c_ends_all_ranks_in_one_line(tmp_path):
    """Ctrl-C while the workers start (importing torch: where a KeyboardInterrupt would print
    a traceback per rank)."""
    proc, log = start(tmp_path, "run")
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while len(workers := workers_of(proc)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does: the foreground group
        text = finish(proc, log, expect_rc=130)
        assert_gone(workers)
    finally:
        _kill_all(proc)
    status = [line for line in text.splitlines() if line.startswith("[megatron_dualpipe] ")]
    assert len(status) <= 1 and "Traceback" not in text, text  # "starting 2 processes ..."
    assert [line for line in text.splitlines() if line not in status] == [
        "megatron-dualpipe train: interrupted (Ctrl-C); all ranks stopped"], text


@pytest.mark.slow
def test_sigterm_checkpoints_and_the_rerun_resumes_bit_identically(tmp_path):
    # The preempted run and the uninterrupted reference run at the same time.
    preempted, reference = tmp_path / "preempted", tmp_path / "reference"
    proc, log = start(preempted, "first")
    ref_proc, ref_log = start(reference, "reference")
    try:
        wait_for_step(proc, log, preempted, 0)
        proc.send_signal(signal.SIGTERM)  # as scancel / Slurm preemption
        first = finish(proc, log)
        finish(ref_proc, ref_log)
    finally:
        _kill_all(proc)
        _kill_all(ref_proc)
    stopped = [line for line in first.splitlines() if "SIGTERM: stopped after step" in line]
    assert len(stopped) == 1, first[-3000:]
    step = int(stopped[0].split("stopped after step ")[1].split()[0])
    assert 1 <= step < STEPS, stopped
    ckpt = preempted / "ckpt" / files.step_dir_name(step)
    assert f"checkpoint saved to {ckpt}; run the same command again to resume" in stopped[0]
    assert "Traceback" not in first
    assert [r["step"] for r in records(preempted)] == list(range(step))

    proc, log = start(preempted, "resumed")
    resumed = finish(proc, log)
    assert f"resuming at step {step}" in resumed and "Traceback" not in resumed
    got = [r["loss"] for r in records(preempted)]
    want = [r["loss"] for r in records(reference)]
    assert [r["step"] for r in records(preempted)] == list(range(STEPS))
    print(f"stopped after step {step}\nresumed:       {got}\nuninterrupted: {want}")
    assert got == want  # bit-identical: same data, deterministic kernels, exact state

    # Once more: the job is complete; no worker starts, nothing is rewritten.
    before = (preempted / "logs" / "metrics.jsonl").read_text()
    proc, log = start(preempted, "again")
    again = finish(proc, log)
    assert "already complete" in again and f"holds step {STEPS}" in again, again
    assert "resuming" not in again
    assert (preempted / "logs" / "metrics.jsonl").read_text() == before

    # Every file of the real checkpoint, damaged in turn, is named by path.
    final = preempted / "ckpt" / files.step_dir_name(STEPS)
    assert files.problems(final) == []
    names = files.files_of(final)
    assert {"train_state.pt", ".metadata"} <= set(names), names
    for name in [*names, files.MANIFEST]:
        path = final / name
        original = path.read_bytes()
        try:
            damaged = bytearray(original)
            damaged[len(damaged) // 2] ^= 0xFF
            path.write_bytes(bytes(damaged))
            found = files.problems(final)
            assert len(found) == 1 and str(path) in found[0], (name, found)
        finally:
            path.write_bytes(original)
    assert files.problems(final) == []
