"""Keep a node's :class:`~mesh._policy.PolicyTable` in step with the policy bucket.

A :class:`PolicyWatcher` reads every key of the bucket, then follows changes. Each
value is decoded and checked against its key before the node sees it; a malformed,
forged or stale value is counted and ignored, and the node keeps the last good
record. When the watch breaks (reconnect, server restart, a stream leader that moved)
the watcher starts it again and resyncs: the table converges on the bucket, and keys
deleted meanwhile are dropped. Meanwhile, and while JetStream is unreachable, the node
keeps working on what it holds (or on its defaults).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from typing import Final

import msgspec
import nats.errors
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from mesh._client import MeshClient
from mesh._errors import ClientClosed, InvalidPolicy, MeshError
from mesh._policy import PolicyRecord, PolicyTable, decode_record, parse_key
from mesh._policy_store import PolicyStore, next_entry, stop_watcher, translate_errors

__all__ = ["PolicyWatcher", "WatcherStats"]

log = logging.getLogger("mesh.policy")

#: How long entering the watcher waits for the bucket's current values.
READY_TIMEOUT: Final = 2.0
#: How long ``prepare`` may take for one record before it counts as failed.
PREPARE_TIMEOUT: Final = 10.0
#: Bounds of the wait between attempts to (re)start the watch, in seconds.
MIN_BACKOFF: Final = 0.25
MAX_BACKOFF: Final = 5.0
#: Seconds without a change after which the watcher checks that it is not behind.
VERIFY_INTERVAL: Final = 5.0
#: Seconds given to changes in flight before a watcher that looks behind restarts.
_SETTLE: Final = 1.0
#: How often, in seconds, an idle watcher looks for a reconnect.
_POLL: Final = 0.5
#: Seconds a watch may wait for the next of the values present when it started.
_INITIAL_TIMEOUT: Final = 5.0
#: Keys whose last revision is remembered (to skip replays); past this it starts over.
_MAX_REVISIONS: Final = 65_536
_MAX_WARNED: Final = 1024

Prepare = Callable[[PolicyRecord], Awaitable[None]]
OnApplied = Callable[[PolicyRecord | None, str], Awaitable[None]]


class WatcherStats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a watcher's counters."""

    applied: int  # records the table took
    removed: int  # records dropped because their key was deleted
    rejected_stale: int  # versions not above the one held
    rejected_malformed: int  # values that do not decode, validate or match their key
    prepare_failed: int  # records whose ``prepare`` raised or timed out
    resyncs: int  # watches restarted after the first
    failures: int  # attempts to watch that failed (JetStream unavailable, ...)


class _Restart(Exception):
    """The watch must be started again (internal)."""


class PolicyWatcher:
    """Feeds ``table`` from the policy bucket until closed; use it as an async context manager.

    For every new record, ``prepare(record)`` runs first (to fetch what applying it needs,
    such as a dictionary; if it fails the record is rejected), then the table takes it,
    then ``on_applied(record, key)`` runs; a deleted key gives ``on_applied(None, key)``.

    Entering returns once the bucket's current values are applied, or after
    :data:`READY_TIMEOUT` seconds, or at once when JetStream is unavailable; the watcher
    keeps trying in the background. :attr:`ready` is set once the table has been in
    step with the bucket.
    """

    def __init__(
        self,
        client: MeshClient,
        table: PolicyTable,
        *,
        prepare: Prepare | None = None,
        on_applied: OnApplied | None = None,
    ) -> None:
        self.client = client
        self.table = table
        self.ready = asyncio.Event()
        self._prepare = prepare
        self._on_applied = on_applied
        self._task: asyncio.Task[None] | None = None
        self._settled = asyncio.Event()  # the first attempt to watch synced or failed
        self._syncs = 0
        self._closed = False
        self._store: PolicyStore | None = None
        self._revisions: dict[str, int] = {}  # key -> last revision handled
        self._last_revision = 0  # the bucket's last revision known to be handled
        self._epoch: object = None  # when the bucket's stream was created
        self._new_epoch = False  # syncing from a new bucket: versions started over too
        self._behind = 0  # the bucket's last revision when the watcher last looked
        self._warned: set[tuple[str, int]] = set()
        self._failing = False  # a failure was reported and no sync succeeded since
        self._failures = 0
        self._applied = 0
        self._removed = 0
        self._prepare_failed = 0
        self._resyncs = 0

    def stats(self) -> WatcherStats:
        return WatcherStats(
            applied=self._applied,
            removed=self._removed,
            rejected_stale=self.table.rejected_stale,
            rejected_malformed=self.table.rejected_malformed,
            prepare_failed=self._prepare_failed,
            resyncs=self._resyncs,
            failures=self._failures,
        )

    async def __aenter__(self) -> PolicyWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self, timeout: float = READY_TIMEOUT) -> None:
        """Start watching; return once ready, JetStream proved unavailable, or ``timeout``."""
        if self._task is not None or self._closed:
            raise RuntimeError("a PolicyWatcher starts once")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="policy-watch")
        try:
            async with asyncio.timeout(timeout):
                await self._settled.wait()
        except TimeoutError:
            log.warning("policy not loaded within %gs; continuing in the background", timeout)

    async def aclose(self) -> None:
        """Stop watching (idempotent). The table keeps what it holds."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])

    # -- the loop ----------------------------------------------------------------------

    async def _run(self) -> None:
        backoff = MIN_BACKOFF
        while True:
            syncs = self._syncs
            try:
                await self._watch()
            except _Restart as exc:
                log.info("policy watch restarting: %s", exc)
            except ClientClosed:
                log.debug("policy watch ends: the client is closed")
                return
            except Exception as exc:
                # Whatever broke, the node goes on with what it holds; try again later.
                self._failures += 1
                self._store = None  # reopen: the bucket may have been deleted
                self._report(exc)
            self._settled.set()
            if self.client.nc.is_closed:
                return
            if self._syncs != syncs:  # it had been working: come back quickly
                backoff = MIN_BACKOFF
            await asyncio.sleep(backoff * random.uniform(0.5, 1.0))
            backoff = min(backoff * 2, MAX_BACKOFF)

    def _report(self, exc: Exception) -> None:
        """Warn about the first failure of a run of them; the rest go to debug."""
        if self._failing:
            log.debug("policy watch still failing: %r", exc)
        elif isinstance(exc, MeshError):
            log.warning("running on the policy held (or on defaults): %s", exc)
        else:
            log.warning("policy watch failed; running on the policy held", exc_info=exc)
        self._failing = True

    async def _watch(self) -> None:
        """One watch: read the current values, resync the table, then follow changes."""
        reconnects = self.client.stats().reconnects
        if self._store is None:
            self._store = await PolicyStore.open(self.client)
        store = self._store
        with translate_errors(store.timeout):
            info = (await store.kv.status()).stream_info
            watcher = await store.kv.watch(">", inactive_threshold=30.0)
        last = info.state.last_seq or 0
        if info.created != self._epoch or last < self._last_revision:
            # A new bucket: revisions and versions started over, and what was seen
            # before says nothing about its contents.
            self._epoch = info.created
            self._revisions.clear()
            self._last_revision = 0
            self._new_epoch = True
        try:
            # Everything up to ``last`` is in the initial values, even if that revision's
            # message has since been removed.
            await self._resync(watcher, floor=last)
            idle_since = time.monotonic()
            while True:
                try:
                    entry = await next_entry(watcher, _POLL)
                except nats.errors.TimeoutError:  # no change within _POLL
                    entry = None
                if self.client.stats().reconnects != reconnects:
                    raise _Restart("reconnected to NATS")
                if entry is not None:
                    await self._handle(entry)
                    idle_since = time.monotonic()
                elif time.monotonic() - idle_since >= (
                    _SETTLE if self._behind else VERIFY_INTERVAL
                ):
                    await self._verify(store)
                    idle_since = time.monotonic()
        finally:
            await stop_watcher(watcher)

    async def _resync(self, watcher: KeyValue.KeyWatcher, floor: int) -> None:
        live: set[str] = set()
        with translate_errors(_INITIAL_TIMEOUT):
            while (entry := await next_entry(watcher, _INITIAL_TIMEOUT)) is not None:
                if entry.operation not in (KV_DEL, KV_PURGE):
                    live.add(entry.key)
                await self._handle(entry)
        # Keys held but no longer in the bucket were deleted (or purged) meanwhile.
        for key in [k for k in self.table.versions() if k not in live]:
            await self._remove(key)
        self._last_revision = max(self._last_revision, floor)
        self._behind = 0
        self._new_epoch = False
        if self.ready.is_set():
            self._resyncs += 1
        self._syncs += 1
        self.ready.set()
        self._settled.set()
        if self._failing:
            self._failing = False
            log.warning("policy watch resumed")

    async def _verify(self, store: PolicyStore) -> None:
        """Restart the watch if the bucket moved on without us, and still had a moment later."""
        with translate_errors(store.timeout):
            info = (await store.kv.status()).stream_info
        last = info.state.last_seq or 0
        if info.created != self._epoch or last < self._last_revision:
            raise _Restart("the policy bucket was recreated")
        if self._behind and self._last_revision < self._behind:
            raise _Restart(f"no change seen up to revision {self._behind}")
        self._behind = last if last > self._last_revision else 0

    # -- one entry -----------------------------------------------------------------------

    async def _handle(self, entry: KeyValue.Entry) -> None:
        key, revision = entry.key, entry.revision or 0
        self._last_revision = max(self._last_revision, revision)
        if self._revisions.get(key) == revision:
            return  # seen before this resync
        if len(self._revisions) >= _MAX_REVISIONS:
            self._revisions.clear()
        self._revisions[key] = revision
        if entry.operation in (KV_DEL, KV_PURGE):
            await self._remove(key)
            return
        try:
            record = decode_record(entry.value or b"", key)
        except InvalidPolicy as exc:
            self.table.rejected_malformed += 1
            self._warn(key, revision, "rejected a malformed policy value: %s", exc)
            return
        held = self.table.get(record.subject, record.section)
        if held == record:
            return
        if held is not None and record.version <= held.version and not self._new_epoch:
            self.table.rejected_stale += 1
            self._warn(
                key,
                revision,
                "rejected policy %s version %d: version %d is held",
                key,
                record.version,
                held.version,
            )
            return
        if self._prepare is not None:
            try:
                async with asyncio.timeout(PREPARE_TIMEOUT):
                    await self._prepare(record)
            except Exception as exc:
                self._prepare_failed += 1
                self._warn(key, revision, "cannot apply policy %s: %r", key, exc)
                return
        if held is not None and record.version <= held.version:
            self.table.remove(record.subject, record.section)  # from the previous bucket
        self.table.apply(record)
        self._applied += 1
        log.info(
            "policy %s version %d by %s: %s", key, record.version, record.author, record.reason
        )
        await self._notify(record, key)

    async def _remove(self, key: str) -> None:
        try:
            subject, section = parse_key(key)
        except InvalidPolicy:
            return  # nothing can be held under a key no record encodes to
        if self.table.remove(subject, section):
            self._removed += 1
            log.info("policy %s deleted", key)
            await self._notify(None, key)

    async def _notify(self, record: PolicyRecord | None, key: str) -> None:
        if self._on_applied is None:
            return
        try:
            await self._on_applied(record, key)
        except Exception:
            # The table changed either way; a failing observer must not stop the watch.
            log.exception("on_applied failed for policy %s", key)

    def _warn(self, key: str, revision: int, message: str, *args: object) -> None:
        """Log at warning once per key and revision (a resync replays them)."""
        if (key, revision) in self._warned:
            return
        if len(self._warned) >= _MAX_WARNED:
            self._warned.clear()
        self._warned.add((key, revision))
        log.warning(message, *args)
