"""The chaos checker: counts by definition, the history's bound, verdicts and the table.

The property tests build histories from random publishes and deliveries over a few
ids (so retries, duplicates and strays happen often) and check the counts against
the definitions, against identities that tie them together, and against reordering.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import asdict
from typing import Any

import pytest
from checker import (
    NO_DUPLICATES,
    NO_LOSS,
    NO_UNEXPECTED,
    Counts,
    History,
    Outcome,
    Result,
    at_least,
    at_most,
    check,
    equal,
    judge,
    render_table,
)
from hypothesis import given
from hypothesis import strategies as st

Event = tuple[str, str, Any]  # ("publish", id, Outcome) or ("deliver", id, consumer)

ids = st.sampled_from([f"m{n}" for n in range(12)])
outcomes = st.sampled_from(list(Outcome))
consumers = st.sampled_from(["a", "b", "c"])
events = st.lists(
    st.one_of(
        st.tuples(st.just("publish"), ids, outcomes),
        st.tuples(st.just("deliver"), ids, consumers),
    ),
    max_size=60,
)


def replay(history_events: list[Event], limit: int = 1000) -> History:
    history = History(limit)
    for kind, mid, value in history_events:
        if kind == "publish":
            history.publish(mid, value)
        else:
            history.deliver(mid, value)
    return history


def without_examples(counts: Counts) -> dict[str, Any]:
    fields = asdict(counts)
    del fields["examples"]  # the first few ids of each anomaly: order-dependent
    return fields


# -- counts by example -------------------------------------------------------------


def test_an_empty_history_counts_nothing() -> None:
    counts = check(History(10))
    assert [counts.get(name) for name in ("attempts", "ok", "delivered", "lost")] == [0] * 4
    assert counts.examples == {}


def test_each_anomaly_is_counted_with_an_example() -> None:
    history = History(100)
    history.publish("fine", Outcome.OK)
    history.deliver("fine", "a")
    history.publish("lost", Outcome.OK)
    history.publish("refused", Outcome.FAILED)
    history.deliver("refused", "a")
    history.deliver("stray", "b")
    history.publish("timed-out", Outcome.UNKNOWN)
    history.deliver("timed-out", "b")
    history.publish("vanished", Outcome.UNKNOWN)
    history.publish("twice", Outcome.OK)
    for consumer in ("a", "b", "a"):
        history.deliver("twice", consumer)

    counts = check(history)

    assert (counts.attempts, counts.ok, counts.failed, counts.unknown) == (6, 3, 1, 2)
    assert counts.delivered == 5
    assert (counts.lost, counts.recovered) == (1, 1)
    assert (counts.duplicated, counts.extra) == (1, 2)
    assert counts.unexpected == 2  # delivered though failed, and never attempted
    assert counts.examples == {
        "lost": ("lost",),
        "duplicated": ("twice by a+b+a",),
        "unexpected": ("refused", "stray"),
    }
    assert counts.consumers == {"a": 4, "b": 3}


@pytest.mark.parametrize(
    ("attempts", "strongest"),
    [
        ([Outcome.UNKNOWN, Outcome.OK], Outcome.OK),
        ([Outcome.OK, Outcome.FAILED], Outcome.OK),
        ([Outcome.FAILED, Outcome.UNKNOWN], Outcome.UNKNOWN),
        ([Outcome.FAILED, Outcome.FAILED], Outcome.FAILED),
    ],
)
def test_a_retried_id_keeps_its_strongest_outcome(
    attempts: list[Outcome], strongest: Outcome
) -> None:
    history = History(10)
    for outcome in attempts:
        history.publish("m", outcome)
    assert history.outcome("m") is strongest
    assert check(history).attempts == len(attempts)


def test_confirm_upgrades_an_attempt_without_counting_another() -> None:
    history = History(10)
    history.publish("m", Outcome.UNKNOWN)
    history.confirm("m")
    assert history.outcome("m") is Outcome.OK
    assert check(history).attempts == 1
    with pytest.raises(KeyError, match="never attempted"):
        history.confirm("other")


def test_the_history_is_bounded_and_says_when_it_overflowed() -> None:
    history = History(limit=2)
    for n in range(3):
        history.publish(f"m{n}", Outcome.OK)
        history.deliver(f"m{n}", "a")
    history.publish("m0", Outcome.OK)  # a known id is no new entry
    history.confirm("m2")  # its attempt overflowed: nothing to confirm, no error

    counts = check(history)

    assert (counts.ok, counts.delivered, counts.overflow) == (2, 2, 2)
    result = judge("bounded", counts, [])
    assert result.failures == ("overflow == 0",)
    with pytest.raises(ValueError, match="at least one"):
        History(0)


def test_undelivered_ok_is_what_would_be_lost_now() -> None:
    history = History(10)
    history.publish("m0", Outcome.OK)
    history.publish("m1", Outcome.UNKNOWN)
    assert history.undelivered_ok() == 1
    history.deliver("m0", "a")
    assert history.undelivered_ok() == 0


# -- criteria and verdicts ---------------------------------------------------------


def test_criteria_compare_counts_counters_and_numbers() -> None:
    history = History(10)
    history.publish("m0", Outcome.OK)
    history.count("dropped")
    history.count("dropped", 2)
    history.note("rss_growth_kib", 512)
    counts = check(history)

    assert equal("lost", "dropped").text == "lost == dropped"
    assert not equal("lost", "dropped")(counts)  # 1 lost, 3 dropped
    assert equal("dropped", 3)(counts)
    assert at_most("rss_growth_kib", 1024)(counts)
    assert not at_least("rss_growth_kib", 1024)(counts)
    assert not at_least("never_set", 0)(counts)  # a missing counter fails, never raises


def test_judge_lists_the_criteria_not_met() -> None:
    history = History(10)
    history.publish("m0", Outcome.OK)
    history.deliver("m0", "a")
    history.deliver("m0", "b")
    result = judge("dup", check(history), [NO_LOSS, NO_DUPLICATES, NO_UNEXPECTED], 1.5)

    assert not result.passed
    assert result.failures == ("duplicated == 0",)
    assert "not met: duplicated == 0" in result.explain()
    assert "m0 by a+b" in result.explain()
    assert not Result("crashed", None, ("did not finish",)).passed


# -- the table ---------------------------------------------------------------------


def test_the_table_has_a_row_per_scenario_and_the_failures_below() -> None:
    good = History(10)
    good.publish("m0", Outcome.OK)
    good.deliver("m0", "a")
    good.note("buffer_full", 12)
    bad = History(10)
    bad.publish("m0", Outcome.OK)
    results = [
        judge("all-servers-down", check(good), [NO_LOSS], 14.2),
        judge("x", check(bad), [NO_LOSS], 3.0),
        Result("crashed", None, ("did not finish",)),
    ]

    lines = render_table(results).splitlines()

    assert lines[0].split()[:3] == ["scenario", "attempts", "ok"]
    column = lines[0].index("verdict")
    assert [line[column : column + 4] for line in lines[1:4]] == ["pass", "FAIL", "FAIL"]
    assert lines[1].startswith("all-servers-down ")
    assert lines[1].endswith("buffer_full=12")
    assert " 14.2 " in lines[1]
    assert lines[3].startswith("crashed ")
    assert " - " in lines[3]
    assert lines[4:] == ["x: not met: lost == 0", "crashed: not met: did not finish"]


# -- properties --------------------------------------------------------------------


@given(events)
def test_counts_follow_the_definitions(history_events: list[Event]) -> None:
    strongest: dict[str, Outcome] = {}
    delivered: Counter[str] = Counter()
    for kind, mid, value in history_events:
        if kind == "publish":
            strongest[mid] = max(strongest.get(mid, Outcome.FAILED), value)
        else:
            delivered[mid] += 1
    ok = {mid for mid, outcome in strongest.items() if outcome is Outcome.OK}
    unknown = {mid for mid, outcome in strongest.items() if outcome is Outcome.UNKNOWN}
    failed = strongest.keys() - ok - unknown

    counts = check(replay(history_events))

    assert counts.attempts == sum(1 for kind, _, _ in history_events if kind == "publish")
    assert (counts.ok, counts.unknown, counts.failed) == (len(ok), len(unknown), len(failed))
    assert counts.delivered == len(delivered)
    assert counts.lost == len(ok - delivered.keys())
    assert counts.recovered == len(unknown & delivered.keys())
    assert counts.unexpected == len(delivered.keys() - ok - unknown)
    assert counts.duplicated == sum(1 for n in delivered.values() if n > 1)
    assert counts.extra == delivered.total() - len(delivered)


@given(events)
def test_every_delivered_id_is_ok_recovered_or_unexpected(history_events: list[Event]) -> None:
    counts = check(replay(history_events))
    assert counts.delivered == (counts.ok - counts.lost) + counts.recovered + counts.unexpected
    assert sum(counts.consumers.values()) == counts.delivered + counts.extra
    assert counts.lost <= counts.ok
    assert counts.recovered <= counts.unknown
    assert counts.extra >= counts.duplicated


@given(events, st.randoms(use_true_random=False))
def test_counts_do_not_depend_on_the_order_of_records(
    history_events: list[Event], rng: random.Random
) -> None:
    shuffled = list(history_events)
    rng.shuffle(shuffled)
    assert without_examples(check(replay(shuffled))) == without_examples(
        check(replay(history_events))
    )


@given(st.dictionaries(ids, outcomes), st.data())
def test_a_clean_run_passes(published: dict[str, Outcome], data: st.DataObject) -> None:
    """Every ok id delivered once, some unknown ones too, no failed one: no anomaly."""
    history = History(100)
    for mid, outcome in published.items():
        history.publish(mid, outcome)
        if outcome is Outcome.OK or (outcome is Outcome.UNKNOWN and data.draw(st.booleans())):
            history.deliver(mid, data.draw(consumers))
    assert judge("clean", check(history), [NO_LOSS, NO_DUPLICATES, NO_UNEXPECTED]).passed


@given(st.lists(ids, min_size=1, unique=True), st.data())
def test_one_missing_delivery_is_one_lost(oks: list[str], data: st.DataObject) -> None:
    missing = data.draw(st.sampled_from(oks))
    history = History(100)
    for mid in oks:
        history.publish(mid, Outcome.OK)
        if mid != missing:
            history.deliver(mid, "a")
    counts = check(history)
    assert counts.lost == 1
    assert counts.examples["lost"] == (missing,)


@given(events, st.integers(min_value=1, max_value=8))
def test_a_bounded_history_keeps_at_most_its_limit(history_events: list[Event], limit: int) -> None:
    counts = check(replay(history_events, limit))
    distinct_published = {mid for kind, mid, _ in history_events if kind == "publish"}
    assert counts.ok + counts.failed + counts.unknown == min(limit, len(distinct_published))
    assert counts.delivered <= limit
    assert (counts.overflow > 0) == (
        len(distinct_published) > limit
        or len({mid for kind, mid, _ in history_events if kind == "deliver"}) > limit
    )


@given(
    st.lists(
        st.tuples(
            st.text("abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=24),
            st.integers(min_value=0, max_value=10**7),
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_table_rows_are_aligned(rows: list[tuple[str, int, bool]]) -> None:
    results = []
    for name, n, lose in rows:
        history = History(10)
        history.publish("m", Outcome.OK)
        if not lose:
            history.deliver("m", "a")
        history.note("n", n)
        results.append(judge(name, check(history), [NO_LOSS]))

    lines = render_table(results).splitlines()

    table = lines[: 1 + len(results)]
    assert lines[1 + len(results) :] == [
        f"{name}: not met: lost == 0" for name, _, lose in rows if lose
    ]
    column = table[0].index("verdict")
    for line, (_, _, lose) in zip(table[1:], rows, strict=True):
        assert line[column : column + 4] == ("FAIL" if lose else "pass")
