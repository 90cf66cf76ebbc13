"""Per-rank figures, directories of per-rank traces, the streaming reader, `--window` and
`--png` of `python -m megatron_dualpipe trace`."""

from __future__ import annotations

import gzip
import json

import pytest
from trace_events import GEMM, cpu, kernel, step

from megatron_dualpipe.cli import main
from megatron_dualpipe.errors import UserError
from megatron_dualpipe.trace import analyze, draw
from megatron_dualpipe.trace.cli import parse_window
from megatron_dualpipe.trace.load import read, trace_files

DISPATCH = "void deep_ep::intranode::dispatch<8, 768, 8192>(int4*, float*)"
COMBINE = "void deep_ep::intranode::combine<__nv_bfloat16, 8, 768>(int4*, float*)"


def rank_trace(shift: float, pid: int = 0) -> list[dict]:
    """Two steps of 100 us. Step 0: dispatch [10, 50) on the comm stream under a GEMM [0, 30)
    -> 20 overlapped, 20 exposed; idle [50, 100) minus nothing = 50. Step 1: combine
    [110, 150) fully under a GEMM [100, 160) -> 40 overlapped; idle 40. `shift` moves the
    whole rank."""
    s = shift
    return [step(0, s, 100, pid=100 + pid), step(1, s + 100, 100, pid=100 + pid),
            kernel(GEMM, s + 0, 30, stream=7, device=pid),
            kernel(DISPATCH, s + 10, 40, stream=20, device=pid),
            kernel(GEMM, s + 100, 60, stream=7, device=pid),
            kernel(COMBINE, s + 110, 40, stream=20, device=pid),
            {"ph": "M", "name": "thread_name", "pid": pid, "tid": 20,
             "args": {"name": "stream 20 (comm)"}}]


def test_rank_figures_exposed_idle_and_steps():
    r = analyze(rank_trace(0))
    a = r["comm"]["alltoall"]
    assert (a["count"], a["time_us"], a["overlapped_us"], a["exposed_us"]) == (2, 80, 60, 20)
    assert a["fraction"] == pytest.approx(0.75)
    assert r["compute_time_us"] == 90
    assert (r["span_us"], r["idle_us"]) == (200, 90)
    s0, s1 = r["steps"]
    assert (s0["alltoall"]["exposed_us"], s0["compute_us"], s0["idle_us"]) == (20, 30, 50)
    assert (s1["alltoall"]["overlapped_us"], s1["compute_us"], s1["idle_us"]) == (40, 60, 40)
    assert [(t["name"], t["exposed_us"], t["time_us"]) for t in r["top_exposed"]] == \
        [("deep_ep::intranode::dispatch", 20, 40), ("deep_ep::intranode::combine", 0, 40)]
    assert [x["rank"] for x in r["ranks"]] == ["trace"]


def _write(path, events, packed=False):
    text = json.dumps({"traceEvents": events, "distributedInfo": {"rank": 0}})
    if packed:
        with gzip.open(path, "wt") as f:
            f.write(text)
    else:
        path.write_text(text)


def test_directory_of_rank_traces_sums_ranks(tmp_path):
    # rank1 is rank0 moved by 1 ms with its dispatch made fully exposed (GEMM removed).
    _write(tmp_path / "rank0.json", rank_trace(0))
    one = [e for e in rank_trace(1000) if not (e.get("name") == GEMM and e["ts"] == 1000)]
    _write(tmp_path / "rank1.json.gz", one, packed=True)
    (tmp_path / "notes.txt").write_text("not a trace")
    r = analyze(tmp_path)
    assert [x["rank"] for x in r["ranks"]] == ["rank0", "rank1"]
    r0, r1 = r["ranks"]
    assert (r0["comm"]["all"]["exposed_us"], r1["comm"]["all"]["exposed_us"]) == (20, 40)
    assert (r1["compute_time_us"], r1["idle_us"]) == (60, 60 + 40)
    a = r["comm"]["all"]
    assert (a["count"], a["time_us"], a["overlapped_us"], a["exposed_us"]) == (4, 160, 100, 60)
    assert a["fraction"] == pytest.approx(100 / 160)
    assert (r["compute_time_us"], r["idle_us"], r["span_us"]) == (150, 190, 400)
    s0 = r["steps"][0]
    assert (s0["step"], s0["time_us"], s0["alltoall"]["time_us"], s0["idle_us"]) == \
        (0, 100, 80, 110)
    assert r["top_exposed"][0]["name"] == "deep_ep::intranode::dispatch"
    assert r["top_exposed"][0]["exposed_us"] == 60 and r["top_exposed"][0]["count"] == 2
    assert r["num_events"] == 6 + 5  # complete events of both files


def test_two_devices_in_one_trace_are_two_ranks():
    r = analyze(rank_trace(0, pid=0) + rank_trace(0, pid=1))
    assert [x["rank"] for x in r["ranks"]] == ["trace/gpu0", "trace/gpu1"]
    assert r["comm"]["all"]["time_us"] == 160  # summed, not a union of the two devices


def test_reader_streams_only_what_it_needs(tmp_path):
    events = rank_trace(0) + [
        {"ph": "s", "cat": "ac2g", "name": "flow", "pid": 0, "tid": 1, "ts": 1, "id": 5},
        {"ph": "X", "cat": "Trace", "name": "PyTorch Profiler", "pid": "Spans", "tid": 1,
         "ts": 0, "dur": 300},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaMalloc", "pid": 100, "tid": 1, "ts": 0,
         "dur": 3, "args": {}},
        cpu("aten::mm", 5, 3), cpu("c10d::send", 9, 3),
    ]
    path = tmp_path / "t.json.gz"
    _write(path, events, packed=True)
    table = read(path)
    # Not kept: the span, a launch without correlation and, in a GPU trace, a CPU op that
    # is no communication (also when it came before the first kernel).
    assert table.num_events == 10 and len(table) == 7
    assert [table.names[i] for i in table.name] == [
        "ProfilerStep#0", "ProfilerStep#1", GEMM, DISPATCH, GEMM, COMBINE, "c10d::send"]
    early = tmp_path / "early.json"
    _write(early, [cpu("aten::mm", 5, 3), cpu("c10d::send", 9, 3)] + rank_trace(0))
    assert len(read(early)) == 7
    assert table.lane_names == {(0, 20): "stream 20 (comm)"}
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps(events))  # Chrome's array form
    assert analyze(bare)["comm"] == analyze(path)["comm"]


def test_reader_errors(tmp_path):
    with pytest.raises(UserError, match="no such trace"):
        trace_files(tmp_path / "missing.json")
    with pytest.raises(UserError, match="holds no trace"):
        trace_files(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"traceEvents": [{"ph": "X", ')
    with pytest.raises(UserError, match="not a Chrome trace"):
        read(bad)
    (tmp_path / "fake.json.gz").write_text("plain")
    with pytest.raises(UserError, match="not a Chrome trace"):
        read(tmp_path / "fake.json.gz")


@pytest.mark.parametrize("text,expected", [
    ("0:25.5", (None, (0.0, 25.5))), (" 10 : 20 ", (None, (10.0, 20.0))),
    ("dualpipe.FB", ("dualpipe.FB", None)), ("nccl:all_to_all", ("nccl:all_to_all", None)),
])
def test_window_argument(text, expected):
    assert parse_window(text) == expected


@pytest.mark.parametrize("text", ["5:3", "1:2:3", "4:", ":", " "])
def test_bad_window_argument(text):
    with pytest.raises(UserError, match="--window"):
        parse_window(text)


def test_cli_time_window_json_and_png(tmp_path, capsys):
    for r in range(2):
        _write(tmp_path / f"rank{r}.json", rank_trace(0, pid=r))
    png = tmp_path / "t.png"
    # 0.1..0.2 ms = step 1 on both ranks: combine under a GEMM, 100% overlapped.
    assert main(["trace", str(tmp_path), "--json", "--window", "0.1:0.2",
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out
    report = json.loads(out[:out.rindex("}") + 1])
    w = report["range"]
    assert (w["start_ms"], w["end_ms"], w["alltoall"]["time_us"]) == (0.1, 0.2, 80)
    assert w["alltoall"]["fraction"] == 1.0 and w["idle_us"] == 80
    assert set(report) >= {"device", "num_events", "compute_time_us", "comm", "steps",
                           "ranks", "top_exposed", "idle_us", "span_us"}
    counts = _colour_counts(png)
    legend = counts[draw.EXPOSED]  # the legend's patch: no exposed communication drawn
    assert 0 < 5 * legend < counts[draw.COMPUTE] and counts[draw.OVERLAPPED] > 0
    # Default window: the first step, where half of each dispatch is exposed.
    assert main(["trace", str(tmp_path), "--png", str(png)]) == 0
    assert _colour_counts(png)[draw.EXPOSED] > 5 * legend


def _colour_counts(png) -> dict:
    import matplotlib.image
    import numpy as np

    pixels = (matplotlib.image.imread(png)[..., :3] * 255).round().astype(int)
    return {c: int(np.all(pixels == _rgb(c), axis=-1).sum())
            for c in (draw.COMPUTE, draw.EXPOSED, draw.OVERLAPPED)}


def _rgb(hex_colour: str) -> tuple:
    return tuple(int(hex_colour[i:i + 2], 16) for i in (1, 3, 5))


def test_cli_user_errors(tmp_path, capsys):
    _write(tmp_path / "rank0.json", rank_trace(0))
    assert main(["trace", str(tmp_path / "nope")]) == 2
    assert main(["trace", str(tmp_path), "--window", "9:1"]) == 2
    assert main(["trace", str(tmp_path), "--png", str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("megatron-dualpipe trace: error:")
                                 for line in err)


def test_progress_follows_the_bytes(tmp_path, capsys):
    from megatron_dualpipe.trace.load import read_all

    for r in range(2):
        _write(tmp_path / f"rank{r}.json.gz", rank_trace(0, pid=r), packed=True)

    class Counter:
        n = 0

        def update(self, k):
            self.n += k

    counter = Counter()
    read(tmp_path / "rank1.json.gz", counter)
    assert counter.n == (tmp_path / "rank1.json.gz").stat().st_size
    tables = read_all([tmp_path], progress=True)  # a tqdm bar on stderr, named by file
    assert [t.label for t in tables] == ["rank0", "rank1"]
    assert "rank1.json.gz" in capsys.readouterr().err
