"""Exact merging: snapshots of a stream split anywhere give the same graph as one snapshot
of the whole stream, and sparse histogram arithmetic equals LatencyHistogram's."""

from __future__ import annotations

import itertools
from collections import Counter

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topology import (
    HistogramCounts,
    Latency,
    LatencyHistogram,
    ReceivedStats,
    SentStats,
    Snapshot,
    Window,
    build_graph,
    decode_snapshot,
)
from topology._histogram import BUCKETS, MAX_COUNT, MAX_NS, bucket_bounds, within_bounds
from topology._sparse import Summaries

S = 1_000_000_000
T0 = 1_700_000_000 * S

latencies = st.integers(min_value=0, max_value=10 * S)


def histogram(values: list[int]) -> LatencyHistogram:
    hist = LatencyHistogram()
    for value in values:
        hist.record(value)
    return hist


def summary(hist: LatencyHistogram) -> Latency:
    """What a distribution of the same values must report."""
    return Latency(
        count=hist.count,
        mean_ns=hist.mean,
        p50_ns=hist.quantile(0.5),
        p99_ns=hist.quantile(0.99),
        max_ns=hist.max,
    )


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(latencies, max_size=30), min_size=1, max_size=6))
def test_summaries_equal_latency_histogram(parts: list[list[int]]) -> None:
    merged = LatencyHistogram()
    for values in parts:
        merged.merge(histogram(values))
    counts = [histogram(values).to_counts() for values in parts]
    summaries = Summaries()
    dist = summaries.of_histograms(counts)
    # Combining in levels (instances → edge → subject) is the same as all at once.
    levels = [
        d for d in (summaries.of_histograms(counts[:2]), summaries.of_histograms(counts[2:])) if d
    ]
    nested = summaries.combine(levels)
    summaries.summarise()
    if merged.count == 0:
        assert dist is None
        assert nested is None
        return
    assert dist is not None
    assert nested is not None
    assert dist.latency == summary(merged)
    assert nested.latency == dist.latency


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.lists(st.lists(latencies, min_size=1, max_size=20), min_size=1, max_size=9),
        min_size=1,
        max_size=12,
    )
)
def test_many_distributions_summarised_together_are_each_exact(
    groups: list[list[list[int]]],
) -> None:
    # One pass summarises every distribution: none leaks into its neighbours, whether
    # its histograms are added up first (more than ADD_ABOVE) or not, and a distribution
    # of all of them is exact too.
    summaries = Summaries()
    made = []
    for parts in groups:
        dist = summaries.of_histograms([histogram(values).to_counts() for values in parts])
        assert dist is not None
        made.append((dist, histogram([v for values in parts for v in values])))
    top = summaries.combine([dist for dist, _ in made])
    assert top is not None
    everything = histogram([v for parts in groups for values in parts for v in values])
    summaries.summarise()
    for dist, merged in [*made, (top, everything)]:
        assert dist.latency == summary(merged)


# One instance's traffic, event by event.
sent_events = st.tuples(
    st.sampled_from(["evt.x", "evt.y", "svc.z"]),  # subject
    st.integers(0, 5000),  # raw bytes
    st.booleans(),  # a request?
    st.booleans(),  # failed?
    latencies,
)
received_events = st.tuples(
    st.sampled_from([("evt.*", ""), ("svc.z", "z")]),  # subscription
    st.sampled_from(["p", "q", ""]),  # sender
    st.integers(0, 5000),
    st.booleans(),  # handler error?
    st.booleans(),  # undecodable?
    latencies,
)


def sent_stats(events: list[tuple[str, int, bool, bool, int]]) -> list[SentStats]:
    stats = []
    for subject in sorted({e[0] for e in events}):
        mine = [e for e in events if e[0] == subject]
        rtts = [e[4] for e in mine if e[2]]
        stats.append(
            SentStats(
                subject=subject,
                msgs=len(mine),
                raw_bytes=sum(e[1] for e in mine),
                wire_bytes=sum(e[1] // 2 + 40 for e in mine),
                requests=len(rtts),
                failed=sum(1 for e in mine if e[2] and e[3]),
                latency=histogram(rtts).to_counts() if rtts else None,
            )
        )
    return stats


def received_stats(
    events: list[tuple[tuple[str, str], str, int, bool, bool, int]],
    subscriptions: list[tuple[str, str]],
    pending: int,
) -> list[ReceivedStats]:
    """Stats of every subscription, as a node reports them, with or without traffic."""
    stats = []
    for sub in subscriptions:
        mine = [e for e in events if e[0] == sub]
        good = [e for e in mine if not e[4]]
        stats.append(
            ReceivedStats(
                subject=sub[0],
                queue=sub[1],
                msgs=len(mine),
                raw_bytes=sum(e[2] for e in mine),
                wire_bytes=sum(e[2] + 40 for e in mine),
                senders=dict(Counter(e[1] for e in mine)),
                handled=len(good),
                errors=sum(1 for e in good if e[3]),
                latency=histogram([e[5] for e in good]).to_counts() if good else None,
                replies=len(good) if sub[1] else 0,
                decode_failures=dict(Counter(e[1] for e in mine if e[4])),
                pending=pending,
            )
        )
    return stats


@st.composite
def streams(draw: st.DrawFn) -> tuple[list[Snapshot], list[Snapshot]]:
    """Two instances' traffic as snapshots of arbitrary slices, and as one snapshot each."""
    split: list[Snapshot] = []
    whole: list[Snapshot] = []
    for instance, agent in (("z-0", "z"), ("z-1", "z"), ("p-0", "p")):
        out = draw(st.lists(sent_events, max_size=25))
        into = draw(st.lists(received_events, max_size=25))
        cuts = sorted(draw(st.lists(st.integers(0, 25), max_size=4)))
        bounds = [0, *cuts, 25]
        pending = draw(st.integers(0, 50))
        subscriptions = sorted({e[0] for e in into})
        seconds = draw(
            st.lists(st.integers(1, 3), min_size=len(bounds) - 1, max_size=len(bounds) - 1)
        )
        time = T0
        for seq, (lo, hi) in enumerate(itertools.pairwise(bounds)):
            time += seconds[seq] * S
            split.append(
                Snapshot(
                    instance=instance,
                    agent=agent,
                    seq=seq,
                    time=time,
                    interval=seconds[seq] * S,
                    sent=sent_stats(out[lo:hi]),
                    received=received_stats(into[lo:hi], subscriptions, pending if hi == 25 else 0),
                )
            )
        whole.append(
            Snapshot(
                instance=instance,
                agent=agent,
                seq=0,
                time=time,
                interval=sum(seconds) * S,
                sent=sent_stats(out),
                received=received_stats(into, subscriptions, pending),
            )
        )
    return split, whole


@settings(max_examples=150, deadline=None)
@given(streams())
def test_split_stream_gives_the_same_graph_as_the_whole(
    case: tuple[list[Snapshot], list[Snapshot]],
) -> None:
    split, whole = case
    a, b = build_graph(split), build_graph(whole)
    # Only what is about snapshots themselves may differ: how many, and the gauge series.
    assert msgspec.structs.replace(a, instances=(), snapshots=0) == msgspec.structs.replace(
        b, instances=(), snapshots=0
    )
    for x, y in zip(a.instances, b.instances, strict=True):
        assert (x.instance, x.seconds, x.pending[-1]) == (y.instance, y.seconds, y.pending[-1])


def test_a_single_distribution_is_shared_and_empty_parts_count_for_nothing() -> None:
    summaries = Summaries()
    part = histogram([5, 7]).to_counts()
    dist = summaries.of_histograms([part])
    assert dist is not None
    assert summaries.combine([dist]) is dist
    assert summaries.of_histograms([HistogramCounts(counts={}), part]) is not None
    assert summaries.of_histograms([HistogramCounts(counts={})]) is None
    # Buckets that hold nothing are no values: no min or max to report.
    assert summaries.of_histograms([HistogramCounts(counts={3: 0}, min=3, max=3)]) is None
    summaries.summarise()
    assert dist.latency == Latency(count=2, mean_ns=6.0, p50_ns=5, p99_ns=7, max_ns=7)


@settings(max_examples=100, deadline=None)
@given(
    st.dictionaries(st.integers(0, BUCKETS - 1), st.integers(0, 50), min_size=1, max_size=40),
    st.dictionaries(st.integers(0, BUCKETS - 1), st.integers(0, 50), max_size=40),
)
def test_buckets_holding_zero_change_nothing(a: dict[int, int], b: dict[int, int]) -> None:
    # A node never sends a zero count, but a snapshot may hold one: it must not move a
    # quantile. The extremes are the outermost buckets' bounds.
    parts = []
    merged = LatencyHistogram()
    for counts in (a, b):
        held = [i for i, n in counts.items() if n]
        if not held:
            continue
        lo, hi = bucket_bounds(min(held))[0], sum(bucket_bounds(max(held))) - 1
        part = HistogramCounts(counts=counts, min=lo, max=hi, sum=lo + hi)
        parts.append(part)
        merged.merge(LatencyHistogram.from_counts(part))
    summaries = Summaries()
    dist = summaries.of_histograms(parts)
    summaries.summarise()
    if merged.count == 0:
        assert dist is None
        return
    assert dist is not None
    assert (dist.latency.count, dist.latency.p50_ns, dist.latency.p99_ns) == (
        merged.count,
        merged.quantile(0.5),
        merged.quantile(0.99),
    )


@settings(max_examples=60, deadline=None)
@given(st.lists(st.lists(latencies, min_size=1, max_size=15), min_size=3, max_size=20))
def test_any_depth_and_mix_of_levels_is_exact(parts: list[list[int]]) -> None:
    # Histograms, distributions of them, and distributions of distributions of
    # different depths: every level equals the whole stream recorded at once.
    counts = [histogram(values).to_counts() for values in parts]
    summaries = Summaries()
    third = len(counts) // 3
    low = summaries.of_histograms(counts[:third])  # may hold more than ADD_ABOVE histograms
    mid = summaries.combine([low, summaries.of_histograms(counts[third : 2 * third])])  # type: ignore[list-item]
    top = summaries.combine([mid, summaries.of_histograms(counts[2 * third :])])  # type: ignore[list-item]
    summaries.summarise()
    for dist, upto in ((low, third), (mid, 2 * third), (top, len(parts))):
        merged = histogram([v for values in parts[:upto] for v in values])
        assert dist is not None
        assert dist.latency == summary(merged)


def test_sums_beyond_64_bits_are_exact() -> None:
    big = HistogramCounts(counts={2047: 4}, min=MAX_NS, max=MAX_NS, sum=MAX_NS)
    summaries = Summaries()
    dist = summaries.of_histograms([big, big, big])
    assert dist is not None
    summaries.summarise()
    assert dist.latency.mean_ns == 3 * MAX_NS / 12


@pytest.mark.parametrize(
    ("bad", "computable"),
    [
        (HistogramCounts(counts={BUCKETS: 1}), False),
        (HistogramCounts(counts={-1: 1}), False),
        (HistogramCounts(counts={5: -1, 6: 2}), False),
        (HistogramCounts(counts={5: 1}, min=-1), False),
        (HistogramCounts(counts={5: 1 << 63}), False),
        # Beyond what a node sends, but still added up exactly.
        (HistogramCounts(counts={5: MAX_COUNT + 1}), True),
        (HistogramCounts(counts={5: 1}, sum=1 << 63), True),
    ],
    ids=[
        "bucket-too-high",
        "negative-bucket",
        "negative-count",
        "negative-min",
        "count-above-63-bits",
        "count-above-32-bits",
        "sum-above-63-bits",
    ],
)
def test_a_histogram_out_of_bounds_is_refused_by_windows_and_decoding(
    bad: HistogramCounts, computable: bool
) -> None:
    assert not within_bounds(bad)
    snapshot = Snapshot(
        instance="a-1",
        agent="a",
        seq=0,
        time=T0,
        interval=S,
        sent=[SentStats(subject="svc.x", msgs=1, requests=1, latency=bad)],
    )
    if computable:
        assert build_graph([snapshot]).publications[0].latency is not None
    else:
        with pytest.raises(ValueError, match="histogram"):
            build_graph([snapshot])
    window = Window()
    assert not window.add(snapshot)
    assert window.stats.invalid == 1
    # Decoding refuses the same values (or cannot even encode them).
    with pytest.raises((msgspec.ValidationError, OverflowError)):
        decode_snapshot(msgspec.msgpack.encode(snapshot))
