"""Live registration of node instances in a JetStream KV bucket with a TTL.

Each instance puts ``<name>.<instance>`` every :data:`HEARTBEAT` seconds; the
bucket's max age (:data:`TTL`) removes an instance that stopped heartbeating
(killed, frozen, partitioned) within seconds. A clean shutdown purges its key
at once. ``mesh nodes`` reads the bucket.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import TYPE_CHECKING, Final

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import KeyValueConfig, StorageType
from nats.js.kv import KeyValue

from mesh import MeshClient, MeshError
from mesh._names import validate_agent_name, validate_instance

if TYPE_CHECKING:
    from nodes._node import Node

log = logging.getLogger("mesh.node")

BUCKET: Final = "mesh_nodes"
TTL: Final = 6.0
HEARTBEAT: Final = 2.0
#: Largest registration decoded (a real one is a few hundred bytes per subject).
MAX_INFO_BYTES: Final = 256 * 1024


class NodeInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What a live instance says about itself."""

    name: str
    instance: str
    version: str
    subjects: list[str]
    host: str
    pid: int
    started: float
    heartbeat: float


_encode = msgspec.json.Encoder().encode
_info_decoder: Final = msgspec.json.Decoder(NodeInfo)


def decode_info(data: bytes) -> NodeInfo:
    """Decode a registration.

    Raises ``ValueError`` (``msgspec.DecodeError`` is one) for anything that is not a
    registration of at most :data:`MAX_INFO_BYTES` bytes, whatever the bytes. Unknown
    fields are skipped: ``mesh up`` counts replicas from registrations, and a newer node
    must still count.
    """
    if len(data) > MAX_INFO_BYTES:
        raise ValueError(f"registration of {len(data)} bytes is over {MAX_INFO_BYTES}")
    try:
        return _info_decoder.decode(data)
    except RecursionError:
        raise ValueError("registration nests too deeply") from None


async def open_registry(client: MeshClient, *, create: bool = True) -> KeyValue | None:
    """The registration bucket; created if missing and ``create``; ``None`` if absent."""
    js = client.nc.jetstream(timeout=5)
    try:
        return await js.key_value(BUCKET)
    except nats.js.errors.BucketNotFoundError:
        if not create:
            return None
    return await js.create_key_value(
        KeyValueConfig(bucket=BUCKET, history=1, ttl=TTL, storage=StorageType.MEMORY)
    )


async def list_nodes(client: MeshClient) -> list[NodeInfo]:
    """Every live instance, sorted by name then start time.

    Raises :class:`MeshError` when the registry cannot be read (JetStream off or down).
    """
    try:
        return await _list_nodes(client)
    except (nats.errors.Error, TimeoutError) as exc:
        raise MeshError(
            f"cannot read the node registry ({BUCKET}): {type(exc).__name__}. Registrations "
            "live in JetStream: is it enabled on the server? (`mesh server` enables it)"
        ) from None


async def _list_nodes(client: MeshClient) -> list[NodeInfo]:
    kv = await open_registry(client, create=False)
    if kv is None:
        return []
    try:
        keys = await kv.keys()
    except nats.js.errors.NoKeysError:
        return []
    now = time.time()
    found = []
    for key in keys:
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            continue  # expired between listing and reading
        if entry.value is None:
            continue
        try:
            info = decode_info(entry.value)
        except ValueError:
            log.warning("ignoring an unreadable registration under %r", key)
            continue
        if now - info.heartbeat <= TTL:
            found.append(info)
    return sorted(found, key=lambda i: (i.name, i.started))


class Registration:
    """Keeps one instance's registration alive until closed."""

    def __init__(self, client: MeshClient, node: Node, instance: str, started: float) -> None:
        self.client = client
        # The key is built from both: each must be one token a KV key may hold.
        self.key = f"{validate_agent_name(node.name)}.{validate_instance(instance)}"
        self._info = dict(
            name=node.name,
            instance=instance,
            version=node.version,
            subjects=[h.subject for h in node.handlers],
            host=socket.gethostname(),
            pid=os.getpid(),
            started=started,
        )
        self._kv: KeyValue | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        try:
            self._kv = await open_registry(self.client)
        except (nats.errors.Error, TimeoutError) as exc:
            log.warning(
                "not registering in %s (is JetStream enabled on the server?): %s", BUCKET, exc
            )
            return
        try:
            await self._put()
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            # Not fatal: the node serves anyway, and the heartbeat tries again.
            log.warning("could not register in %s: %s", BUCKET, exc)
        self._task = asyncio.get_running_loop().create_task(self._heartbeat())

    async def _put(self) -> None:
        assert self._kv is not None
        info = NodeInfo(heartbeat=time.time(), **self._info)  # type: ignore[arg-type]
        await self._kv.put(self.key, _encode(info))

    async def _heartbeat(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT)
            try:
                await self._put()
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                # Disconnected: the entry may expire; the next beat restores it.
                log.debug("heartbeat failed: %s", exc)

    async def aclose(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
        kv, self._kv = self._kv, None
        if kv is not None:
            try:
                await kv.purge(self.key)
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                log.debug("deregister: %s", exc)
