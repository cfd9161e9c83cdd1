"""Window: dedup, staleness, pruning, bounds and lost-snapshot counting, with unit tests
and property tests against a model (the set of seqs each instance delivered)."""

from __future__ import annotations

from random import Random

from hypothesis import given, settings
from hypothesis import strategies as st

from topology import HistogramCounts, SentStats, Snapshot, Window, build_graph

S = 1_000_000_000
T0 = 1_700_000_000 * S


def snap(instance: str, seq: int, *, time: int | None = None, msgs: int = 1) -> Snapshot:
    return Snapshot(
        instance=instance,
        agent="a",
        seq=seq,
        time=time if time is not None else T0 + seq * S,
        interval=S,
        sent=[SentStats(subject="x", msgs=msgs)],
    )


def test_duplicates_are_refused_and_counted() -> None:
    w = Window(seconds=10)
    assert w.add(snap("i", 0))
    assert w.add(snap("i", 1))
    assert not w.add(snap("i", 1))
    assert (w.stats.duplicates, w.stats.added, len(w)) == (1, 2, 2)


def test_gaps_count_as_lost_until_the_snapshot_arrives_late() -> None:
    w = Window(seconds=10)
    w.add(snap("i", 0))
    w.add(snap("i", 3))
    assert w.lost == 2
    assert w.add(snap("i", 2))  # late, not a duplicate
    assert w.lost == 1
    assert not w.add(snap("i", 2))
    assert w.lost == 1


def test_the_clock_is_the_snapshots_time_and_old_snapshots_are_stale() -> None:
    w = Window(seconds=5)
    w.add(snap("i", 10))
    assert w.now == T0 + 10 * S
    assert not w.add(snap("j", 0))  # 10 s older than the newest
    assert w.stats.stale == 1
    assert w.add(snap("j", 5))  # exactly at the edge of the window


def test_prune_drops_old_snapshots_and_empty_instances() -> None:
    w = Window(seconds=5)
    for seq in range(4):
        w.add(snap("old", seq))
    w.add(snap("new", 8))
    w.prune(T0 + 8 * S)
    assert [(s.instance, s.seq) for s in w.snapshots()] == [("new", 8), ("old", 3)]
    w.prune(T0 + 20 * S)
    assert w.instances == 0
    assert list(w.snapshots()) == []
    w.prune(T0)  # the clock never goes back
    assert w.now == T0 + 20 * S


def test_snapshots_skip_what_aged_out_before_a_prune() -> None:
    w = Window(seconds=5)
    w.add(snap("a", 0))
    w.add(snap("b", 9))
    assert [(s.instance, s.seq) for s in w.snapshots()] == [("b", 9)]


def test_bounds_are_counted() -> None:
    w = Window(seconds=100, max_instances=2, max_snapshots_per_instance=3)
    for seq in range(5):
        w.add(snap("a", seq))
    assert [s.seq for s in w.snapshots()] == [2, 3, 4]
    assert w.stats.evicted == 2
    assert not w.add(snap("a", 1))  # evicted, then sent again: still a duplicate
    w.add(snap("b", 0))
    assert not w.add(snap("c", 0))
    assert w.stats.instances_refused == 1


def test_a_full_window_makes_room_by_dropping_aged_out_instances() -> None:
    w = Window(seconds=5, max_instances=1)
    w.add(snap("a", 0))
    assert w.add(snap("b", 10))
    assert [s.instance for s in w.snapshots()] == ["b"]


def test_malformed_snapshots_are_refused() -> None:
    w = Window()
    bad = HistogramCounts(counts={1: 1}, min=1, max=1, sum=1, sub_bits=4)
    odd = Snapshot(
        instance="i",
        agent="a",
        seq=0,
        time=T0,
        interval=S,
        sent=[SentStats(subject="x", msgs=1, latency=bad)],
    )
    negative = Snapshot(instance="i", agent="a", seq=0, time=T0, interval=-1)
    assert not w.add(odd)
    assert not w.add(negative)
    assert w.stats.invalid == 2


def test_build_graph_reads_a_window() -> None:
    w = Window(seconds=10)
    for seq in (0, 1, 3):
        w.add(snap("i", seq, msgs=2))
    graph = build_graph(w)
    assert graph.seconds == 10
    assert graph.snapshots == 3
    assert graph.lost == 1
    assert graph.publications[0].msgs == 6


# Each instance delivers a set of seqs in any order, some twice.
deliveries = st.dictionaries(
    st.sampled_from(["a", "b", "c"]),
    st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=40),
    min_size=1,
)


@settings(max_examples=200, deadline=None)
@given(deliveries, st.randoms(use_true_random=False))
def test_lost_and_duplicates_match_the_model(sent: dict[str, list[int]], rng: Random) -> None:
    arrivals = [(name, seq) for name, seqs in sent.items() for seq in seqs]
    rng.shuffle(arrivals)
    w = Window(seconds=1000, max_snapshots_per_instance=64)
    accepted = [w.add(snap(name, seq)) for name, seq in arrivals]
    unique = {name: set(seqs) for name, seqs in sent.items()}
    assert sum(accepted) == sum(len(s) for s in unique.values())
    assert w.stats.duplicates == len(arrivals) - sum(accepted)
    assert w.lost == sum(max(s) - min(s) + 1 - len(s) for s in unique.values())
    assert [(s.instance, s.seq) for s in w.snapshots()] == sorted(
        (name, seq) for name, seqs in unique.items() for seq in seqs
    )


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abcd"), st.integers(0, 60)), min_size=1, max_size=50),
    st.integers(0, 80),
)
def test_prune_keeps_exactly_the_window(arrivals: list[tuple[str, int]], now_s: int) -> None:
    w = Window(seconds=10)
    for name, seq in arrivals:
        w.add(snap(name, seq))
    held = [(s.instance, s.seq) for s in w.snapshots()]
    w.prune(T0 + now_s * S)
    cutoff = w.now - 10 * S
    kept = [(s.instance, s.seq) for s in w.snapshots()]
    assert kept == [(name, seq) for name, seq in held if T0 + seq * S >= cutoff]
    assert w.instances == len({name for name, _ in kept})
    assert len(w) == len(kept)
