"""The command line: recipe errors are one-line messages with exit status 2; --help works."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_dualpipe import cli

ROOT = Path(__file__).resolve().parent.parent
TINY = "recipes/tiny_moe_cpu.yaml"
PREFIX = "megatron-dualpipe train: error: "


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    return subprocess.run(
        [sys.executable, "-m", "megatron_dualpipe", *args], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL, check=False,
    )


def test_bad_recipe_exits_2_with_one_line_and_no_traceback():
    # A real process, as a user runs it: nothing is trained, nothing is spawned.
    proc = run_cli("train", TINY, "--set", "model.hiden_size=128")
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = [line for line in proc.stderr.splitlines() if line.startswith("megatron-dualpipe")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(PREFIX)
    assert "model.hiden_size: unknown field; allowed fields:" in errors[0]
    assert "hidden_size" in errors[0]


@pytest.mark.parametrize("args, expected", [
    ([TINY, "--set", "parallel.schedule=foo"],
     "parallel.schedule: Input should be"),
    ([TINY, "--set", "model.num_layers=5"],
     "model.num_layers=5 must split evenly into 2 pipeline stages"),
    ([TINY, "--set", "moe.num_experts=7"],
     "moe.num_experts = 7 is not divisible by parallel.ep=2"),
    ([TINY, "--set", "train.global_batch_size=6"],
     "train.global_batch_size=6 must be a multiple of"),
    ([TINY, "--set", "modle.x=1"], "--set modle.x: 'modle' is not a section"),
    ([TINY, "--set", "pp"], "--set 'pp': expected KEY=VALUE"),
    (["recipes/does_not_exist.yaml"], "recipe file not found: recipes/does_not_exist.yaml"),
    ([TINY, "--nproc-per-node", "3"], "world size 3"),
])
def test_train_errors(capsys, monkeypatch, args, expected):
    monkeypatch.chdir(ROOT)
    assert cli.main(["train", *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX) and expected in lines[0], err


def test_several_field_errors_are_listed_under_one_error_line(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.main(["train", TINY, "--set", "model.num_layers=abc",
                     "--set", "parallel.schedule=foo"]) == 2
    err = capsys.readouterr().err
    first, *rest = err.strip().splitlines()
    assert first == PREFIX + f"invalid recipe {TINY}:"
    assert [line.split(":")[0].strip() for line in rest] == [
        "model.num_layers", "parallel.schedule"]


@pytest.mark.parametrize("argv, expected", [
    ([], ["train", "simulate", "plan", "eplb"]),
    (["train"], ["recipe", "--set", "KEY=VALUE", "--nproc-per-node"]),
    (["simulate"], ["usage: megatron-dualpipe simulate"]),
    (["plan"], ["usage: megatron-dualpipe plan"]),
    (["eplb"], ["usage: megatron-dualpipe eplb", "plan"]),
    (["eplb", "plan"], ["usage: megatron-dualpipe eplb plan"]),
])
def test_help(capsys, argv, expected):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*argv, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for text in expected:
        assert text in out, out


def test_missing_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([])
    assert exit_.value.code == 2
    assert "usage: megatron-dualpipe" in capsys.readouterr().err


def test_only_user_errors_are_caught(capsys, monkeypatch):
    """A UserError is one line and exit 2; any other exception (a bug) keeps its traceback."""
    from megatron_dualpipe.errors import UserError

    def user_mistake(args):
        raise UserError("train.steps=0: must be >= 1")

    monkeypatch.setattr(cli, "_run_train", user_mistake)
    assert cli.main(["train", TINY]) == 2
    assert capsys.readouterr().err == f"{PREFIX}train.steps=0: must be >= 1\n"

    def bug(args):
        raise ValueError("an internal shape mismatch")

    monkeypatch.setattr(cli, "_run_train", bug)
    with pytest.raises(ValueError, match="internal shape mismatch"):
        cli.main(["train", TINY])


def test_train_rules_run_in_the_launcher_before_any_worker(capsys, monkeypatch):
    """A rule only `train` enforces (config/rules.py TRAIN_RULES) stops the launcher."""
    from megatron_dualpipe import launch

    def spawn(*args, **kwargs):
        raise AssertionError("no worker may start")

    monkeypatch.setattr(launch, "spawn_local", spawn)
    monkeypatch.setattr(launch, "in_launched_job", lambda: False)
    assert cli.main(["train", TINY, "--set", "optimizer.name=sgd",
                     "--set", "optimizer.moment_dtype=bf16"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(PREFIX + "optimizer.moment_dtype=bf16 needs optimizer.name=adam"), err
    assert err.count("\n") == 1
