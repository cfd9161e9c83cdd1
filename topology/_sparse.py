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
single part is that part. :meth:`Summaries.summarise` then fills every latency in one
vectorised pass (NumPy): the buckets of all distributions are gathered from the
histograms they cover, sorted by (distribution, bucket), added up in one running sum,
and each distribution's quantile buckets found by binary search in it. Done one
distribution at a time, in Python, this took a third of the time of ``mesh bench
topology``.

NumPy is imported by :meth:`Summaries.summarise`, not with this module: a node, which
imports :mod:`topology` for its telemetry types, never loads it.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from topology._histogram import SUB_BITS, HistogramCounts

__all__ = ["Distribution", "Latency", "Summaries", "check_layout"]


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
        #: Indexes of the histograms covered, in :class:`Summaries`.
        self.members = members
        self.latency = Latency(count=0, mean_ns=0.0, p50_ns=0, p99_ns=0, max_ns=0)


class Summaries:
    """The distributions of one graph: made with :meth:`combine`, summarised together."""

    __slots__ = ("_distributions", "_histograms")

    def __init__(self) -> None:
        self._histograms: list[HistogramCounts] = []
        self._distributions: list[Distribution] = []

    def combine(self, parts: Sequence[HistogramCounts | Distribution]) -> Distribution | None:
        """The distribution of ``parts`` (histograms or distributions); None if they
        hold no value. A single distribution is returned itself."""
        if len(parts) == 1 and isinstance(parts[0], Distribution):
            return parts[0]
        histograms = self._histograms
        members: list[int] = []
        for part in parts:
            if isinstance(part, Distribution):
                members += part.members
            elif any(part.counts.values()):  # an empty one's min and max mean nothing
                members.append(len(histograms))
                histograms.append(part)
        if not members:
            return None
        dist = Distribution(members)
        self._distributions.append(dist)
        return dist

    def summarise(self) -> None:
        """Set the latency of every distribution made so far (once they are all made).

        Raises ValueError for a histogram outside the bounds that decoding a snapshot
        enforces (:func:`~topology._histogram.within_bounds`; a
        :class:`~topology.Window` refuses such snapshots on ``add``).
        """
        if not self._distributions:
            return
        from topology._vector import summarise

        summarise(self._histograms, self._distributions)
