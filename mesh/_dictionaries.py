"""Compression dictionaries: trained from a subject's traffic, kept in a JetStream
Object Store, fetched by id.

A dictionary is stored as the object ``dict-<id>`` in the bucket :data:`BUCKET`, where
``<id>`` is the zstd dictionary id inside the data (random, so two trainings never
collide in practice). Its subject, creation time, level and sample count travel in the
object's description as JSON: a description is free text to every NATS client, while
nats-py writes object headers in a shape the Go tools do not read.

Reads do not use nats-py's ``ObjectStore.get``/``list``: those consume through an
ordered push consumer with no timeout, which a cancelled wait leaves subscribed. Here
every read is a bounded JetStream "get message" request (the object's meta message,
then its chunks in order), and the SHA-256 digest is checked.

Anyone who may write the bucket may write anything into it, so what is read is checked
like any input from the network: a meta message over :data:`MAX_META_BYTES` is not
decoded, one that does not decode (whatever the bytes) is unreadable, and a description
this module did not write is listed without details. Only the description refuses
unknown fields (a newer writer's description loses its details in an older listing);
the meta message is NATS's object-store schema, which every client extends.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import secrets
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Final

import msgspec
import nats.errors
import nats.js.errors
import zstandard
from nats.js.api import ObjectMeta, ObjectStoreConfig, StorageType
from nats.js.object_store import (
    OBJ_ALL_META_PRE_TEMPLATE,
    OBJ_CHUNKS_PRE_TEMPLATE,
    OBJ_META_PRE_TEMPLATE,
    OBJ_STREAM_TEMPLATE,
    ObjectStore,
)

from mesh._codec import MAX_DICTIONARY_ID, CodecEngine, check_dictionary, dictionary_id
from mesh._errors import (
    DictionaryError,
    DictionaryNotFound,
    DictionaryTrainingFailed,
    JetStreamUnavailable,
    MalformedMessage,
)
from mesh._wire import Codec

if TYPE_CHECKING:
    from nats.js import JetStreamContext

    from mesh._client import MeshClient
    from mesh._message import Message

BUCKET: Final = "mesh_dicts"
#: Seconds any one store operation may take.
DEFAULT_TIMEOUT: Final = 5.0
#: Dictionaries kept in memory by a store.
DEFAULT_CACHE_SIZE: Final = 16
#: Largest dictionary stored or fetched (zstd's own advice is ~100 KiB).
MAX_DICTIONARY_SIZE: Final = 1024 * 1024
#: Entries :meth:`DictionaryStore.list` reads at most.
MAX_LISTED: Final = 10_000
#: Largest object meta message decoded (name, description and headers of one object).
MAX_META_BYTES: Final = 64 * 1024

#: Training needs at least this many messages and bytes...
MIN_SAMPLES: Final = 100
MIN_SAMPLE_BYTES: Final = 8 * 1024
#: ...and uses at most this many (more makes training slower, not better).
MAX_TRAINING_SAMPLES: Final = 10_000
MAX_TRAINING_BYTES: Final = 16 * 1024 * 1024
#: Bytes :func:`sample_subject` collects at most.
MAX_SAMPLED_BYTES: Final = 32 * 1024 * 1024

# zstd reserves dictionary ids below 32768 and from 2**31 for a registry.
_MIN_PRIVATE_ID: Final = 32_768
_MAX_PRIVATE_ID: Final = 2**31 - 1
_STREAM: Final = OBJ_STREAM_TEMPLATE.format(bucket=BUCKET)
_DIGEST_PREFIX: Final = "SHA-256="


class DictionaryInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A stored dictionary: its id and size, the subject it was trained for, when
    (Unix ns), at which level and on how many sample messages."""

    id: int
    size: int
    subject: str = ""
    created: int = 0
    level: int = 0
    samples: int = 0


class DictionaryStoreStats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a store's counters: reads from JetStream, cache hits, evictions."""

    fetches: int
    hits: int
    evictions: int


class _Description(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    subject: str = ""
    created: int = 0
    level: int = 0
    samples: int = 0


class _ObjectInfo(msgspec.Struct, kw_only=True):
    """The fields of an object's meta message (JSON, as every NATS client writes it)."""

    name: str = ""
    nuid: str = ""
    size: int = 0
    chunks: int = 0
    digest: str = ""
    deleted: bool = False
    description: str | None = None


_encode_description = msgspec.json.Encoder().encode
_description_decoder: Final = msgspec.json.Decoder(_Description)
_object_info_decoder: Final = msgspec.json.Decoder(_ObjectInfo)


def _decode_object_info(data: bytes) -> _ObjectInfo:
    """An object's meta message; ValueError for anything else, whatever the bytes."""
    if len(data) > MAX_META_BYTES:
        raise ValueError(f"object metadata of {len(data)} bytes is over {MAX_META_BYTES}")
    try:
        return _object_info_decoder.decode(data)
    except RecursionError:
        raise ValueError("object metadata nests too deeply") from None


def _decode_description(text: str) -> _Description:
    """A description this module wrote; ValueError for any other text.

    Nothing nests in it: an unknown field is refused before its value is read, so
    a deep one cannot reach the recursion limit.
    """
    return _description_decoder.decode(text)


class DictionaryStore:
    """Dictionaries by id, from the :data:`BUCKET` object store. Create with :meth:`open`.

    :meth:`get` keeps up to ``cache_size`` dictionaries in memory (least recently used
    go first, counted) and fetches each missing one once, however many callers wait.
    """

    def __init__(
        self,
        js: JetStreamContext,
        bucket: ObjectStore | None,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be at least 1, not {cache_size}")
        self._js = js
        self._bucket = bucket
        self.cache_size = cache_size
        self.timeout = timeout
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._inflight: dict[int, asyncio.Future[bytes]] = {}
        self._fetches = 0
        self._hits = 0
        self._evictions = 0

    @classmethod
    async def open(
        cls,
        client: MeshClient,
        *,
        create: bool = True,
        cache_size: int = DEFAULT_CACHE_SIZE,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> DictionaryStore:
        """Open the store (creating its bucket if ``create``; else the first
        :meth:`put` creates it).

        Raises :class:`JetStreamUnavailable` when the server has no JetStream.
        """
        js = client.nc.jetstream(timeout=timeout)
        store = cls(js, None, cache_size=cache_size, timeout=timeout)
        try:
            async with asyncio.timeout(timeout):
                await store._open_bucket(create)
        except (TimeoutError, nats.errors.Error) as exc:
            raise JetStreamUnavailable("the dictionary store", _describe(exc)) from None
        return store

    @property
    def stats(self) -> DictionaryStoreStats:
        return DictionaryStoreStats(
            fetches=self._fetches, hits=self._hits, evictions=self._evictions
        )

    async def _open_bucket(self, create: bool) -> ObjectStore | None:
        if self._bucket is None:
            try:
                self._bucket = await self._js.object_store(BUCKET)
            except nats.js.errors.BucketNotFoundError:
                if not create:
                    return None
                self._bucket = await self._js.create_object_store(
                    BUCKET,
                    config=ObjectStoreConfig(
                        description="natsmesh compression dictionaries",
                        storage=StorageType.FILE,
                    ),
                )
        return self._bucket

    # -- reading -------------------------------------------------------------------

    async def get(self, dictionary: int) -> bytes:
        """The dictionary with id ``dictionary``.

        Raises :class:`DictionaryNotFound` when it is not stored, the store cannot be
        read, or it does not answer within the store's timeout.
        """
        data = self._cache.get(dictionary)
        if data is not None:
            self._cache.move_to_end(dictionary)
            self._hits += 1
            return data
        while (pending := self._inflight.get(dictionary)) is not None:
            try:
                return await asyncio.shield(pending)
            except DictionaryNotFound as exc:
                raise DictionaryNotFound(exc.dictionary, exc.reason) from None
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise
                # The caller that was fetching was cancelled, not us: fetch in its place.
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._inflight[dictionary] = future
        try:
            data = await self._fetch(dictionary)
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning without waiters
            raise
        except BaseException:
            future.cancel()
            raise
        finally:
            del self._inflight[dictionary]
        self._remember(dictionary, data)
        future.set_result(data)
        return data

    def _remember(self, dictionary: int, data: bytes) -> None:
        self._cache[dictionary] = data
        self._cache.move_to_end(dictionary)
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
            self._evictions += 1

    async def _fetch(self, dictionary: int) -> bytes:
        if not 0 < dictionary <= MAX_DICTIONARY_ID:
            raise DictionaryNotFound(dictionary, "not a valid dictionary id")
        self._fetches += 1
        try:
            async with asyncio.timeout(self.timeout):
                if await self._open_bucket(create=False) is None:
                    raise DictionaryNotFound(
                        dictionary, f"no dictionary was ever stored (no bucket {BUCKET!r})"
                    )
                data = await self._read(dictionary)
        except TimeoutError:
            raise DictionaryNotFound(
                dictionary, f"the dictionary store did not answer within {self.timeout:g}s"
            ) from None
        except nats.js.errors.NotFoundError:
            raise DictionaryNotFound(dictionary) from None
        except ValueError as exc:  # the meta message does not decode
            raise DictionaryNotFound(dictionary, f"unreadable object metadata: {exc}") from None
        except nats.errors.Error as exc:
            raise DictionaryNotFound(
                dictionary, f"cannot read the dictionary store: {_describe(exc)}"
            ) from None
        carried = dictionary_id(data)
        if carried != dictionary:
            raise DictionaryNotFound(
                dictionary, f"the stored object holds dictionary {carried} instead"
            )
        return data

    async def _read(self, dictionary: int) -> bytes:
        """The object's data, chunk by chunk; NotFoundError if absent or deleted."""
        name = _object_name(dictionary)
        meta = await self._js.get_last_msg(_STREAM, _meta_subject(name))
        info = _decode_object_info(meta.data or b"")
        if info.deleted:
            raise nats.js.errors.ObjectNotFoundError()
        if info.size > MAX_DICTIONARY_SIZE:
            raise DictionaryNotFound(
                dictionary, f"the stored object is {info.size} bytes, over the size limit"
            )
        chunks = OBJ_CHUNKS_PRE_TEMPLATE.format(bucket=BUCKET, obj=info.nuid)
        data = bytearray()
        seq = 1
        for _ in range(info.chunks):
            found = await self._next(chunks, seq)
            if found is None or len(data) + len(found[1]) > info.size:
                break
            seq, chunk = found
            data += chunk
        if len(data) != info.size or _digest(data) != info.digest:
            raise DictionaryNotFound(dictionary, "the stored object is corrupt (digest mismatch)")
        return bytes(data)

    async def _next(self, subject: str, seq: int) -> tuple[int, bytes] | None:
        """The first message on ``subject`` (wildcards allowed) at or after sequence
        ``seq``: the sequence to ask for next and its data; None when there is none."""
        try:
            msg = await self._js.get_msg(_STREAM, seq=seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return None
        return (msg.seq or seq) + 1, msg.data or b""

    async def list(self) -> list[DictionaryInfo]:
        """Every stored dictionary, oldest first (at most :data:`MAX_LISTED`).

        Raises :class:`DictionaryError` when the store cannot be read.
        """
        found: list[DictionaryInfo] = []
        try:
            async with asyncio.timeout(self.timeout):
                if await self._open_bucket(create=False) is None:
                    return []
                everything = OBJ_ALL_META_PRE_TEMPLATE.format(bucket=BUCKET)
                seq = 1
                while len(found) < MAX_LISTED:
                    meta = await self._next(everything, seq)
                    if meta is None:
                        break
                    seq, data = meta
                    entry = _entry(data)
                    if entry is not None:
                        found.append(entry)
        except TimeoutError:
            raise DictionaryError(
                f"cannot list the dictionary store: no answer within {self.timeout:g}s"
            ) from None
        except nats.errors.Error as exc:
            raise DictionaryError(f"cannot list the dictionary store: {_describe(exc)}") from None
        return sorted(found, key=lambda d: (d.created, d.id))

    # -- writing -------------------------------------------------------------------

    async def put(self, data: bytes, *, subject: str = "", level: int = 3, samples: int = 0) -> int:
        """Store a zstd dictionary; return its id (the one inside ``data``).

        Storing the same dictionary again is a no-op. Raises :class:`ValueError` when
        ``data`` is not a zstd dictionary with an id, is one zstd cannot load, or is over
        :data:`MAX_DICTIONARY_SIZE`, :class:`DictionaryError` when another dictionary
        holds the id or the store cannot be written.
        """
        dictionary = check_dictionary(data)
        if len(data) > MAX_DICTIONARY_SIZE:
            raise ValueError(
                f"the dictionary is {len(data)} bytes, over the {MAX_DICTIONARY_SIZE}-byte limit"
            )
        name = _object_name(dictionary)
        description = _encode_description(
            _Description(subject=subject, created=time.time_ns(), level=level, samples=samples)
        ).decode()
        try:
            async with asyncio.timeout(self.timeout):
                bucket = await self._open_bucket(create=True)
                assert bucket is not None
                stored = await self._stored_digest(name)
                if stored is None:
                    await bucket.put(
                        name, data, meta=ObjectMeta(name=name, description=description)
                    )
                elif stored != _digest(data):
                    raise DictionaryError(
                        f"a different dictionary with id {dictionary} is already stored: "
                        "train again (ids are random)"
                    )
        except TimeoutError:
            raise DictionaryError(
                f"cannot store dictionary {dictionary}: no answer within {self.timeout:g}s"
            ) from None
        except nats.errors.Error as exc:
            raise DictionaryError(
                f"cannot store dictionary {dictionary}: {_describe(exc)}"
            ) from None
        self._remember(dictionary, bytes(data))
        return dictionary

    async def _stored_digest(self, name: str) -> str | None:
        try:
            meta = await self._js.get_last_msg(_STREAM, _meta_subject(name))
        except nats.js.errors.NotFoundError:
            return None
        try:
            info = _decode_object_info(meta.data or b"")
        except ValueError:
            return ""  # unreadable: never equal to a digest, so put() refuses to overwrite it
        return None if info.deleted else info.digest


def _object_name(dictionary: int) -> str:
    return f"dict-{dictionary}"


def _meta_subject(name: str) -> str:
    return OBJ_META_PRE_TEMPLATE.format(
        bucket=BUCKET, obj=base64.urlsafe_b64encode(name.encode()).decode()
    )


def _digest(data: bytes | bytearray) -> str:
    return _DIGEST_PREFIX + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()


def _entry(meta: bytes) -> DictionaryInfo | None:
    """The listing entry of one meta message; None for deleted or foreign objects."""
    try:
        info = _decode_object_info(meta)
    except ValueError:
        return None
    prefix, _, number = info.name.partition("-")
    if info.deleted or prefix != "dict" or not number.isdigit():
        return None
    try:
        described = _decode_description(info.description or "{}")
    except ValueError:
        described = _Description()  # written by another tool: list it without details
    return DictionaryInfo(
        id=int(number),
        size=info.size,
        subject=described.subject,
        created=described.created,
        level=described.level,
        samples=described.samples,
    )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, nats.js.errors.ServiceUnavailableError | nats.errors.NoRespondersError):
        return "JetStream is not enabled on the server"
    return str(exc).strip() or type(exc).__name__


# -- training ------------------------------------------------------------------------


def train(
    samples: list[bytes], *, size: int = 64 * 1024, subject: str = "", level: int = 3
) -> bytes:
    """Train a zstd dictionary of ``size`` bytes on sample messages; return its bytes.

    Uses at most :data:`MAX_TRAINING_SAMPLES` messages / :data:`MAX_TRAINING_BYTES`.
    The dictionary gets a random id in zstd's private range. Raises
    :class:`DictionaryTrainingFailed` for too few samples or when zstd gives up.
    """
    used: list[bytes | bytearray | memoryview] = []
    total = 0
    for sample in samples:
        if not sample:
            continue
        if len(used) >= MAX_TRAINING_SAMPLES or total + len(sample) > MAX_TRAINING_BYTES:
            break
        used.append(sample)
        total += len(sample)
    if len(used) < MIN_SAMPLES or total < MIN_SAMPLE_BYTES:
        raise DictionaryTrainingFailed(
            subject,
            f"only {len(used)} messages ({_kib(total)}) sampled; need at least "
            f"{MIN_SAMPLES} messages / {_kib(MIN_SAMPLE_BYTES)}",
        )
    dict_id = _MIN_PRIVATE_ID + secrets.randbelow(_MAX_PRIVATE_ID - _MIN_PRIVATE_ID + 1)
    try:
        trained = zstandard.train_dictionary(size, used, dict_id=dict_id, level=level)
    except zstandard.ZstdError as exc:
        raise DictionaryTrainingFailed(
            subject,
            f"zstd could not train a {_kib(size)} dictionary on {len(used)} messages "
            f"({_kib(total)}): {exc}. Sample more (or more varied) traffic, or ask for a "
            "smaller dictionary",
        ) from None
    return bytes(trained.as_bytes())


def _kib(n: int) -> str:
    return f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} B"


async def sample_subject(
    client: MeshClient,
    subject: str,
    *,
    max_messages: int = 2000,
    seconds: float = 10.0,
    max_bytes: int = MAX_SAMPLED_BYTES,
    codec: CodecEngine | None = None,
    started: asyncio.Event | None = None,
) -> list[bytes]:
    """Collect the raw bodies of messages on ``subject`` (wildcards allowed) for training.

    Stops after ``max_messages`` messages, ``max_bytes`` bytes or ``seconds``, whichever
    comes first. Compressed bodies are decompressed with ``codec`` (give it a store so
    it can fetch dictionaries); those it cannot decode are left out. ``started`` is set
    once the server has the subscription: what is published after that is seen.
    """
    if max_messages < 1 or max_bytes < 1 or not seconds > 0:
        raise ValueError("max_messages, max_bytes and seconds must be positive")
    engine = codec if codec is not None else CodecEngine()
    samples: list[bytes] = []
    total = 0
    full = asyncio.Event()

    async def collect(msg: Message) -> None:
        nonlocal total
        if full.is_set():
            return
        envelope = msg.envelope
        body: bytes | memoryview = msg.body
        if envelope is not None and envelope.codec != Codec.NONE:
            try:
                body = await engine.decode(body, envelope, msg.subject)
            except MalformedMessage:
                return  # counted in engine.stats.decode_failures
        if total + len(body) > max_bytes:
            full.set()
            return
        samples.append(bytes(body))
        total += len(body)
        if len(samples) >= max_messages:
            full.set()

    # Beyond max_bytes waiting for the callback, NATS drops (counted on the subscription).
    sub = await client.subscribe(subject, collect, traced=False, pending_bytes=max_bytes)
    try:
        await client.flush()
        if started is not None:
            started.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(full.wait(), seconds)
    finally:
        await sub.unsubscribe()
    return samples
