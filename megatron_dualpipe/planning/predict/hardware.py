"""Hardware files: one GPU's peak compute, memory and link bandwidths, every number sourced.

The packaged files live in `megatron_dualpipe/planning/hardware/` (`h800`, `h100`, `h200`);
`load_hardware` takes one of those names or the path of a YAML file with the same fields.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import yaml

from megatron_dualpipe.errors import UserError

HARDWARE_DIR = Path(__file__).resolve().parent.parent / "hardware"


@dataclass(frozen=True)
class Hardware:
    """One GPU of a cluster (per-GPU numbers; GB = 1e9 bytes)."""

    name: str
    gpu: str
    bf16_tflops: float  # dense BF16 Tensor Core peak
    fp8_tflops: float  # dense FP8 Tensor Core peak
    hbm_gb: float
    hbm_gb_per_s: float
    nvlink_gb_per_s: float  # one direction, per GPU
    ib_gb_per_s: float  # one direction, per GPU (scale-out network)
    gpus_per_node: int
    sms: int

    def peak_tflops(self, precision: str) -> float:
        return self.fp8_tflops if precision == "fp8" else self.bf16_tflops

    def with_bandwidth_scale(self, factor: float) -> Hardware:
        """The same GPU with NVLink and IB `factor` times as fast (for what-if checks)."""
        d = asdict(self)
        d["nvlink_gb_per_s"] *= factor
        d["ib_gb_per_s"] *= factor
        return Hardware(**d)

    def to_json(self) -> dict:
        return asdict(self)


def hardware_names() -> list[str]:
    return sorted(p.stem for p in HARDWARE_DIR.glob("*.yaml"))


def load_hardware(name_or_path: str | Path) -> Hardware:
    """A packaged hardware name (`h800`, `h100`, `h200`) or a YAML file; `UserError` if bad."""
    text = str(name_or_path)
    path = HARDWARE_DIR / f"{text}.yaml" if text in hardware_names() else Path(text)
    if not path.is_file():
        raise UserError(f"--hardware {text}: not a known GPU or a file; known: "
                        f"{', '.join(hardware_names())} (or a YAML file with the fields of "
                        f"{HARDWARE_DIR / 'h800.yaml'})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"--hardware {path}: not valid YAML ({err.__class__.__name__})") from None
    names = [f.name for f in fields(Hardware)]
    if not isinstance(raw, dict):
        raise UserError(f"--hardware {path}: expected a mapping with fields {', '.join(names)}")
    missing = [n for n in names if n not in raw]
    unknown = [k for k in raw if k not in names]
    if missing or unknown:
        what = f"missing {', '.join(missing)}" if missing else f"unknown {', '.join(unknown)}"
        raise UserError(f"--hardware {path}: {what}; fields: {', '.join(names)}")
    for n in names[2:]:
        if not isinstance(raw[n], (int, float)) or raw[n] <= 0:
            raise UserError(f"--hardware {path}: {n}={raw[n]!r} must be a positive number")
    return Hardware(**{n: raw[n] for n in names})
