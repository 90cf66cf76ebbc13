"""A checkpoint's files on disk: step directories, the manifest, the `latest.json` pointer.

A checkpoint is written into `<ckpt_dir>/step_NNNNNNN.tmp`, then `manifest.json` (size and
CRC-32 of every file) is written into it, then it is renamed to `step_NNNNNNN`, and only then
is `latest.json` replaced. A directory without the `.tmp` suffix and with a manifest that
matches its files is a complete checkpoint. No torch here: the launcher uses this module
before any worker starts.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from pathlib import Path

LATEST = "latest.json"
MANIFEST = "manifest.json"
STEP_DIR = re.compile(r"^step_(\d+)$")
CHUNK = 1 << 22


def step_dir_name(step: int) -> str:
    return f"step_{step:07d}"


def files_of(path: Path) -> list[str]:
    """Every file under a checkpoint directory (relative, sorted), the manifest excluded."""
    out = []
    for root, _dirs, names in os.walk(path):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), path)
            if rel != MANIFEST:
                out.append(rel)
    return sorted(out)


def crc32(path: Path) -> int:
    value = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            value = zlib.crc32(block, value)
    return value


def describe(path: Path, names: list[str]) -> dict[str, list[int]]:
    """{file: [size, crc32]} for `names` (relative to `path`)."""
    return {name: [(path / name).stat().st_size, crc32(path / name)] for name in names}


def write_json_atomic(path: Path, value) -> None:
    """Write `value` as JSON to a temporary file, flush it to disk, then rename it to `path`."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish(tmp_dir: Path, final_dir: Path, step: int, entries: dict) -> None:
    """Write the manifest into `tmp_dir`, rename it to `final_dir`, then point `latest` at it."""
    write_json_atomic(tmp_dir / MANIFEST, {"step": step, "files": entries})
    if final_dir.exists():  # the same step saved again (e.g. after a resume)
        old = final_dir.with_name(final_dir.name + ".old")
        remove_tree(old)
        os.replace(final_dir, old)
        os.replace(tmp_dir, final_dir)
        remove_tree(old)
    else:
        os.replace(tmp_dir, final_dir)
    _fsync_dir(final_dir.parent)
    write_json_atomic(final_dir.parent / LATEST, {"step": step, "path": final_dir.name})


def remove_tree(path: Path) -> None:
    import shutil

    if path.exists():
        shutil.rmtree(path)


def problems(path: Path, names: list[str] | None = None, checksums: bool = True) -> list[str]:
    """What is wrong with the checkpoint at `path` (empty: it is complete and intact).

    With `names`, only those manifest entries are checked (ranks split the reading); with
    `checksums=False` only presence and sizes.
    """
    manifest_path = path / MANIFEST
    if not path.is_dir():
        return [f"{path}: missing"]
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError
    except FileNotFoundError:
        return [f"{manifest_path}: missing (the save did not finish)"]
    except (OSError, ValueError, KeyError, TypeError):
        return [f"{manifest_path}: unreadable or not a checkpoint manifest"]
    out = []
    for name in sorted(files) if names is None else names:
        size, crc = files[name]
        file = path / name
        if not file.is_file():
            out.append(f"{file}: missing")
        elif file.stat().st_size != size:
            out.append(f"{file}: {file.stat().st_size} bytes, the manifest says {size}")
        elif checksums and crc32(file) != crc:
            out.append(f"{file}: checksum mismatch (corrupt)")
    return out


def manifest_files(path: Path) -> list[str]:
    try:
        return sorted(json.loads((path / MANIFEST).read_text())["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def read_latest(ckpt_dir: str | Path) -> tuple[int | None, str | None]:
    """(step named by `latest.json` or None, a problem with the pointer or None)."""
    marker = Path(ckpt_dir) / LATEST
    if not marker.exists():
        return None, None
    try:
        value = json.loads(marker.read_text())
        step = int(value["step"])
        if value["path"] != step_dir_name(step):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError):
        return None, f"{marker}: corrupt (not a checkpoint pointer); ignoring it"
    return step, None


def step_dirs(ckpt_dir: str | Path) -> list[int]:
    """Steps of the `step_N` directories in `ckpt_dir`, newest first."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := STEP_DIR.match(p.name))]
    return sorted(steps, reverse=True)


def candidates(ckpt_dir: str | Path) -> tuple[list[int], list[str]]:
    """Steps to try, newest first, and notes about the pointer (corrupt, names a missing dir)."""
    pointed, note = read_latest(ckpt_dir)
    steps = step_dirs(ckpt_dir)
    notes = [note] if note else []
    if pointed is not None and pointed not in steps:
        notes.append(f"{Path(ckpt_dir) / LATEST} names {step_dir_name(pointed)}, which is "
                     "missing")
    return steps, notes


def newest_complete(ckpt_dir: str | Path, checksums: bool = False) -> int | None:
    """The newest step whose checkpoint is intact (sizes only unless `checksums`)."""
    for step in step_dirs(ckpt_dir):
        if not problems(Path(ckpt_dir) / step_dir_name(step), checksums=checksums):
            return step
    return None


def already_complete(recipe, step: int) -> str:
    """What a re-run of a finished job prints (it then exits 0)."""
    return (f"already complete: {recipe.train.ckpt_dir} holds step {step} of "
            f"train.steps={recipe.train.steps}; nothing to do (raise train.steps to train on, "
            "or give another train.ckpt_dir to start over)")


def check_fresh_start(recipe) -> None:
    """`train.resume: false` must not mix a new run's checkpoints with an old run's."""
    ckpt_dir = recipe.train.ckpt_dir
    if not ckpt_dir or recipe.train.resume:
        return
    steps = step_dirs(ckpt_dir)
    if steps:
        from megatron_dualpipe.errors import UserError

        raise UserError(
            f"train.resume=false but train.ckpt_dir={ckpt_dir} already holds checkpoints "
            f"(newest: {step_dir_name(steps[0])}); give another train.ckpt_dir, or remove "
            "them to start over"
        )
