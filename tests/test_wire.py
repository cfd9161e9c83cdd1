"""The wire format: frames and payloads (pure, no server)."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh._errors import MalformedMessage, PayloadError
from mesh._names import MAX_NAME_LENGTH
from mesh._wire import (
    MAGIC,
    MAX_FAILURE_SIZE,
    MAX_HEADER_SIZE,
    MAX_ID_LENGTH,
    MAX_TRACE_LENGTH,
    VERSION,
    Codec,
    ContentType,
    Envelope,
    Kind,
    RemoteFailure,
    decode_failure,
    decode_frame,
    decode_payload,
    encode_frame,
    encode_payload,
    is_frame,
)

_INT64 = st.integers(min_value=-(2**63), max_value=2**63 - 1)
_UINT64 = st.integers(min_value=0, max_value=2**64 - 1)

envelopes = st.builds(
    Envelope,
    id=st.text(max_size=40),
    sender=st.text(max_size=64),
    kind=st.sampled_from(Kind),
    created=_UINT64,
    deadline=_UINT64,
    priority=_INT64,
    trace=st.text(max_size=80),
    codec=st.sampled_from(Codec),
    content_type=st.sampled_from(ContentType),
)


class Task(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    n: int = 0


class Other(msgspec.Struct, frozen=True, kw_only=True):
    url: str
    size: int


# ------------------------------------------------------------------ frames


@given(envelopes, st.binary(max_size=2048))
def test_frame_round_trip(envelope: Envelope, body: bytes) -> None:
    frame = encode_frame(envelope, body)
    assert is_frame(frame)
    assert frame[0] == MAGIC
    assert frame[1] == VERSION
    decoded, view = decode_frame(frame, "s")
    assert decoded == envelope
    assert isinstance(view, memoryview)
    assert bytes(view) == body


def test_frame_round_trip_defaults_and_every_field() -> None:
    minimal = Envelope(id="i", sender="s")
    assert decode_frame(encode_frame(minimal, b""))[0] == minimal
    full = Envelope(
        id="ABCDEFGHIJKLMNOPQRSTUV",
        sender="research-agent",
        kind=Kind.ERROR,
        created=1_700_000_000_000_000_000,
        deadline=1_700_000_005_000_000_000,
        priority=3,
        trace="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        codec=Codec.NONE,
        content_type=ContentType.MSGPACK,
    )
    decoded, body = decode_frame(encode_frame(full, b"\xc1\x00payload"))
    assert decoded == full
    for field in Envelope.__struct_fields__:
        assert getattr(decoded, field) == getattr(full, field)
    assert bytes(body) == b"\xc1\x00payload"


def test_frame_is_never_json_or_text() -> None:
    assert not is_frame(b'{"a": 1}')
    assert not is_frame("héllo".encode())
    assert not is_frame(msgspec.msgpack.encode({"a": 1}))
    assert not is_frame(b"")


def test_decode_accepts_memoryview_and_bytearray() -> None:
    env = Envelope(id="x", sender="y")
    frame = encode_frame(env, b"body")
    for data in (memoryview(frame), bytearray(frame)):
        decoded, body = decode_frame(data)  # type: ignore[arg-type]
        assert decoded == env
        assert bytes(body) == b"body"


def test_wrong_magic() -> None:
    frame = encode_frame(Envelope(id="x", sender="y"), b"b")
    with pytest.raises(MalformedMessage) as info:
        decode_frame(b"{" + frame[1:], "tasks.x")
    assert info.value.subject == "tasks.x"
    assert "not a mesh frame" in info.value.reason


@pytest.mark.parametrize("version", [0, 2, 255])
def test_wrong_version(version: int) -> None:
    frame = bytearray(encode_frame(Envelope(id="x", sender="y"), b"b"))
    frame[1] = version
    with pytest.raises(MalformedMessage) as info:
        decode_frame(bytes(frame))
    assert f"version {version}" in info.value.reason


@pytest.mark.parametrize("data", [b"\xc1", b"\xc1\x01", b"\xc1\x01\x00"])
def test_too_short_for_a_header(data: bytes) -> None:
    with pytest.raises(MalformedMessage):
        decode_frame(data)


def test_truncated_header() -> None:
    frame = encode_frame(Envelope(id="x" * 30, sender="agent"), b"")
    for cut in range(4, len(frame)):
        with pytest.raises(MalformedMessage):
            decode_frame(frame[:cut])


def test_header_length_past_the_end() -> None:
    with pytest.raises(MalformedMessage) as info:
        decode_frame(bytes((MAGIC, VERSION)) + (500).to_bytes(2, "big") + b"\x90")
    assert "truncated" in info.value.reason


@pytest.mark.parametrize(
    "header",
    [
        msgspec.msgpack.encode({"id": "x", "sender": "y"}),  # a map, not an array
        msgspec.msgpack.encode([1, 2]),  # id is not a string
        msgspec.msgpack.encode(["x"]),  # sender missing
        msgspec.msgpack.encode(["x", "y", 99]),  # no such Kind
        msgspec.msgpack.encode("just a string"),
        b"",
        b"\xc1",  # never valid msgpack
        b"\x92\xa1x",  # truncated array
        b"\x92\xa1x\xa1\xff",  # invalid UTF-8 in a string
        b"\x91" * 2000 + b"\xc0",  # deeply nested
    ],
)
def test_header_that_is_not_an_envelope(header: bytes) -> None:
    frame = bytes((MAGIC, VERSION)) + len(header).to_bytes(2, "big") + header + b"body"
    with pytest.raises(MalformedMessage) as info:
        decode_frame(frame, "s")
    assert isinstance(info.value, PayloadError)


@given(st.binary(max_size=200))
def test_garbage_after_magic_only_raises_malformed(garbage: bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        decode_frame(bytes((MAGIC,)) + garbage)


@given(st.binary(max_size=200))
def test_garbage_after_a_valid_prefix_only_raises_malformed(garbage: bytes) -> None:
    header_len = len(garbage).to_bytes(2, "big")
    for data in (
        bytes((MAGIC, VERSION)) + garbage,
        bytes((MAGIC, VERSION)) + header_len + garbage,
    ):
        with contextlib.suppress(MalformedMessage):
            decode_frame(data)


@pytest.mark.parametrize("size", [MAX_HEADER_SIZE + 100, 70_000])
def test_oversized_header_is_refused_on_encode(size: int) -> None:
    env = Envelope(id="x", sender="y", trace="t" * size)
    with pytest.raises(PayloadError, match="header"):
        encode_frame(env, b"")


def test_oversized_header_is_refused_on_decode() -> None:
    header = msgspec.msgpack.encode(Envelope(id="x", sender="y", trace="t" * MAX_HEADER_SIZE))
    frame = bytes((MAGIC, VERSION)) + len(header).to_bytes(2, "big") + header
    with pytest.raises(MalformedMessage, match="over the limit"):
        decode_frame(frame)


# ------------------------------------------------------------------ payloads


def test_struct_payload_round_trip() -> None:
    body, ctype = encode_payload(Task(text="hi", n=2))
    assert ctype is ContentType.JSON
    assert msgspec.json.decode(body) == {"text": "hi", "n": 2}
    assert decode_payload(body, ctype, Task) == Task(text="hi", n=2)
    assert decode_payload(memoryview(body), ctype, Task) == Task(text="hi", n=2)
    assert decode_payload(body, ctype) == {"text": "hi", "n": 2}
    assert decode_payload(body, ctype, dict) == {"text": "hi", "n": 2}


@pytest.mark.parametrize(
    "value",
    [{"a": 1, "b": [1, 2.5, None, True], "c": {"d": "é"}}, [1, "two", {"three": 3}], "s", 3, None],
)
def test_json_values_round_trip(value: Any) -> None:
    body, ctype = encode_payload(value)
    assert ctype is ContentType.JSON
    assert decode_payload(body, ctype) == value


@pytest.mark.parametrize("value", [{"a": 1}, [1, 2], Task(text="x")])
def test_msgpack_round_trip(value: Any) -> None:
    body, ctype = encode_payload(value, ContentType.MSGPACK)
    assert ctype is ContentType.MSGPACK
    assert decode_payload(body, ctype, type(value)) == value


@given(st.binary(max_size=1024))
def test_bytes_payload_round_trip(data: bytes) -> None:
    for value in (data, bytearray(data), memoryview(data)):
        body, ctype = encode_payload(value)
        assert ctype is ContentType.BYTES
        assert body == data
        assert decode_payload(body, ctype) == data
        assert decode_payload(body, ctype, bytes) == data
    # Any content type read as bytes gives the raw body.
    assert decode_payload(data, ContentType.JSON, bytes) == data


def test_decode_into_the_wrong_struct() -> None:
    body, ctype = encode_payload(Task(text="hi"))
    with pytest.raises(MalformedMessage) as info:
        decode_payload(body, ctype, Other, "tasks.fetch")
    assert info.value.subject == "tasks.fetch"
    assert "Other" in info.value.reason
    with pytest.raises(MalformedMessage):
        decode_payload(b"not json", ContentType.JSON, Task)
    with pytest.raises(MalformedMessage):
        decode_payload(b"\xff\xfe", ContentType.JSON)
    with pytest.raises(MalformedMessage):
        decode_payload(b"\xc1", ContentType.MSGPACK, Task)
    with pytest.raises(MalformedMessage):
        decode_payload(b"[1, 2]", ContentType.JSON, dict)


@given(st.binary(max_size=200), st.sampled_from([Any, dict, list, Task]))
def test_decode_payload_only_raises_malformed(data: bytes, type_: Any) -> None:
    for ctype in (ContentType.JSON, ContentType.MSGPACK):
        with contextlib.suppress(MalformedMessage):
            decode_payload(data, ctype, type_)


@pytest.mark.parametrize("value", [object(), {"a": object()}, [1, {2, 3j}], {(1, 2): 3}])
def test_unencodable_payload_is_a_helpful_type_error(value: Any) -> None:
    with pytest.raises(TypeError) as info:
        encode_payload(value)
    message = str(info.value)
    assert "cannot encode" in message
    assert type(value).__name__ in message
    assert "Struct" in message
    assert "bytes" in message


def test_unencodable_msgpack_payload_is_a_type_error() -> None:
    for value in (object(), 2**70):
        with pytest.raises(TypeError, match="cannot encode"):
            encode_payload(value, ContentType.MSGPACK)


# ------------------------------------------------------------------ hostile headers

_MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=5), inner),
    max_leaves=20,
)


@given(_MSGPACK_VALUES)
def test_any_msgpack_header_is_an_envelope_or_malformed(value: Any) -> None:
    header = msgspec.msgpack.encode(value)
    frame = bytes((MAGIC, VERSION)) + len(header).to_bytes(2, "big") + header + b"body"
    try:
        envelope, body = decode_frame(frame, "s")
    except MalformedMessage:
        return
    assert isinstance(envelope, Envelope)
    assert bytes(body) == b"body"


def test_frame_from_a_newer_sender_with_appended_fields_decodes() -> None:
    # Unknown trailing fields are skipped, not refused: how an older reader takes the
    # frames of a newer sender (the envelope is array-like and append-only).
    fields = ["id-1", "agent", int(Kind.REQUEST), 5, 6, 1, "", 0, 1, 0, 0]
    header = msgspec.msgpack.encode([*fields, "a field from the future", {"x": [1, 2]}])
    frame = bytes((MAGIC, VERSION)) + len(header).to_bytes(2, "big") + header + b"{}"
    envelope, body = decode_frame(frame, "s")
    assert (envelope.id, envelope.sender, envelope.kind) == ("id-1", "agent", Kind.REQUEST)
    assert bytes(body) == b"{}"


def test_deeply_nested_appended_field_is_malformed() -> None:
    fields = msgspec.msgpack.encode(["i", "s", 0, 0, 0, 0, "", 0, 1, 0, 0])
    header = bytes((0x9C,)) + fields[1:] + b"\x91" * 10_000 + b"\xc0"  # 12 fields, last deep
    frame = bytes((MAGIC, VERSION)) + len(header).to_bytes(2, "big") + header
    with pytest.raises(MalformedMessage, match="recursion"):
        decode_frame(frame, "s")


@pytest.mark.parametrize(
    ("field", "limit"),
    [("id", MAX_ID_LENGTH), ("sender", MAX_NAME_LENGTH), ("trace", MAX_TRACE_LENGTH)],
)
def test_overlong_id_sender_or_trace_is_malformed(field: str, limit: int) -> None:
    at_limit = Envelope(**{"id": "i", "sender": "s", field: "x" * limit})
    assert decode_frame(encode_frame(at_limit, b""))[0] == at_limit
    over = Envelope(**{"id": "i", "sender": "s", field: "x" * (limit + 1)})
    with pytest.raises(MalformedMessage, match=f"length <= {limit}"):
        decode_frame(encode_frame(over, b""), "s")


@pytest.mark.parametrize(
    "header",
    [
        b"\x92\xa1\xff\xa1s",  # invalid UTF-8 in the id
        b"\x92\xa1i\xa2\xc3\x28",  # invalid UTF-8 in the sender
        b"\x97\xa1i\xa1s\x00\x00\x00\x00\xa1\xed",  # invalid UTF-8 in the trace
    ],
)
def test_invalid_utf8_in_any_string_field_is_malformed(header: bytes) -> None:
    frame = bytes((MAGIC, VERSION)) + len(header).to_bytes(2, "big") + header
    with pytest.raises(MalformedMessage, match=r"(?i)utf-8"):
        decode_frame(frame, "s")


# ------------------------------------------------------------------ error replies


def test_decode_failure_round_trip_and_unknown_fields() -> None:
    failure = RemoteFailure(type="ValueError", message="bad", node="n")
    assert decode_failure(msgspec.json.encode(failure)) == failure
    newer = b'{"type": "E", "message": "m", "node": "n", "code": 7, "detail": {"a": [1]}}'
    assert decode_failure(newer) == RemoteFailure(type="E", message="m", node="n")


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"not json",
        b'{"type": "E"}',  # message missing
        b'{"type": 1, "message": "m"}',
        b'{"type": "E", "message": "\xff"}',  # invalid UTF-8
        b'{"type": "E", "message": "m", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",  # deep
        b'{"type": "E", "message": "' + b"x" * MAX_FAILURE_SIZE + b'"}',  # over the cap
    ],
)
def test_unreadable_error_reply_is_malformed(body: bytes) -> None:
    with pytest.raises(MalformedMessage) as info:
        decode_failure(body, "tasks.x")
    assert info.value.subject == "tasks.x"


@given(st.binary(max_size=300))
def test_decode_failure_only_raises_malformed(data: bytes) -> None:
    with contextlib.suppress(MalformedMessage):
        assert isinstance(decode_failure(data), RemoteFailure)


@pytest.mark.parametrize(
    ("body", "ctype"),
    [
        (b"[" * 10_000 + b"]" * 10_000, ContentType.JSON),
        (b'{"a": ' * 10_000 + b"1" + b"}" * 10_000, ContentType.JSON),
        (b"\x91" * 10_000 + b"\xc0", ContentType.MSGPACK),
        (b'"\xff\xfe"', ContentType.JSON),
        (b"\xa2\xff\xfe", ContentType.MSGPACK),
        (b"1" * 5000, ContentType.JSON),  # an integer out of range
    ],
)
def test_payload_nesting_utf8_and_range_failures_are_malformed(
    body: bytes, ctype: ContentType
) -> None:
    for type_ in (Any, list, dict, Task):
        with pytest.raises(MalformedMessage):
            decode_payload(body, ctype, type_, "s")
