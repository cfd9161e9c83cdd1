"""`Window`: the last few seconds of telemetry snapshots, per instance, bounded.

The window's clock is the snapshots' own ``time`` (the newest one seen, or the
``now_ns`` given to :meth:`Window.prune`), never the wall clock, so feeding recorded
snapshots gives the same result as feeding them live.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Final

import msgspec

from topology._histogram import within_bounds
from topology._snapshot import Snapshot

__all__ = ["Window", "WindowStats"]

DEFAULT_SECONDS: Final = 10.0
DEFAULT_MAX_INSTANCES: Final = 10_000
DEFAULT_MAX_SNAPSHOTS: Final = 64


class WindowStats(msgspec.Struct, frozen=True, kw_only=True):
    """What a window accepted and refused since it was created."""

    added: int
    #: An (instance, seq) seen before.
    duplicates: int
    #: Older than the window when it arrived.
    stale: int
    #: A negative interval or a histogram with another bucket layout.
    invalid: int
    #: New instances refused because ``max_instances`` were in the window.
    instances_refused: int
    #: Snapshots dropped to keep ``max_snapshots_per_instance``.
    evicted: int
    #: Snapshots never received, from gaps in each instance's ``seq``.
    lost: int


class _Instance:
    __slots__ = ("highest", "lowest", "missing", "seqs", "snapshots")

    def __init__(self) -> None:
        #: Held snapshots and their seqs, ascending by seq.
        self.seqs: list[int] = []
        self.snapshots: list[Snapshot] = []
        #: The lowest and highest seq seen (-1: none yet).
        self.lowest = self.highest = -1
        #: Seqs skipped over that may still arrive late (bounded).
        self.missing: set[int] = set()


class Window:
    """Snapshots of the last ``seconds``, per instance.

    :meth:`add` refuses (returns ``False`` and counts) a duplicate ``(instance, seq)``,
    a snapshot older than the window, a malformed one, and a new instance while
    ``max_instances`` are held (after dropping instances that have aged out). Each
    instance keeps its ``max_snapshots_per_instance`` newest snapshots. :attr:`lost`
    counts the seqs never seen between an instance's lowest and highest seq (those
    that arrive late are taken back). An instance id names one process: its seqs start
    at 0 and only grow.
    """

    def __init__(
        self,
        seconds: float = DEFAULT_SECONDS,
        max_instances: int = DEFAULT_MAX_INSTANCES,
        max_snapshots_per_instance: int = DEFAULT_MAX_SNAPSHOTS,
    ) -> None:
        if seconds <= 0:
            raise ValueError(f"the window must be positive, not {seconds} s")
        if max_instances < 1 or max_snapshots_per_instance < 1:
            raise ValueError("max_instances and max_snapshots_per_instance must be at least 1")
        self.seconds = seconds
        self.max_instances = max_instances
        self.max_snapshots_per_instance = max_snapshots_per_instance
        self._span = int(seconds * 1e9)
        self._instances: dict[str, _Instance] = {}
        #: The newest time seen (ns): the window covers [now - seconds, now].
        self.now = 0
        self.lost = 0
        self._added = self._duplicates = self._stale = self._invalid = 0
        self._refused = self._evicted = 0

    def __len__(self) -> int:
        return sum(len(inst.seqs) for inst in self._instances.values())

    @property
    def instances(self) -> int:
        """Instances with at least one snapshot in the window."""
        return len(self._instances)

    @property
    def stats(self) -> WindowStats:
        return WindowStats(
            added=self._added,
            duplicates=self._duplicates,
            stale=self._stale,
            invalid=self._invalid,
            instances_refused=self._refused,
            evicted=self._evicted,
            lost=self.lost,
        )

    def add(self, snapshot: Snapshot) -> bool:
        """Hold ``snapshot``; ``False`` (and counted) if it is refused."""
        if not _valid(snapshot):
            self._invalid += 1
            return False
        if snapshot.time < self.now - self._span:
            self._stale += 1
            return False
        inst = self._instances.get(snapshot.instance)
        if inst is None:
            if len(self._instances) >= self.max_instances:
                self.prune(max(self.now, snapshot.time))
            if len(self._instances) >= self.max_instances:
                self._refused += 1
                return False
            inst = self._instances[snapshot.instance] = _Instance()
        seq = snapshot.seq
        if inst.highest < 0:
            inst.lowest = inst.highest = seq
        elif seq > inst.highest:
            self._skipped(inst, inst.highest + 1, seq)
            inst.highest = seq
        elif seq < inst.lowest:
            self._skipped(inst, seq + 1, inst.lowest)
            inst.lowest = seq
        elif seq in inst.missing:
            inst.missing.discard(seq)
            self.lost -= 1
        else:
            self._duplicates += 1
            return False
        at = bisect.bisect_left(inst.seqs, seq)
        inst.seqs.insert(at, seq)
        inst.snapshots.insert(at, snapshot)
        if len(inst.seqs) > self.max_snapshots_per_instance:
            del inst.seqs[0], inst.snapshots[0]
            self._evicted += 1
        self._added += 1
        if snapshot.time > self.now:
            self.now = snapshot.time
        return True

    def _skipped(self, inst: _Instance, start: int, stop: int) -> None:
        """Seqs ``start`` to ``stop - 1`` were never seen: lost, unless they come late.

        Only the ``max_snapshots_per_instance`` latest of them are remembered; one
        arriving later than that is refused as a duplicate and stays counted as lost.
        """
        if stop <= start:
            return
        self.lost += stop - start
        bound = self.max_snapshots_per_instance
        inst.missing.update(range(max(start, stop - bound), stop))
        if len(inst.missing) > bound:
            inst.missing = set(sorted(inst.missing)[-bound:])

    def prune(self, now_ns: int) -> None:
        """Drop snapshots older than ``now_ns - seconds``, and instances left empty.

        ``now_ns`` also moves the window's clock forward (never back).
        """
        if now_ns > self.now:
            self.now = now_ns
        cutoff = self.now - self._span
        gone = []
        for name, inst in self._instances.items():
            snapshots = inst.snapshots
            if any(s.time < cutoff for s in snapshots):
                kept = [i for i, s in enumerate(snapshots) if s.time >= cutoff]
                inst.snapshots = [snapshots[i] for i in kept]
                inst.seqs = [inst.seqs[i] for i in kept]
            if not inst.snapshots:
                gone.append(name)
        for name in gone:
            del self._instances[name]

    def snapshots(self) -> Iterator[Snapshot]:
        """The snapshots in the window (not older than ``now - seconds``), by instance and seq."""
        cutoff = self.now - self._span
        for name in sorted(self._instances):
            for snapshot in self._instances[name].snapshots:
                if snapshot.time >= cutoff:
                    yield snapshot


def _valid(snapshot: Snapshot) -> bool:
    if snapshot.interval < 0 or snapshot.seq < 0:
        return False
    for sent in snapshot.sent:
        if sent.latency is not None and not within_bounds(sent.latency):
            return False
    for received in snapshot.received:
        if received.latency is not None and not within_bounds(received.latency):
            return False
    return True
