"""Rules about this machine, run by `train` before any worker: data files (config/rules.py),
output directories (config/preflight.py) and memory (planning/fits.py)."""

import pytest

from megatron_dualpipe import launch
from megatron_dualpipe.cli import main
from megatron_dualpipe.config import load_recipe
from megatron_dualpipe.config import preflight as P
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.planning import fits as F
from megatron_dualpipe.planning import make_plan

TINY = "recipes/tiny_moe_cpu.yaml"


class Spawned(Exception):
    pass


@pytest.fixture
def no_workers(monkeypatch):
    def spawn(*_args, **_kwargs):
        raise Spawned

    monkeypatch.setattr(launch, "spawn_local", spawn)


def train_error(capsys, *overrides: str) -> str:
    argv = ["train", TINY, *(a for o in overrides for a in ("--set", o))]
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    return err[0].removeprefix("megatron-dualpipe train: error: ")


def test_missing_data_is_refused_before_any_worker(tmp_path, capsys, no_workers):
    prefix = tmp_path / "corpus_text_document"
    line = train_error(capsys, "data.kind=indexed", f"data.path={prefix}")
    assert line.startswith(f"data.path: {prefix}") and "not found" in line, line


def test_output_dirs_are_tried(tmp_path, capsys, no_workers):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert train_error(capsys, f"train.ckpt_dir={blocker}") == (
        f"train.ckpt_dir={blocker}: exists and is not a directory")
    assert train_error(capsys, f"train.log_dir={blocker / 'logs'}").startswith(
        f"train.log_dir={blocker / 'logs'}: cannot write there: ")
    with pytest.raises(Spawned):  # creatable: created, and nothing left behind but the dirs
        main(["train", TINY, "--set", f"train.log_dir={tmp_path / 'new' / 'logs'}"])
    assert list((tmp_path / "new" / "logs").iterdir()) == []


def test_memory_estimate_is_plans(monkeypatch):
    recipe = load_recipe("recipes/deepseek_v3_proxy_8gpu.yaml")
    ranks = F.estimate_gb(recipe)
    assert [round(r.total, 3) for r in ranks] == make_plan(recipe)["per_rank_memory_gb"]


def test_memory_estimate_with_very_many_microbatches_is_quick_and_the_same():
    recipe = load_recipe(TINY)  # 4 micro-batches per step: below the cap (pp x 5 = 10)
    many = load_recipe(TINY, ["train.global_batch_size=4000000000000000000"])
    assert [r.activations for r in F.estimate_gb(many)] == [
        r.activations for r in F.estimate_gb(load_recipe(TINY, ["train.global_batch_size=64"]))]
    assert F.estimate_gb(recipe)[0].activations <= F.estimate_gb(many)[0].activations


def test_memory_over_the_device_is_refused_with_the_biggest_items(monkeypatch, capsys,
                                                                  no_workers):
    monkeypatch.setattr(P, "device_memory_gb", lambda recipe: ("GPU", 80.0))
    line = train_error(capsys, "moe.num_experts=1000000", "moe.ffn_hidden_size=4096")
    worst = max(F.estimate_gb(load_recipe(TINY, ["moe.num_experts=1000000",
                                                 "moe.ffn_hidden_size=4096"])),
                key=lambda r: r.total)
    assert line.startswith(f"estimated memory too large for this machine: pipeline rank "
                           f"{worst.pp_rank} needs {worst.total:.3g} GB, the GPU has 80 GB "
                           f"(biggest items per device: optimizer {worst.optimizer:.3g} GB, ")
    assert line.endswith("pass --force to run anyway")
    with pytest.raises(Spawned):
        main(["train", TINY, "--force", "--set", "moe.num_experts=1000000", "--set",
              "moe.ffn_hidden_size=4096"])


def test_cpu_counts_every_process_of_the_node(monkeypatch):
    monkeypatch.setattr(P, "device_memory_gb", lambda recipe: ("host", 1e-9))
    recipe = load_recipe(TINY)
    total = sum(r.total for r in F.estimate_gb(recipe)) * 2  # 4 processes, 2 per pp rank
    with pytest.raises(UserError, match=f"4 processes need {total:.3g} GB"):
        F.check_memory(recipe)
    monkeypatch.setattr(P, "device_memory_gb", lambda recipe: None)  # unknown: no check
    F.check_memory(recipe)
