"""The policy bucket: every subject's policy, one JetStream KV key per subject and section.

Writers (sidecars, the CLI) go through :class:`PolicyStore`: each write is a
compare-and-set on the key's revision, so concurrent writers never lose an update,
and carries the next version, its author and reason. Nodes read the bucket through
:class:`mesh._policy_watch.PolicyWatcher`. Errors from nats-py are translated here.

Versions keep growing across a delete (the next write continues from the last
version in the key's history), so a node that missed the delete still sees the
new record as newer than the one it holds.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import logging
import random
import time
from collections.abc import Iterator
from typing import Final, NamedTuple

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from mesh import _denials
from mesh._client import MeshClient
from mesh._errors import (
    ClientClosed,
    InvalidPolicy,
    JetStreamUnavailable,
    MeshError,
    PolicyConflict,
    PolicyPinned,
)
from mesh._policy import (
    PolicyRecord,
    Section,
    decode_record,
    encode_record,
    policy_key,
    validate_record,
)

__all__ = ["BUCKET", "HISTORY", "PolicyStore"]

log = logging.getLogger("mesh.policy")

BUCKET: Final = "mesh_policy"
#: Revisions kept per key (`mesh policy history`); JetStream's maximum.
HISTORY: Final = 64
#: Seconds a JetStream API call may take.
DEFAULT_TIMEOUT: Final = 5.0
#: Compare-and-set attempts before :class:`PolicyConflict`.
MAX_ATTEMPTS: Final = 16

_WHAT: Final = f"the policy bucket {BUCKET!r}"
# JetStream's "wrong last sequence" codes: the compare-and-set lost.
_WRONG_LAST_SEQUENCE: Final = (10071, 10164)
_DELETED: Final = (KV_DEL, KV_PURGE)


@contextlib.contextmanager
def translate_errors(timeout: float = DEFAULT_TIMEOUT) -> Iterator[None]:
    """Turn nats-py's errors from a KV call into the mesh's."""
    mark = _denials.mark()
    try:
        yield
    except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
        raise ClientClosed() from None
    except (nats.js.errors.ServiceUnavailableError, nats.errors.NoRespondersError):
        raise JetStreamUnavailable(_WHAT, "JetStream is not enabled on this server") from None
    except nats.js.errors.NoStreamResponseError:
        raise JetStreamUnavailable(_WHAT, "no stream stores it (was the bucket deleted?)") from None
    except nats.js.errors.NotFoundError:
        raise JetStreamUnavailable(_WHAT, "it does not exist (was it deleted?)") from None
    except (TimeoutError, nats.errors.TimeoutError):
        # No answer because the server refused the request itself?
        denied = _denials.since(mark, prefix="$JS.") or _denials.since(mark, prefix="$KV.")
        if denied is not None:
            raise denied from None
        raise JetStreamUnavailable(_WHAT, f"JetStream did not answer within {timeout:g}s") from None
    except nats.js.errors.APIError as exc:
        raise MeshError(f"JetStream refused a request on {_WHAT}: {exc.description}") from None
    except nats.errors.Error as exc:
        raise MeshError(f"cannot use {_WHAT}: {exc}") from None


async def next_entry(watcher: KeyValue.KeyWatcher, timeout: float) -> KeyValue.Entry | None:
    """The watcher's next entry; None once the values present at the start are all read.

    Raises nats-py's TimeoutError after ``timeout`` seconds without one.
    """
    entry: KeyValue.Entry | None = await watcher.updates(timeout)  # type: ignore[no-untyped-call]
    return entry


async def stop_watcher(watcher: KeyValue.KeyWatcher) -> None:
    """Stop a watcher; on a closed or lost connection there is nothing left to stop."""
    with contextlib.suppress(nats.errors.Error, OSError):
        await watcher.stop()  # type: ignore[no-untyped-call]


class _Current(NamedTuple):
    """What a key holds now."""

    record: PolicyRecord | None  # None: absent, deleted or unreadable
    revision: int  # of the key's last message (a value or a delete marker); 0 if none
    version: int  # the last readable version, 0 if none
    live: bool  # a value (readable or not) rather than nothing or a delete marker


class PolicyStore:
    """Reads and writes policy records in the :data:`BUCKET` KV bucket.

    Open it with :meth:`open`. ``malformed`` counts stored values that :meth:`list` and
    :meth:`history` skipped because they do not decode or validate.
    """

    def __init__(self, kv: KeyValue, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.kv = kv
        self.timeout = timeout
        self.malformed = 0

    @classmethod
    async def open(
        cls,
        client: MeshClient,
        *,
        create: bool = True,
        replicas: int = 1,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> PolicyStore:
        """Open the bucket, creating it (with ``replicas`` copies) when missing and ``create``.

        Raises :class:`JetStreamUnavailable` when the server has no JetStream, or when the
        bucket is missing and ``create`` is false.
        """
        js = client.nc.jetstream(timeout=timeout)
        with translate_errors(timeout):
            try:
                kv = await js.key_value(BUCKET)
            except nats.js.errors.BucketNotFoundError:
                if not create:
                    raise JetStreamUnavailable(_WHAT, "it does not exist yet") from None
                config = KeyValueConfig(
                    bucket=BUCKET,
                    description="natsmesh policy: one key per subject and section",
                    history=HISTORY,
                    replicas=replicas,
                    storage=StorageType.FILE,
                )
                kv = await js.create_key_value(config)
        return cls(kv, timeout=timeout)

    async def get(self, subject: str, section: str = "codec") -> PolicyRecord | None:
        """The current record, None if there is none; :class:`InvalidPolicy` if unreadable."""
        return (await self._current(policy_key(subject, section))).record

    async def set(
        self,
        subject: str,
        value: Section,
        *,
        author: str,
        reason: str,
        pin: bool | None = None,
        operator: bool = False,
    ) -> PolicyRecord:
        """Write ``value`` as the next version of its section of ``subject``; return it.

        ``pin`` True or False pins or unpins the section, None keeps the pin as it is. A
        pinned section changes only with ``operator`` (:class:`PolicyPinned` otherwise).
        Raises :class:`InvalidPolicy` for a value no node would apply, and
        :class:`PolicyConflict` when other writers won the race :data:`MAX_ATTEMPTS` times.
        """
        section = str(value.__struct_config__.tag)
        key = policy_key(subject, section)
        draft = PolicyRecord(
            subject=subject, version=1, author=author, reason=reason, time=0, value=value
        )
        validate_record(draft, key=key)  # before any round trip
        for attempt in range(MAX_ATTEMPTS):
            now = await self._current(key, tolerate_malformed=True)
            current = now.record
            if current is not None and current.pinned and not operator:
                raise PolicyPinned(subject, section, current.author)
            record = msgspec.structs.replace(
                draft,
                version=now.version + 1,
                time=time.time_ns(),
                pinned=pin if pin is not None else current is not None and current.pinned,
            )
            if await self._write(key, encode_record(record), now.revision):
                return record
            await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise PolicyConflict(subject, section, MAX_ATTEMPTS)

    async def delete(
        self,
        subject: str,
        section: str = "codec",
        *,
        author: str,
        reason: str,
        operator: bool = False,
    ) -> None:
        """Delete the section (nodes fall back to their defaults); no-op if there is none.

        A pinned section is deleted only with ``operator`` (:class:`PolicyPinned`).
        """
        key = policy_key(subject, section)
        for attempt in range(MAX_ATTEMPTS):
            now = await self._current(key, tolerate_malformed=True)
            if not now.live:
                return
            if now.record is not None and now.record.pinned and not operator:
                raise PolicyPinned(subject, section, now.record.author)
            with translate_errors(self.timeout):
                try:
                    await self.kv.delete(key, last=now.revision)
                except nats.js.errors.APIError as exc:
                    if exc.err_code not in _WRONG_LAST_SEQUENCE:
                        raise
                else:
                    log.info("policy %s deleted by %s: %s", key, author, reason)
                    return
            await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise PolicyConflict(subject, section, MAX_ATTEMPTS)

    async def list(self) -> list[PolicyRecord]:
        """Every current record, by key; unreadable values are skipped and counted."""
        found: dict[str, PolicyRecord] = {}
        with translate_errors(self.timeout):
            watcher = await self.kv.watch(">", ignore_deletes=True)
            try:
                while (entry := await next_entry(watcher, self.timeout)) is not None:
                    record = self._decode(entry)
                    if record is not None:
                        found[entry.key] = record
            finally:
                await stop_watcher(watcher)
        return [found[key] for key in sorted(found)]

    async def history(
        self, subject: str, section: str = "codec"
    ) -> builtins.list[PolicyRecord | None]:
        """The stored revisions of a section, oldest first: None marks a delete.

        At most :data:`HISTORY` revisions are kept; unreadable ones are skipped and counted.
        """
        entries = await self._history(policy_key(subject, section))
        records: builtins.list[PolicyRecord | None] = []
        for entry in entries:
            if entry.operation in _DELETED:
                records.append(None)
            elif (record := self._decode(entry)) is not None:
                records.append(record)
        return records

    # -- internals -------------------------------------------------------------------

    async def _current(self, key: str, *, tolerate_malformed: bool = False) -> _Current:
        """What ``key`` holds; an unreadable value raises unless ``tolerate_malformed``."""
        with translate_errors(self.timeout):
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError as exc:
                if exc.entry is None:  # never written
                    return _Current(None, 0, 0, live=False)
                # A delete marker: the next write continues from the last version.
                revision = exc.entry.revision or 0
                return _Current(None, revision, await self._last_version(key), live=False)
        revision = entry.revision or 0
        try:
            record = decode_record(entry.value or b"", key)
        except InvalidPolicy:
            if not tolerate_malformed:
                raise
            return _Current(None, revision, await self._last_version(key), live=True)
        return _Current(record, revision, record.version, live=True)

    async def _write(self, key: str, data: bytes, revision: int) -> bool:
        """Compare-and-set: False when the key's last revision is no longer ``revision``.

        ``kv.update(last=0)`` rather than ``kv.create``: for a deleted key ``create``
        retries by itself against whatever the marker's revision is by then, which is not
        the state this write's version was computed from.
        """
        with translate_errors(self.timeout):
            try:
                await self.kv.update(key, data, last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                return False
        return True

    async def _last_version(self, key: str) -> int:
        """The version of the newest readable record in the key's history, 0 if none."""
        for entry in reversed(await self._history(key)):
            if entry.operation in _DELETED:
                continue
            try:
                return decode_record(entry.value or b"", key).version
            except InvalidPolicy:
                continue
        return 0

    async def _history(self, key: str) -> builtins.list[KeyValue.Entry]:
        with translate_errors(self.timeout):
            try:
                return await self.kv.history(key)
            except nats.js.errors.NoKeysError:
                return []

    def _decode(self, entry: KeyValue.Entry) -> PolicyRecord | None:
        try:
            return decode_record(entry.value or b"", entry.key)
        except InvalidPolicy as exc:
            self.malformed += 1
            log.warning("skipping an unreadable policy at revision %s: %s", entry.revision, exc)
            return None
