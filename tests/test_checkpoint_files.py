"""Checkpoint files on disk (manifest, pointer, choosing the newest intact one), the metrics
file on resume, and "already complete" — without training (see test_faults.py for that)."""

import json
import zlib
from pathlib import Path

import pytest
import torch.distributed as dist

from megatron_dualpipe import checkpoint
from megatron_dualpipe import checkpoint_files as files
from megatron_dualpipe.cli import main
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.metrics import MetricsLogger


def fake_checkpoint(root: Path, step: int, payload: bytes = b"weights") -> Path:
    """A step directory as `checkpoint.save` leaves it: files, manifest, rename, pointer."""
    tmp = root / (files.step_dir_name(step) + ".tmp")
    (tmp / "sub").mkdir(parents=True)
    (tmp / "__0_0.distcp").write_bytes(payload * 100)
    (tmp / "sub" / "layer.pt").write_bytes(b"expert" + bytes([step]))
    names = files.files_of(tmp)
    files.publish(tmp, root / files.step_dir_name(step), step, files.describe(tmp, names))
    return root / files.step_dir_name(step)


@pytest.fixture
def one_rank():
    """A 1-process gloo group in this process (what `checkpoint.choose` needs)."""
    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    yield
    dist.destroy_process_group()


def test_publish_writes_manifest_then_renames_then_points(tmp_path):
    path = fake_checkpoint(tmp_path, 3)
    manifest = json.loads((path / files.MANIFEST).read_text())
    data = (path / "__0_0.distcp").read_bytes()
    assert manifest["files"]["__0_0.distcp"] == [len(data), zlib.crc32(data)]
    assert sorted(manifest["files"]) == ["__0_0.distcp", "sub/layer.pt"]
    assert not (tmp_path / "step_0000003.tmp").exists()
    assert json.loads((tmp_path / files.LATEST).read_text()) == {"step": 3,
                                                                   "path": "step_0000003"}
    assert files.problems(path) == []
    # Saving the same step again replaces it whole.
    fake_checkpoint(tmp_path, 3, payload=b"other")
    assert files.problems(path) == [] and b"other" in (path / "__0_0.distcp").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == [files.LATEST, "step_0000003"]


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete"])
@pytest.mark.parametrize("name", ["__0_0.distcp", "sub/layer.pt"])
def test_each_damaged_file_is_named(tmp_path, name, damage):
    path = fake_checkpoint(tmp_path, 1)
    file = path / name
    data = file.read_bytes()
    if damage == "flip":
        file.write_bytes(bytes([data[0] ^ 1]) + data[1:])
        expected = f"{file}: checksum mismatch (corrupt)"
    elif damage == "truncate":
        file.write_bytes(data[:-1])
        expected = f"{file}: {len(data) - 1} bytes, the manifest says {len(data)}"
    else:
        file.unlink()
        expected = f"{file}: missing"
    assert files.problems(path) == [expected]
    # Sizes-only (what the launcher checks) sees all but a same-size flip.
    assert files.problems(path, checksums=False) == ([] if damage == "flip" else [expected])


def test_missing_or_broken_manifest_is_named(tmp_path):
    path = fake_checkpoint(tmp_path, 1)
    (path / files.MANIFEST).write_text("{not json")
    assert files.problems(path) == [f"{path / files.MANIFEST}: unreadable or not a checkpoint "
                                    "manifest"]
    (path / files.MANIFEST).unlink()
    assert files.problems(path) == [f"{path / files.MANIFEST}: missing (the save did not "
                                    "finish)"]


def test_pointer_problems_are_named(tmp_path):
    fake_checkpoint(tmp_path, 2)
    marker = tmp_path / files.LATEST
    marker.write_text('{"step": 2, "pa')
    assert files.candidates(tmp_path) == (
        [2], [f"{marker}: corrupt (not a checkpoint pointer); ignoring it"])
    marker.write_text('{"step": 9, "path": "step_0000009"}')
    assert files.candidates(tmp_path) == (
        [2], [f"{marker} names step_0000009, which is missing"])


def test_choose_skips_damaged_newest_for_the_newest_intact(tmp_path, one_rank, capsys):
    fake_checkpoint(tmp_path, 2)
    fake_checkpoint(tmp_path, 4)
    newest = fake_checkpoint(tmp_path, 6)
    (tmp_path / "step_0000008.tmp").mkdir()  # an interrupted save: never a candidate
    (newest / "sub" / "layer.pt").write_bytes(b"garbage!")
    assert checkpoint.choose(str(tmp_path)) == tmp_path / "step_0000004"
    out = capsys.readouterr().out
    assert f"skipped a damaged checkpoint: {newest / 'sub' / 'layer.pt'}: " in out
    assert f"using the newest intact checkpoint: {tmp_path / 'step_0000004'}" in out

    files.remove_tree(tmp_path / "step_0000004")  # deleted by hand: skipped too
    assert checkpoint.choose(str(tmp_path)) == tmp_path / "step_0000002"


def test_choose_refuses_when_no_checkpoint_is_usable(tmp_path, one_rank):
    assert checkpoint.choose(str(tmp_path / "none_yet")) is None
    path = fake_checkpoint(tmp_path, 5)
    (path / "__0_0.distcp").unlink()
    with pytest.raises(UserError, match=f"no usable checkpoint in {tmp_path}: "
                       f"{path / '__0_0.distcp'}: missing; restore a checkpoint"):
        checkpoint.choose(str(tmp_path))


def rows(path: Path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_metrics_resume_replaces_later_rows_and_a_new_run_keeps_the_old_file(tmp_path):
    log = MetricsLogger(str(tmp_path), 10, enabled=True)
    record = {"loss": 1.0, "lr": 0.1, "grad_norm": 1.0, "tokens_per_s": 1.0, "step_time_s": 1}
    for step in range(5):
        log.log(dict(record, step=step))
    path = tmp_path / "metrics.jsonl"
    with path.open("a") as f:
        f.write('{"step": 5, "lo')  # cut short by a kill
    MetricsLogger(str(tmp_path), 10, enabled=True, resume_step=3)  # resumed from step 3
    assert rows(path) == [0, 1, 2]
    MetricsLogger(str(tmp_path), 10, enabled=True)  # a new run from step 0
    assert not path.exists() and rows(tmp_path / "metrics.1.jsonl") == [0, 1, 2]


def test_rerunning_a_finished_job_says_complete_and_starts_nothing(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    fake_checkpoint(ckpt, 7)
    argv = ["train", "recipes/tiny_moe_cpu.yaml", "--set", f"train.ckpt_dir={ckpt}",
            "--set", f"train.log_dir={tmp_path / 'logs'}"]
    assert main([*argv, "--set", "train.steps=7"]) == 0
    out = capsys.readouterr().out
    assert f"already complete: {ckpt} holds step 7 of train.steps=7; nothing to do" in out
    assert list((tmp_path / "logs").iterdir()) == []  # created by the checks, nothing written


def test_a_fresh_start_does_not_mix_with_old_checkpoints(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    fake_checkpoint(ckpt, 7)
    line = main_error(capsys, ["train", "recipes/tiny_moe_cpu.yaml", "--set", "train.resume=false",
                               "--set", f"train.ckpt_dir={ckpt}"])
    assert line == (f"megatron-dualpipe train: error: train.resume=false but "
                    f"train.ckpt_dir={ckpt} already holds checkpoints (newest: step_0000007); "
                    "give another train.ckpt_dir, or remove them to start over")


def main_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    return err[0]
