"""Exact merging: snapshots of a stream split anywhere give the same graph as one snapshot
of the whole stream, and sparse histogram arithmetic equals LatencyHistogram's."""

from __future__ import annotations

import itertools
from collections import Counter

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from topology import (
    HistogramCounts,
    LatencyHistogram,
    ReceivedStats,
    SentStats,
    Snapshot,
    build_graph,
)
from topology._sparse import Distribution

S = 1_000_000_000
T0 = 1_700_000_000 * S

latencies = st.integers(min_value=0, max_value=10 * S)


def histogram(values: list[int]) -> LatencyHistogram:
    hist = LatencyHistogram()
    for value in values:
        hist.record(value)
    return hist


@settings(max_examples=150, deadline=None)
@given(st.lists(st.lists(latencies, max_size=30), min_size=1, max_size=6))
def test_sparse_arithmetic_equals_latency_histogram(parts: list[list[int]]) -> None:
    merged = LatencyHistogram()
    for values in parts:
        merged.merge(histogram(values))
    counts = [histogram(values).to_counts() for values in parts]
    dist = Distribution.combine(counts)
    if merged.count == 0:
        assert dist is None
        return
    assert dist is not None
    exact = merged.to_counts()
    assert (dist.counts, dist.min, dist.max, dist.sum) == (
        exact.counts,
        exact.min,
        exact.max,
        exact.sum,
    )
    summary = dist.latency
    assert summary is not None
    assert (summary.count, summary.mean_ns, summary.max_ns) == (
        merged.count,
        merged.mean,
        merged.max,
    )
    assert (summary.p50_ns, summary.p99_ns) == (merged.quantile(0.5), merged.quantile(0.99))
    # Combining in levels (instances → edge → subject) is the same as all at once.
    levels = [d for d in (Distribution.combine(counts[:2]), Distribution.combine(counts[2:])) if d]
    nested = Distribution.combine(levels)
    assert nested is not None
    assert nested.latency == summary


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


def test_a_single_part_is_shared_not_copied() -> None:
    part = histogram([5, 7]).to_counts()
    dist = Distribution.combine([part])
    assert dist is not None
    assert dist.counts is part.counts
    assert Distribution.combine([dist]) is dist
    assert Distribution.combine([HistogramCounts(counts={}), part]) is not None
    assert Distribution.combine([HistogramCounts(counts={})]) is None
