"""Strict recipe files and command-line arguments: one message naming the file, field or
argument, exit status 2, no traceback."""

import pytest

from megatron_dualpipe.cli import main
from megatron_dualpipe.config import load_recipe
from megatron_dualpipe.config.load import parse_yaml


def error_line(capsys, argv) -> str:
    """Run the CLI in-process; it must exit 2 with exactly one error line."""
    try:
        rc = main(argv)
    except SystemExit as exit_:  # argparse
        rc = exit_.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if not line.startswith(("usage:", "  "))]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("text, message", [
    ("train:\n  steps: 3\n  steps: 4\n", "invalid YAML: duplicate key 'steps' (line 3, column 3)"),
    ("", "the file is empty"),
    ("# a comment only\n", "the file is empty"),
    ("- a\n- b\n", "top level must be a mapping, got list"),
    ("train: [\n", "invalid YAML: "),
])
def test_bad_recipe_files_are_named(tmp_path, capsys, text, message):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    line = error_line(capsys, ["plan", str(path)])
    assert line.startswith(f"megatron-dualpipe plan: error: recipe {path}: {message}"), line


def test_undecodable_bytes_are_named(tmp_path, capsys):
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    assert error_line(capsys, ["plan", str(path)]) == (
        f"megatron-dualpipe plan: error: recipe {path}: not UTF-8 text (byte 9: 0xe9)")


@pytest.mark.parametrize("override, message", [
    ("train.steps=true", "train.steps: expected an integer, got true"),
    ("train.steps=2.0", "train.steps: expected an integer, got 2.0"),
    ("moe.num_experts=1e12", "moe.num_experts: expected an integer, got 1000000000000.0"),
    ("optimizer.lr=yes", "optimizer.lr: expected a number, got true"),
    ("optimizer.lr='0.1'", "optimizer.lr: expected a number, got '0.1'"),
    ("train.resume=1", "train.resume: expected true or false, got 1"),
    ("model.hidden_size={}", "model.hidden_size: expected an integer, got {}"),
    ("data.path={a: 1}", "data.path: expected one of: a valid string, a valid list"),
    ("parallel.nproc_per_node=0", "parallel.nproc_per_node: Input should be greater than or "
                                  "equal to 1"),
])
def test_scalars_are_strict(capsys, override, message):
    line = error_line(capsys, ["train", "recipes/tiny_moe_cpu.yaml", "--set", override])
    assert line.startswith(
        "megatron-dualpipe train: error: invalid recipe recipes/tiny_moe_cpu.yaml: " + message
    ), line


def test_yaml_12_floats_and_plain_values():
    assert parse_yaml("a: 1e-4\nb: 3\nc: 2.5\nd: -1E+3\ne: 1_000\nf: 1e12") == {
        "a": 1e-4, "b": 3, "c": 2.5, "d": -1000.0, "e": 1000, "f": 1e12}
    assert load_recipe("recipes/tiny_moe_cpu.yaml", ["optimizer.lr=1e-4"]).optimizer.lr == 1e-4


@pytest.mark.parametrize("argv, message", [
    (["train", "recipes/tiny_moe_cpu.yaml", "--nproc-per-node", "0"],
     "train: error: argument --nproc-per-node: expected an integer >= 1, got 0"),
    (["plan", "recipes/tiny_moe_cpu.yaml", "--gpu-memory-gb", "-5"],
     "plan: error: argument --gpu-memory-gb: expected a number > 0, got -5"),
    (["plan", "recipes/tiny_moe_cpu.yaml", "--gpu-memory-gb", "nan"],
     "plan: error: argument --gpu-memory-gb: expected a finite number, got 'nan'"),
    (["simulate", "--schedule", "1f1b", "--pp", "2", "--microbatches", "4", "--f", "-1"],
     "simulate: error: argument --f: expected a number >= 0, got -1"),
    (["simulate", "--schedule", "1f1b", "--pp", "0", "--microbatches", "4"],
     "simulate: error: argument --pp: expected an integer >= 1, got 0"),
    (["simulate", "--schedule", "1f1b", "--pp", "2", "--microbatches", "4", "--png",
      "/no/such/dir/x.png"],
     "simulate: error: argument --png: cannot write /no/such/dir/x.png: directory /no/such/dir "
     "does not exist"),
    (["simulate", "--schedule", "dualpipev", "--pp", "64", "--microbatches", "100000"],
     "simulate: error: --pp 64 x --microbatches 100000 = 6,400,000 is above the limit of "
     "50,000"),
    (["eplb", "plan", "--load", "x.pt", "--replicas", "8", "--groups", "1", "--nodes", "1",
      "--gpus", "-2"], "eplb plan: error: argument --gpus: expected an integer >= 1, got -2"),
    (["eplb", "plan", "--load", "x.pt", "--replicas", "8", "--groups", "1", "--nodes", "1",
      "--gpus", "2", "--out", "/no/such/dir/plan.pt"],
     "eplb plan: error: argument --out: cannot write /no/such/dir/plan.pt: directory "
     "/no/such/dir does not exist"),
])
def test_subcommand_arguments(capsys, argv, message):
    line = error_line(capsys, argv)
    assert line.startswith("megatron-dualpipe " + message), line


def test_simulate_at_the_limit_runs(capsys):
    assert main(["simulate", "--schedule", "1f1b", "--pp", "2", "--microbatches", "25000",
                 "--json"]) == 0
    assert '"microbatches": 25000' in capsys.readouterr().out
