"""The wire format: a compact msgspec envelope in front of the user's raw payload.

A mesh frame is::

    0xC1  version(1)  header_length(u16, big-endian)  header(msgpack array)  body

``0xC1`` is a byte that neither msgpack nor UTF-8 ever produces, so a frame can
never be mistaken for a JSON or text payload sent by a plain NATS client; any
message not starting with it is handled as a bare payload. The header is the
:class:`Envelope` struct encoded as a msgpack array (fields by position; new
fields are only ever appended, with defaults). The body is the user's payload
bytes, untouched: a hop that only routes a message never decodes it.

When the subject's policy compresses (see :mod:`mesh._codec`), ``codec`` is
:attr:`Codec.ZSTD` and the body is one zstd frame that carries its content size,
a checksum and the id of the trained dictionary it needs (``dictionary``, 0 for
none; it must equal the frame's own dictionary id). ``level`` is informational:
the zstd level the sender used. Both fields were appended after the first
release, so frames from older senders (which lack them) decode with 0.

NATS headers are not used on the hot path: in nats-py one header costs about a
third of pub/sub throughput.

Everything here may come from a hostile sender. A frame is refused (as
:class:`MalformedMessage`, never another exception) when its header is over
:data:`MAX_HEADER_SIZE` bytes (checked before decoding), is not an envelope, holds
invalid UTF-8 or nests too deeply, or carries an ``id``, ``sender`` or ``trace`` longer
than any mesh client writes: the sender names telemetry tables, the id a reliable
handler's table of handled ids, and the trace travels on in the handler's own frames,
so none of them may grow to the header's size. The envelope does not refuse unknown
trailing fields: that is how a newer sender's appended fields reach an older reader.
"""

from __future__ import annotations

import enum
import struct
from typing import Annotated, Any, Final

import msgspec

from mesh._errors import MalformedMessage, PayloadError
from mesh._names import MAX_NAME_LENGTH

MAGIC: Final = 0xC1
VERSION: Final = 1
_PREFIX: Final = bytes((MAGIC, VERSION))
_HEADER_START: Final = 4
MAX_HEADER_SIZE: Final = 16 * 1024
#: Longest message id a frame may carry (ids a caller chooses, see
#: :func:`mesh._reliable.validate_msg_id`, are at most this long; generated ones are 22).
MAX_ID_LENGTH: Final = 128
#: Longest trace field a frame may carry (a version-00 ``traceparent`` is 55 characters;
#: later versions may append fields).
MAX_TRACE_LENGTH: Final = 256


class Kind(enum.IntEnum):
    """What a message is."""

    EVENT = 0
    REQUEST = 1
    REPLY = 2
    ERROR = 3


class ContentType(enum.IntEnum):
    """How the body is encoded."""

    BYTES = 0
    JSON = 1
    MSGPACK = 2


class Codec(enum.IntEnum):
    """How the body is compressed on the wire (set per subject by policy)."""

    NONE = 0
    ZSTD = 1


# Trace field values besides a W3C ``traceparent``.
TRACE_NONE: Final = ""  # no context: the receiver may start a trace
TRACE_UNSAMPLED: Final = "0"  # upstream decided not to sample: no spans downstream


class Envelope(msgspec.Struct, array_like=True, frozen=True, kw_only=True, gc=False):
    """Mesh metadata carried in front of every payload.

    ``created`` and ``deadline`` are Unix times in nanoseconds (``deadline`` 0
    means none). ``trace`` is a W3C ``traceparent``, ``"0"`` for a chain that was
    not sampled, or empty.

    ``gc=False``: its fields are strings and integers, so an envelope can never be
    part of a reference cycle; untracked, it does not make the collector run more
    often on a busy receive path.

    The length bounds on ``id``, ``sender`` (an agent name) and ``trace`` are checked
    when a frame is decoded (by msgspec, in C: they cost nothing measurable), not when
    an envelope is built.
    """

    id: Annotated[str, msgspec.Meta(max_length=MAX_ID_LENGTH)]
    sender: Annotated[str, msgspec.Meta(max_length=MAX_NAME_LENGTH)]
    kind: Kind = Kind.EVENT
    created: int = 0
    deadline: int = 0
    priority: int = 0
    trace: Annotated[str, msgspec.Meta(max_length=MAX_TRACE_LENGTH)] = TRACE_NONE
    codec: Codec = Codec.NONE
    content_type: ContentType = ContentType.JSON
    # Appended fields (older frames end before them): see the module docstring.
    dictionary: int = 0
    level: int = 0


class RemoteFailure(msgspec.Struct, frozen=True, kw_only=True):
    """The body of an error reply: what a handler raised."""

    type: str
    message: str
    node: str = ""


class ErrorReply(msgspec.Struct, frozen=True, kw_only=True):
    """An error reply as a plain NATS client sees it: ``{"error": {...}}``."""

    error: RemoteFailure


#: Largest error reply body read (a failure's message is cut to 4096 characters).
MAX_FAILURE_SIZE: Final = 64 * 1024
_failure_decoder: Final = msgspec.json.Decoder(RemoteFailure)


def decode_failure(body: bytes | memoryview, subject: str = "") -> RemoteFailure:
    """Decode the body of an ERROR frame.

    Raises :class:`MalformedMessage` for anything that is not a :class:`RemoteFailure`
    of at most :data:`MAX_FAILURE_SIZE` bytes, whatever the bytes (unknown fields are
    skipped: a newer node may add some).
    """
    if len(body) > MAX_FAILURE_SIZE:
        raise MalformedMessage(
            subject, f"error reply of {len(body)} bytes is over the {MAX_FAILURE_SIZE}-byte limit"
        )
    try:
        return _failure_decoder.decode(body)
    except (ValueError, RecursionError) as exc:
        # msgspec.DecodeError and UnicodeDecodeError are ValueErrors.
        raise MalformedMessage(subject, f"unreadable error reply: {exc}") from None


_encode_header = msgspec.msgpack.Encoder().encode
_header_decoder: Final = msgspec.msgpack.Decoder(Envelope)
_unpack_prefix = struct.Struct(">BBH").unpack_from


def encode_frame(envelope: Envelope, body: bytes) -> bytes:
    """Return the frame for ``envelope`` and ``body`` (one copy of the body).

    Raises :class:`PayloadError` if the encoded envelope is over :data:`MAX_HEADER_SIZE`.
    """
    header = _encode_header(envelope)
    if len(header) > MAX_HEADER_SIZE:
        # The length field is 16 bits; a header this large is a bug upstream (a runaway
        # trace or id), and receivers refuse it too.
        raise PayloadError(
            f"message envelope header is {len(header)} bytes, over the {MAX_HEADER_SIZE}-byte "
            "limit: the id, sender or trace field is far too long"
        )
    return b"".join((_PREFIX, len(header).to_bytes(2, "big"), header, body))


def is_frame(data: bytes) -> bool:
    """True if ``data`` starts like a mesh frame (otherwise it is a bare payload)."""
    return len(data) > 0 and data[0] == MAGIC


def decode_frame(data: bytes, subject: str = "") -> tuple[Envelope, memoryview]:
    """Split a frame into its envelope and a view of its body.

    Raises :class:`MalformedMessage` for any frame that does not decode: wrong
    version, truncated header, a header that is not a valid envelope.
    """
    try:
        magic, version, header_length = _unpack_prefix(data)
    except struct.error:
        raise MalformedMessage(subject, "not a mesh frame") from None
    if magic != MAGIC:
        raise MalformedMessage(subject, "not a mesh frame")
    if version != VERSION:
        raise MalformedMessage(subject, f"unsupported frame version {version}")
    if header_length > MAX_HEADER_SIZE:
        raise MalformedMessage(subject, f"header of {header_length} bytes is over the limit")
    end = _HEADER_START + header_length
    if end > len(data):
        raise MalformedMessage(subject, "truncated header")
    try:
        # The header is small: copying it is cheaper than a memoryview slice.
        envelope = _header_decoder.decode(data[_HEADER_START:end])
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        # UnicodeDecodeError is a ValueError; a deeply nested header a RecursionError.
        raise MalformedMessage(subject, f"bad envelope: {exc}") from None
    return envelope, memoryview(data)[end:]


# ---------------------------------------------------------------- payloads

_json_encode = msgspec.json.Encoder().encode
_msgpack_encode = msgspec.msgpack.Encoder().encode
_json_decoders: dict[Any, msgspec.json.Decoder[Any]] = {}
_msgpack_decoders: dict[Any, msgspec.msgpack.Decoder[Any]] = {}
_MAX_CACHED_DECODERS: Final = 256


def encode_payload(
    value: Any, content_type: ContentType | None = None
) -> tuple[bytes, ContentType]:
    """Encode a user value: bytes stay bytes, anything else becomes JSON (or msgpack)."""
    if isinstance(value, bytes | bytearray | memoryview) and content_type in (
        None,
        ContentType.BYTES,
    ):
        return bytes(value), ContentType.BYTES
    try:
        if content_type is ContentType.MSGPACK:
            return _msgpack_encode(value), ContentType.MSGPACK
        return _json_encode(value), ContentType.JSON
    except (TypeError, ValueError, OverflowError) as exc:
        raise TypeError(
            f"cannot encode a {type(value).__name__} as a message payload: {exc}. "
            "Use a msgspec Struct, a dict/list of JSON values, or bytes"
        ) from None


def decode_payload(
    body: bytes | memoryview, content_type: ContentType, type_: Any = Any, subject: str = ""
) -> Any:
    """Decode a body into ``type_`` (``bytes`` gives the raw body).

    Raises :class:`MalformedMessage` when the body does not fit ``type_``: invalid
    JSON or msgpack, invalid UTF-8, nesting too deep, the wrong shape. Its size is
    bounded before it gets here: by the server's ``max_payload`` as received, by the
    codec's ``max_decompressed`` once decompressed.
    """
    if type_ is bytes:
        return bytes(body)
    if content_type is ContentType.BYTES and type_ is Any:
        return bytes(body)
    try:
        if content_type is ContentType.MSGPACK:
            return _decoder(_msgpack_decoders, msgspec.msgpack.Decoder, type_).decode(body)
        return _decoder(_json_decoders, msgspec.json.Decoder, type_).decode(body)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise MalformedMessage(
            subject, f"payload does not decode as {_type_name(type_)}: {exc}"
        ) from None


def _decoder(cache: dict[Any, Any], factory: Any, type_: Any) -> Any:
    decoder = cache.get(type_)
    if decoder is None:
        if len(cache) >= _MAX_CACHED_DECODERS:
            cache.clear()
        decoder = cache[type_] = factory(type_)
    return decoder


def _type_name(type_: Any) -> str:
    return "JSON" if type_ is Any else getattr(type_, "__name__", repr(type_))
