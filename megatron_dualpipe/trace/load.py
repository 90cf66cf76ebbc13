"""Streaming reader of Chrome traces into a compact per-file table of events.

A trace is a JSON object with a ``traceEvents`` array (what ``torch.profiler`` writes) or a bare
array of events; ``.gz`` files are decompressed on the fly. The file is parsed incrementally
(`ijson`), one event at a time, and only the complete (``ph: X``) events the analysis needs are
kept, in typed arrays with interned names (about 40 bytes per event), so that memory stays well
below the file size. Once a trace shows GPU kernels, its CPU operations are only kept where the
GPU analysis uses them (communication ops, which tell what launched an NCCL kernel; user
annotations, which mark steps and windows). A directory stands for the traces in it
(``*.json``, ``*.json.gz``), one per rank.
"""

from __future__ import annotations

import gzip
import re
from array import array
from dataclasses import dataclass
from pathlib import Path

from megatron_dualpipe.errors import UserError
from megatron_dualpipe.trace.classify import COLLECTIVE_KEYS, op_rule

# Categories kept, by code.
KERNEL, GPU_OTHER, CPU, LAUNCH, GPU_ANNOTATION, ANNOTATION = range(6)
CPU_CODES = (CPU, ANNOTATION)  # CPU operations and user annotations
_CATEGORIES = {
    "kernel": KERNEL,
    "gpu_memcpy": GPU_OTHER, "gpu_memset": GPU_OTHER,
    "cpu_op": CPU, "user_annotation": ANNOTATION, "python_function": CPU,
    "cuda_runtime": LAUNCH, "cuda_driver": LAUNCH, "runtime": LAUNCH, "driver": LAUNCH,
    "gpu_user_annotation": GPU_ANNOTATION,
}
_PROGRESS_EVERY = 20000


@dataclass(slots=True)
class Event:
    """One complete trace event; times in microseconds."""

    name: str
    cat: int
    pid: object
    tid: object
    ts: float
    dur: float
    corr: int = -1  # correlation id (kernels and their launches)
    collective: str | None = None  # the ``Collective name`` argument, if any

    @property
    def end(self) -> float:
        return self.ts + self.dur

    @property
    def lane(self) -> tuple:
        return (self.pid, self.tid)


class EventTable:
    """The kept events of one trace, column by column."""

    def __init__(self, label: str, path: str | None = None):
        self.label, self.path = label, path
        self.num_events = 0  # every complete event, kept or not
        self.names: list[str] = []
        self._name_ids: dict[str, int] = {}
        self.lanes: list[tuple] = []
        self._lane_ids: dict[tuple, int] = {}
        self.lane_names: dict[tuple, str] = {}  # thread_name metadata
        self.cat = array("b")
        self.name = array("i")
        self.lane = array("i")
        self.ts = array("d")
        self.dur = array("d")
        self.corr = array("q")
        self.collective = array("i")
        self.gpu = False  # kernels seen: keep only the CPU ops the GPU analysis uses

    def _intern(self, name: str) -> int:
        idx = self._name_ids.get(name)
        if idx is None:
            idx = self._name_ids[name] = len(self.names)
            self.names.append(name)
        return idx

    def _lane(self, pid, tid) -> int:
        key = (pid, tid)
        idx = self._lane_ids.get(key)
        if idx is None:
            idx = self._lane_ids[key] = len(self.lanes)
            self.lanes.append(key)
        return idx

    def add(self, e: dict) -> None:
        """Keep one raw event (a dict of the trace) if the analysis needs it."""
        ph = e.get("ph")
        if ph == "M":
            if e.get("name") == "thread_name" and isinstance(e.get("args"), dict):
                self.lane_names[(e.get("pid"), e.get("tid"))] = str(e["args"].get("name", ""))
            return
        if ph != "X" or "dur" not in e or "ts" not in e:
            return
        self.num_events += 1
        code = _CATEGORIES.get(str(e.get("cat", "")).lower())
        if code is None:
            return
        args = e.get("args") or {}
        corr = args.get("correlation")
        if code == LAUNCH and corr is None:
            return
        raw_name = str(e.get("name", ""))
        if code == CPU and self.gpu and op_rule(raw_name) is None:
            return
        name = self._intern(raw_name)
        if code == KERNEL and not self.gpu:
            self.gpu = True
            self._drop_unwanted_ops()
        collective = next((args[k] for k in COLLECTIVE_KEYS if k in args), None)
        self.cat.append(code)
        self.name.append(name)
        self.lane.append(self._lane(e.get("pid"), e.get("tid")))
        self.ts.append(float(e["ts"]))
        self.dur.append(float(e["dur"]))
        self.corr.append(int(corr) if isinstance(corr, (int, float)) else -1)
        self.collective.append(-1 if collective is None else self._intern(str(collective)))

    def _drop_unwanted_ops(self) -> None:
        keep = [i for i in range(len(self.cat))
                if self.cat[i] != CPU or op_rule(self.names[self.name[i]]) is not None]
        if len(keep) == len(self.cat):
            return
        for column in ("cat", "name", "lane", "ts", "dur", "corr", "collective"):
            old = getattr(self, column)
            setattr(self, column, array(old.typecode, (old[i] for i in keep)))

    def __len__(self) -> int:
        return len(self.cat)

    def event(self, i: int) -> Event:
        pid, tid = self.lanes[self.lane[i]]
        coll = self.collective[i]
        return Event(self.names[self.name[i]], self.cat[i], pid, tid, self.ts[i], self.dur[i],
                     self.corr[i], None if coll < 0 else self.names[coll])

    def events(self, *codes: int, names=None, exclude=()):
        """Events of the given category codes (all if none), optionally only those whose name
        id is in `names`, and never those whose name id is in `exclude`."""
        for i in range(len(self.cat)):
            if (not codes or self.cat[i] in codes) and (names is None or self.name[i] in names) \
                    and self.name[i] not in exclude:
                yield self.event(i)

    def name_ids(self, predicate) -> set[int]:
        """Ids of the interned names for which `predicate(name)` holds."""
        return {i for i, n in enumerate(self.names) if predicate(n)}

    def has(self, code: int) -> bool:
        return code in self.cat


def from_events(raw, label: str = "trace") -> EventTable:
    """A table from an already-parsed trace (dict with ``traceEvents``, or a list of events)."""
    table = EventTable(label)
    for e in raw.get("traceEvents", []) if isinstance(raw, dict) else raw:
        if isinstance(e, dict):
            table.add(e)
    return table


def trace_files(source: str | Path) -> list[Path]:
    """The trace files a path names: the file itself, or a directory's ``*.json[.gz]``."""
    path = Path(source)
    if path.is_dir():
        files = sorted((p for p in path.iterdir()
                        if p.name.endswith((".json", ".json.gz")) and p.is_file()),
                       key=_rank_key)
        if not files:
            raise UserError(f"{path}: directory holds no trace (*.json or *.json.gz)")
        return files
    if not path.exists():
        raise UserError(f"{path}: no such trace file or directory")
    return [path]


def _rank_key(path: Path):
    m = re.search(r"rank(\d+)", path.name)
    return (0, int(m.group(1)), path.name) if m else (1, 0, path.name)


def rank_label(path: Path) -> str:
    """``rank3`` for ``.../rank3.json``, else the file name without its extensions."""
    m = re.search(r"rank[_-]?(\d+)", path.name)
    return f"rank{m.group(1)}" if m else path.name.split(".")[0]


def read(path: Path, progress=None) -> EventTable:
    """Stream one trace file into a table; `progress` (a tqdm bar) advances by file bytes."""
    import ijson

    table = EventTable(rank_label(path), str(path))
    try:
        with open(path, "rb") as raw:
            stream = gzip.GzipFile(fileobj=raw) if path.name.endswith(".gz") else raw
            prefix = "item" if _first_char(stream) == b"[" else "traceEvents.item"
            stream.seek(0)
            done = 0
            for n, e in enumerate(ijson.items(stream, prefix, use_float=True)):
                if isinstance(e, dict):
                    table.add(e)
                if progress is not None and n % _PROGRESS_EVERY == 0:
                    pos = raw.tell()
                    progress.update(pos - done)
                    done = pos
            if progress is not None:
                progress.update(path.stat().st_size - done)
    except (ijson.JSONError, UnicodeDecodeError, OSError, EOFError) as err:
        raise UserError(f"{path}: not a Chrome trace (.json or .json.gz): {err}") from err
    return table


def _first_char(stream) -> bytes:
    while True:
        c = stream.read(1)
        if not c or not c.isspace():
            return c


def read_all(sources, progress: bool | None = None) -> list[EventTable]:
    """Tables of every trace file the sources name, with one progress bar over all bytes
    (shown on a terminal only unless `progress` is True)."""
    files = [f for s in sources for f in trace_files(s)]
    total = sum(f.stat().st_size for f in files)
    bar = _bar(total, progress)
    try:
        tables = []
        for f in files:
            if bar is not None:
                bar.set_description(f.name)
            tables.append(read(f, bar))
        return tables
    finally:
        if bar is not None:
            bar.close()


def _bar(total: int, progress: bool | None):
    if progress is False:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is a dependency, but the bar is only a convenience
        return None
    return tqdm(total=total, unit="B", unit_scale=True, disable=None if progress is None
                else not progress, leave=False)
