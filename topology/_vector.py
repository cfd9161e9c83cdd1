"""The vectorised pass of :meth:`topology._sparse.Summaries.summarise` (NumPy).

Every bucket of every distribution is gathered from the histograms it lists, the lot
sorted by (distribution, bucket) and added up in one running sum; a distribution's
quantile bucket is where the running sum first reaches the sum before the distribution
plus the quantile's rank (one binary search per quantile for all of them). Buckets of
the same index from several histograms sit side by side in the sort, so they count as
one.

The result is exactly what :class:`~topology.LatencyHistogram` reports for the merged
histogram: integer arithmetic throughout (sums of nanoseconds as Python integers, and
counts checked to stay far from 64 bits), and the ranks computed in the same floating
point as :meth:`~topology.LatencyHistogram.quantile`.
"""

from __future__ import annotations

from itertools import chain
from operator import attrgetter
from typing import TYPE_CHECKING, Final

import numpy as np
from msgspec.structs import force_setattr

from topology._histogram import BUCKETS, SUB_BITS

if TYPE_CHECKING:
    import numpy.typing as npt

    from topology._sparse import Summaries

    _Ints = npt.NDArray[np.int64]

_BUCKET_BITS: Final = (BUCKETS - 1).bit_length()
#: The running sum of all counts stays below this (checked first): int64 stays exact.
_SAFE: Final = float(1 << 62)
_min: Final = attrgetter("min")
_max: Final = attrgetter("max")
_sum: Final = attrgetter("sum")


def summarise(summaries: Summaries) -> None:
    """Set the latency of each of ``summaries.distributions``.

    Raises ValueError for a histogram no snapshot can hold: a bucket outside the
    layout, a negative count, min, max or sum, or a count, min or max above 63 bits.
    """
    histograms, distributions = summaries.histograms, summaries.distributions
    counts = [hist.counts for hist in histograms]
    sizes = np.fromiter(map(len, counts), np.int64, len(counts))
    try:
        keys = np.fromiter(chain.from_iterable(counts), np.int64, int(sizes.sum()))
        values = np.fromiter(chain.from_iterable([c.values() for c in counts]), np.int64, len(keys))
        lows = np.fromiter(map(_min, histograms), np.int64, len(histograms))
        highs = np.fromiter(map(_max, histograms), np.int64, len(histograms))
    except OverflowError:
        raise ValueError("a histogram has a min, max or count above 63 bits") from None
    # Sums of nanoseconds can outgrow 64 bits: kept as Python integers.
    sums = np.fromiter(map(_sum, histograms), object, len(histograms))
    if keys.min() < 0 or keys.max() >= BUCKETS:
        raise ValueError(f"a histogram has a bucket outside 0..{BUCKETS - 1}")
    if values.min() < 0 or min(lows.min(), highs.min(), sums.min()) < 0:
        raise ValueError("a histogram has a negative count, min, max or sum")

    # Every (distribution, histogram) pair, then every bucket of each pair.
    members = [dist.members for dist in distributions]
    per_dist = np.fromiter(map(len, members), np.int64, len(members))
    pairs = np.fromiter(chain.from_iterable(members), np.int64, int(per_dist.sum()))
    first_pair = _starts(per_dist)
    held = np.add.reduceat(values.astype(np.float64), _starts(sizes))
    if float(held[pairs].sum()) >= _SAFE:
        raise ValueError("too many histogram counts to add up exactly")
    pair_sizes = sizes[pairs]
    # (Temporaries are dropped as soon as they are used: a long window gathers
    # millions of buckets.)
    entry = np.arange(int(pair_sizes.sum()), dtype=np.int64) + np.repeat(
        _starts(sizes)[pairs] - _starts(pair_sizes), pair_sizes
    )
    gathered, counted = keys[entry], values[entry]
    del entry
    owner = np.repeat(np.repeat(np.arange(len(members), dtype=np.int64), per_dist), pair_sizes)
    per_dist_entries = np.bincount(owner, minlength=len(members))
    # Sorted by (distribution, bucket), one running sum holds every distribution's
    # cumulative counts, offset by the counts of the distributions before it.
    owner <<= _BUCKET_BITS
    owner |= gathered
    del gathered
    order = np.argsort(owner, kind="stable")
    buckets = owner[order]
    buckets &= BUCKETS - 1
    del owner
    running = np.cumsum(counted[order])
    del counted, order
    ends = np.cumsum(per_dist_entries)
    before = np.concatenate(([0], running))[ends - per_dist_entries]
    totals = running[ends - 1] - before
    # Nearest rank ceil(q * count), computed as LatencyHistogram.quantile does.
    as_float = totals.astype(np.float64)
    r50 = np.ceil(0.5 * as_float).astype(np.int64)
    r99 = np.ceil(0.99 * as_float).astype(np.int64)
    low = np.minimum.reduceat(lows[pairs], first_pair)
    high = np.maximum.reduceat(highs[pairs], first_pair)
    total_ns = np.add.reduceat(sums[pairs], first_pair)
    p50 = _value_at(r50, buckets[np.searchsorted(running, before + r50)], totals, low, high)
    p99 = _value_at(r99, buckets[np.searchsorted(running, before + r99)], totals, low, high)
    for dist, count, sum_ns, v50, v99, hi in zip(
        distributions,
        totals.tolist(),
        total_ns.tolist(),
        p50.tolist(),
        p99.tolist(),
        high.tolist(),
        strict=True,
    ):
        latency = dist.latency
        force_setattr(latency, "count", count)
        force_setattr(latency, "mean_ns", sum_ns / count)
        force_setattr(latency, "p50_ns", v50)
        force_setattr(latency, "p99_ns", v99)
        force_setattr(latency, "max_ns", hi)


def _starts(sizes: _Ints) -> _Ints:
    """Where each run starts when runs of these sizes are laid end to end."""
    return np.cumsum(sizes) - sizes


def _value_at(ranks: _Ints, buckets: _Ints, totals: _Ints, low: _Ints, high: _Ints) -> _Ints:
    """The values reported for these ranks, found in these buckets: the exact extreme
    at either end, else the bucket's midpoint (``bucket_bounds``) clamped to them."""
    shift = np.maximum((buckets >> SUB_BITS) - 1, 0)
    middle = ((buckets - (shift << SUB_BITS)) << shift) + ((1 << shift) >> 1)
    value = np.minimum(np.maximum(middle, low), high)
    value = np.where(ranks >= totals, high, value)
    return np.where(ranks <= 1, low, value)
