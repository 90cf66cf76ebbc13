"""Calibration files: measured (or estimated) times of one rank's layer parts, and their use.

A calibration file (JSON) holds, for each precision (`bf16`, `fp8`) and each part
(`attention`, `moe`, `dense_mlp`, `head`; see `flops.py`), the milliseconds of one
micro-batch's forward (`f_ms`), backward-input (`b_ms`) and backward-weight (`w_ms`) pass on
one GPU, next to the FLOPs those passes did (`f_flops`, `b_flops`, `w_flops`). The `moe` part
is the expert compute of one expert-parallel rank without dispatch/combine (which the model
adds from link bandwidths): router, shared expert and `topk` expert rows per token.

A recipe's part time is the calibrated time scaled by the FLOPs ratio (the recipe's FLOPs per
micro-batch over the calibration's), and from the calibration GPU to the target GPU by the
ratio of their dense peaks for that precision. `benchmarks/calibrate_layer.py` writes these
files; `h200_v3_rank.json` is the default (DeepSeek-V3's per-GPU shapes on one H200).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_dualpipe.errors import UserError

CALIBRATION_DIR = Path(__file__).resolve().parent.parent / "calibration"
DEFAULT_CALIBRATION = CALIBRATION_DIR / "h200_v3_rank.json"
PARTS = ("attention", "moe", "dense_mlp", "head")
PRECISIONS = ("bf16", "fp8")
PASSES = ("f", "b", "w")


@dataclass(frozen=True)
class PassTimes:
    """Milliseconds of one micro-batch's forward, backward-input and backward-weight pass."""

    f: float
    b: float
    w: float

    def __add__(self, other: PassTimes) -> PassTimes:
        return PassTimes(self.f + other.f, self.b + other.b, self.w + other.w)

    def scaled(self, factor: float) -> PassTimes:
        return PassTimes(self.f * factor, self.b * factor, self.w * factor)

    @property
    def total(self) -> float:
        return self.f + self.b + self.w


ZERO = PassTimes(0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Calibration:
    """A loaded calibration file (see the module docstring)."""

    path: str
    source: str
    hardware: str
    data: dict

    def entry(self, precision: str, part: str) -> dict:
        return self.data["precisions"][precision][part]

    def part_times(self, precision: str, part: str, flops_f: float, flops_b: float,
                   flops_w: float, peak_ratio: float) -> PassTimes:
        """Times of `part` doing the given FLOPs per micro-batch on a GPU `peak_ratio` times as
        fast as the calibration GPU (0 FLOPs: 0 ms)."""
        e = self.entry(precision, part)

        def one(p: str, flops: float) -> float:
            if flops == 0:
                return 0.0
            return e[f"{p}_ms"] * flops / e[f"{p}_flops"] / peak_ratio

        return PassTimes(one("f", flops_f), one("b", flops_b), one("w", flops_w))


def _check(data, where: str) -> None:
    if not isinstance(data, dict):
        raise UserError(f"--calibration {where}: expected a JSON object")
    for key in ("source", "hardware", "precisions"):
        if key not in data:
            raise UserError(f"--calibration {where}: missing field {key!r}")
    for prec in PRECISIONS:
        parts = data["precisions"].get(prec)
        if not isinstance(parts, dict):
            raise UserError(f"--calibration {where}: precisions.{prec} missing; "
                            f"precisions: {', '.join(PRECISIONS)}")
        for part in PARTS:
            e = parts.get(part)
            if not isinstance(e, dict):
                raise UserError(f"--calibration {where}: precisions.{prec}.{part} missing; "
                                f"parts: {', '.join(PARTS)}")
            for p in PASSES:
                for unit in ("ms", "flops"):
                    v = e.get(f"{p}_{unit}")
                    if not isinstance(v, (int, float)) or v < 0 or (unit == "flops" and v == 0
                                                                     and e.get(f"{p}_ms")):
                        raise UserError(f"--calibration {where}: precisions.{prec}.{part}."
                                        f"{p}_{unit}={v!r} must be a number >= 0")


def load_calibration(path: str | Path | None = None) -> Calibration:
    """Load and check a calibration file (default: the packaged H200 one); `UserError` if bad."""
    path = Path(path) if path is not None else DEFAULT_CALIBRATION
    if not path.is_file():
        raise UserError(f"--calibration {path}: no such file")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"--calibration {path}: not valid JSON ({err.msg}, line {err.lineno})"
                        ) from None
    _check(data, str(path))
    return Calibration(str(path), str(data["source"]), str(data["hardware"]), data)
