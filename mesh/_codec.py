"""Body compression: zstd per subject, with trained dictionaries.

:class:`CodecEngine` turns a body into what goes on the wire under a subject's
:class:`~mesh._policy.CodecPolicy` (:meth:`~CodecEngine.encode`, synchronous, on the
publish path) and back (:meth:`~CodecEngine.decode`). The envelope says how a body
was compressed: ``codec``, ``dictionary`` (0 for none) and ``level``.

Every compressed body is one zstd frame with its content size, a checksum and its
dictionary id, so a receiver never silently mis-decodes: a frame is refused (as
:class:`MalformedMessage`) when its dictionary differs from the envelope's, when it
declares more than ``max_decompressed`` bytes (checked in the frame header, before
anything is allocated), when it needs a larger window than allowed, when it does not
declare its size or carry a checksum, and when it is corrupt, truncated, followed by
trailing bytes or decompresses to another size than it declared.

The frame header is checked before its dictionary is looked for, so only a frame that
could be decoded makes the engine fetch a dictionary it does not hold. Fetches that
find nothing are bounded too (:data:`MISSING_PER_SECOND`): a sender inventing
dictionary ids gets its frames refused, not one JetStream request per frame. A
dictionary is checked when it is installed (zstd must be able to load it), so a
corrupt one is refused once instead of failing every frame.

Compressors (per level and dictionary), decompressors and dictionaries are built once
and kept in bounded caches; an entry pushed out is counted and rebuilt on next use.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Final, TypeVar

import msgspec
import zstandard

from mesh._errors import DictionaryNotFound, InvalidPolicy, MalformedMessage
from mesh._policy import MAX_ZSTD_LEVEL, MIN_ZSTD_LEVEL, CodecPolicy
from mesh._wire import Codec, Envelope

if TYPE_CHECKING:
    from mesh._dictionaries import DictionaryStore

K = TypeVar("K")
V = TypeVar("V")

#: Largest body a receiver decompresses; larger frames are refused before decoding.
DEFAULT_MAX_DECOMPRESSED: Final = 8 * 1024 * 1024
#: log2 of the largest zstd window a receiver accepts (23: 8 MiB).
DEFAULT_MAX_WINDOW_LOG: Final = 23
#: Entries in each cache: compressors, decompressors, dictionaries.
CACHE_SIZE: Final = 32
#: Seconds a dictionary the store could not supply is refused without asking again.
RETRY_MISSING_AFTER: Final = 5.0
#: Dictionary ids the engine remembers as missing (a hostile sender may invent many).
MAX_MISSING: Final = 256
#: zstd dictionary ids are 32-bit.
MAX_DICTIONARY_ID: Final = 2**32 - 1
#: Fetches that found no dictionary, per second, past which unknown dictionary ids are
#: refused without asking the store; up to :data:`MISSING_BURST` at once.
MISSING_PER_SECOND: Final = 1.0
MISSING_BURST: Final = 16

_CONTENT_SIZE_UNKNOWN: Final = zstandard.CONTENTSIZE_UNKNOWN
_CONTENT_SIZE_ERROR: Final = zstandard.CONTENTSIZE_ERROR


class CodecStats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a :class:`CodecEngine`'s counters.

    ``raw_sent`` counts bodies a zstd policy left uncompressed (under ``min_size``, or
    not smaller compressed); ``missing_dictionary`` those sent raw because the policy's
    dictionary was not loaded; ``evictions`` cache entries pushed out by the bound;
    ``fetches_refused`` frames refused without asking the store for their unknown
    dictionary, because too many such fetches had found nothing (each is also a decode
    failure).
    """

    compressed: int
    raw_sent: int
    missing_dictionary: int
    decode_failures: int
    dictionary_fetches: int
    evictions: int
    fetches_refused: int


def dictionary_id(data: bytes) -> int:
    """The id a zstd dictionary carries (0 when ``data`` is not a zstd dictionary)."""
    return int(zstandard.ZstdCompressionDict(data).dict_id())


def check_dictionary(data: bytes) -> int:
    """The id of ``data`` if zstd can compress and decompress with it.

    Raises :class:`ValueError` when ``data`` is not a zstd dictionary with an id, or
    when its header is right but zstd cannot load its tables (a corrupt dictionary:
    every frame would fail with it).
    """
    dictionary = dictionary_id(data)
    if dictionary == 0:
        raise ValueError("not a zstd dictionary: no dictionary header or id 0")
    try:
        loaded = zstandard.ZstdCompressionDict(data)
        zstandard.ZstdDecompressor(dict_data=loaded)
        zstandard.ZstdCompressor(level=MIN_ZSTD_LEVEL, dict_data=loaded).compress(b"\0")
    except zstandard.ZstdError as exc:
        raise ValueError(f"zstd cannot load dictionary {dictionary}: {exc}") from None
    return dictionary


class CodecEngine:
    """Compresses and decompresses bodies by policy; one per client.

    ``dictionaries`` is where dictionaries are fetched from (none: only those given to
    :meth:`add_dictionary` are known). Not thread-safe: use it from one event loop.
    """

    def __init__(
        self,
        dictionaries: DictionaryStore | None = None,
        *,
        max_decompressed: int = DEFAULT_MAX_DECOMPRESSED,
        max_window_log: int = DEFAULT_MAX_WINDOW_LOG,
    ) -> None:
        if max_decompressed < 1:
            raise ValueError(f"max_decompressed must be positive, not {max_decompressed}")
        if not zstandard.WINDOWLOG_MIN <= max_window_log <= zstandard.WINDOWLOG_MAX:
            raise ValueError(
                f"max_window_log must be between {zstandard.WINDOWLOG_MIN} and "
                f"{zstandard.WINDOWLOG_MAX}, not {max_window_log}"
            )
        self.dictionaries = dictionaries
        self.max_decompressed = max_decompressed
        self.max_window_size = 1 << max_window_log
        # Insertion-ordered dicts used as FIFO caches: a hit costs one lookup and no
        # reordering, which matters on the publish path; a pushed-out entry is rebuilt.
        self._compressors: dict[tuple[int, int], zstandard.ZstdCompressor] = {}
        self._decompressors: dict[int, zstandard.ZstdDecompressor] = {}
        self._dictionaries: dict[int, bytes] = {}
        self._missing: dict[int, float] = {}  # id -> monotonic time to ask the store again
        self._compressed = 0
        self._raw_sent = 0
        self._missing_dictionary = 0
        self._decode_failures = 0
        self._dictionary_fetches = 0
        self._evictions = 0
        self._fetches_refused = 0
        # A token bucket: a fetch that finds nothing takes a token.
        self._missing_budget = float(MISSING_BURST)
        self._budget_time = time.monotonic()

    @property
    def stats(self) -> CodecStats:
        return CodecStats(
            compressed=self._compressed,
            raw_sent=self._raw_sent,
            missing_dictionary=self._missing_dictionary,
            decode_failures=self._decode_failures,
            dictionary_fetches=self._dictionary_fetches,
            evictions=self._evictions,
            fetches_refused=self._fetches_refused,
        )

    # -- dictionaries ------------------------------------------------------------

    def add_dictionary(self, data: bytes) -> int:
        """Make a zstd dictionary usable at once, without the store; return its id.

        Raises :class:`ValueError` when ``data`` is not a zstd dictionary with an id,
        or one zstd cannot load.
        """
        dictionary = check_dictionary(data)
        self._install(dictionary, data)
        return dictionary

    def _install(self, dictionary: int, data: bytes) -> None:
        self._missing.pop(dictionary, None)
        if self._dictionaries.get(dictionary) == data:
            return
        _bounded_put(self, self._dictionaries, dictionary, data)
        # Anything built from an older copy under this id is stale.
        self._decompressors.pop(dictionary, None)
        for key in [key for key in self._compressors if key[1] == dictionary]:
            del self._compressors[key]

    async def _fetch(self, dictionary: int) -> None:
        """Load ``dictionary`` from the store (DictionaryNotFound if it cannot)."""
        if self.dictionaries is None:
            raise DictionaryNotFound(dictionary, "no dictionary store is configured")
        data = await self.dictionaries.get(dictionary)
        try:
            carried = check_dictionary(data)
        except ValueError as exc:
            raise DictionaryNotFound(
                dictionary, f"the store returned no usable one: {exc}"
            ) from None
        if carried != dictionary:
            raise DictionaryNotFound(
                dictionary, f"the store returned a dictionary with id {carried} instead"
            )
        if dictionary not in self._dictionaries:
            self._dictionary_fetches += 1
        self._install(dictionary, data)

    # -- encoding ----------------------------------------------------------------

    async def prepare(self, policy: CodecPolicy) -> None:
        """Make :meth:`encode` able to apply ``policy``: check it, load its dictionary,
        build its compressor.

        Raises :class:`InvalidPolicy` for a level outside 1..19 or an impossible
        dictionary id or threshold, :class:`DictionaryNotFound` when the dictionary
        cannot be loaded.
        """
        if policy.algorithm == "none":
            return
        _check(policy)
        if policy.dictionary and policy.dictionary not in self._dictionaries:
            await self._fetch(policy.dictionary)
        self._compressor(policy.level, policy.dictionary)

    def encode(self, body: bytes, policy: CodecPolicy) -> tuple[bytes, Codec, int, int]:
        """Return ``(wire body, codec, dictionary id, level)`` for ``body`` under ``policy``.

        The body goes raw (``Codec.NONE, 0, 0``) when the policy says "none", when it is
        under ``min_size``, when compressing does not make it smaller, or when the
        policy's dictionary is not loaded yet (see :meth:`prepare`). Raises only
        :class:`InvalidPolicy`, for a policy :meth:`prepare` would refuse too.
        """
        if policy.algorithm == "none":
            return body, Codec.NONE, 0, 0
        if len(body) < policy.min_size:
            self._raw_sent += 1
            return body, Codec.NONE, 0, 0
        level, dictionary = policy.level, policy.dictionary
        compressor = self._compressors.get((level, dictionary))
        if compressor is None:
            _check(policy)
            if dictionary and dictionary not in self._dictionaries:
                self._missing_dictionary += 1
                return body, Codec.NONE, 0, 0
            compressor = self._compressor(level, dictionary)
        wire = compressor.compress(body)
        if len(wire) >= len(body):
            self._raw_sent += 1
            return body, Codec.NONE, 0, 0
        self._compressed += 1
        return wire, Codec.ZSTD, dictionary, level

    def _compressor(self, level: int, dictionary: int) -> zstandard.ZstdCompressor:
        key = (level, dictionary)
        compressor = self._compressors.get(key)
        if compressor is None:
            # precompute_compress() was measured and left out: with or without it a
            # compressor digests its dictionary once, and per-message CPU is the same.
            data = self._dictionaries[dictionary] if dictionary else None
            compressor = zstandard.ZstdCompressor(
                level=level,
                dict_data=None if data is None else zstandard.ZstdCompressionDict(data),
                write_checksum=True,
                write_content_size=True,
                write_dict_id=True,
            )
            _bounded_put(self, self._compressors, key, compressor)
        return compressor

    # -- decoding ----------------------------------------------------------------

    async def decode(self, body: bytes | memoryview, envelope: Envelope, subject: str) -> bytes:
        """Return the body as it was before :meth:`encode`.

        Fetches (once) a dictionary it does not hold yet. Raises
        :class:`MalformedMessage` for anything it cannot decode exactly: an unknown
        codec, a dictionary that cannot be had (or is not asked for: too many fetches
        found nothing lately), a frame over the size or window limits, a corrupt,
        truncated or mismatched frame, trailing data.
        """
        if envelope.codec == Codec.NONE:
            return bytes(body)
        decoded = self.decode_cached(body, envelope, subject)
        if decoded is not None:
            return decoded
        dictionary = envelope.dictionary
        if not self._may_fetch():
            self._fetches_refused += 1
            raise self._malformed(
                subject,
                f"dictionary {dictionary} is unknown and was not fetched: too many unknown "
                "dictionaries were asked for lately",
            )
        try:
            await self._fetch(dictionary)
        except DictionaryNotFound as exc:
            self._missing_budget = max(0.0, self._missing_budget - 1)
            if len(self._missing) >= MAX_MISSING:
                self._evictions += len(self._missing)
                self._missing.clear()
            self._missing[dictionary] = time.monotonic() + RETRY_MISSING_AFTER
            raise self._malformed(
                subject, f"dictionary {dictionary} is unavailable: {exc.reason}"
            ) from None
        decoded = self.decode_cached(body, envelope, subject)
        if decoded is None:  # pushed out of the cache already: 32 others arrived meanwhile
            raise self._malformed(subject, f"dictionary {dictionary} could not be kept loaded")
        return decoded

    def _may_fetch(self) -> bool:
        """True unless fetches that found nothing used up the budget (refilled over time)."""
        now = time.monotonic()
        budget = self._missing_budget + (now - self._budget_time) * MISSING_PER_SECOND
        self._missing_budget = min(float(MISSING_BURST), budget)
        self._budget_time = now
        return self._missing_budget >= 1

    def decode_cached(
        self, body: bytes | memoryview, envelope: Envelope, subject: str
    ) -> bytes | None:
        """:meth:`decode` without I/O: ``None`` when a dictionary must be fetched first.

        The frame header is checked before that answer, so ``None`` means the frame
        is worth a fetch.
        """
        codec = envelope.codec
        if codec == Codec.NONE:
            return bytes(body)
        if codec != Codec.ZSTD:
            raise self._malformed(subject, f"unknown codec {int(codec)}")
        dictionary = envelope.dictionary
        decompressor = self._decompressors.get(dictionary)
        if decompressor is None and not 0 <= dictionary <= MAX_DICTIONARY_ID:
            raise self._malformed(subject, f"dictionary id {dictionary} is out of range")
        size = self._check_frame(body, dictionary, subject)
        if decompressor is None:
            if dictionary and dictionary not in self._dictionaries:
                if self.dictionaries is None:
                    raise self._malformed(
                        subject,
                        f"dictionary {dictionary} is unknown and no dictionary store is configured",
                    )
                retry_at = self._missing.get(dictionary)
                if retry_at is not None and time.monotonic() < retry_at:
                    raise self._malformed(
                        subject, f"dictionary {dictionary} is unavailable (recently missing)"
                    )
                return None
            decompressor = self._decompressor(dictionary)
        try:
            if not size:
                return self._decompress_empty(decompressor, body, subject)
            return decompressor.decompress(
                body, max_output_size=self.max_decompressed, allow_extra_data=False
            )
        except zstandard.ZstdError as exc:
            raise self._malformed(subject, f"corrupt zstd frame: {exc}") from None

    def _decompress_empty(
        self, decompressor: zstandard.ZstdDecompressor, body: bytes | memoryview, subject: str
    ) -> bytes:
        # decompress() answers b"" for a frame that declares no content without reading
        # the rest of it: a corrupt, truncated or trailed frame would pass. Streamed, the
        # whole frame is checked (never sent by a mesh client: an empty body goes raw).
        stream = decompressor.decompressobj()
        if stream.decompress(body) or not stream.eof or stream.unused_data:
            raise self._malformed(
                subject, "corrupt zstd frame: it declares no content but does not end there"
            )
        return b""

    def _decompressor(self, dictionary: int) -> zstandard.ZstdDecompressor:
        data = self._dictionaries[dictionary] if dictionary else None
        decompressor = zstandard.ZstdDecompressor(
            dict_data=None if data is None else zstandard.ZstdCompressionDict(data),
            max_window_size=self.max_window_size,
        )
        _bounded_put(self, self._decompressors, dictionary, decompressor)
        return decompressor

    def _check_frame(self, body: bytes | memoryview, dictionary: int, subject: str) -> int:
        """Refuse a frame by its header alone (size, window, dictionary, checksum); return
        the size it declares."""
        # Read before decompressing so that nothing is allocated for a frame that
        # declares a huge size: decompress() would allocate the declared size up front.
        try:
            frame = zstandard.get_frame_parameters(body)
        except zstandard.ZstdError as exc:
            raise self._malformed(subject, f"not a zstd frame: {exc}") from None
        size = frame.content_size
        if size in (_CONTENT_SIZE_UNKNOWN, _CONTENT_SIZE_ERROR):
            raise self._malformed(subject, "the zstd frame does not declare its content size")
        if size > self.max_decompressed:
            raise self._malformed(
                subject,
                f"the zstd frame declares {size} bytes, over the {self.max_decompressed}-byte "
                "limit",
            )
        if frame.window_size > self.max_window_size:
            raise self._malformed(
                subject,
                f"the zstd frame needs a {frame.window_size}-byte window, over the "
                f"{self.max_window_size}-byte limit",
            )
        if frame.dict_id != dictionary:
            raise self._malformed(
                subject,
                f"the zstd frame uses dictionary {frame.dict_id} but the envelope says "
                f"{dictionary}",
            )
        if not frame.has_checksum:
            raise self._malformed(subject, "the zstd frame carries no checksum")
        return int(size)

    def _malformed(self, subject: str, reason: str) -> MalformedMessage:
        self._decode_failures += 1
        return MalformedMessage(subject, reason)


def _check(policy: CodecPolicy) -> None:
    if not MIN_ZSTD_LEVEL <= policy.level <= MAX_ZSTD_LEVEL:
        raise InvalidPolicy(
            "codec",
            f"zstd level {policy.level} is outside {MIN_ZSTD_LEVEL}..{MAX_ZSTD_LEVEL}",
        )
    if not 0 <= policy.dictionary <= MAX_DICTIONARY_ID:
        raise InvalidPolicy("codec", f"dictionary id {policy.dictionary} is not a 32-bit id")
    if policy.min_size < 0:
        raise InvalidPolicy("codec", f"min_size {policy.min_size} is negative")


def _bounded_put(engine: CodecEngine, cache: dict[K, V], key: K, value: V) -> None:
    """Store ``value``, pushing out the oldest entry (counted) when ``cache`` is full."""
    if key not in cache and len(cache) >= CACHE_SIZE:
        del cache[next(iter(cache))]
        engine._evictions += 1
    cache[key] = value
