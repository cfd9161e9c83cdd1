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
from collections.abc import Sequence
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
        total = sum(counts.values())
        if total <= 0:
            return None
        # The p50 bucket is found walking up from the lowest, the p99 bucket walking
        # down from the highest: a merged histogram holds hundreds of buckets, and the
        # top 1% of the values sits in a few of them.
        r50, r99 = math.ceil(0.5 * total), math.ceil(0.99 * total)
        keys = sorted(counts)
        i50 = i99 = keys[-1]
        running = 0
        for index in keys:
            running += counts[index]
            if running >= r50:
                i50 = index
                break
        below = total  # then: the values in the buckets under the current one
        for index in reversed(keys):
            below -= counts[index]
            if below < r99:  # the buckets under this one hold fewer than r99 values
                i99 = index
                break
        lo, hi = self.min, self.max
        self._latency = Latency(
            count=total,
            mean_ns=self.sum / total,
            p50_ns=_value_at(r50, i50, total, lo, hi),
            p99_ns=_value_at(r99, i99, total, lo, hi),
            max_ns=hi,
        )
        return self._latency


def _value_at(rank: int, index: int, total: int, lo: int, hi: int) -> int:
    """The value reported for the ``rank``-th of ``total`` values, found in bucket
    ``index``: the exact extreme at either end, else the bucket's midpoint clamped to them."""
    if rank <= 1:
        return lo
    if rank >= total:
        return hi
    shift = (index >> SUB_BITS) - 1
    if shift > 0:  # bucket_bounds(index), inlined
        index = ((index - (shift << SUB_BITS)) << shift) + (1 << shift) // 2
    # else: one value per bucket, the index is the value
    return min(max(index, lo), hi)
