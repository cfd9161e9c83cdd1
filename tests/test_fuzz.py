"""Hostile input at a running node: at least 100,000 malformed frames, envelopes and
payloads over a real nats-server, and malformed names thrown at the API.

One hypothesis example carries a batch of :data:`BATCH` inputs: hypothesis draws a
seed, how the batch mixes the kinds of input, and some inputs of its own (raw bytes,
msgpack headers, names); the rest of the batch is expanded from the seed by a fast
generator. ``MESH_FUZZ_INPUTS`` (default 100,000) sets how many inputs are thrown;
run with ``-s`` to see the counts.

The fate of every input is predicted before it is sent, from the pure decoders the
node uses (:func:`decode_frame`, the codec, :func:`decode_payload`): refused as a
frame, refused as a payload, refused for a deadline already past, or handled. Inputs
built to break one rule are also checked to be predicted as refused. Then the node
must have counted exactly what was predicted, each refusal once: frames in the
client's ``malformed`` count and in telemetry's ``decode_failures``, payloads and
deadlines as handler errors (and telemetry ``errors``), and every request answered
once, with an error for each refused one. Meanwhile the node keeps answering, nothing
escapes a callback (nothing is logged: nats-py logs what a callback raises through
the client), it drains and exits cleanly when told to, and its memory stays bounded.

The node runs in a process of its own (this file run as a script), so its resident
memory is its own: hypothesis keeps a record of every example it ran, and that grows
with the run.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
import zstandard
from _util import arun, eventually
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.msg import Msg

from mesh import InvalidName, MeshClient, NoResponders, RequestTimeout
from mesh._codec import DEFAULT_MAX_DECOMPRESSED, CodecEngine
from mesh._errors import MalformedMessage
from mesh._message import Message
from mesh._names import (
    validate_agent_name,
    validate_instance,
    validate_queue_group,
    validate_subject,
)
from mesh._wire import (
    MAGIC,
    MAX_HEADER_SIZE,
    VERSION,
    Codec,
    ContentType,
    Envelope,
    Kind,
    decode_frame,
    decode_payload,
    encode_frame,
)
from nodes import Context, Node, NodeRuntime
from nodes._micro import PENDING_BYTES as MICRO_PENDING_BYTES
from nodes._micro import PENDING_MSGS as MICRO_PENDING_MSGS
from nodes._micro import MicroResponder
from nodes._registry import MAX_INFO_BYTES, NodeInfo, Registration, decode_info
from topology._snapshot import TELEMETRY_SUBJECT, decode_snapshot

T = TypeVar("T")

INPUTS = int(os.environ.get("MESH_FUZZ_INPUTS", "100000"))
BATCH = 1000
#: Resident memory the node process may gain between the first batch and the last.
RSS_BOUND = 16 * 1024 * 1024
REPLIES = "_INBOX.fuzz.replies"
NODE = "fuzzed"
STATS = "fz.stats"
_PAGE = os.sysconf("SC_PAGE_SIZE")


class Task(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    n: int = 0


class Item(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    qty: int


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    items: int


#: The node's subjects and the payload type each handler is annotated with.
HANDLERS: dict[str, Any] = {
    "fz.task": Task,
    "fz.items": list[Item],
    "fz.raw": bytes,
    "fz.events.e1": Task,
}
TYPED = ("fz.task", "fz.items", "fz.events.e1")


def make_node() -> Node:
    node = Node(NODE, max_concurrency=64)

    @node.handles("fz.task")
    async def task(task: Task) -> Summary:
        return Summary(text=task.text[:20], items=task.n)

    @node.handles("fz.items")
    async def items(items: list[Item]) -> Summary:
        return Summary(text=",".join(i.name for i in items)[:20], items=len(items))

    @node.handles("fz.raw")
    async def raw(data: bytes) -> int:
        return len(data)

    @node.handles("fz.events.>")
    async def event(task: Task) -> None:
        return None

    @node.handles(STATS)
    async def stats(message: dict[str, Any], ctx: Context) -> dict[str, int]:
        """The node's own counts, for the test to compare with what it threw."""
        fuzzed = [h.stats for h in node.handlers if h.subject != STATS]
        return {
            "malformed": ctx.client.stats().malformed,
            "requests": sum(s.requests for s in fuzzed),
            "errors": sum(s.errors for s in fuzzed),
            "timeouts": sum(s.timeouts for s in fuzzed),
        }

    return node


def serve(url: str) -> None:
    """The fuzzed node's process: serve until SIGTERM, then drain and exit."""

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        async with await MeshClient.connect(url, name=NODE) as client:
            # No dictionary store: an unknown dictionary is refused without a fetch. With
            # one, the receive callback awaits the fetch holding the interval's telemetry
            # counters, and a snapshot taken meanwhile loses that count (mesh/_client.py,
            # on_msg); the bounded fetch itself is tested in test_codec.py.
            client.codec = CodecEngine()
            async with NodeRuntime(make_node(), client, register=False, telemetry_interval=0.5):
                await stop.wait()

    asyncio.run(main())


# ---------------------------------------------------------------- building inputs

# Outcomes of one input at the node.
FRAME, PAYLOAD, DEADLINE, OK = "frame", "payload", "deadline", "ok"
REFUSED = (FRAME, PAYLOAD, DEADLINE)


@dataclass(frozen=True)
class Input:
    kind: str
    subject: str
    data: bytes
    request: bool
    #: What the input was built to be (None: whatever the decoders make of it).
    built: str | None


_COMPRESS = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=True)
_NO_CHECKSUM = zstandard.ZstdCompressor(level=1, write_checksum=False, write_content_size=True)
_NO_SIZE = zstandard.ZstdCompressor(level=1, write_checksum=True, write_content_size=False)
_SAMPLES = [
    msgspec.json.encode({"text": f"sample {i} " + "word " * (i % 40), "n": i, "tags": ["a"] * i})
    for i in range(200)
]
_DICTIONARY = zstandard.train_dictionary(2048, _SAMPLES, dict_id=3_000_000)
_WITH_DICTIONARY = zstandard.ZstdCompressor(
    level=1, dict_data=_DICTIONARY, write_checksum=True, write_content_size=True
)


def _with_dictionary_id(frame: bytes, dictionary: int) -> bytes:
    """A zstd frame with a 4-byte dictionary id field, claiming ``dictionary`` instead."""
    at = 5 if frame[4] & 0x20 else 6  # after the window byte unless single-segment
    return frame[:at] + dictionary.to_bytes(4, "little") + frame[at + 4 :]


def _raw_frame(header: bytes, body: bytes = b"", *, version: int = VERSION) -> bytes:
    return bytes((MAGIC, version)) + len(header).to_bytes(2, "big") + header + body


class Generator:
    """Builds a batch of inputs of many kinds from one seed (fast: no hypothesis inside)."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.ids = 0

    def envelope(self, **changes: Any) -> Envelope:
        rng = self.rng
        self.ids += 1
        fields: dict[str, Any] = dict(
            id=f"fz{self.ids:08x}",
            # Some senders repeat, many do not: the telemetry sender table overflows too.
            sender=rng.choice(("fuzzer", "fuzzer-b"))
            if rng.random() < 0.7
            else "s" + rng.randbytes(rng.randrange(1, 31)).hex(),
            kind=rng.choice(list(Kind)),
            created=rng.randrange(2**63),
            priority=rng.randrange(-5, 5),
            content_type=ContentType.JSON,
        )
        fields.update(changes)
        return Envelope(**fields)

    def good_payload(self, subject: str) -> bytes:
        rng = self.rng
        if subject == "fz.items":
            return msgspec.json.encode([Item(name=f"i{k}", qty=k) for k in range(rng.randrange(4))])
        if subject == "fz.raw":
            return rng.randbytes(rng.randrange(200))
        return msgspec.json.encode(Task(text="word " * rng.randrange(60), n=rng.randrange(99)))

    def bad_payload(self, subject: str) -> bytes:
        """A body that can never decode into ``subject``'s handler type."""
        rng = self.rng
        depth = rng.randrange(1000, 5000)
        if subject == "fz.items":
            choices = [
                b"{}",
                b'[{"name": 1, "qty": 2}]',
                b'[{"name": "x"}]',
                b'[{"name": "\xff", "qty": 1}]',
                b"[" * depth + b"]" * depth,
                b"[1, 2",
                b'"a string"',
            ]
        else:
            choices = [
                b'{"text": 5}',
                b'{"n": 1}',
                b"[1, 2]",
                b'{"text": "\xff\xfe"}',
                b'{"text": "x", "n": ' + b"9" * 5000 + b"}",  # out of range
                b'{"text": ' + b"[" * depth + b"]" * depth + b"}",
                b"not json",
                b"",
                b'{"text": "x", "n": 1.5}',
            ]
        return rng.choice(choices)

    def build(self, kind: str, subject: str) -> tuple[bytes, str | None]:
        """One input of ``kind`` for ``subject``: its bytes and the outcome it was built for."""
        rng = self.rng
        env = self.envelope
        if kind == "random-bytes":
            data = rng.randbytes(rng.randrange(300))
            return (bytes((MAGIC,)) + data if rng.random() < 0.5 else data), None
        if kind == "magic-garbage":
            header = rng.randbytes(rng.randrange(40))
            return _raw_frame(header, rng.randbytes(rng.randrange(40))), None
        if kind == "bad-version":
            version = rng.choice([v for v in range(256) if v != VERSION])
            return bytes((MAGIC, version)) + rng.randbytes(rng.randrange(60)), FRAME
        if kind == "truncated-header":
            frame = encode_frame(env(trace="t" * rng.randrange(60)), b"{}")
            header_end = 4 + int.from_bytes(frame[2:4], "big")
            return frame[: rng.randrange(1, header_end)], FRAME
        if kind == "huge-header-length":
            length = rng.choice(
                [rng.randrange(MAX_HEADER_SIZE + 1, 2**16), rng.randrange(100, 4000)]
            )
            return bytes((MAGIC, VERSION)) + length.to_bytes(2, "big") + rng.randbytes(50), FRAME
        if kind == "wrong-types":
            bad: Any = rng.choice([1, None, 2.5, [1], {"a": 1}, b"bytes", True])
            header = rng.choice(
                [
                    [bad, "sender"],
                    ["id", bad],
                    ["id", "s", 99],
                    ["id", "s", 0, "not an int"],
                    ["id", "s", 0, 0, 0, 0, "", 7],  # no such codec
                    ["id", "s", 0, 0, 0, 0, "", 0, 9],  # no such content type
                    {"id": "x", "sender": "y"},
                    "just a string",
                    [],
                    ["id"],
                ]
            )
            return _raw_frame(msgspec.msgpack.encode(header), b"{}"), FRAME
        if kind == "deep-nesting":
            # Past any recursion limit in play (pytest raises it to 3000) and under the header cap.
            depth = rng.randrange(6000, 16000)
            if rng.random() < 0.5:
                header = b"\x91" * depth + b"\xc0"
            else:  # a valid envelope with a deep field appended, as a newer sender might
                fields = msgspec.msgpack.encode(["i", "s", 0, 0, 0, 0, "", 0, 1, 0, 0])
                header = bytes((0x9C,)) + fields[1:] + b"\x91" * depth + b"\xc0"
            return _raw_frame(header, b"{}"), FRAME
        if kind == "invalid-utf8":
            marker = "UTF8MARKER"
            field_name = rng.choice(["id", "sender", "trace"])
            header = msgspec.msgpack.encode(env(**{field_name: marker}))
            garbage = b"\xff" + rng.randbytes(len(marker) - 1)
            return _raw_frame(header.replace(marker.encode(), garbage), b"{}"), FRAME
        if kind == "overlong-field":
            field_name, limit = rng.choice([("id", 128), ("sender", 64), ("trace", 256)])
            value = "x" * rng.randrange(limit + 1, 6000)
            return encode_frame(env(**{field_name: value}), b"{}"), FRAME
        if kind == "zstd-garbage":
            body = rng.randbytes(rng.randrange(80))
            if rng.random() < 0.5:
                body = b"\x28\xb5\x2f\xfd" + body
            return encode_frame(env(codec=Codec.ZSTD), body), FRAME
        if kind == "zstd-truncated":
            wire = _COMPRESS.compress(self.good_payload(subject) + b" " * 100)
            return encode_frame(env(codec=Codec.ZSTD), wire[: rng.randrange(len(wire))]), FRAME
        if kind == "zstd-oversized":
            size = rng.randrange(DEFAULT_MAX_DECOMPRESSED + 1, 2**32)
            descriptor = (2 << 6) | (1 << 2)  # 4-byte content size, checksum
            header = b"\x28\xb5\x2f\xfd" + bytes((descriptor, (20 - 10) << 3))
            block = (1 | (5 << 3)).to_bytes(3, "little") + b"hello"
            body = header + size.to_bytes(4, "little") + block + b"\0" * 4
            return encode_frame(env(codec=Codec.ZSTD), body), FRAME
        if kind == "zstd-unknown-dictionary":
            invented = rng.randrange(1, 2**32)
            wire = _with_dictionary_id(
                _WITH_DICTIONARY.compress(self.good_payload(subject)), invented
            )
            return encode_frame(env(codec=Codec.ZSTD, dictionary=invented), wire), FRAME
        if kind == "zstd-dictionary-mismatch":
            wire = _COMPRESS.compress(self.good_payload(subject))
            claimed = rng.randrange(1, 2**32)
            return encode_frame(env(codec=Codec.ZSTD, dictionary=claimed), wire), FRAME
        if kind == "zstd-trailing":
            wire = _COMPRESS.compress(self.good_payload(subject))
            tail = rng.choice([b"\0", rng.randbytes(rng.randrange(1, 30)), wire])
            return encode_frame(env(codec=Codec.ZSTD), wire + tail), FRAME
        if kind == "zstd-no-checksum-or-size":
            compressor = rng.choice([_NO_CHECKSUM, _NO_SIZE])
            wire = compressor.compress(self.good_payload(subject))
            return encode_frame(env(codec=Codec.ZSTD), wire), FRAME
        if kind == "payload-mismatch":
            return encode_frame(env(), self.bad_payload(subject)), PAYLOAD
        if kind == "compressed-payload-mismatch":
            wire = _COMPRESS.compress(self.bad_payload(subject))
            return encode_frame(env(codec=Codec.ZSTD), wire), PAYLOAD
        if kind == "msgpack-payload-mismatch":
            body = rng.choice(
                [b"\xc1", b"\x91" * 3000 + b"\xc0", b"\xa2\xff\xfe", b"\x81\xa4text\x05"]
            )
            return encode_frame(env(content_type=ContentType.MSGPACK), body), PAYLOAD
        if kind == "bare-payload-mismatch":  # a plain NATS client, no frame
            body = self.bad_payload(subject)
            return (body if body[:1] != bytes((MAGIC,)) else b"x" + body), PAYLOAD
        if kind == "deadline-passed":
            deadline = rng.choice([1, time.time_ns() - rng.randrange(1, 10**12), -(2**40)])
            return encode_frame(env(deadline=deadline), self.good_payload(subject)), DEADLINE
        if kind == "valid":
            body = self.good_payload(subject)
            if rng.random() < 0.3:
                return encode_frame(env(codec=Codec.ZSTD), _COMPRESS.compress(body)), OK
            return encode_frame(env(), body), OK
        raise AssertionError(f"unknown kind {kind}")


#: Kinds, the subjects they go to, and their weight in a batch.
KINDS: dict[str, tuple[tuple[str, ...], int]] = {
    "random-bytes": (tuple(HANDLERS), 8),
    "magic-garbage": (tuple(HANDLERS), 6),
    "bad-version": (tuple(HANDLERS), 3),
    "truncated-header": (tuple(HANDLERS), 5),
    "huge-header-length": (tuple(HANDLERS), 3),
    "wrong-types": (tuple(HANDLERS), 6),
    "deep-nesting": (tuple(HANDLERS), 3),
    "invalid-utf8": (tuple(HANDLERS), 5),
    "overlong-field": (tuple(HANDLERS), 3),
    "zstd-garbage": (tuple(HANDLERS), 5),
    "zstd-truncated": (tuple(HANDLERS), 4),
    "zstd-oversized": (tuple(HANDLERS), 3),
    "zstd-unknown-dictionary": (tuple(HANDLERS), 3),
    "zstd-dictionary-mismatch": (tuple(HANDLERS), 3),
    "zstd-trailing": (tuple(HANDLERS), 3),
    "zstd-no-checksum-or-size": (tuple(HANDLERS), 3),
    "payload-mismatch": (TYPED, 10),
    "compressed-payload-mismatch": (TYPED, 4),
    "msgpack-payload-mismatch": (TYPED, 3),
    "bare-payload-mismatch": (TYPED, 6),
    "deadline-passed": (tuple(HANDLERS), 2),
    "valid": (tuple(HANDLERS), 3),
}


def predict(data: bytes, subject: str, engine: CodecEngine) -> str | None:
    """What the node will do with ``data`` on ``subject`` (None: do not send it, its
    deadline is too close to call)."""
    content_type = ContentType.JSON
    body: bytes | memoryview = data
    if data[:1] == bytes((MAGIC,)):
        try:
            envelope, body = decode_frame(data, subject)
            if envelope.codec:
                decoded = engine.decode_cached(body, envelope, subject)
                # Without a store (here as at the node) an unknown dictionary is refused.
                assert decoded is not None
                body = decoded
        except MalformedMessage:
            return FRAME
        if envelope.deadline:
            left = envelope.deadline - time.time_ns()
            if left <= 0:
                return DEADLINE
            if left < 600 * 10**9:
                return None
        content_type = envelope.content_type
    try:
        decode_payload(body, content_type, HANDLERS[subject], subject)
    except MalformedMessage:
        return PAYLOAD
    return OK


# ---------------------------------------------------------------- names

_BAD_CHARS = (" ", "\t", "\r", "\n", "\r\n", "\x00", "\x7f", "\x1b", "é", "\u2028", "\u00a0")


@dataclass(frozen=True)
class NameCase:
    kind: str
    value: Any
    #: Refused as a subscription pattern too (not only as a publish subject).
    pattern: bool = True
    #: Refused as a queue group (only "" is a valid one that no other rule allows).
    queue: bool = True


def bad_names(rng: random.Random, count: int) -> list[NameCase]:
    """Names each invalid as a subject and as an agent name, by construction."""
    cases = []
    for _ in range(count):
        base = ".".join(
            "".join(rng.choice("abcXYZ019-_") for _ in range(rng.randrange(1, 6)))
            for _ in range(rng.randrange(1, 4))
        )
        at = rng.randrange(len(base) + 1)
        kind = rng.choice(
            ("whitespace-control", "wildcard", "reserved", "empty-token", "overlong", "type")
        )
        if kind == "whitespace-control":
            value: Any = base[:at] + rng.choice(_BAD_CHARS) + base[at:]
            cases.append(NameCase(kind, value))
        elif kind == "wildcard":
            value = rng.choice([base + ".*", base + ".>", "*." + base, ">"])
            cases.append(NameCase(kind, value, pattern=False))
            cases.append(NameCase(kind, rng.choice([base + ".>.x", base + "*", ">" + base])))
        elif kind == "reserved":
            prefix = rng.choice(("$", "$SRV.", "$JS.API.", "_INBOX.", "_INBOX", "_MESH."))
            cases.append(NameCase(kind, prefix + base))
        elif kind == "empty-token":
            value = rng.choice(["." + base, base + ".", base.replace(".", "..") + "..x", "."])
            cases.append(NameCase(kind, value))
        elif kind == "overlong":
            cases.append(NameCase(kind, "a" * rng.randrange(257, 2000)))
        else:
            value = rng.choice([None, 0, 7, 2.5, b"tasks", ["a"], {"a": 1}, ("a",), ""])
            cases.append(NameCase(kind, value, queue=value != ""))
    return cases


_hyp_names = st.tuples(st.text(max_size=20), st.sampled_from(_BAD_CHARS), st.text(max_size=20)).map(
    lambda t: NameCase("hypothesis", t[0] + t[1] + t[2])
)


def check_names_sync(cases: list[NameCase], counts: Counter[str]) -> None:
    """Every validator and constructor refuses each name with InvalidName, nothing else."""

    def refused(api: str, call: Callable[..., object], *args: Any, **kwargs: Any) -> None:
        try:
            call(*args, **kwargs)
        except InvalidName:
            counts[api] += 1
            return
        raise AssertionError(f"{api} accepted the invalid name {args[0]!r}")

    node = Node("names")
    for case in cases:
        value = case.value
        refused("validate_subject", validate_subject, value)
        refused("validate_agent_name", validate_agent_name, value)
        refused("validate_instance", validate_instance, value)
        refused("Node()", Node, value)
        if case.queue:
            refused("validate_queue_group", validate_queue_group, value)
        if case.pattern:
            refused("validate_subject(wildcards)", validate_subject, value, wildcards=True)
            refused("Node.handles()", node.handles, value)
    assert not node.handlers


async def check_names_async(
    client: MeshClient, url: str, cases: list[NameCase], counts: Counter[str]
) -> None:
    """The client refuses each name before anything is sent."""

    async def nothing(msg: Message) -> None:
        return None

    async def refused(
        api: str, call: Callable[..., Coroutine[Any, Any, object]], *args: Any, **kwargs: Any
    ) -> None:
        try:
            await call(*args, **kwargs)
        except InvalidName:
            counts[api] += 1
            return
        raise AssertionError(f"{api} accepted the invalid name {args!r} {kwargs!r}")

    published = client.stats().published
    for i, case in enumerate(cases):
        value = case.value
        await refused("client.publish", client.publish, value, b"x")
        await refused("client.request", client.request, value, b"x", timeout=1)
        if case.pattern:
            await refused("client.subscribe", client.subscribe, value, nothing)
        if i % 10 == 0:
            await refused("MeshClient.connect", MeshClient.connect, url, name=value)
    assert client.stats().published == published


# ---------------------------------------------------------------- the running node


@dataclass
class Tally:
    """What was thrown and what the node must therefore have counted."""

    by_kind: Counter[str] = field(default_factory=Counter)
    outcomes: Counter[str] = field(default_factory=Counter)
    refused_by_kind: Counter[str] = field(default_factory=Counter)
    requests: int = 0
    refused_requests: int = 0
    names: int = 0
    name_checks: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    skipped: int = 0

    @property
    def sent(self) -> int:
        return sum(self.outcomes.values())


class Harness:
    """The node's process, and a fuzzing client and a telemetry watcher on an event loop
    in a thread, so that hypothesis (which is synchronous) drives them batch by batch."""

    def __init__(self, url: str, log: Path) -> None:
        self.url = url
        self.log = log
        self.loop = asyncio.new_event_loop()
        self.loop_errors: list[dict[str, Any]] = []
        self.loop.set_exception_handler(lambda _loop, context: self.loop_errors.append(context))
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzzer")
        self.node: subprocess.Popen[bytes] | None = None
        #: The node's telemetry, summed as it arrives.
        self.telemetry: Counter[str] = Counter()
        self.seqs: list[int] = []
        self.replies: Counter[str] = Counter()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        self.thread.start()
        self.call(self._start())
        with self.log.open("wb") as log:
            self.node = subprocess.Popen(
                [sys.executable, __file__, self.url],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.call(eventually(self._answers, timeout=30, message="the node did not come up"))

    async def _start(self) -> None:
        self.watcher = await MeshClient.connect(self.url, name="watcher")

        async def on_snapshot(msg: Message) -> None:
            snapshot = decode_snapshot(msg.data)
            if snapshot.agent != NODE:
                return
            self.seqs.append(snapshot.seq)
            for r in snapshot.received:
                if r.subject == STATS:
                    continue
                self.telemetry["decode_failures"] += sum(r.decode_failures.values())
                self.telemetry["errors"] += r.errors
                self.telemetry["timeouts"] += r.timeouts
                self.telemetry["handled"] += r.handled
                self.telemetry["dropped"] += r.dropped

        await self.watcher.subscribe(
            f"{TELEMETRY_SUBJECT}.>", on_snapshot, internal=True, traced=False
        )
        await self.watcher.flush()
        self.fuzzer = await MeshClient.connect(self.url, name="fuzzer")

        async def on_reply(msg: Msg) -> None:
            self.replies["error" if _is_error(msg) else "ok"] += 1

        await self.fuzzer.nc.subscribe(
            REPLIES, cb=on_reply, pending_msgs_limit=1_000_000, pending_bytes_limit=2**30
        )
        await self.fuzzer.flush()

    async def _answers(self) -> bool:
        try:
            await self.stats()
        except (NoResponders, RequestTimeout):
            return False
        return True

    async def stats(self) -> dict[str, int]:
        result: dict[str, int] = await self.fuzzer.request(STATS, {}, timeout=5)
        return result

    def rss(self) -> int:
        """The node process's resident memory now."""
        assert self.node is not None
        with open(f"/proc/{self.node.pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * _PAGE

    def stop_node(self) -> int:
        """SIGTERM: the node drains, sends its last snapshot and exits; its exit code."""
        assert self.node is not None
        self.node.send_signal(signal.SIGTERM)
        return self.node.wait(30)

    def stop(self) -> None:
        async def close() -> None:
            for name in ("fuzzer", "watcher"):  # those _start got to connect
                client: MeshClient | None = getattr(self, name, None)
                if client is not None:
                    await client.aclose()

        try:
            if self.node is not None and self.node.poll() is None:
                self.node.kill()
                self.node.wait(10)
            self.call(close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
            self.loop.close()

    async def throw(self, batch: list[Input], tally: Tally) -> dict[str, int]:
        """Send a batch, then wait until the node has dealt with all of it; its counts."""
        nc = self.fuzzer.nc
        for item in batch:
            await nc.publish(item.subject, item.data, reply=REPLIES if item.request else "")
        await self.fuzzer.flush()
        counts: dict[str, int] = {}

        async def taken_in() -> bool:
            # Refused as frames or given to a handler; a handler counts a refusal in
            # the same step as the request, so these counts are final.
            counts.update(await self.stats())
            return (
                counts["malformed"] + counts["requests"] == tally.sent
                and sum(self.replies.values()) == tally.requests
            )

        await eventually(
            taken_in, timeout=30, message=f"the node did not take in batch {tally.batches}"
        )
        return counts


def _is_error(msg: Msg) -> bool:
    if msg.data[:1] == bytes((MAGIC,)):
        return decode_frame(msg.data)[0].kind is Kind.ERROR
    return bool(msg.headers and "Nats-Service-Error" in msg.headers)


def _frames(value: Any) -> bytes:
    return _raw_frame(msgspec.msgpack.encode(value), b'{"text": "x"}')


_MSGPACK_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=12)
    | st.binary(max_size=12),
    lambda inner: st.lists(inner, max_size=12) | st.dictionaries(st.text(max_size=4), inner),
    max_leaves=16,
)


@pytest.mark.slow
@pytest.mark.timeout(max(240, INPUTS // 500))
def test_a_running_node_survives_and_counts_hostile_input(nats_url: str, tmp_path: Path) -> None:
    harness = Harness(nats_url, tmp_path / "node.log")
    tally = Tally()
    oracle = CodecEngine()  # no store: an unknown dictionary is refused, as at the node
    kinds = list(KINDS)
    rss: list[int] = []
    examples = math.ceil(INPUTS / BATCH)
    started = time.monotonic()

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=(Phase.generate,),  # a batch runs against the live node: no shrinking
        suppress_health_check=list(HealthCheck),
    )
    @given(
        seed=st.integers(0, 2**64 - 1),
        weights=st.lists(st.integers(0, 3), min_size=len(KINDS), max_size=len(KINDS)),
        raw=st.lists(st.binary(max_size=80), max_size=12),
        headers=st.lists(_MSGPACK_VALUES, max_size=12),
        names=st.lists(_hyp_names, max_size=10),
    )
    def batch(
        seed: int, weights: list[int], raw: list[bytes], headers: list[Any], names: list[NameCase]
    ) -> None:
        gen = Generator(seed)
        rng = gen.rng
        # Hypothesis tilts the mix: each kind's weight is its base times 1 + a drawn factor.
        mix = [KINDS[k][1] * (1 + w) for k, w in zip(kinds, weights, strict=True)]
        drawn: list[tuple[str, bytes]] = [("hypothesis-bytes", b) for b in raw]
        drawn += [("hypothesis-bytes", bytes((MAGIC,)) + b) for b in raw]
        drawn += [("hypothesis-header", _frames(h)) for h in headers]

        def inputs() -> Iterator[Input]:
            for kind, data in drawn:
                subject = rng.choice(tuple(HANDLERS))
                yield Input(kind, subject, data, rng.random() < 0.5, None)
            while True:
                kind = rng.choices(kinds, mix)[0]
                subject = rng.choice(KINDS[kind][0])
                data, built = gen.build(kind, subject)
                yield Input(kind, subject, data, rng.random() < 0.5, built)

        to_send: list[Input] = []
        for item in itertools.islice(inputs(), BATCH * 2):
            if len(to_send) == BATCH:
                break
            outcome = predict(item.data, item.subject, oracle)
            if outcome is None:
                tally.skipped += 1
                continue
            if item.built is not None:
                assert outcome == item.built, (item.kind, item.subject, item.data[:200])
            tally.by_kind[item.kind] += 1
            tally.outcomes[outcome] += 1
            if outcome in REFUSED:
                tally.refused_by_kind[item.kind] += 1
            if item.request:
                tally.requests += 1
                tally.refused_requests += outcome in REFUSED
            to_send.append(item)
        counts = harness.call(harness.throw(to_send, tally))
        tally.batches += 1
        if tally.batches == 1 or tally.batches % max(1, examples // 10) == 0:
            rss.append(harness.rss())  # the first after one batch: caches and buffers warm
        # Every refusal counted once, batch by batch.
        assert counts["malformed"] == tally.outcomes[FRAME]
        assert counts["errors"] == tally.outcomes[PAYLOAD] + tally.outcomes[DEADLINE]
        assert counts["timeouts"] == tally.outcomes[DEADLINE]
        cases = names + bad_names(rng, 150)
        check_names_sync(cases, tally.name_checks)
        harness.call(check_names_async(harness.fuzzer, nats_url, cases, tally.name_checks))
        tally.names += len(cases)

    harness.start()
    try:
        batch()
        rss.append(harness.rss())
        elapsed = time.monotonic() - started

        async def still_serving() -> Summary:
            await harness.fuzzer.publish("fz.events.e1", Task(text="one more"))
            return await harness.fuzzer.request(
                "fz.task", Task(text="still here", n=3), type=Summary, timeout=5
            )

        assert harness.call(still_serving()) == Summary(text="still here", items=3)
        tally.outcomes[OK] += 2
        final = harness.call(harness.stats())
        assert harness.stop_node() == 0  # drained and exited cleanly
        # Its last snapshot went out as it closed: wait for the watcher to have it.
        harness.call(
            eventually(
                lambda: harness.telemetry["handled"] == tally.sent - tally.outcomes[FRAME],
                timeout=10,
            ),
            timeout=20,
        )
    finally:
        harness.stop()
    telemetry = {
        key: harness.telemetry[key]
        for key in ("decode_failures", "errors", "timeouts", "handled", "dropped")
    }
    _report(tally, final, telemetry, harness.replies, rss, elapsed)

    assert tally.sent >= INPUTS
    assert sorted(harness.seqs) == list(range(len(harness.seqs)))  # no snapshot lost
    assert final["malformed"] == tally.outcomes[FRAME]
    assert final["requests"] == tally.sent - tally.outcomes[FRAME]
    assert final["errors"] == tally.outcomes[PAYLOAD] + tally.outcomes[DEADLINE]
    assert final["timeouts"] == tally.outcomes[DEADLINE]
    assert telemetry == {
        "decode_failures": tally.outcomes[FRAME],
        "errors": tally.outcomes[PAYLOAD] + tally.outcomes[DEADLINE],
        "timeouts": tally.outcomes[DEADLINE],
        "handled": tally.sent - tally.outcomes[FRAME],
        "dropped": 0,
    }
    assert harness.replies["error"] == tally.refused_requests
    assert harness.replies["ok"] == tally.requests - tally.refused_requests
    # Nothing escaped a callback: nats-py hands that to the client, which logs it.
    output = harness.log.read_text(errors="replace")
    assert output == "", output[:2000]
    assert harness.loop_errors == []
    assert rss[-1] - rss[0] < RSS_BOUND, f"the node's RSS grew by {(rss[-1] - rss[0]) / 2**20} MiB"


# ---------------------------------------------------------------- node-side rules, one each


def test_a_payload_type_msgspec_cannot_decode_is_refused_at_declaration() -> None:
    node = Node("typed")
    with pytest.raises(TypeError, match="msgspec cannot decode"):

        @node.handles("typed.x")
        async def ambiguous(message: list[int] | tuple[int, ...]) -> None: ...

    assert node.handlers == []


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (b'{"name": "n", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nests too deeply"),
        (b'{"name": "\xff"}', "(?i)utf-8"),
        (b"x" * (MAX_INFO_BYTES + 1), "over"),
        (b"[]", "Expected `object`"),
    ],
)
def test_a_registration_that_is_not_one_is_a_value_error(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_info(data)


def test_a_registration_from_a_newer_node_still_counts() -> None:
    info = NodeInfo(
        name="n",
        instance="i",
        version="1",
        subjects=["a"],
        host="h",
        pid=1,
        started=0,
        heartbeat=0,
    )
    newer = msgspec.json.encode({**msgspec.structs.asdict(info), "zone": "eu", "tags": [1]})
    assert decode_info(newer) == info


def test_subjects_and_keys_are_built_from_checked_names(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="namer") as client:
            node = Node("namer")
            with pytest.raises(InvalidName):
                Registration(client, node, "a.b", 0.0)
            with pytest.raises(InvalidName):
                await MicroResponder(node, "x y", client, 0.0).start()
            node.name = "bad name"  # a Node's name is checked once, when it is made
            with pytest.raises(InvalidName):
                await MicroResponder(node, "i1", client, 0.0).start()
            with pytest.raises(InvalidName):
                Registration(client, node, "i1", 0.0)

    arun(main())


def test_discovery_subscriptions_are_bounded(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="micro") as client:
            responder = MicroResponder(Node("micro"), "i1", client, 0.0)
            await responder.start()
            try:
                subs = responder._subs
                assert len(subs) == 9
                assert {s._pending_msgs_limit for s in subs} == {MICRO_PENDING_MSGS}
                assert {s._pending_bytes_limit for s in subs} == {MICRO_PENDING_BYTES}
                reply = await client.nc.request("$SRV.PING.micro", b"", timeout=5)
                assert msgspec.json.decode(reply.data)["id"] == "i1"
            finally:
                await responder.aclose()

    arun(main())


def _report(
    tally: Tally,
    final: dict[str, int],
    telemetry: dict[str, int],
    replies: Counter[str],
    rss: list[int],
    elapsed: float,
) -> None:
    mib = 2**20
    lines = [
        f"\nfuzz: {tally.sent} inputs in {tally.batches} batches, {elapsed:.1f} s "
        f"({tally.skipped} skipped: deadline too close to call)",
        "inputs by kind (refused / thrown):",
        *(
            f"  {kind:30} {tally.refused_by_kind[kind]:7} / {n}"
            for kind, n in sorted(tally.by_kind.items())
        ),
        f"outcomes: {dict(sorted(tally.outcomes.items()))}",
        f"node counters: {final}",
        f"telemetry: {telemetry}",
        f"requests {tally.requests}: replies {dict(replies)} "
        f"(refused requests {tally.refused_requests})",
        f"names: {tally.names} malformed names, {sum(tally.name_checks.values())} refusals: "
        + ", ".join(f"{api} {n}" for api, n in sorted(tally.name_checks.items())),
        f"node RSS: {rss[0] / mib:.1f} MiB after the first batch, {rss[-1] / mib:.1f} MiB at "
        f"the end (+{(rss[-1] - rss[0]) / mib:.1f} MiB, bound {RSS_BOUND / mib:.0f} MiB); "
        "along the way: " + " ".join(f"{r / mib:.1f}" for r in rss),
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    serve(sys.argv[1])
