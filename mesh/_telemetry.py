"""Telemetry: what a client sends and receives, counted on the hot path and
published as a :class:`~topology.Snapshot` about once a second.

Counting is a few attribute increments per message. The client keeps one
:class:`SentCounters` per subject it publishes to and each subscription one
:class:`ReceivedCounters`; the emitter swaps them for fresh ones at every snapshot,
so a snapshot holds exactly the interval's deltas and nothing needs subtracting.
Every table is bounded: past :data:`MAX_SUBJECTS` subjects messages are counted in
``untracked``, past :data:`MAX_SENDERS` senders under :data:`OTHER_SENDER`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from mesh._names import validate_instance
from topology._histogram import LatencyHistogram
from topology._snapshot import (
    TELEMETRY_SUBJECT,
    ReceivedStats,
    ReliableStats,
    SentStats,
    Snapshot,
    encode_snapshot,
)

if TYPE_CHECKING:
    from mesh._client import MeshClient
    from mesh._message import Subscription

log = logging.getLogger("mesh.telemetry")

#: Seconds between snapshots.
DEFAULT_INTERVAL: Final = 1.0
#: Distinct subjects counted per interval; more are counted in ``untracked`` only.
MAX_SUBJECTS: Final = 1024
#: Distinct senders counted per subscription and interval; more go under OTHER_SENDER.
MAX_SENDERS: Final = 256
OTHER_SENDER: Final = "~other"
#: Subscriptions closed since the last snapshot whose last counts are still to report.
MAX_RETIRED: Final = 256

_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


class SentCounters:
    """One subject's outbound counts for the current interval."""

    __slots__ = ("compressed", "failed", "latency", "msgs", "raw", "requests", "wire")

    def __init__(self) -> None:
        self.msgs = 0
        self.raw = 0
        self.wire = 0
        self.requests = 0
        self.failed = 0
        self.compressed = 0
        self.latency: LatencyHistogram | None = None

    def record_latency(self, ns: int) -> None:
        if self.latency is None:
            self.latency = LatencyHistogram()
        self.latency.record(ns)

    def stats(self, subject: str) -> SentStats:
        return SentStats(
            subject=subject,
            msgs=self.msgs,
            raw_bytes=self.raw,
            wire_bytes=self.wire,
            requests=self.requests,
            failed=self.failed,
            compressed=self.compressed,
            latency=self.latency.to_counts() if self.latency is not None else None,
        )


class SenderCounts:
    """Messages and bytes one sender sent to one subscription this interval."""

    __slots__ = ("msgs", "raw", "wire")

    def __init__(self) -> None:
        self.msgs = 0
        self.raw = 0
        self.wire = 0


class ReceivedCounters:
    """One subscription's inbound counts for the current interval.

    Arrivals are counted per sender only (one dict lookup per message); the
    subscription's totals are their sums, taken when the snapshot is made.
    """

    __slots__ = (
        "dead_lettered",
        "decode_failures",
        "dropped",
        "duplicates",
        "errors",
        "handled",
        "latency",
        "redelivered",
        "replies",
        "reply_bytes",
        "senders",
        "timeouts",
        "unconfirmed",
    )

    def __init__(self) -> None:
        self.senders: dict[str, SenderCounts] = {}
        self.decode_failures: dict[str, int] = {}
        self.dropped = 0
        self.handled = 0
        self.errors = 0
        self.timeouts = 0
        self.replies = 0
        self.reply_bytes = 0
        self.latency: LatencyHistogram | None = None
        # A reliable subscription's settling (see ReceivedStats).
        self.redelivered = 0
        self.duplicates = 0
        self.dead_lettered = 0
        self.unconfirmed = 0

    def add_sender(self, sender: str) -> SenderCounts:
        """The counts of a sender not seen yet this interval (the slow path)."""
        senders = self.senders
        if len(senders) >= MAX_SENDERS:
            sender = OTHER_SENDER
        counts = senders.get(sender)
        if counts is None:
            counts = senders[sender] = SenderCounts()
        return counts

    def decode_failed(self, sender: str) -> None:
        failures = self.decode_failures
        if sender not in failures and len(failures) >= MAX_SENDERS:
            sender = OTHER_SENDER
        failures[sender] = failures.get(sender, 0) + 1

    def handler_done(self, ns: int, *, error: bool = False, timeout: bool = False) -> None:
        self.handled += 1
        if error:
            self.errors += 1
        if timeout:
            self.timeouts += 1
        if self.latency is None:
            self.latency = LatencyHistogram()
        self.latency.record(ns)

    def stats(self, sub: Subscription, inflight: int) -> ReceivedStats:
        senders = self.senders.values()
        return ReceivedStats(
            subject=sub.subject,
            queue=sub.queue,
            msgs=sum(c.msgs for c in senders),
            raw_bytes=sum(c.raw for c in senders),
            wire_bytes=sum(c.wire for c in senders),
            senders={name: c.msgs for name, c in self.senders.items()},
            handled=self.handled,
            errors=self.errors,
            timeouts=self.timeouts,
            latency=self.latency.to_counts() if self.latency is not None else None,
            replies=self.replies,
            reply_bytes=self.reply_bytes,
            decode_failures=self.decode_failures,
            dropped=self.dropped,
            pending=sub.pending,
            inflight=inflight,
            backlog=sub.backlog,
            reliable=self._reliable(),
        )

    def _reliable(self) -> ReliableStats | None:
        if not (self.redelivered or self.duplicates or self.dead_lettered or self.unconfirmed):
            return None
        return ReliableStats(
            redelivered=self.redelivered,
            duplicates=self.duplicates,
            dead_lettered=self.dead_lettered,
            unconfirmed=self.unconfirmed,
        )


def rss_bytes() -> int:
    """The process's resident memory now (Linux), or its peak elsewhere."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class TelemetryEmitter:
    """Publishes a client's snapshot every ``interval`` seconds, and a last one on close.

    ``inflight`` maps a subscription to the handler calls running for it (a node
    passes its runtime's count); ``policy`` gives the policy versions in force and
    the count of refused policy values since the last snapshot.
    """

    def __init__(
        self,
        client: MeshClient,
        *,
        agent: str,
        instance: str,
        interval: float = DEFAULT_INTERVAL,
        max_concurrency: int = 0,
        inflight: Callable[[Subscription], int] | None = None,
        policy: Callable[[], tuple[dict[str, int], int]] | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("the telemetry interval must be positive")
        self.client = client
        self.agent = agent
        self.instance = instance
        self.interval = interval
        self.subject = f"{TELEMETRY_SUBJECT}.{validate_instance(instance)}"
        self._max_concurrency = max_concurrency
        self._inflight = inflight
        self._policy = policy
        self._seq = 0
        self._last_time = time.time_ns()
        self._last_cpu = time.process_time()
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        #: Snapshots that could not be sent (disconnected, buffer full).
        self.failed = 0

    async def __aenter__(self) -> TelemetryEmitter:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name=f"{self.agent}-telemetry"
            )

    async def aclose(self) -> None:
        """Stop the loop and publish the counts of the last partial interval (idempotent)."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._emit()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._emit()

    def snapshot(self) -> Snapshot:
        """Take the current interval's counts (and start a new interval)."""
        client = self.client
        now = time.time_ns()
        cpu = time.process_time()
        sent, client._sent = client._sent, {}
        untracked, client._untracked = client._untracked, 0
        inflight = self._inflight
        received = []
        for sub in [*client._retired, *client._subs.values()]:
            if sub.internal:
                continue
            counters, sub.counters = sub.counters, ReceivedCounters()
            received.append(counters.stats(sub, inflight(sub) if inflight else 0))
        client._retired.clear()
        versions, rejected = self._policy() if self._policy is not None else ({}, 0)
        snap = Snapshot(
            instance=self.instance,
            agent=self.agent,
            seq=self._seq,
            time=now,
            interval=now - self._last_time,
            cpu=cpu - self._last_cpu,
            rss=rss_bytes(),
            max_concurrency=self._max_concurrency,
            sent=[c.stats(subject) for subject, c in sent.items()],
            received=received,
            untracked=untracked,
            policy_rejected=rejected,
            policy=versions,
        )
        self._seq += 1
        self._last_time = now
        self._last_cpu = cpu
        return snap

    async def _emit(self) -> None:
        snap = self.snapshot()
        try:
            await self.client._send_raw(self.subject, encode_snapshot(snap))
        except Exception as exc:  # telemetry must never take a node down
            self.failed += 1
            log.debug("telemetry snapshot %d not sent: %s", snap.seq, exc)
