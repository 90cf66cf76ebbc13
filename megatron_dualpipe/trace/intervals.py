"""Half-open time intervals ``[start, end)`` in microseconds, as sorted disjoint lists."""

from __future__ import annotations

import bisect

Intervals = list[tuple[float, float]]


def union(intervals) -> Intervals:
    """Sorted, disjoint union of half-open intervals ``[start, end)``."""
    out: Intervals = []
    for i in sorted(i for i in intervals if i[1] > i[0]):
        if out and i[0] <= out[-1][1]:
            if i[1] > out[-1][1]:
                out[-1] = (out[-1][0], i[1])
        else:
            out.append(i)  # the caller's tuple: no copy of large inputs
    return out


def intersect(a: Intervals, b: Intervals) -> Intervals:
    """Intersection of two unions (as returned by `union`)."""
    if len(b) * 16 < len(a):
        return _intersect_few(a, b)
    if len(a) * 16 < len(b):
        return _intersect_few(b, a)
    out: Intervals = []
    i = j = 0
    while i < len(a) and j < len(b):
        start, end = max(a[i][0], b[j][0]), min(a[i][1], b[j][1])
        if start < end:
            out.append((start, end))
        if a[i][1] < b[j][1]:
            i += 1
        else:
            j += 1
    return out


def _intersect_few(many: Intervals, few: Intervals) -> Intervals:
    """`intersect` for a short `few`: a binary search in `many` per interval of `few`."""
    out: Intervals = []
    for lo, hi in few:
        k = bisect.bisect_right(many, lo, key=lambda iv: iv[1])  # first ending after lo
        while k < len(many) and many[k][0] < hi:
            start, end = max(many[k][0], lo), min(many[k][1], hi)
            if start < end:
                out.append((start, end))
            k += 1
    return out


def length(intervals: Intervals) -> float:
    return sum(end - start for start, end in intervals)


def clip(intervals: Intervals, lo: float, hi: float) -> Intervals:
    return intersect(intervals, [(lo, hi)])


def covered_length(start: float, end: float, cover: Intervals, starts: list[float]) -> float:
    """Length of ``[start, end)`` inside `cover` (a union; `starts` its start times)."""
    total = 0.0
    k = max(bisect.bisect_right(starts, start) - 1, 0)
    while k < len(cover) and cover[k][0] < end:
        lo, hi = max(cover[k][0], start), min(cover[k][1], end)
        if hi > lo:
            total += hi - lo
        k += 1
    return total


def merge_close(intervals: Intervals, gap: float) -> Intervals:
    """`union` that also closes gaps shorter than `gap` (for drawing at a given resolution)."""
    out: Intervals = []
    for start, end in union(intervals):
        if out and start - out[-1][1] < gap:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out
