"""The policy plane: keys, validation, the node's table, the KV store and the watcher.

Pure code gets unit and property tests; the store and the watcher run against a real
nats-server (a restart, a partition through a proxy we cut, a server without JetStream).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import msgspec
import pytest
from _util import arun, eventually, retrying
from hypothesis import assume, given
from hypothesis import strategies as st

from mesh import InvalidName, MeshClient, Message, _enforcer, validate_subject
from mesh._cluster import NatsCluster
from mesh._enforcer import (
    MAX_APPLIED_BYTES,
    AppliedTracker,
    PolicyApplied,
    PolicyEnforcer,
    decode_applied,
    encode_applied,
)
from mesh._errors import InvalidPolicy, JetStreamUnavailable, PolicyPinned
from mesh._policy import (
    CODEC_CACHE_SIZE,
    MAX_RECORD_BYTES,
    CodecPolicy,
    PolicyRecord,
    PolicyTable,
    decode_record,
    encode_record,
    parse_key,
    policy_key,
    validate_record,
)
from mesh._policy_store import BUCKET, HISTORY, PolicyStore
from mesh._policy_watch import PolicyWatcher
from mesh._server import NatsServer

ZSTD = CodecPolicy(algorithm="zstd", level=3)


def record(subject: str = "tasks.summarize", version: int = 1, **changes: Any) -> PolicyRecord:
    fields: dict[str, Any] = dict(
        subject=subject, version=version, author="router", reason="p50 1.2 KB", time=1
    )
    fields["value"] = CodecPolicy(**changes.pop("codec", {}))
    fields.update(changes)
    return PolicyRecord(**fields)


# -- keys ------------------------------------------------------------------------------

_TOKEN_CHARS = st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters=".*>")
_tokens = st.one_of(st.text(_TOKEN_CHARS, min_size=1, max_size=12), st.sampled_from(["*", ">"]))


@st.composite
def subjects(draw: st.DrawFn) -> str:
    subject = ".".join(draw(st.lists(_tokens, min_size=1, max_size=8)))
    try:
        validate_subject(subject, wildcards=True)
    except InvalidName:
        assume(False)
    return subject


@given(subjects())
def test_key_round_trips_every_valid_subject(subject: str) -> None:
    key = policy_key(subject, "codec")
    assert all(c.isalnum() or c in "-/_=." for c in key)
    assert parse_key(key) == (subject, "codec")


@pytest.mark.parametrize(
    ("subject", "key"),
    [
        ("tasks.summarize", "codec.tasks.summarize"),
        ("tasks.*.done", "codec.tasks.=S.done"),
        ("events.>", "codec.events.=R"),
        ("a=b.c", "codec.=x613d62.c"),
        ("agents.r&d", "codec.agents.=x722664"),
    ],
)
def test_key_examples(subject: str, key: str) -> None:
    assert policy_key(subject, "codec") == key
    assert parse_key(key) == (subject, "codec")


@pytest.mark.parametrize(
    "key",
    ["codec", "route.a", "codec.=x61", "codec.=xZZ", "codec.=xff", "codec.a..b", "codec.=x2e"],
)
def test_parse_key_rejects_what_policy_key_cannot_make(key: str) -> None:
    with pytest.raises(InvalidPolicy):
        parse_key(key)


def test_policy_key_rejects_bad_subjects_and_sections() -> None:
    for subject in ("", "a..b", "$SYS.x", "a.>.b", "a b"):
        with pytest.raises(InvalidPolicy):
            policy_key(subject, "codec")
    with pytest.raises(InvalidPolicy, match="unknown section"):
        policy_key("a", "route")


# -- validation and decoding ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"subject": "a..b"}, "subject"),
        ({"subject": "_INBOX.x"}, "subject"),
        ({"version": 0}, "version"),
        ({"author": ""}, "author"),
        ({"author": "x" * 65}, "author"),
        ({"author": "a\x1b[31m"}, "author"),
        ({"reason": "x" * 201}, "reason"),
        ({"reason": "two\nlines"}, "one line"),
        ({"time": -1}, "time"),
        ({"codec": {"algorithm": "zstd", "level": 0}}, "level"),
        ({"codec": {"algorithm": "zstd", "level": 20}}, "level"),
        ({"codec": {"dictionary": -1}}, "dictionary"),
        ({"codec": {"dictionary": 2**32}}, "dictionary"),
        ({"codec": {"min_size": -1}}, "min_size"),
        ({"codec": {"min_size": 64 * 1024 * 1024 + 1}}, "min_size"),
    ],
)
def test_validate_rejects(changes: dict[str, Any], reason: str) -> None:
    with pytest.raises(InvalidPolicy, match=reason):
        validate_record(record(**changes))


def test_validate_accepts_bounds_and_checks_the_key() -> None:
    ok = record(
        "tasks.*",
        author="x" * 64,
        reason="r" * 200,
        codec={"algorithm": "zstd", "level": 19, "dictionary": 2**32 - 1, "min_size": 0},
    )
    assert validate_record(ok, key="codec.tasks.=S") is ok
    # A level is only checked when it is used.
    validate_record(record(codec={"algorithm": "none", "level": 99}))
    with pytest.raises(InvalidPolicy, match="not this key"):
        validate_record(ok, key="codec.tasks.other")


def test_decode_round_trip_and_rejections() -> None:
    good = record(codec={"algorithm": "zstd", "level": 9, "dictionary": 7})
    key = policy_key(good.subject, "codec")
    assert decode_record(encode_record(good), key) == good
    wire = msgspec.json.decode(encode_record(good))
    bad_inputs = [
        b"",
        b"\xff\xfe",
        b"not json",
        b"[" * 100_000,
        b'{"subject": "\xff"}',
        b"x" * (MAX_RECORD_BYTES + 1),
        msgspec.json.encode({**wire, "extra": 1}),
        msgspec.json.encode({**wire, "version": "2"}),
        msgspec.json.encode({**wire, "value": {**wire["value"], "section": "route"}}),
        msgspec.json.encode({**wire, "value": {**wire["value"], "level": 42}}),
    ]
    for data in bad_inputs:
        with pytest.raises(InvalidPolicy):
            decode_record(data, key)
    with pytest.raises(InvalidPolicy, match="not this key"):
        decode_record(encode_record(good), "codec.tasks.other")


@given(st.binary(max_size=300))
def test_decode_record_only_raises_invalid_policy(data: bytes) -> None:
    with contextlib.suppress(InvalidPolicy):
        assert isinstance(decode_record(data), PolicyRecord)


_JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


@given(
    st.sampled_from(["subject", "version", "author", "reason", "time", "pinned", "value"]),
    _JSON_VALUES,
)
def test_a_record_with_any_field_replaced_decodes_or_is_invalid(field: str, value: Any) -> None:
    wire = msgspec.json.decode(encode_record(record()))
    wire[field] = value
    try:
        decoded = decode_record(msgspec.json.encode(wire))
    except InvalidPolicy as exc:
        reason = exc.reason
        assert reason
        return
    assert validate_record(decoded) is decoded


# -- acknowledgements ------------------------------------------------------------------------


def _ack(**changes: Any) -> dict[str, Any]:
    return {
        "instance": "i1",
        "agent": "node",
        "key": "codec.tasks",
        "version": 3,
        "time": 9,
        **changes,
    }


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (msgspec.msgpack.encode({**_ack(), "extra": 1}), "unknown field"),
        (msgspec.msgpack.encode(_ack(version="3")), "Expected `int`"),
        (b"\x85\xa8instance\xa2\xff\xfe", "(?i)utf-8"),
        (msgspec.msgpack.encode(_ack(key="k" * MAX_APPLIED_BYTES)), "over"),
        (b"\x91" * 4000 + b"\xc0", "Expected `object`"),
        (b"", "truncated"),
    ],
)
def test_decode_applied_refuses_what_is_not_an_acknowledgement(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_applied(data)


@given(st.binary(max_size=200))
def test_decode_applied_only_raises_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        assert isinstance(decode_applied(data), PolicyApplied)


def test_tracker_counts_malformed_acks_and_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_enforcer, "MAX_TRACKED", 3)
    tracker = AppliedTracker()

    async def feed() -> None:
        for data in (b"garbage", b"\x91" * 5000, msgspec.msgpack.encode({**_ack(), "x": 1})):
            await tracker.on_ack(Message("_MESH.policy.applied.i1", "", data, None))
        for i in range(5):
            ack = PolicyApplied(instance=f"i{i}", agent="a", key="codec.t", version=1, time=i)
            await tracker.on_ack(Message("_MESH.policy.applied.x", "", encode_applied(ack), None))

    arun(feed())
    assert tracker.malformed == 3
    assert len(tracker.latest) == 3
    assert tracker.overflow == 2
    assert tracker.applied("codec.t", 1) == {"i0": 0, "i1": 1, "i2": 2}


def test_enforcer_validates_the_names_its_subject_is_built_from() -> None:
    for agent, instance in [
        ("node", "a.b"),
        ("node", "x\r\nPUB y 1"),
        ("node", ">"),
        ("bad name", "i1"),
    ]:
        with pytest.raises(InvalidName):
            PolicyEnforcer(None, agent=agent, instance=instance)  # type: ignore[arg-type]


# -- the table -------------------------------------------------------------------------------


def codec(level: int) -> dict[str, Any]:
    return {"codec": {"algorithm": "zstd", "level": level}}


def test_table_exact_beats_patterns_and_specific_patterns_win() -> None:
    table = PolicyTable()
    for subject, level in [
        ("tasks.>", 1),
        ("tasks.*", 2),
        ("tasks.*.done", 3),
        ("*.summarize.done", 4),
        ("tasks.summarize", 5),
        ("tasks.summarize.>", 6),
    ]:
        assert table.apply(record(subject, **codec(level)))

    def level(subject: str) -> int | None:
        found = table.codec_for(subject)
        return None if found is None else found.level

    assert level("tasks.summarize") == 5  # exact
    assert level("tasks.translate") == 2  # '*' beats '>' at equal literal count
    assert level("tasks.a.b.c") == 1
    # Two literals each: the pattern without '>' wins.
    assert level("tasks.summarize.done") == 4
    assert level("tasks.summarize.x") == 6  # two literals beat tasks.>'s one
    assert level("tasks.translate.done") == 3
    assert level("jobs.summarize.done") == 4
    assert level("tasks") is None
    assert level("other.subject") is None


def test_table_tie_break_is_the_pattern_string() -> None:
    table = PolicyTable()
    table.apply(record("a.*.c", **codec(1)))
    table.apply(record("a.b.*", **codec(2)))
    found = table.codec_for("a.b.c")
    assert found is not None
    assert found.level == 1  # "a.*.c" < "a.b.*"


def test_table_cache_forgets_on_every_change_and_is_bounded() -> None:
    table = PolicyTable()
    assert table.codec_for("tasks.x") is None  # cached as "defaults"
    table.apply(record("tasks.*", **codec(4)))
    assert table.codec_for("tasks.x") == CodecPolicy(algorithm="zstd", level=4)
    table.apply(record("tasks.x", **codec(7)))
    assert table.codec_for("tasks.x") == CodecPolicy(algorithm="zstd", level=7)
    assert table.remove("tasks.x", "codec")
    assert not table.remove("tasks.x", "codec")
    assert table.codec_for("tasks.x") == CodecPolicy(algorithm="zstd", level=4)

    for i in range(CODEC_CACHE_SIZE + 10):
        table.codec_for(f"load.s{i}")
    assert table.cache_resets == 1
    assert table.codec_for("tasks.x") == CodecPolicy(algorithm="zstd", level=4)


def test_table_rejects_stale_versions() -> None:
    table = PolicyTable()
    assert table.apply(record(version=3, **codec(3)))
    assert not table.apply(record(version=3, **codec(9)))
    assert not table.apply(record(version=2, **codec(9)))
    assert table.rejected_stale == 2
    assert table.apply(record(version=4, **codec(4)))
    key = policy_key("tasks.summarize", "codec")
    assert table.versions() == {key: 4}
    assert [r.version for r in table.records()] == [4]
    assert table.codec_for("tasks.summarize") == CodecPolicy(algorithm="zstd", level=4)


# -- the store -------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def connected(url: str, name: str = "policy-test") -> AsyncIterator[MeshClient]:
    client = await MeshClient.connect(url, name=name)
    try:
        yield client
    finally:
        await client.aclose()


def test_store_versions_list_history_and_delete(nats_url: str) -> None:
    async def main() -> None:
        async with connected(nats_url) as client:
            store = await PolicyStore.open(client)
            status = await store.kv.status()
            assert (status.bucket, status.history) == (BUCKET, HISTORY)
            assert await store.get("tasks.a") is None
            assert await store.list() == []
            assert await store.history("tasks.a") == []

            one = await store.set("tasks.a", ZSTD, author="router", reason="median 1.2 KB")
            two = await store.set("tasks.a", CodecPolicy(), author="router", reason="tiny")
            await store.set("tasks.*", ZSTD, author="ops", reason="default for tasks")
            assert (one.version, two.version) == (1, 2)
            assert await store.get("tasks.a") == two
            assert [r.subject for r in await store.list()] == ["tasks.*", "tasks.a"]  # by key

            await store.delete("tasks.a", author="ops", reason="back to defaults")
            await store.delete("tasks.a", author="ops", reason="again: a no-op")
            assert await store.get("tasks.a") is None
            assert [r.subject for r in await store.list()] == ["tasks.*"]
            three = await store.set("tasks.a", ZSTD, author="router", reason="back")
            assert three.version == 3  # versions continue across a delete
            history = await store.history("tasks.a")
            assert [r and r.version for r in history] == [1, 2, None, 3]

            with pytest.raises(InvalidPolicy):
                await store.set("tasks.a", ZSTD, author="", reason="no author")
            with pytest.raises(InvalidPolicy):
                await store.set("a..b", ZSTD, author="x", reason="bad subject")
            assert (await store.get("tasks.a")) == three

    arun(main())


def test_store_concurrent_writers_lose_no_update(nats_url: str) -> None:
    async def main() -> None:
        async with connected(nats_url, "w1") as c1, connected(nats_url, "w2") as c2:
            stores = [await PolicyStore.open(c1), await PolicyStore.open(c2)]
            writes = [
                stores[i % 2].set(
                    "tasks.hot", CodecPolicy(min_size=i), author=f"writer{i}", reason="race"
                )
                for i in range(10)
            ]
            written = await asyncio.gather(*writes)
            assert sorted(r.version for r in written) == list(range(1, 11))
            history = await stores[0].history("tasks.hot")
            assert [r and r.version for r in history] == list(range(1, 11))
            assert {r and r.value.min_size for r in history} == set(range(10))

    arun(main())


def test_store_pins_hold_for_everyone_but_an_operator(nats_url: str) -> None:
    async def main() -> None:
        async with connected(nats_url) as client:
            store = await PolicyStore.open(client)
            await store.set("tasks.a", ZSTD, author="router", reason="auto")
            pinned = await store.set(
                "tasks.a", CodecPolicy(), author="alice", reason="by hand", pin=True, operator=True
            )
            assert pinned.pinned
            with pytest.raises(PolicyPinned, match="alice"):
                await store.set("tasks.a", ZSTD, author="router", reason="auto")
            with pytest.raises(PolicyPinned):
                await store.delete("tasks.a", author="router", reason="auto")
            # An operator may change it; the pin stays unless told otherwise.
            kept = await store.set("tasks.a", ZSTD, author="bob", reason="hand", operator=True)
            assert kept.pinned
            assert kept.version == 3
            unpinned = await store.set(
                "tasks.a", ZSTD, author="bob", reason="let go", pin=False, operator=True
            )
            assert not unpinned.pinned
            after = await store.set("tasks.a", CodecPolicy(), author="router", reason="auto")
            assert after.version == 5
            assert not after.pinned

    arun(main())


def test_store_skips_and_counts_unreadable_values(nats_url: str) -> None:
    async def main() -> None:
        async with connected(nats_url) as client:
            store = await PolicyStore.open(client)
            good = await store.set("tasks.a", ZSTD, author="router", reason="ok")
            await store.kv.put("codec.tasks.b", b"garbage")
            assert await store.list() == [good]
            assert store.malformed == 1
            with pytest.raises(InvalidPolicy):
                await store.get("tasks.b")
            # A writer may replace garbage; its version continues from the last good one.
            fixed = await store.set("tasks.b", ZSTD, author="ops", reason="repair")
            assert fixed.version == 1

    arun(main())


def test_store_without_jetstream_says_so() -> None:
    async def main() -> None:
        with NatsServer(jetstream=False) as server:
            async with connected(server.url) as client:
                with pytest.raises(JetStreamUnavailable, match="JetStream"):
                    await PolicyStore.open(client, timeout=2)

    arun(main())


# -- the watcher -----------------------------------------------------------------------------


class Seen:
    """What on_applied reported, and a prepare that can be told to fail."""

    def __init__(self) -> None:
        self.events: list[tuple[int | None, str]] = []
        self.refuse: set[int] = set()

    async def prepare(self, record: PolicyRecord) -> None:
        if record.value.dictionary in self.refuse:
            raise LookupError(f"no dictionary {record.value.dictionary}")

    async def on_applied(self, record: PolicyRecord | None, key: str) -> None:
        self.events.append((record and record.version, key))


def level_of(table: PolicyTable, subject: str) -> int | None:
    found = table.codec_for(subject)
    return None if found is None else found.level


def test_watcher_applies_changes_and_deletes(nats_url: str) -> None:
    async def main() -> None:
        async with connected(nats_url, "writer") as wc, connected(nats_url, "node") as nc:
            store = await PolicyStore.open(wc)
            await store.set("tasks.a", ZSTD, author="router", reason="before start")
            table, seen = PolicyTable(), Seen()
            async with PolicyWatcher(
                nc, table, prepare=seen.prepare, on_applied=seen.on_applied
            ) as watcher:
                assert watcher.ready.is_set()
                assert level_of(table, "tasks.a") == 3  # loaded before entering returned
                await store.set(
                    "tasks.*", CodecPolicy(algorithm="zstd", level=9), author="r", reason="r"
                )
                await eventually(lambda: level_of(table, "tasks.b") == 9)
                await store.delete("tasks.*", author="ops", reason="r")
                await eventually(lambda: level_of(table, "tasks.b") is None)
                assert seen.events == [
                    (1, "codec.tasks.a"),
                    (1, "codec.tasks.=S"),
                    (None, "codec.tasks.=S"),
                ]
                stats = watcher.stats()
                assert (stats.applied, stats.removed, stats.resyncs) == (2, 1, 0)
            await watcher.aclose()  # idempotent

    arun(main())


def test_watcher_rejects_forged_stale_and_garbage_values(
    nats_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    async def main() -> None:
        async with connected(nats_url, "writer") as wc, connected(nats_url, "node") as nc:
            store = await PolicyStore.open(wc)
            await store.set("tasks.a", CodecPolicy(), author="router", reason="r")
            await store.set("tasks.a", ZSTD, author="router", reason="r")
            other = await store.set("tasks.b", CodecPolicy(), author="router", reason="r")
            table, seen = PolicyTable(), Seen()
            seen.refuse.add(404)
            async with PolicyWatcher(nc, table, prepare=seen.prepare) as watcher:
                key_a = policy_key("tasks.a", "codec")
                # A valid record of another subject copied under tasks.a's key.
                await store.kv.put(key_a, encode_record(other))
                await eventually(lambda: table.rejected_malformed == 1)
                await store.kv.put(key_a, b"\x00garbage")
                await eventually(lambda: table.rejected_malformed == 2)
                # A replayed older version (version 2 is held).
                stale = record("tasks.a", version=1, codec={"algorithm": "zstd", "level": 12})
                await store.kv.put(key_a, encode_record(stale))
                await eventually(lambda: table.rejected_stale == 1)
                # A record whose dictionary the node cannot fetch.
                await store.kv.put(
                    key_a,
                    encode_record(record("tasks.a", version=7, codec={"dictionary": 404})),
                )
                await eventually(lambda: watcher.stats().prepare_failed == 1)
                assert level_of(table, "tasks.a") == 3  # the last good record, throughout
                assert table.versions()["codec.tasks.a"] == 2
                # The writer still moves on from the last readable version.
                fixed = await store.set(
                    "tasks.a", CodecPolicy(algorithm="zstd", level=5), author="r", reason="r"
                )
                assert fixed.version == 8
                await eventually(lambda: level_of(table, "tasks.a") == 5)

    with caplog.at_level(logging.WARNING, logger="mesh.policy"):
        arun(main())
    assert any("malformed" in r.message for r in caplog.records)


@contextlib.asynccontextmanager
async def proxy(upstream_port: int) -> AsyncIterator[Partition]:
    """A TCP proxy to 127.0.0.1:upstream_port that the test can cut and restore."""
    partition = Partition(upstream_port)
    server = await asyncio.start_server(partition.serve, "127.0.0.1", 0)
    partition.port = server.sockets[0].getsockname()[1]
    async with server:
        try:
            yield partition
        finally:
            partition.cut()


class Partition:
    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self.open = True
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def cut(self) -> None:
        self.open = False
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, up_writer]

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))


def test_watcher_catches_up_after_a_partition(nats_server: NatsServer) -> None:
    async def main() -> None:
        async with (
            proxy(nats_server.port) as link,
            connected(nats_server.url, "writer") as wc,
            connected(link.url, "node") as nc,
        ):
            store = await PolicyStore.open(wc)
            await store.set("tasks.a", ZSTD, author="r", reason="r")
            await store.set("tasks.gone", ZSTD, author="r", reason="r")
            table = PolicyTable()
            async with PolicyWatcher(nc, table) as watcher:
                assert len(table) == 2
                link.cut()
                await eventually(lambda: not nc.connected)
                await store.set(
                    "tasks.a", CodecPolicy(algorithm="zstd", level=11), author="r", reason="r"
                )
                await store.delete("tasks.gone", author="r", reason="r")
                await store.set("tasks.new", ZSTD, author="r", reason="r")
                assert level_of(table, "tasks.a") == 3  # still the last good one
                link.open = True
                await eventually(lambda: level_of(table, "tasks.a") == 11)
                await eventually(lambda: table.get("tasks.gone", "codec") is None)
                await eventually(lambda: table.get("tasks.new", "codec") is not None)
                assert watcher.stats().resyncs >= 1

    arun(main(), timeout=60)


def test_watcher_survives_a_server_restart(nats_server: NatsServer) -> None:
    async def main() -> None:
        async with connected(nats_server.url, "node") as nc:
            async with connected(nats_server.url, "writer") as wc:
                store = await PolicyStore.open(wc)
                await store.set("tasks.a", ZSTD, author="r", reason="r")
            table = PolicyTable()
            async with PolicyWatcher(nc, table) as watcher:
                assert level_of(table, "tasks.a") == 3
                await asyncio.to_thread(nats_server.restart)
                async with connected(nats_server.url, "writer") as wc:
                    store = await retrying(
                        lambda: PolicyStore.open(wc), (JetStreamUnavailable,), 15
                    )
                    level = CodecPolicy(algorithm="zstd", level=13)
                    await retrying(
                        lambda: store.set("tasks.a", level, author="r", reason="r"),
                        (JetStreamUnavailable,),
                        15,
                    )
                    # Within nats-py's own recovery of a lost watch (~20 s) this needs ours.
                    await eventually(lambda: level_of(table, "tasks.a") == 13)
                    assert watcher.stats().resyncs >= 1

    arun(main(), timeout=60)


def test_node_without_jetstream_runs_on_defaults(caplog: pytest.LogCaptureFixture) -> None:
    async def main() -> None:
        with NatsServer(jetstream=False) as server:
            async with connected(server.url, "node") as nc:
                table = PolicyTable()
                got: list[bytes] = []

                async def on_message(msg: Message) -> None:
                    got.append(msg.data)

                sub = await nc.subscribe("tasks.a", on_message)
                async with PolicyWatcher(nc, table) as watcher:
                    assert not watcher.ready.is_set()
                    assert table.codec_for("tasks.a") is None
                    await nc.publish("tasks.a", b"still here")
                    await eventually(lambda: got == [b"still here"])
                    # It keeps trying, and says so once.
                    await eventually(lambda: watcher.stats().failures >= 3)
                await sub.unsubscribe()

    with caplog.at_level(logging.WARNING, logger="mesh.policy"):
        arun(main())
    unavailable = [r for r in caplog.records if "JetStream" in r.message]
    assert len(unavailable) == 1


def test_watcher_resyncs_when_the_bucket_is_recreated(nats_url: str) -> None:
    """A watch broken with no reconnect (here: its stream deleted) is noticed and redone."""

    async def main() -> None:
        async with connected(nats_url, "writer") as wc, connected(nats_url, "node") as nc:
            store = await PolicyStore.open(wc)
            for level in (1, 2, 3):
                value = CodecPolicy(algorithm="zstd", level=level)
                await store.set("tasks.a", value, author="r", reason="r")
            await store.set("tasks.b", ZSTD, author="r", reason="r")
            table = PolicyTable()
            async with PolicyWatcher(nc, table) as watcher:
                assert table.versions() == {"codec.tasks.a": 3, "codec.tasks.b": 1}
                await wc.nc.jetstream().delete_key_value(BUCKET)
                store = await PolicyStore.open(wc)
                value = CodecPolicy(algorithm="zstd", level=17)
                await store.set("tasks.a", value, author="r", reason="r")
                # Revision and version 1, both below what the watcher saw: nats-py's own
                # recovery would resume after revision 4 and never see it, and the version
                # would look stale if the watcher did not know the bucket is a new one.
                await eventually(lambda: level_of(table, "tasks.a") == 17, timeout=30)
                await eventually(lambda: table.versions() == {"codec.tasks.a": 1})
                stats = watcher.stats()
                assert stats.resyncs >= 1
                assert stats.rejected_stale == 0

    arun(main(), timeout=60)


@pytest.mark.cluster
def test_store_replicates_when_asked(nats_cluster: NatsCluster) -> None:
    async def main() -> None:
        first, second = nats_cluster.urls[0], nats_cluster.urls[1]
        async with connected(first, "writer") as wc, connected(second, "node") as nc:
            store = await PolicyStore.open(wc, replicas=3)
            status = await store.kv.status()
            assert status.stream_info.config.num_replicas == 3
            table = PolicyTable()
            async with PolicyWatcher(nc, table):
                await store.set("tasks.a", ZSTD, author="r", reason="r")
                await eventually(lambda: level_of(table, "tasks.a") == 3)

    arun(main(), timeout=60)
