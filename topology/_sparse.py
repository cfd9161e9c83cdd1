"""Histogram arithmetic on the sparse wire form, :class:`HistogramCounts`.

The analysis combines thousands of small histograms (a snapshot's histogram holds the
few buckets one interval filled). Rebuilding each as a 2,048-bucket
:class:`LatencyHistogram` would cost more than everything else together (its merge and
quantile walk every bucket: ~100 µs, against a few µs for a typical sparse one), so the
sparse form is used directly: :class:`Distribution` adds histograms (or other
distributions) bucket by bucket, with their extremes and sums, exactly as
:meth:`LatencyHistogram.merge` does; shares instead of copying when there is a single
part; and summarises itself once as a :class:`Latency`: what
:meth:`LatencyHistogram.quantile` and friends report for the merged histogram.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Sequence
from itertools import accumulate
from typing import Protocol

import msgspec

from topology._histogram import SUB_BITS, HistogramCounts

__all__ = ["Distribution", "Latency", "check_layout"]


class Latency(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A latency distribution in a report: exact count, mean and max; quantiles within
    :data:`~topology._histogram.RELATIVE_ERROR` (all in ns)."""

    count: int
    mean_ns: float
    p50_ns: int
    p99_ns: int
    max_ns: int


def check_layout(hist: HistogramCounts | None, where: str) -> None:
    """Raise ValueError if ``hist`` uses another bucket layout than this code."""
    if hist is not None and hist.sub_bits != SUB_BITS:
        raise ValueError(f"{where}: histogram layout sub_bits={hist.sub_bits}, expected {SUB_BITS}")


class _Counts(Protocol):
    @property
    def counts(self) -> dict[int, int]: ...
    @property
    def min(self) -> int: ...
    @property
    def max(self) -> int: ...
    @property
    def sum(self) -> int: ...


class Distribution:
    """Bucket counts with exact min, max and sum; never mutated once made.

    :meth:`combine` of one part shares that part's dict; of several, adds them into a
    new one. :attr:`latency` is computed on first use and remembered.
    """

    __slots__ = ("_latency", "_summarised", "counts", "max", "min", "sum")

    def __init__(self, counts: dict[int, int], lo: int, hi: int, total: int) -> None:
        self.counts = counts
        self.min, self.max, self.sum = lo, hi, total
        self._latency: Latency | None = None
        self._summarised = False

    @classmethod
    def combine(cls, parts: Sequence[_Counts]) -> Distribution | None:
        """The bucket-wise sum of the non-empty ``parts`` (None if there are none)."""
        if len(parts) == 1:  # the common case: one instance, one edge
            first = parts[0]
            if not first.counts:
                return None
            if isinstance(first, Distribution):
                return first
            return cls(first.counts, first.min, first.max, first.sum)
        counts: dict[int, int] = {}
        get = counts.get
        lo = hi = total = 0
        for part in parts:
            more = part.counts
            if not more:
                continue  # an empty histogram's min and max mean nothing
            if counts:
                for index, n in more.items():
                    counts[index] = get(index, 0) + n
                lo, hi = min(lo, part.min), max(hi, part.max)
            else:
                counts.update(more)
                lo, hi = part.min, part.max
            total += part.sum
        return cls(counts, lo, hi, total) if counts else None

    @property
    def latency(self) -> Latency | None:
        """Count, mean, p50, p99 and max, as :class:`LatencyHistogram` reports them.

        A quantile is the nearest-rank value ``max(1, ceil(q * count))``: the exact min
        or max at the ends, otherwise the midpoint of the bucket holding that rank,
        clamped to the exact extremes.
        """
        if self._summarised:
            return self._latency
        self._summarised = True
        counts = self.counts
        keys = sorted(counts)
        cums = list(accumulate(map(counts.__getitem__, keys)))
        total = cums[-1] if cums else 0
        if total <= 0:
            return None
        lo, hi = self.min, self.max
        found = []
        for rank in (math.ceil(0.5 * total), math.ceil(0.99 * total)):
            if rank <= 1:
                found.append(lo)
            elif rank >= total:
                found.append(hi)
            else:
                index = keys[bisect_left(cums, rank)]
                shift = (index >> SUB_BITS) - 1
                if shift <= 0:  # one value per bucket
                    middle = index
                else:  # bucket_bounds(index), inlined: this runs for every edge
                    middle = ((index - (shift << SUB_BITS)) << shift) + (1 << shift) // 2
                found.append(min(max(middle, lo), hi))
        self._latency = Latency(
            count=total, mean_ns=self.sum / total, p50_ns=found[0], p99_ns=found[1], max_ns=hi
        )
        return self._latency
