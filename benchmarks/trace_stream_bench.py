"""Peak memory and time of `trace` on a large generated GPU trace (streamed reading).

    python benchmarks/trace_stream_bench.py --mb 300 [--gz] [--keep /tmp/big.json]

Writes a synthetic ``torch.profiler``-style GPU trace of about ``--mb`` MB (per kernel: a
parent and a child ``cpu_op`` with input shapes, a ``cudaLaunchKernel`` with its correlation
id, the kernel, and the flow events linking them; one kernel in eight a DeepEP dispatch or
combine on a second stream, under the GEMMs of the compute stream), then analyses it in a
fresh process and prints the file size, the analysis time and the peak resident memory of that
process (``ru_maxrss``), next to the peak of a process that only imports the analyser.
"""

from __future__ import annotations

import argparse
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GEMM = "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64_warpgroupsize1x1"
COMM = ("void deep_ep::intranode::dispatch<8, 768, 8192>(int4*, float*, int*, long*, float*)",
        "void deep_ep::intranode::combine<__nv_bfloat16, 8, 768>(int4*, float*, int*)")


def _group(i: int, t: float) -> list[dict]:
    """The events of one kernel launch at CPU time `t` (µs)."""
    comm = i % 8 == 0
    name = COMM[(i // 8) % 2] if comm else GEMM
    args = {"External id": i, "Record function id": 0, "Ev Idx": i,
            "Input Dims": [[4096, 7168], [7168, 2048], []],
            "Input type": ["c10::BFloat16", "c10::BFloat16", ""],
            "Input Strides": [[7168, 1], [1, 7168], []],
            "Concrete Inputs": ["", "", ""]}
    k_ts = t + 40
    return [
        {"ph": "X", "cat": "cpu_op", "name": "aten::linear", "pid": 100, "tid": 100, "ts": t,
         "dur": 12.0, "args": args},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "pid": 100, "tid": 100, "ts": t + 1,
         "dur": 10.0, "args": args},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "pid": 100, "tid": 100,
         "ts": t + 2, "dur": 5.0, "args": {"External id": i, "cbid": 211, "correlation": i}},
        {"ph": "X", "cat": "kernel", "name": name, "pid": 0, "tid": 20 if comm else 7,
         "ts": k_ts, "dur": 30.0 if comm else 15.0,
         "args": {"External id": i, "queued": 0, "device": 0, "context": 1,
                  "stream": 20 if comm else 7, "correlation": i, "registers per thread": 168,
                  "shared memory": 213248, "blocks per SM": 0.6, "warps per SM": 2.4,
                  "grid": [132, 1, 1], "block": [384, 1, 1],
                  "est. achieved occupancy %": 0}},
        {"ph": "s", "id": i, "pid": 100, "tid": 100, "ts": t + 2, "cat": "ac2g",
         "name": "ac2g"},
        {"ph": "f", "id": i, "pid": 0, "tid": 7, "ts": k_ts, "cat": "ac2g", "name": "ac2g",
         "bp": "e"},
    ]


def generate(path: Path, megabytes: float) -> int:
    """Write the trace, in Kineto's order (CPU-side events first, then the GPU's); returns the
    number of events."""
    per_group = sum(len(json.dumps(e)) + 2 for e in _group(0, 0.0))
    groups = int(megabytes * 1e6 / per_group)
    opener = gzip.open if path.name.endswith(".gz") else open
    n = 0
    with opener(path, "wt") as f:
        f.write('{"schemaVersion": 1, "traceEvents": [\n')
        for gpu_side in (False, True):
            for i in range(groups):
                if i % 500 == 0 and not gpu_side:
                    f.write(json.dumps({"ph": "X", "cat": "user_annotation",
                                        "name": f"ProfilerStep#{i // 500}", "pid": 100,
                                        "tid": 100, "ts": i * 20.0, "dur": 500 * 20.0}) + ",\n")
                    n += 1
                for e in _group(i, i * 20.0):
                    if (e["pid"] == 0) == gpu_side:
                        f.write(json.dumps(e) + ",\n")
                        n += 1
        f.write('{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "GPU 0"}}\n]}\n')
    return n + 1


_CHILD = """
import json, resource, sys, time
t = time.time()
if sys.argv[1] != "-":
    from megatron_dualpipe.trace import analyze
    r = analyze(sys.argv[1])
else:
    import megatron_dualpipe.trace.report
    r = {"comm": {"all": {}}, "num_events": 0}
use = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"seconds": time.time() - t, "cpu_s": use.ru_utime + use.ru_stime,
                  "peak_mb": use.ru_maxrss / 1024, "num_events": r["num_events"],
                  "all": r["comm"]["all"]}))
"""


def measure(path: str) -> dict:
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", _CHILD, path], check=True, env=env,
                         capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=300.0, help="size of the trace (MB)")
    parser.add_argument("--gz", action="store_true", help="write it gzip'd")
    parser.add_argument("--keep", default=None, help="path of the trace (default: a temp file)")
    args = parser.parse_args()
    path = Path(args.keep or f"/tmp/trace_stream_bench.json{'.gz' if args.gz else ''}")
    t = time.time()
    n = generate(path, args.mb)
    size = path.stat().st_size / 1e6
    print(f"wrote {path}: {size:.0f} MB, {n} events in {time.time() - t:.0f} s")
    base = measure("-")
    run = measure(str(path))
    print(f"analysis: {run['seconds']:.1f} s ({run['cpu_s']:.1f} s CPU), peak RSS "
          f"{run['peak_mb']:.0f} MB (import only: {base['peak_mb']:.0f} MB); "
          f"{run['num_events']} complete events, "
          f"communication {run['all']['time_us'] / 1e3:.1f} ms, "
          f"{100 * run['all']['fraction']:.1f}% overlapped")
    if not args.keep:
        path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
