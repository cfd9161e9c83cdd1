"""The latency distributions of a graph being built, summarised all at once.

The analysis combines thousands of small histograms (a snapshot's histogram holds the
few buckets one interval filled) at several levels: an edge's instances, a subject's
publishers or subscriptions, an agent's subscriptions, the subjects that link two
agents. Each level is summarised (:class:`Latency`: count, mean, p50, p99, max) from the
exact bucket-wise sum of the histograms under it: what :meth:`LatencyHistogram.merge`
then :meth:`LatencyHistogram.quantile` and friends give.

:class:`Summaries` collects the distributions while the graph is built. A distribution
(:class:`Distribution`) is the histograms it covers, and its :class:`Latency` exists
from the start, so the graph's records are made as the build goes; a distribution of a
single part is that part. A distribution lists the histograms under it (an edge's come
from its instances' snapshots; more than :data:`ADD_ABOVE` are added up at once, in
Python, so no level lists many). :meth:`Summaries.summarise` then fills every latency in
one vectorised pass (NumPy, :mod:`topology._vector`). Done one
distribution at a time, in Python, this took a third of the time of ``mesh bench
topology``.

NumPy is imported by :meth:`Summaries.summarise`, not with this module: a node, which
imports :mod:`topology` for its telemetry types, never loads it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol, TypeVar

import msgspec

from topology._histogram import SUB_BITS, HistogramCounts

__all__ = ["Distribution", "Latency", "Summaries", "add_counts", "check_layout"]


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


class Distribution:
    """Histograms whose bucket-wise sum a :class:`Latency` summarises.

    ``latency`` is the same object from the moment the distribution is made; its
    values are set by :meth:`Summaries.summarise`.
    """

    __slots__ = ("latency", "members")

    def __init__(self, members: list[int]) -> None:
        #: Indexes of its histograms in :attr:`Summaries.histograms` (one may be
        #: counted more than once).
        self.members = members
        self.latency = Latency(count=0, mean_ns=0.0, p50_ns=0, p99_ns=0, max_ns=0)


#: More histograms than this in one distribution are added up at once, in Python, rather
#: than handed over one by one: an edge's come from its instances' snapshots, many of
#: one distribution, and their sum has far fewer buckets than they have together.
#: (Gathering buckets for the vectorised pass costs about as much per bucket as adding
#: them up here, and the pass slows down once they no longer fit in the CPU's caches.)
ADD_ABOVE: Final = 4


class _Counts(Protocol):
    """A histogram's buckets (index: count), min, max and sum of values."""

    @property
    def counts(self) -> dict[int, int]: ...
    @property
    def min(self) -> int: ...
    @property
    def max(self) -> int: ...
    @property
    def sum(self) -> int: ...


class _Sum:
    """Histograms added up."""

    __slots__ = ("counts", "max", "min", "sum")

    def __init__(self, counts: dict[int, int], lo: int, hi: int, total: int) -> None:
        self.counts, self.min, self.max, self.sum = counts, lo, hi, total


K = TypeVar("K")


def add_counts(into: dict[K, int], counts: dict[K, int]) -> None:
    """Add ``counts`` to ``into``, key by key."""
    get = into.get
    for key, n in counts.items():
        into[key] = get(key, 0) + n


def _add(parts: list[_Counts]) -> _Sum:
    """The bucket-wise sum of non-empty ``parts``, starting from a copy of the largest."""
    sizes = [len(part.counts) for part in parts]
    largest = sizes.index(max(sizes))
    base = parts[largest]
    counts = base.counts.copy()
    lo, hi, total = base.min, base.max, base.sum
    for at, part in enumerate(parts):
        if at != largest:
            add_counts(counts, part.counts)
            lo, hi = min(lo, part.min), max(hi, part.max)
            total += part.sum
    return _Sum(counts, lo, hi, total)


class Summaries:
    """The distributions of one graph: made with :meth:`combine`, summarised together."""

    __slots__ = ("distributions", "histograms")

    def __init__(self) -> None:
        #: Every distribution's histograms.
        self.histograms: list[_Counts] = []
        self.distributions: list[Distribution] = []

    def of_histograms(self, parts: Sequence[_Counts]) -> Distribution | None:
        """The distribution of these histograms; None if they hold no value."""
        held = [part for part in parts if any(part.counts.values())]  # empty: no min, max
        if not held:
            return None
        if len(held) > ADD_ABOVE:
            held = [_add(held)]
        histograms = self.histograms
        start = len(histograms)
        histograms += held
        dist = Distribution(list(range(start, len(histograms))))
        self.distributions.append(dist)
        return dist

    def combine(self, parts: Sequence[Distribution]) -> Distribution | None:
        """The distribution of these distributions (a subject's edges, an agent's
        subscriptions…); None if there are none. A single one is returned itself."""
        if len(parts) <= 1:
            return parts[0] if parts else None  # the common case: one edge
        members: list[int] = []
        for part in parts:
            members += part.members
        dist = Distribution(members)
        self.distributions.append(dist)
        return dist

    def summarise(self) -> None:
        """Set the latency of every distribution made so far (once they are all made).

        Raises ValueError for a histogram outside the bounds that decoding a snapshot
        enforces (:func:`~topology._histogram.within_bounds`; a
        :class:`~topology.Window` refuses such snapshots on ``add``).
        """
        if not self.distributions:
            return
        from topology._vector import summarise

        summarise(self)
