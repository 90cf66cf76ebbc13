"""Per-rank compute action lists for pipeline schedules (the single source of truth).

Both the executor and the simulator consume the lists produced here.  Each rank runs its
list strictly in order; P2P traffic is implied by the stage graph (`stage_of`, `next_rank`).

Action model
------------
* ``F``  forward of ``(chunk, microbatch)``.
* ``B``  backward of ``(chunk, microbatch)``.  ``split_wgrad=True`` means only the input
  gradient is computed now and the weight gradient is queued (zero-bubble split).
* ``W``  pops the *oldest* queued weight gradient of this rank (FIFO, like DeepSeek's
  WeightGradStore); ``chunk``/``microbatch`` record whose weight gradient that is.
* ``FB`` an overlapped pair: forward of ``(chunk, microbatch)`` together with the backward of
  ``(bwd_chunk, bwd_microbatch)`` (DeepSeek's ``F&B``).  DeepSeek never splits these.

Layouts (``stage`` = position along a micro-batch's path, 0 = where it enters)
-------------------------------------------------------------------------------
* ``1f1b``, ``zb1p``: one chunk; rank r is stage r.
* ``interleaved``: chunk c of rank r is stage ``c * num_ranks + r``.
* ``dualpipev``: chunk 0 of rank r is stage r, chunk 1 is stage ``2N-1-r`` (V shape; data
  enters and the loss is computed on rank 0).  Every chunk sees all micro-batches.
* ``dualpipe``: two pipelines of N stages.  Direction 0 (micro-batches ``0..M/2-1``) enters at
  rank 0 and runs through chunk 0; direction 1 (micro-batches ``M/2..M-1``) enters at rank
  N-1 and runs through chunk 1 towards rank 0.  Chunk 1 of rank r is stage ``N-1-r`` of
  direction 1, i.e. it holds the same layers as chunk 0 of rank ``N-1-r`` (mirror copy).

The DualPipe/DualPipeV step structure follows deepseek-ai/DualPipe (steps nF0, nF0F1, nB1W1F1,
nF0B1F1B0, nB1F1B0, nB1B0, nWB0, nW).  Note that the reference's step 5 is "B1, then F1&B0"
(it carries the last N-r-1 forwards of chunk 1) and step 6 contains no W.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from megatron_dualpipe.errors import UserError
from megatron_dualpipe.schedules.spec import get_spec

KINDS = ("F", "B", "W", "FB")


@dataclass(frozen=True)
class Action:
    """One compute action of one rank (see module docstring)."""

    kind: str
    chunk: int
    microbatch: int
    split_wgrad: bool = False
    bwd_chunk: int | None = None
    bwd_microbatch: int | None = None
    bwd_split_wgrad: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown action kind {self.kind!r}")
        if (self.kind == "FB") != (self.bwd_chunk is not None and self.bwd_microbatch is not None):
            raise ValueError("bwd_chunk/bwd_microbatch are required for FB and only for FB")

    def parts(self) -> tuple[Action, ...]:
        """``(F, B)`` for an FB pair, ``(self,)`` otherwise."""
        if self.kind != "FB":
            return (self,)
        return (Action("F", self.chunk, self.microbatch),
                Action("B", self.bwd_chunk, self.bwd_microbatch, self.bwd_split_wgrad))

    def __str__(self) -> str:
        if self.kind == "FB":
            return f"{self.parts()[0]}&{self.parts()[1]}"
        return f"{self.kind}{self.chunk}.{self.microbatch}{'w' if self.split_wgrad else ''}"


class _RankBuilder:
    """Appends actions for one rank, assigning micro-batches per chunk in order."""

    def __init__(self, mb_offset: dict[int, int], overlap: bool, zero_bubble: bool) -> None:
        self.mb_offset = mb_offset
        self.overlap = overlap
        self.zero_bubble = zero_bubble
        self.next_f = dict.fromkeys(mb_offset, 0)
        self.next_b = dict.fromkeys(mb_offset, 0)
        self.wgrad_queue: deque[tuple[int, int]] = deque()
        self.actions: list[Action] = []

    def _take(self, counters: dict[int, int], chunk: int) -> int:
        counters[chunk] += 1
        return self.mb_offset[chunk] + counters[chunk] - 1

    def _forward(self, chunk: int) -> Action:
        return Action("F", chunk, self._take(self.next_f, chunk))

    def _backward(self, chunk: int, split: bool) -> Action:
        split = split and self.zero_bubble
        mb = self._take(self.next_b, chunk)
        if split:
            self.wgrad_queue.append((chunk, mb))
        return Action("B", chunk, mb, split)

    def f(self, chunk: int) -> None:
        self.actions.append(self._forward(chunk))

    def b(self, chunk: int, split: bool = False) -> None:
        self.actions.append(self._backward(chunk, split))

    def w(self) -> None:
        if self.zero_bubble:
            chunk, mb = self.wgrad_queue.popleft()
            self.actions.append(Action("W", chunk, mb))

    def fb(self, f_chunk: int, b_chunk: int) -> None:
        fwd, bwd = self._forward(f_chunk), self._backward(b_chunk, False)
        if self.overlap:
            self.actions.append(Action("FB", fwd.chunk, fwd.microbatch, False,
                                       bwd.chunk, bwd.microbatch, bwd.split_wgrad))
        else:
            self.actions += [fwd, bwd]


def _dual_steps(rb: _RankBuilder, n: int, m: int, r: int, turn_rank: bool, ch) -> None:
    """DeepSeek's eight steps for a (half-)pipe of n ranks, m micro-batches, rank index r.

    ``ch(phase)`` maps the reference's phase (0/1) to the local chunk; ``turn_rank`` marks the
    rank(s) where the pipe turns around (last rank of DualPipeV, middle ranks of DualPipe).
    """
    for _ in range((n - r - 1) * 2):                      # 1: nF0
        rb.f(ch(0))
    for _ in range(r + 1):                                # 2: nF0F1
        rb.f(ch(0))
        rb.f(ch(1))
    for _ in range(n - r - 1):                            # 3: nB1W1F1 (zero bubble)
        rb.b(ch(1), split=True)
        rb.w()
        rb.f(ch(1))
    for i in range(m - 2 * n + r + 1):                    # 4: nF0B1F1B0 (main)
        if i == 0 and turn_rank:
            rb.f(ch(0))                                   # not overlapped: smaller bubble
            rb.b(ch(1))
        else:
            rb.fb(ch(0), ch(1))
        rb.fb(ch(1), ch(0))
    for _ in range(n - r - 1):                            # 5: nB1F1B0
        rb.b(ch(1))
        rb.fb(ch(1), ch(0))
    zb = False
    steps = r + 1
    for i in range(steps):                                # 6: nB1B0, zb switched on half-way
        if i == steps // 2 and r % 2 == 1:
            zb = True
        rb.b(ch(1), split=zb)
        if i == steps // 2 and r % 2 == 0:
            zb = True
        rb.b(ch(0), split=zb)
    for _ in range(n - r - 1):                            # 7: nWB0 (zero bubble)
        rb.w()
        rb.b(ch(0), split=True)
    for _ in range(r + 1):                                # 8: nW
        rb.w()
    if rb.wgrad_queue:
        raise RuntimeError("internal error: weight-grad queue not drained")


def dualpipev_actions(num_ranks: int, num_microbatches: int, overlap: bool = True,
                      zero_bubble: bool = True) -> list[list[Action]]:
    """DualPipeV (V-shape, cut-in-half DualPipe) action lists, one list per rank."""
    validate("dualpipev", num_ranks, num_microbatches)
    out = []
    for r in range(num_ranks):
        rb = _RankBuilder({0: 0, 1: 0}, overlap, zero_bubble)
        _dual_steps(rb, num_ranks, num_microbatches, r, r == num_ranks - 1, lambda p: p)
        out.append(rb.actions)
    return out


def dualpipe_actions(num_ranks: int, num_microbatches: int, overlap: bool = True,
                     zero_bubble: bool = True) -> list[list[Action]]:
    """Bidirectional DualPipe action lists, one list per rank.

    Chunk 0 carries micro-batches ``0..M/2-1`` (direction 0), chunk 1 carries ``M/2..M-1``.
    Ranks in the second half run the mirrored schedule (reference phase p = chunk ``p ^ 1``).
    """
    validate("dualpipe", num_ranks, num_microbatches)
    half = num_microbatches // 2
    num_half_ranks = num_ranks // 2
    out = []
    for r in range(num_ranks):
        half_rank = min(r, num_ranks - 1 - r)
        swap = int(r >= num_half_ranks)
        rb = _RankBuilder({0: 0, 1: half}, overlap, zero_bubble)
        _dual_steps(rb, num_half_ranks, half, half_rank, half_rank == num_half_ranks - 1,
                    lambda p, s=swap: p ^ s)
        out.append(rb.actions)
    return out


def one_f_one_b_actions(num_ranks: int, num_microbatches: int) -> list[list[Action]]:
    """Megatron's non-interleaved 1F1B: warm-up forwards, steady F/B pairs, cool-down B."""
    validate("1f1b", num_ranks, num_microbatches)
    out = []
    for r in range(num_ranks):
        warmup = min(num_ranks - r - 1, num_microbatches)
        acts = [Action("F", 0, i) for i in range(warmup)]
        for i in range(num_microbatches - warmup):
            acts += [Action("F", 0, warmup + i), Action("B", 0, i)]
        acts += [Action("B", 0, i) for i in range(num_microbatches - warmup, num_microbatches)]
        out.append(acts)
    return out


def zb1p_actions(num_ranks: int, num_microbatches: int) -> list[list[Action]]:
    """ZB-H1 (zero-bubble paper): 1F1B order with every B split into B and W.

    Rank r runs F/B exactly as 1F1B but keeps ``r`` weight grads pending during the steady
    phase; in the cool-down each B is followed by one W and the rest are flushed at the end.
    The W passes thus fill the cool-down bubbles; in-flight activations stay as in 1F1B.
    """
    validate("zb1p", num_ranks, num_microbatches)
    return [_zb1p_rank(num_ranks, num_microbatches, r) for r in range(num_ranks)]


def _zb1p_rank(num_ranks: int, num_microbatches: int, r: int) -> list[Action]:
    rb = _RankBuilder({0: 0}, overlap=False, zero_bubble=True)
    warmup = min(num_ranks - r - 1, num_microbatches)
    for _ in range(warmup):
        rb.f(0)
    for _ in range(num_microbatches - warmup):
        rb.f(0)
        rb.b(0, split=True)
        if len(rb.wgrad_queue) > r:  # rank r runs its W passes r micro-batches late
            rb.w()
    for _ in range(warmup):
        rb.b(0, split=True)
        rb.w()
    while rb.wgrad_queue:
        rb.w()
    return rb.actions


def interleaved_actions(num_ranks: int, num_microbatches: int,
                        num_chunks: int = 2) -> list[list[Action]]:
    """Megatron's interleaved 1F1B (virtual pipeline, micro-batch groups of size num_ranks)."""
    validate("interleaved", num_ranks, num_microbatches, num_chunks=num_chunks)
    n, v = num_ranks, num_chunks
    total = num_microbatches * v

    def virtual(k: int, forward: bool) -> tuple[int, int]:
        chunk = (k % (n * v)) // n
        return (chunk if forward else v - 1 - chunk), (k // (n * v)) * n + k % n

    out = []
    for r in range(n):
        warmup = total if num_microbatches == n else min((n - r - 1) * 2 + (v - 1) * n, total)
        acts = [Action("F", *virtual(k, True)) for k in range(warmup)]
        for k in range(total - warmup):
            acts += [Action("F", *virtual(k + warmup, True)), Action("B", *virtual(k, False))]
        acts += [Action("B", *virtual(k, False)) for k in range(total - warmup, total)]
        out.append(acts)
    return out


def build_actions(schedule: str, num_ranks: int, num_microbatches: int, *, overlap: bool = True,
                  zero_bubble: bool = True, num_chunks: int = 2) -> list[list[Action]]:
    """Dispatch to the generator of ``schedule`` (overlap/zero_bubble apply to DualPipe(V))."""
    generate = _GENERATORS[get_spec(schedule).name]
    return generate(num_ranks, num_microbatches, overlap, zero_bubble, num_chunks)


# name -> generator(num_ranks, num_microbatches, overlap, zero_bubble, num_chunks)
_GENERATORS = {
    "1f1b": lambda n, m, overlap, zb, chunks: one_f_one_b_actions(n, m),
    "interleaved": lambda n, m, overlap, zb, chunks: interleaved_actions(n, m, chunks),
    "zb1p": lambda n, m, overlap, zb, chunks: zb1p_actions(n, m),
    "dualpipe": lambda n, m, overlap, zb, chunks: dualpipe_actions(n, m, overlap, zb),
    "dualpipev": lambda n, m, overlap, zb, chunks: dualpipev_actions(n, m, overlap, zb),
}


# ----------------------------------------------------------------------------- stage graph


def num_chunks_of(schedule: str, num_chunks: int = 2) -> int:
    """Local model chunks per rank."""
    return get_spec(schedule).num_chunks(num_chunks)


def num_stages(schedule: str, num_ranks: int, num_chunks: int = 2) -> int:
    """Length of a micro-batch's path (stages of one direction for DualPipe)."""
    return get_spec(schedule).num_stages(num_ranks, num_chunks)


def stage_of(schedule: str, num_ranks: int, rank: int, chunk: int) -> int:
    """Stage index (position along the micro-batch path) of ``chunk`` on ``rank``.

    For DualPipe chunk 1 this is its position in direction 1, ``N-1-rank``, which is also the
    index of the layer block it holds (mirror of chunk 0 on rank ``N-1-rank``).
    """
    return get_spec(schedule).stage_of(num_ranks, rank, chunk)


def rank_chunk_of_stage(schedule: str, num_ranks: int, stage: int,
                        direction: int = 0) -> tuple[int, int]:
    """Inverse of `stage_of`: ``(rank, chunk)``; ``direction`` (0/1) only matters for DualPipe."""
    return get_spec(schedule).rank_chunk_of_stage(num_ranks, stage, direction)


def next_rank(schedule: str, num_ranks: int, rank: int, chunk: int, direction: str,
              num_chunks: int = 2) -> tuple[int, int] | None:
    """Peer ``(rank, chunk)`` that receives this chunk's output, or None at the path's end.

    ``direction="forward"``: where the forward activation goes (next stage);
    ``direction="backward"``: where the input gradient goes (previous stage).  The peer may be
    the same rank (DualPipeV turn on rank N-1), in which case no P2P is needed.
    """
    if direction not in ("forward", "backward"):
        raise ValueError(f"direction={direction!r} must be 'forward' or 'backward'")
    stage = stage_of(schedule, num_ranks, rank, chunk)
    target = stage + (1 if direction == "forward" else -1)
    if not 0 <= target < num_stages(schedule, num_ranks, num_chunks):
        return None
    return rank_chunk_of_stage(schedule, num_ranks, target, direction=chunk)


def microbatches_of_chunk(schedule: str, num_microbatches: int, chunk: int) -> range:
    """Global micro-batch ids that pass through local ``chunk``."""
    return get_spec(schedule).microbatches_of_chunk(num_microbatches, chunk)


def _nearest(value: int, ok, lo: int = 1) -> str:
    """The nearest valid integers just below and just above ``value`` (``ok`` tests validity)."""
    below = next((v for v in range(value - 1, lo - 1, -1) if ok(v)), None)
    above = next(v for v in range(max(value + 1, lo), 2 * value + 10**4) if ok(v))
    return f"{below} or {above}" if below is not None else str(above)


def validate(schedule: str, num_ranks: int, num_microbatches: int,
             num_layers: int | None = None, num_chunks: int = 2) -> None:
    """Raise UserError (naming the recipe field and nearest valid values) if unsupported."""
    spec = get_spec(schedule)
    n, m = num_ranks, num_microbatches
    if n < 1:
        raise UserError(f"parallel.pp={n} must be >= 1")
    if spec.bidirectional and n % 2:
        raise UserError(f"parallel.pp={n} must be even for {schedule}; "
                        f"nearest valid: {_nearest(n, lambda v: v % 2 == 0, lo=2)}")
    if spec.needs_vpp and num_chunks < 2:
        raise UserError(f"num_chunks={num_chunks} must be >= 2 for {schedule}")
    low, step = spec.min_microbatches(n), spec.microbatch_multiple
    if spec.needs_vpp:
        ok, need = (lambda v: v >= n and v % n == 0), f"a multiple of parallel.pp={n}"
    elif spec.dualpipe_family:
        def ok(v: int) -> bool:
            return v % step == 0 and v >= low

        need = f"{'even and ' if step == 2 else ''}>= 2*parallel.pp={low}"
    else:
        ok, need = (lambda v: v >= 1), ">= 1"
    if not ok(m):
        raise UserError(f"the number of micro-batches {m} (train.global_batch_size / "
                        f"(train.micro_batch_size x data-parallel size)) must be {need} for "
                        f"{schedule}; nearest valid: {_nearest(m, ok)}")
    if num_layers is not None:
        # DualPipe holds N layer blocks (each rank keeps two of them: 2x parameters).
        parts = spec.num_stages(n, num_chunks)
        if num_layers < parts or num_layers % parts:
            raise UserError(
                f"model.num_layers={num_layers} must be a multiple of {parts} "
                f"(stages of {schedule} with parallel.pp={n}); "
                f"nearest valid: {_nearest(num_layers, lambda v: v % parts == 0, lo=parts)}")


def check_actions(schedule: str, actions: list[list[Action]], num_ranks: int,
                  num_microbatches: int, num_chunks: int = 2) -> None:
    """Raise AssertionError unless every local (chunk, microbatch) gets exactly one F and one
    B (F first), and exactly one W iff its B was split, with W popped in FIFO order."""

    def fail(rank: int, msg: str) -> None:
        raise AssertionError(f"{schedule} rank {rank}: {msg}")

    if len(actions) != num_ranks:
        fail(-1, f"expected {num_ranks} rank lists, got {len(actions)}")
    chunks = range(num_chunks_of(schedule, num_chunks))
    for rank, acts in enumerate(actions):
        expected = {(c, mb) for c in chunks
                    for mb in microbatches_of_chunk(schedule, num_microbatches, c)}
        seen_f, seen_b, seen_w = set(), set(), set()
        queue: deque[tuple[int, int]] = deque()
        for act in acts:
            for part in act.parts():
                key = (part.chunk, part.microbatch)
                if key not in expected:
                    fail(rank, f"{part} is not a (chunk, microbatch) of this rank")
                if part.kind == "F":
                    if key in seen_f:
                        fail(rank, f"duplicate forward {part}")
                    seen_f.add(key)
                elif part.kind == "B":
                    if key in seen_b or key not in seen_f:
                        fail(rank, f"{part} duplicated or before its forward")
                    seen_b.add(key)
                    if part.split_wgrad:
                        queue.append(key)
                else:
                    if not queue or queue.popleft() != key:
                        fail(rank, f"{part} does not pop the oldest pending weight grad")
                    seen_w.add(key)
        if seen_f != expected or seen_b != expected:
            fail(rank, f"missing F/B for {sorted(expected - (seen_f & seen_b))}")
        if queue:
            fail(rank, f"weight grads never applied: {list(queue)}")
