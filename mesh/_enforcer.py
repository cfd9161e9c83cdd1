"""A client obeying the policy plane: watch the bucket, prepare, apply, acknowledge.

:class:`PolicyEnforcer` gives a client a :class:`~mesh._policy.PolicyTable` fed by a
:class:`~mesh._policy_watch.PolicyWatcher`. Before a codec value is applied its
dictionary is fetched (a value whose dictionary cannot be had is refused and counted,
and the last good value stays). Every applied or removed value is announced on
``_MESH.policy.applied.<instance>``, which is how ``mesh policy set`` and
``mesh bench policy`` know when every node has it.

Anyone may publish on that subject, so an acknowledgement is read like any input from
the network: at most :data:`MAX_APPLIED_BYTES`, no unknown fields (readers are upgraded
before the nodes, as for every control-plane record), and a tracker that counts what it
refuses and holds a bounded number of entries.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection
from typing import Final

import msgspec

from mesh._client import MeshClient
from mesh._message import Message
from mesh._names import validate_agent_name, validate_instance
from mesh._policy import PolicyRecord, PolicyTable
from mesh._policy_watch import PolicyWatcher

log = logging.getLogger("mesh.policy")

#: Subject prefix of apply acknowledgements; the instance id is the last token.
APPLIED_SUBJECT: Final = "_MESH.policy.applied"
#: Largest acknowledgement decoded (a real one is well under 1 KiB).
MAX_APPLIED_BYTES: Final = 4 * 1024
#: (instance, key) pairs an :class:`AppliedTracker` holds at most.
MAX_TRACKED: Final = 65_536


class PolicyApplied(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One instance saying it now enforces ``version`` of ``key`` (0: the key was removed)."""

    instance: str
    agent: str
    key: str
    version: int
    #: Unix ns when the value took effect on the instance.
    time: int


encode_applied = msgspec.msgpack.Encoder().encode
_applied_decoder: Final = msgspec.msgpack.Decoder(PolicyApplied)


def decode_applied(data: bytes) -> PolicyApplied:
    """Decode an acknowledgement.

    Raises ``ValueError`` (``msgspec.DecodeError`` is one) for anything that is not an
    acknowledgement of at most :data:`MAX_APPLIED_BYTES` bytes, whatever the bytes.
    Nothing nests in one and unknown fields are refused before their value is read, so
    no input reaches the recursion limit.
    """
    if len(data) > MAX_APPLIED_BYTES:
        raise ValueError(f"acknowledgement of {len(data)} bytes is over {MAX_APPLIED_BYTES}")
    return _applied_decoder.decode(data)


class AppliedTracker:
    """Collects apply acknowledgements: the newest version (and when) per instance and key.

    Holds at most :data:`MAX_TRACKED` (instance, key) pairs; acknowledgements that do
    not decode are counted in :attr:`malformed`, those past the bound in :attr:`overflow`.
    """

    def __init__(self) -> None:
        self.latest: dict[tuple[str, str], tuple[int, int]] = {}  # -> (version, applied ns)
        self.malformed = 0
        self.overflow = 0
        self._changed = asyncio.Event()

    async def on_ack(self, msg: Message) -> None:
        """A subscription callback for ``_MESH.policy.applied.>``."""
        try:
            ack = decode_applied(msg.data)
        except ValueError:
            self.malformed += 1
            return
        where = (ack.instance, ack.key)
        if where not in self.latest and len(self.latest) >= MAX_TRACKED:
            self.overflow += 1
            return
        if ack.version >= self.latest.get(where, (-1, 0))[0]:
            self.latest[where] = (ack.version, ack.time)
            self._changed.set()

    def applied(self, key: str, version: int) -> dict[str, int]:
        """Instances holding ``version`` (or newer) of ``key``, with when they applied it."""
        return {i: t for (i, k), (v, t) in self.latest.items() if k == key and v >= version}

    async def wait(
        self, key: str, version: int, count: int, timeout: float, among: Collection[str] = ()
    ) -> dict[str, int]:
        """Wait until ``count`` instances (of ``among``, when given) hold ``version``."""

        def done() -> dict[str, int]:
            found = self.applied(key, version)
            return {i: t for i, t in found.items() if i in among} if among else found

        give_up = time.monotonic() + timeout
        while len(done()) < count and time.monotonic() < give_up:
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), give_up - time.monotonic())
        return done()


class PolicyEnforcer:
    """Keeps ``client.policy`` in step with the policy bucket. An async context manager."""

    def __init__(self, client: MeshClient, *, agent: str, instance: str) -> None:
        self.client = client
        self.agent = validate_agent_name(agent)
        # The acknowledgement subject is built from it.
        self.instance = validate_instance(instance)
        self.table = PolicyTable()
        self.watcher = PolicyWatcher(
            client, self.table, prepare=self._prepare, on_applied=self._on_applied
        )
        self._subject = f"{APPLIED_SUBJECT}.{instance}"
        self._reported_rejections = 0

    async def __aenter__(self) -> PolicyEnforcer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Install the table on the client and load the current policy (bounded wait)."""
        self.client.policy = self.table
        await self.watcher.start()

    async def aclose(self) -> None:
        """Stop watching; the client keeps the last policy it had (idempotent)."""
        await self.watcher.aclose()

    def telemetry(self) -> tuple[dict[str, int], int]:
        """Versions in force, and values refused since the last call (for snapshots)."""
        stats = self.watcher.stats()
        rejected = stats.rejected_stale + stats.rejected_malformed + stats.prepare_failed
        fresh, self._reported_rejections = rejected - self._reported_rejections, rejected
        return self.table.versions(), fresh

    async def _prepare(self, record: PolicyRecord) -> None:
        await self.client.codec.prepare(record.value)

    async def _on_applied(self, record: PolicyRecord | None, key: str) -> None:
        ack = PolicyApplied(
            instance=self.instance,
            agent=self.agent,
            key=key,
            version=record.version if record is not None else 0,
            time=time.time_ns(),
        )
        try:
            await self.client._send_raw(self._subject, encode_applied(ack))
        except Exception as exc:  # an acknowledgement is a courtesy; the policy holds
            log.debug("policy acknowledgement for %s not sent: %s", key, exc)
