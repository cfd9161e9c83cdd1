"""A Jepsen-style total-queue checker for the chaos scenarios: pure code, no I/O.

A scenario records every publish attempt by message id with its outcome, and
every delivery (the id and the consumer that processed it) in a `History`;
`check` then counts what Jepsen's total-queue checker counts:

    ok          the system confirmed the publish
    failed      the publish definitely did not happen (refused, buffer full)
    unknown     it may or may not have happened (a timeout, a buffered publish)
    delivered   distinct ids processed by some consumer
    lost        ok, and never delivered
    duplicated  delivered more than once: how many ids, and how many extra deliveries
    unexpected  delivered, though never attempted or recorded failed
    recovered   unknown, and delivered after all

An id attempted more than once (a retry after a timeout) keeps its strongest
outcome, ok over unknown over failed: one confirmation is enough, and one
timeout means it may be stored.

One difference from Jepsen: there, a dequeued message whose enqueue was recorded
as failed counts as recovered; here it is unexpected. The scenarios record
failed only where nothing can have been sent (refused by the server, or never
handed to the connection), so such a delivery is a real anomaly.

A `Criterion` is a named condition on the counts; `judge` turns counts and
criteria into a `Result`, and `render_table` prints every scenario's result as
one aligned table.
"""

from __future__ import annotations

import enum
import itertools
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "NO_DUPLICATES",
    "NO_LOSS",
    "NO_UNEXPECTED",
    "Counts",
    "Criterion",
    "History",
    "Outcome",
    "Result",
    "at_least",
    "at_most",
    "check",
    "equal",
    "judge",
    "render_table",
]

#: Ids kept as examples of each anomaly (lost, duplicated, unexpected), for failure messages.
EXAMPLES: Final = 5


class Outcome(enum.IntEnum):
    """What the publisher knows about one attempt; a larger value is a stronger outcome."""

    FAILED = 0
    UNKNOWN = 1
    OK = 2


class History:
    """Every publish outcome and every delivery of one scenario, bounded in memory.

    ``limit`` bounds the distinct ids kept for publishes and for deliveries each; a
    record past it is dropped and counted in ``overflow``, and `check` reports it,
    since the counts are then incomplete. ``counters`` holds the scenario's own
    numbers (drops reported by a client, buffer-full errors, memory), shown in the
    table beside the counts.
    """

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"a history must hold at least one id, not {limit}")
        self.limit = limit
        self.attempts = 0
        self.overflow = 0
        self.counters: dict[str, float] = {}
        self._outcomes: dict[str, Outcome] = {}
        self._deliveries: dict[str, int] = {}
        self._first_consumer: dict[str, str] = {}
        self._by_consumer: Counter[str] = Counter()
        self._duplicate_consumers: dict[str, list[str]] = {}

    def publish(self, message_id: str, outcome: Outcome) -> None:
        """Record one publish attempt of ``message_id`` and what came of it."""
        self.attempts += 1
        known = self._outcomes.get(message_id)
        if known is None:
            if len(self._outcomes) >= self.limit:
                self.overflow += 1
                return
            self._outcomes[message_id] = outcome
        elif outcome > known:
            self._outcomes[message_id] = outcome

    def confirm(self, message_id: str) -> None:
        """The outcome of an attempt already recorded turned out ok (a flush or a late
        acknowledgement confirmed it): not another attempt."""
        if message_id not in self._outcomes:
            if len(self._outcomes) < self.limit:
                raise KeyError(f"{message_id!r} was never attempted")
            return  # its attempt overflowed the history
        self._outcomes[message_id] = Outcome.OK

    def deliver(self, message_id: str, consumer: str) -> None:
        """Record that ``consumer`` processed ``message_id``."""
        seen = self._deliveries.get(message_id)
        if seen is None:
            if len(self._deliveries) >= self.limit:
                self.overflow += 1
                return
            self._deliveries[message_id] = 1
            self._first_consumer[message_id] = consumer
        else:
            self._deliveries[message_id] = seen + 1
            consumers = self._duplicate_consumers.get(message_id)
            if consumers is None and len(self._duplicate_consumers) < EXAMPLES:
                first = self._first_consumer[message_id]
                consumers = self._duplicate_consumers[message_id] = [first]
            if consumers is not None and len(consumers) < EXAMPLES:
                consumers.append(consumer)
        self._by_consumer[consumer] += 1

    def count(self, name: str, n: float = 1) -> None:
        """Add ``n`` to the scenario counter ``name``."""
        self.counters[name] = self.counters.get(name, 0) + n

    def note(self, name: str, value: float) -> None:
        """Set the scenario counter ``name``."""
        self.counters[name] = value

    def outcome(self, message_id: str) -> Outcome | None:
        """The strongest outcome recorded for ``message_id``, None if never attempted."""
        return self._outcomes.get(message_id)

    def deliveries(self, message_id: str) -> int:
        """How many times ``message_id`` was delivered."""
        return self._deliveries.get(message_id, 0)

    def consumers(self) -> dict[str, int]:
        """Deliveries by consumer."""
        return dict(self._by_consumer)

    def undelivered_ok(self) -> int:
        """Confirmed ids not delivered yet (what `check` would count as lost now)."""
        delivered = self._deliveries
        return sum(
            1
            for mid, outcome in self._outcomes.items()
            if outcome is Outcome.OK and mid not in delivered
        )


#: The counts, in the order the table shows them.
_COUNT_COLUMNS: Final = (
    "attempts",
    "ok",
    "failed",
    "unknown",
    "delivered",
    "lost",
    "duplicated",
    "extra",
    "unexpected",
    "recovered",
)
_COUNT_FIELDS: Final = frozenset({*_COUNT_COLUMNS, "overflow"})


@dataclass(frozen=True, kw_only=True)
class Counts:
    """What `check` found in one history."""

    attempts: int
    ok: int
    failed: int
    unknown: int
    delivered: int
    lost: int
    duplicated: int
    extra: int
    unexpected: int
    recovered: int
    overflow: int
    consumers: Mapping[str, int] = field(default_factory=dict)
    counters: Mapping[str, float] = field(default_factory=dict)
    examples: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    def get(self, name: str) -> float:
        """A count or a scenario counter by name; KeyError when neither exists."""
        if name in _COUNT_FIELDS:
            value: float = getattr(self, name)
            return value
        return self.counters[name]


def check(history: History) -> Counts:
    """Count the history's outcomes and deliveries (see the module docstring)."""
    outcomes = history._outcomes
    deliveries = history._deliveries
    by_outcome = Counter(outcomes.values())
    lost: list[str] = []
    recovered = 0
    for mid, outcome in outcomes.items():
        if mid in deliveries:
            recovered += outcome is Outcome.UNKNOWN
        elif outcome is Outcome.OK:
            lost.append(mid)
    duplicated = extra = 0
    unexpected: list[str] = []
    for mid, times in deliveries.items():
        if times > 1:
            duplicated += 1
            extra += times - 1
        if outcomes.get(mid, Outcome.FAILED) is Outcome.FAILED:  # never attempted, or failed
            unexpected.append(mid)
    duplicate_examples = tuple(
        f"{mid} by {'+'.join(consumers)}" for mid, consumers in history._duplicate_consumers.items()
    )
    return Counts(
        attempts=history.attempts,
        ok=by_outcome[Outcome.OK],
        failed=by_outcome[Outcome.FAILED],
        unknown=by_outcome[Outcome.UNKNOWN],
        delivered=len(deliveries),
        lost=len(lost),
        duplicated=duplicated,
        extra=extra,
        unexpected=len(unexpected),
        recovered=recovered,
        overflow=history.overflow,
        consumers=history.consumers(),
        counters=dict(history.counters),
        examples={
            name: ids
            for name, ids in (
                ("lost", tuple(lost[:EXAMPLES])),
                ("duplicated", duplicate_examples),
                ("unexpected", tuple(unexpected[:EXAMPLES])),
            )
            if ids
        },
    )


# -- criteria and verdicts ---------------------------------------------------------


@dataclass(frozen=True)
class Criterion:
    """A condition the counts of a scenario must meet, e.g. ``lost == 0``."""

    text: str
    holds: Callable[[Counts], bool]

    def __call__(self, counts: Counts) -> bool:
        """True when the condition holds; a counter that was never set fails it."""
        try:
            return bool(self.holds(counts))
        except KeyError:
            return False


def _value(counts: Counts, operand: str | float) -> float:
    return counts.get(operand) if isinstance(operand, str) else operand


def equal(name: str, other: str | float) -> Criterion:
    """``name`` equals ``other`` (a count or counter name, or a number)."""
    return Criterion(f"{name} == {other}", lambda c: _value(c, name) == _value(c, other))


def at_most(name: str, bound: str | float) -> Criterion:
    """``name`` is at most ``bound`` (a count or counter name, or a number)."""
    return Criterion(f"{name} <= {bound}", lambda c: _value(c, name) <= _value(c, bound))


def at_least(name: str, bound: str | float) -> Criterion:
    """``name`` is at least ``bound`` (a count or counter name, or a number)."""
    return Criterion(f"{name} >= {bound}", lambda c: _value(c, name) >= _value(c, bound))


NO_LOSS: Final = equal("lost", 0)
NO_DUPLICATES: Final = equal("duplicated", 0)
NO_UNEXPECTED: Final = equal("unexpected", 0)
#: Every scenario: the history held every record, so the counts are complete.
_COMPLETE: Final = equal("overflow", 0)


@dataclass(frozen=True)
class Result:
    """One scenario's verdict: its counts (None when it did not get that far) and the
    criteria that did not hold."""

    scenario: str
    counts: Counts | None
    failures: tuple[str, ...]
    seconds: float = math.nan

    @property
    def passed(self) -> bool:
        return self.counts is not None and not self.failures

    def explain(self) -> str:
        """Several lines for an assertion message: the verdict, counts and examples."""
        lines = [f"{self.scenario}: {'pass' if self.passed else 'FAIL'}"]
        lines += [f"  not met: {text}" for text in self.failures]
        counts = self.counts
        if counts is not None:
            lines.append("  " + " ".join(f"{name}={counts.get(name):g}" for name in _COUNT_COLUMNS))
            if counts.counters:
                lines.append("  " + _notes(counts))
            if counts.consumers:
                lines.append(
                    "  by consumer: "
                    + ", ".join(f"{name}={n}" for name, n in sorted(counts.consumers.items()))
                )
            lines += [f"  {name}, e.g.: {', '.join(ids)}" for name, ids in counts.examples.items()]
        return "\n".join(lines)


def judge(
    scenario: str, counts: Counts, criteria: Iterable[Criterion], seconds: float = math.nan
) -> Result:
    """The verdict on ``counts``: every criterion, and a complete history, must hold."""
    failures = tuple(c.text for c in itertools.chain([_COMPLETE], criteria) if not c(counts))
    return Result(scenario, counts, failures, seconds)


# -- the table ---------------------------------------------------------------------

_HEADERS: Final = {"duplicated": "dup ids", "extra": "dup extra"}


def _notes(counts: Counts) -> str:
    return " ".join(f"{name}={value:g}" for name, value in sorted(counts.counters.items()))


def render_table(results: Sequence[Result]) -> str:
    """Every result as one row of an aligned table, then the criteria each failed.

    Numbers are right-aligned; the last column lists the scenario's own counters.
    """
    count_names = _COUNT_COLUMNS
    header = ["scenario", *(_HEADERS.get(n, n) for n in count_names), "s", "verdict", "counters"]
    rows = [header]
    for result in results:
        counts = result.counts
        cells = [result.scenario]
        cells += [f"{counts.get(n):g}" if counts is not None else "-" for n in count_names]
        cells.append(f"{result.seconds:.1f}" if not math.isnan(result.seconds) else "-")
        cells.append("pass" if result.passed else "FAIL")
        cells.append(_notes(counts) if counts is not None else "")
        rows.append(cells)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = []
    for row in rows:
        first = row[0].ljust(widths[0])
        middle = [cell.rjust(width) for cell, width in zip(row[1:-2], widths[1:-1], strict=True)]
        verdict = row[-2].ljust(widths[-1])
        lines.append("  ".join([first, *middle, verdict, row[-1]]).rstrip())
    for result in results:
        lines += [f"{result.scenario}: not met: {text}" for text in result.failures]
    return "\n".join(lines)
