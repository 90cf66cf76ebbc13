"""``eplb plan`` command line: outputs, migration, dispatcher contract, one-line errors."""

import argparse
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_dualpipe.eplb import cli, rebalance_experts, report

REPO = Path(__file__).resolve().parents[1]
SHAPE_ARGS = ["--replicas", "48", "--groups", "4", "--nodes", "2", "--gpus", "8"]


@pytest.fixture
def load_file(tmp_path):
    path = tmp_path / "load.npy"
    np.save(path, np.random.default_rng(0).lognormal(0, 1, (4, 32)))
    return path


def plan_args(load, *extra):
    return ["plan", "--load", str(load), *SHAPE_ARGS, *extra]


def test_plan_writes_tensors_and_metadata(load_file, tmp_path, capsys):
    out = tmp_path / "plan.pt"
    assert cli.main(plan_args(load_file, "--out", str(out))) == 0
    saved = torch.load(out, weights_only=True)
    weight = np.load(load_file)
    expected = rebalance_experts(weight, 48, 4, 2, 8)
    for key, tensor in zip(("phy2log", "log2phy", "logcnt"), expected):
        assert torch.equal(saved[key], tensor)
    after = report(weight, saved["phy2log"], 8, 2).mean_balancedness
    assert saved["meta"]["policy"] == "hierarchical"
    assert saved["meta"]["balancedness_after"] == pytest.approx(after)
    text = capsys.readouterr().out
    assert "balancedness before:" in text
    assert f"balancedness after:  {after:.4f}" in text


def test_plan_accepts_pt_load_and_current_plan(load_file, tmp_path, capsys):
    weight = torch.from_numpy(np.load(load_file))
    pt_load = tmp_path / "load.pt"
    torch.save({"weight": weight}, pt_load)
    first = tmp_path / "first.pt"
    assert cli.main(plan_args(pt_load, "--out", str(first))) == 0
    drifted = tmp_path / "drifted.pt"
    torch.save(weight * 1.05, drifted)
    second = tmp_path / "second.pt"
    args = plan_args(drifted, "--current", str(first), "--out", str(second),
                     "--expert-bytes", "100")
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "slots moved:" in text and "(current plan)" in text
    meta = torch.load(second, weights_only=True)["meta"]
    assert meta["bytes_moved"] == 100 * meta["slots_moved"]


def test_default_output_path(load_file, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.main(plan_args(load_file)) == 0
    assert (tmp_path / "eplb_plan.pt").is_file()


@pytest.mark.parametrize("extra,word", [
    (["--replicas", "47"], "num_replicas"),
    (["--groups", "3", "--policy", "hierarchical"], "num_groups"),
    (["--mode", "compat", "--current", "{load}"], "current"),
])
def test_bad_shapes_give_one_line_error(load_file, tmp_path, capsys, extra, word):
    extra = [e.replace("{load}", str(load_file)) for e in extra]
    assert cli.main(plan_args(load_file, "--out", str(tmp_path / "x.pt"), *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error:") and word in err
    assert "Traceback" not in err


@pytest.mark.parametrize("name,content,word", [
    ("missing.npy", None, "not found"),
    ("load.txt", b"1 2 3", ".pt or .npy"),
    ("broken.pt", b"not a checkpoint", "cannot read"),
    ("broken.npy", b"not numpy", "cannot read"),
])
def test_bad_files_give_one_line_error(tmp_path, capsys, name, content, word):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert cli.main(plan_args(path, "--out", str(tmp_path / "x.pt"))) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and word in err


def test_argument_errors_exit_2_in_one_line(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["plan", "--load", "x.npy", "--replicas", "many"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--replicas" in err


def test_png_without_matplotlib_says_how_to_install(load_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    args = plan_args(load_file, "--out", str(tmp_path / "p.pt"), "--png", str(tmp_path / "a.png"))
    assert cli.main(args) == 2
    assert "pip install matplotlib" in capsys.readouterr().err
    assert not (tmp_path / "p.pt").exists()


def test_png_is_drawn(load_file, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "loads.png"
    assert cli.main(plan_args(load_file, "--out", str(tmp_path / "p.pt"), "--png", str(png))) == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_dispatcher_contract(load_file, tmp_path):
    """What the top-level ``python -m megatron_dualpipe`` does with this module."""
    parser = argparse.ArgumentParser(prog="megatron_dualpipe")
    subparsers = parser.add_subparsers(dest="command")
    cli.add_arguments(subparsers.add_parser("eplb", help="expert load balancer"))
    args = parser.parse_args(["eplb", *plan_args(load_file, "--out", str(tmp_path / "p.pt"))])
    assert cli.run(args) == 0
    assert (tmp_path / "p.pt").is_file()


def test_module_entry_point(load_file, tmp_path):
    out = tmp_path / "p.pt"
    result = subprocess.run(
        [sys.executable, "-m", "megatron_dualpipe.eplb.cli",
         *plan_args(load_file, "--out", str(out), "--policy", "global")],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "policy=global" in result.stdout and out.is_file()
