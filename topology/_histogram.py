"""`LatencyHistogram`: a mergeable, fixed-memory latency histogram.

Values are nanoseconds. The layout is log-linear (as in HdrHistogram): values below
128 ns get one bucket each; above that, every power-of-two range ``[2^k, 2^(k+1))`` is
split into 64 equal sub-buckets. A bucket is never wider than 1/64 of its lower bound,
and a quantile is reported as its bucket's midpoint, so a reported value is within
:data:`RELATIVE_ERROR` (1/128, under 0.8 %) of the recorded one. The 2,048 buckets cover
0 to :data:`HIGHEST_TRACKABLE_NS` (about 137 s); larger values land in the last bucket
and are counted in :attr:`LatencyHistogram.overflows`.

Memory is the same whatever was recorded, recording is a few integer operations, and
merging adds bucket counts, so merging two histograms is exactly the same as recording
both streams into one. :meth:`LatencyHistogram.to_counts` gives a sparse
:class:`HistogramCounts` struct to send in telemetry snapshots.
"""

from __future__ import annotations

import math
from typing import Annotated, Final

import msgspec

__all__ = [
    "BUCKETS",
    "HIGHEST_TRACKABLE_NS",
    "MAX_COUNT",
    "MAX_NS",
    "RELATIVE_ERROR",
    "SUB_BITS",
    "HistogramCounts",
    "LatencyHistogram",
    "bucket_bounds",
    "bucket_index",
    "within_bounds",
]

#: log2 of the number of linear sub-buckets in each power-of-two range.
SUB_BITS: Final = 6
_SUB: Final = 1 << SUB_BITS
# bit_length of the smallest value whose bucket is wider than 1 ns (128).
_LINEAR_BITS: Final = SUB_BITS + 1
#: The largest value with a bucket of its own (2^37 - 1 ns, about 137 s).
HIGHEST_TRACKABLE_NS: Final = (1 << 37) - 1
#: Number of buckets; fixed, whatever is recorded.
BUCKETS: Final = (HIGHEST_TRACKABLE_NS.bit_length() - _LINEAR_BITS + 2) << SUB_BITS
#: Largest relative difference between a reported quantile and the recorded value.
RELATIVE_ERROR: Final = 1 / (2 * _SUB)


#: Largest count one bucket of a snapshot's histogram may hold: far above what one
#: interval records (a snapshot with more is garbled or forged).
MAX_COUNT: Final = (1 << 32) - 1
#: Largest min, max or sum (ns) a snapshot's histogram may hold: 63 bits, 292 years.
MAX_NS: Final = (1 << 63) - 1

_Index = Annotated[int, msgspec.Meta(ge=0, lt=BUCKETS)]
_Count = Annotated[int, msgspec.Meta(ge=0, le=MAX_COUNT)]
_Ns = Annotated[int, msgspec.Meta(ge=0, le=MAX_NS)]


class HistogramCounts(msgspec.Struct, frozen=True, kw_only=True):
    """A histogram on the wire: the non-empty buckets and the exact extremes and sum.

    ``counts`` maps bucket index to count (only non-zero buckets). ``sub_bits`` names the
    bucket layout, so a receiver with another layout rejects the data instead of
    misreading it. Decoding refuses indexes outside the layout, counts outside
    0..:data:`MAX_COUNT`, a min, max or sum outside 0..:data:`MAX_NS`, and more than
    :data:`BUCKETS` entries (a hostile snapshot cannot make a huge dict).
    """

    counts: Annotated[dict[_Index, _Count], msgspec.Meta(max_length=BUCKETS)]
    min: _Ns = 0
    max: _Ns = 0
    sum: _Ns = 0
    overflows: int = 0
    sub_bits: int = SUB_BITS


def within_bounds(hist: HistogramCounts) -> bool:
    """Whether ``hist`` is of this layout and within the bounds decoding enforces (a
    histogram made in Python is not checked when it is made)."""
    values = (hist.min, hist.max, hist.sum)
    if hist.sub_bits != SUB_BITS or min(values) < 0 or max(values) > MAX_NS:
        return False
    counts = hist.counts
    return not counts or (
        min(counts) >= 0
        and max(counts) < BUCKETS
        and min(counts.values()) >= 0
        and max(counts.values()) <= MAX_COUNT
    )


def bucket_index(ns: int) -> int:
    """The bucket a non-negative value up to :data:`HIGHEST_TRACKABLE_NS` falls in."""
    shift = ns.bit_length() - _LINEAR_BITS
    if shift < 0:
        return ns
    return (shift << SUB_BITS) + (ns >> shift)


def bucket_bounds(index: int) -> tuple[int, int]:
    """The lowest value of bucket ``index`` and its width (in ns)."""
    shift = (index >> SUB_BITS) - 1
    if shift <= 0:
        return index, 1
    return (index - (shift << SUB_BITS)) << shift, 1 << shift


class LatencyHistogram:
    """Counts of nanosecond latencies in fixed log-linear buckets.

    ``min``, ``max``, ``mean`` and ``count`` are exact; quantiles are within
    :data:`RELATIVE_ERROR`. An empty histogram reports 0 for all of them.
    """

    __slots__ = ("_count", "_counts", "_max", "_min", "_sum", "overflows")

    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self) -> None:
        self._counts = [0] * BUCKETS
        self._count = 0
        self._sum = 0
        self._min = 0
        self._max = 0
        #: Values above HIGHEST_TRACKABLE_NS (recorded in the last bucket).
        self.overflows = 0

    def record(self, ns: int) -> None:
        """Record one value in nanoseconds (negative values are a ValueError)."""
        if ns < 0:
            raise ValueError(f"a latency cannot be negative: {ns} ns")
        value = ns
        if value > HIGHEST_TRACKABLE_NS:
            value = HIGHEST_TRACKABLE_NS
            self.overflows += 1
        shift = value.bit_length() - _LINEAR_BITS
        if shift < 0:
            self._counts[value] += 1
        else:
            self._counts[(shift << SUB_BITS) + (value >> shift)] += 1
        if self._count == 0:
            self._min = self._max = ns
        elif ns < self._min:
            self._min = ns
        elif ns > self._max:
            self._max = ns
        self._count += 1
        self._sum += ns

    @property
    def count(self) -> int:
        """How many values were recorded."""
        return self._count

    @property
    def min(self) -> int:
        return self._min

    @property
    def max(self) -> int:
        return self._max

    @property
    def sum(self) -> int:
        return self._sum

    @property
    def mean(self) -> float:
        return self._sum / self._count if self._count else 0.0

    def quantile(self, q: float) -> int:
        """The value at quantile ``q`` (0..1), in ns.

        It estimates the nearest-rank quantile of the recorded values: the value of rank
        ``max(1, ceil(q * count))`` in sorted order, within :data:`RELATIVE_ERROR`.
        """
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"a quantile must be between 0 and 1, not {q}")
        if self._count == 0:
            return 0
        rank = max(1, math.ceil(q * self._count))
        if rank == 1:
            return self._min
        if rank >= self._count:
            return self._max
        seen = 0
        for index, n in enumerate(self._counts):
            seen += n
            if seen >= rank:
                low, width = bucket_bounds(index)
                return min(max(low + width // 2, self._min), self._max)
        return self._max  # unreachable: the counts add up to count

    def merge(self, other: LatencyHistogram) -> None:
        """Add ``other``'s values to this histogram (exact)."""
        if other._count == 0:
            return
        counts = self._counts
        for index, n in enumerate(other._counts):
            if n:
                counts[index] += n
        if self._count == 0:
            self._min, self._max = other._min, other._max
        else:
            self._min = min(self._min, other._min)
            self._max = max(self._max, other._max)
        self._count += other._count
        self._sum += other._sum
        self.overflows += other.overflows

    def reset(self) -> None:
        """Forget every value (the memory is kept)."""
        counts = self._counts
        for index in range(BUCKETS):
            counts[index] = 0
        self._count = self._sum = self._min = self._max = self.overflows = 0

    def to_counts(self) -> HistogramCounts:
        """A sparse copy to send on the wire; see :meth:`from_counts`."""
        return HistogramCounts(
            counts={i: n for i, n in enumerate(self._counts) if n},
            min=self._min,
            max=self._max,
            sum=self._sum,
            overflows=self.overflows,
        )

    @classmethod
    def from_counts(cls, data: HistogramCounts) -> LatencyHistogram:
        """Rebuild a histogram from :meth:`to_counts`; ValueError if ``data`` is inconsistent."""
        if data.sub_bits != SUB_BITS:
            raise ValueError(f"histogram layout sub_bits={data.sub_bits}, expected {SUB_BITS}")
        hist = cls()
        total = 0
        for index, n in data.counts.items():
            if not 0 <= index < BUCKETS:
                raise ValueError(f"histogram bucket {index} is out of range 0..{BUCKETS - 1}")
            if n < 0:
                raise ValueError(f"histogram bucket {index} has a negative count {n}")
            hist._counts[index] = n
            total += n
        if total and not 0 <= data.min <= data.max:
            raise ValueError(f"histogram min {data.min} and max {data.max} are inconsistent")
        if not 0 <= data.overflows <= total or data.sum < 0:
            raise ValueError("histogram sum or overflow count is inconsistent")
        hist._count = total
        if total:
            hist._min, hist._max, hist._sum = data.min, data.max, data.sum
            hist.overflows = data.overflows
        return hist

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, LatencyHistogram):
            return NotImplemented
        return (
            self._count == other._count
            and self._sum == other._sum
            and self._min == other._min
            and self._max == other._max
            and self.overflows == other.overflows
            and self._counts == other._counts
        )

    def __repr__(self) -> str:
        if not self._count:
            return "<LatencyHistogram empty>"
        return (
            f"<LatencyHistogram count={self._count} p50={self.quantile(0.5)}ns "
            f"p99={self.quantile(0.99)}ns max={self._max}ns>"
        )
