"""Body compression: the codec engine (pure), the dictionary store (real nats-server),
training and sampling, and hostile frames."""

from __future__ import annotations

import asyncio
import random
import tracemalloc
from pathlib import Path

import msgspec
import pytest
import zstandard
from _util import arun

from mesh import MeshClient
from mesh._bench_codec import demo_corpus, format_codec_bench, run_codec_bench
from mesh._codec import (
    DEFAULT_MAX_DECOMPRESSED,
    MISSING_BURST,
    CodecEngine,
    check_dictionary,
    dictionary_id,
)
from mesh._dictionaries import (
    BUCKET,
    MAX_META_BYTES,
    MIN_SAMPLES,
    DictionaryStore,
    _decode_description,
    _decode_object_info,
    sample_subject,
    train,
)
from mesh._errors import (
    DictionaryError,
    DictionaryNotFound,
    DictionaryTrainingFailed,
    InvalidPolicy,
    JetStreamUnavailable,
    MalformedMessage,
)
from mesh._policy import CodecPolicy
from mesh._server import NatsServer
from mesh._wire import Codec, ContentType, Envelope, Kind, decode_frame, encode_frame

SUBJECT = "tasks.summarize"


def _json_corpus(n: int, seed: int) -> list[bytes]:
    """Agent-style JSON messages: the same keys and phrasing, varying values."""
    rng = random.Random(seed)
    words = ("model", "token", "latency", "summary", "evidence", "source", "answer", "tool")
    return [
        msgspec.json.encode(
            {
                "task_id": f"task-{seed}-{i}",
                "agent": rng.choice(["planner", "researcher", "writer"]),
                "status": rng.choice(["ok", "partial", "retry"]),
                "summary": " ".join(rng.choice(words) for _ in range(40 + i % 30)),
                "sources": [
                    {"url": f"https://example.org/{rng.choice(words)}/{rng.randrange(999)}"}
                    for _ in range(1 + i % 4)
                ],
                "score": round(rng.random(), 3),
            }
        )
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def dictionary() -> bytes:
    return train(_json_corpus(600, seed=1), size=16 * 1024, subject=SUBJECT)


@pytest.fixture(scope="module")
def other_dictionary() -> bytes:
    return train(_json_corpus(600, seed=2), size=16 * 1024, subject=SUBJECT)


def _dictionary_with_id(dictionary: int) -> bytes:
    """A small trained dictionary carrying the id ``dictionary``."""
    samples = _json_corpus(150, seed=dictionary % 1000)
    return bytes(zstandard.train_dictionary(2048, samples, dict_id=dictionary).as_bytes())


def _zstd(level: int = 3, dictionary: int = 0, min_size: int = 0) -> CodecPolicy:
    return CodecPolicy(algorithm="zstd", level=level, dictionary=dictionary, min_size=min_size)


def _envelope(codec: Codec = Codec.ZSTD, dictionary: int = 0, level: int = 3) -> Envelope:
    return Envelope(id="i", sender="s", codec=codec, dictionary=dictionary, level=level)


def _compress(
    data: bytes,
    dictionary: bytes | None = None,
    *,
    write_checksum: bool = True,
    write_content_size: bool = True,
    write_dict_id: bool = True,
) -> bytes:
    compressor = zstandard.ZstdCompressor(
        level=3,
        dict_data=None if dictionary is None else zstandard.ZstdCompressionDict(dictionary),
        write_checksum=write_checksum,
        write_content_size=write_content_size,
        write_dict_id=write_dict_id,
    )
    return compressor.compress(data)


# ------------------------------------------------------------------ wire fields


def test_frame_from_an_older_sender_decodes_with_zero_codec_fields() -> None:
    # The envelope as the first release wrote it: nine fields, no dictionary or level.
    old = ["id-1", "agent", int(Kind.REQUEST), 5, 6, 1, "", 0, int(ContentType.JSON)]
    header = msgspec.msgpack.encode(old)
    frame = bytes((0xC1, 1)) + len(header).to_bytes(2, "big") + header + b"{}"
    envelope, body = decode_frame(frame, SUBJECT)
    assert envelope == Envelope(
        id="id-1", sender="agent", kind=Kind.REQUEST, created=5, deadline=6, priority=1
    )
    assert (envelope.codec, envelope.dictionary, envelope.level) == (Codec.NONE, 0, 0)
    assert bytes(body) == b"{}"


def test_codec_fields_round_trip_in_a_frame() -> None:
    envelope = _envelope(Codec.ZSTD, dictionary=2**32 - 1, level=19)
    decoded, _ = decode_frame(encode_frame(envelope, b"x"))
    assert decoded == envelope


def test_unknown_codec_value_on_the_wire_is_malformed() -> None:
    header = msgspec.msgpack.encode(["i", "s", 0, 0, 0, 0, "", 9, 1])
    frame = bytes((0xC1, 1)) + len(header).to_bytes(2, "big") + header
    with pytest.raises(MalformedMessage):
        decode_frame(frame, SUBJECT)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize(
    ("level", "with_dictionary"), [(1, False), (3, False), (19, False), (3, True), (9, True)]
)
def test_round_trip(level: int, with_dictionary: bool, dictionary: bytes) -> None:
    engine = CodecEngine()
    dictionary_id = engine.add_dictionary(dictionary) if with_dictionary else 0
    policy = _zstd(level, dictionary_id, min_size=64)
    for body in _json_corpus(20, seed=7):
        wire, codec, used, used_level = engine.encode(body, policy)
        assert (codec, used, used_level) == (Codec.ZSTD, dictionary_id, level)
        assert len(wire) < len(body)
        envelope = _envelope(codec, used, used_level)
        frame_envelope, frame_body = decode_frame(encode_frame(envelope, wire), SUBJECT)
        assert engine.decode_cached(frame_body, frame_envelope, SUBJECT) == body
        assert arun(engine.decode(frame_body, frame_envelope, SUBJECT)) == body
    assert engine.stats.compressed == 20
    assert engine.stats.decode_failures == 0


def test_policy_none_sends_raw_and_decode_is_a_copy() -> None:
    engine = CodecEngine()
    body = b'{"a": 1}' * 100
    assert engine.encode(body, CodecPolicy()) == (body, Codec.NONE, 0, 0)
    assert arun(engine.decode(memoryview(body), _envelope(Codec.NONE), SUBJECT)) == body
    assert engine.stats.raw_sent == 0  # "none" is not a zstd body left raw


def test_below_threshold_sends_raw() -> None:
    engine = CodecEngine()
    body = b"a" * 255
    assert engine.encode(body, _zstd(min_size=256)) == (body, Codec.NONE, 0, 0)
    assert engine.encode(body + b"a", _zstd(min_size=256))[1] is Codec.ZSTD
    assert engine.stats.raw_sent == 1
    assert engine.stats.compressed == 1


def test_incompressible_body_sends_raw() -> None:
    engine = CodecEngine()
    body = random.Random(0).randbytes(2000)
    assert engine.encode(body, _zstd()) == (body, Codec.NONE, 0, 0)
    assert engine.stats.raw_sent == 1


def test_policy_with_a_dictionary_not_loaded_sends_raw() -> None:
    engine = CodecEngine()
    body = _json_corpus(1, seed=3)[0]
    assert engine.encode(body, _zstd(dictionary=123_456)) == (body, Codec.NONE, 0, 0)
    assert engine.stats.missing_dictionary == 1


@pytest.mark.parametrize(
    "policy",
    [
        _zstd(level=0),
        _zstd(level=20),
        _zstd(dictionary=-1),
        _zstd(dictionary=2**32),
        _zstd(min_size=-1),
    ],
)
def test_invalid_policy_is_refused(policy: CodecPolicy) -> None:
    engine = CodecEngine()
    with pytest.raises(InvalidPolicy):
        arun(engine.prepare(policy))
    with pytest.raises(InvalidPolicy):
        engine.encode(b"x" * 1000, policy)


def test_prepare_without_a_store_cannot_load_a_dictionary() -> None:
    with pytest.raises(DictionaryNotFound) as info:
        arun(CodecEngine().prepare(_zstd(dictionary=4242)))
    assert info.value.dictionary == 4242


def test_caches_are_bounded_and_count_evictions() -> None:
    engine = CodecEngine()
    body = _json_corpus(1, seed=4)[0]
    for level in range(1, 20):
        for min_size in (0, 1):  # same compressor key: min_size is not part of it
            engine.encode(body, _zstd(level, min_size=min_size))
    assert engine.stats.evictions == 0
    dictionaries = [train(_json_corpus(120, seed=s), size=2048) for s in range(20)]
    for data in dictionaries:
        engine.encode(body, _zstd(3, engine.add_dictionary(data)))
    assert engine.stats.evictions > 0
    assert engine.stats.compressed == 19 * 2 + 20


def test_add_dictionary_refuses_non_dictionaries() -> None:
    with pytest.raises(ValueError, match="not a zstd dictionary"):
        CodecEngine().add_dictionary(b"just some bytes, no dictionary header")


# ------------------------------------------------------------------ hostile frames


def _refused(engine: CodecEngine, body: bytes, envelope: Envelope) -> MalformedMessage:
    with pytest.raises(MalformedMessage) as info:
        engine.decode_cached(body, envelope, SUBJECT)
    with pytest.raises(MalformedMessage):
        arun(engine.decode(body, envelope, SUBJECT))
    assert info.value.subject == SUBJECT
    return info.value


def _frame_header(content_size: int, window_log: int, *, checksum: bool = True) -> bytes:
    """A zstd frame that declares ``content_size`` and holds 5 raw bytes."""
    descriptor = (2 << 6) | (int(checksum) << 2)  # 4-byte content size, windowed
    block = (1 | (5 << 3)).to_bytes(3, "little") + b"hello"  # last, raw, 5 bytes
    return (
        b"\x28\xb5\x2f\xfd"
        + bytes((descriptor, (window_log - 10) << 3))
        + content_size.to_bytes(4, "little")
        + block
        + b"\0" * 4
    )


def test_truncated_frames_are_refused() -> None:
    engine = CodecEngine()
    frame = _compress(_json_corpus(1, seed=5)[0])
    for cut in range(len(frame)):
        _refused(engine, frame[:cut], _envelope())
    assert engine.stats.decode_failures == 2 * len(frame)


def test_any_flipped_bit_is_refused_or_harmless() -> None:
    body = b'{"summary": "the quick brown fox", "n": 1}' * 3
    frame = _compress(body)
    engine = CodecEngine()
    for position in range(len(frame)):
        for bit in range(8):
            damaged = bytearray(frame)
            damaged[position] ^= 1 << bit
            try:
                decoded = engine.decode_cached(bytes(damaged), _envelope(), SUBJECT)
            except MalformedMessage:
                continue
            assert decoded == body  # e.g. a larger window: never a different body


def test_flipped_checksum_is_refused() -> None:
    frame = bytearray(_compress(b"abc" * 200))
    frame[-1] ^= 0x01
    assert "checksum" in _refused(CodecEngine(), bytes(frame), _envelope()).reason


def test_trailing_data_is_refused() -> None:
    frame = _compress(b"abc" * 200)
    for tail in (b"\0", frame):
        _refused(CodecEngine(), frame + tail, _envelope())


def test_not_a_zstd_frame_is_refused() -> None:
    reason = _refused(CodecEngine(), b'{"plain": "json"}', _envelope()).reason
    assert "not a zstd frame" in reason


def test_huge_declared_size_is_refused_without_allocating() -> None:
    engine = CodecEngine()
    frame = _frame_header(1 << 30, window_log=20)
    tracemalloc.start()
    try:
        with pytest.raises(MalformedMessage) as info:
            engine.decode_cached(frame, _envelope(), SUBJECT)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    reason = info.value.reason
    assert str(1 << 30) in reason
    assert str(DEFAULT_MAX_DECOMPRESSED) in reason
    assert peak < 1024 * 1024


def test_window_over_the_limit_is_refused() -> None:
    reason = _refused(CodecEngine(), _frame_header(5, window_log=27), _envelope()).reason
    assert "window" in reason


def test_frame_without_content_size_is_refused() -> None:
    frame = _compress(b"abc" * 200, write_content_size=False)
    assert "content size" in _refused(CodecEngine(), frame, _envelope()).reason


def test_frame_without_checksum_is_refused() -> None:
    frame = _compress(b"abc" * 200, write_checksum=False)
    assert "checksum" in _refused(CodecEngine(), frame, _envelope()).reason


def test_size_limit_is_the_engine_setting() -> None:
    engine = CodecEngine(max_decompressed=1000)
    assert engine.decode_cached(_compress(b"a" * 1000), _envelope(), SUBJECT) == b"a" * 1000
    assert "over the 1000-byte" in _refused(engine, _compress(b"a" * 1001), _envelope()).reason


def test_frame_dictionary_must_match_the_envelope(
    dictionary: bytes, other_dictionary: bytes
) -> None:
    engine = CodecEngine()
    first = engine.add_dictionary(dictionary)
    second = engine.add_dictionary(other_dictionary)
    body = _json_corpus(1, seed=9)[0]
    with_first = _compress(body, dictionary)
    assert engine.decode_cached(with_first, _envelope(dictionary=first), SUBJECT) == body
    for claimed in (second, 0):
        reason = _refused(engine, with_first, _envelope(dictionary=claimed)).reason
        assert f"uses dictionary {first}" in reason
    plain = _compress(body)
    _refused(engine, plain, _envelope(dictionary=first))
    no_id = _compress(body, dictionary, write_dict_id=False)
    _refused(engine, no_id, _envelope(dictionary=first))


def test_unknown_codec_and_bad_dictionary_ids_are_refused() -> None:
    engine = CodecEngine()
    frame = _compress(b"abc" * 200)
    unknown = Envelope(id="i", sender="s", codec=7)  # type: ignore[arg-type]
    assert "unknown codec 7" in _refused(engine, frame, unknown).reason
    for bad in (-1, 2**40):
        assert "out of range" in _refused(engine, frame, _envelope(dictionary=bad)).reason


def test_unknown_dictionary_without_a_store_names_the_id() -> None:
    frame = _compress(b"abc" * 200, _dictionary_with_id(777_777))
    reason = _refused(CodecEngine(), frame, _envelope(dictionary=777_777)).reason
    assert "777777" in reason


# ------------------------------------------------------------------ training


def test_training_with_too_few_samples_fails_clearly() -> None:
    with pytest.raises(DictionaryTrainingFailed) as info:
        train([b"x" * 256] * 12, subject=SUBJECT)
    assert info.value.subject == SUBJECT
    assert "only 12 messages (3 KiB) sampled" in info.value.reason
    assert f"at least {MIN_SAMPLES} messages / 8 KiB" in info.value.reason
    with pytest.raises(DictionaryTrainingFailed, match="only 500 messages"):
        train([b"{}"] * 500)  # enough messages, too few bytes


def test_trained_dictionary_has_a_private_random_id(dictionary: bytes) -> None:
    dictionary_id = zstandard.ZstdCompressionDict(dictionary).dict_id()
    assert 32_768 <= dictionary_id < 2**31
    again = train(_json_corpus(600, seed=1), size=16 * 1024)
    assert zstandard.ZstdCompressionDict(again).dict_id() != dictionary_id


def test_dictionary_improves_the_ratio_on_repetitive_json() -> None:
    corpus = [p.body for p in demo_corpus(1200, seed=0)]
    measured = [b for b in corpus[:600] if len(b) >= 256]
    data = train([p.body for p in demo_corpus(1200, seed=0, training=True)])
    engine = CodecEngine()
    with_dictionary = _zstd(3, engine.add_dictionary(data))

    def ratio(policy: CodecPolicy) -> float:
        wire = sum(len(engine.encode(body, policy)[0]) for body in measured)
        return sum(map(len, measured)) / wire

    plain, trained = ratio(_zstd(3)), ratio(with_dictionary)
    assert plain > 1.2
    assert trained > plain * 1.3


def test_codec_bench_reports_every_option() -> None:
    result = run_codec_bench(messages=150, seed=3, min_cpu_seconds=0)
    assert [row.name for row in result.rows] == [
        "none",
        "zstd:1",
        "zstd:3",
        "zstd:3+dict",
        "zstd:9+dict",
    ]
    assert result.rows[0].wire_bytes == result.rows[0].raw_bytes
    assert result.rows[3].wire_bytes < result.rows[2].wire_bytes < result.rows[0].wire_bytes
    text = format_codec_bench(result)
    assert "median" in text
    assert "p90" in text
    assert "zstd:9+dict" in text


# ------------------------------------------------------------------ the store


def test_store_put_get_list(nats_url: str, dictionary: bytes) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="dicts") as client:
            store = await DictionaryStore.open(client)
            assert await store.list() == []
            dictionary_id = await store.put(dictionary, subject=SUBJECT, level=3, samples=600)
            assert dictionary_id == zstandard.ZstdCompressionDict(dictionary).dict_id()
            assert await store.put(dictionary) == dictionary_id  # the same again: a no-op
            fresh = await DictionaryStore.open(client, create=False)
            assert await fresh.get(dictionary_id) == dictionary
            assert await fresh.get(dictionary_id) == dictionary
            assert (fresh.stats.fetches, fresh.stats.hits) == (1, 1)
            [info] = await fresh.list()
            assert (info.id, info.size, info.subject) == (dictionary_id, len(dictionary), SUBJECT)
            assert (info.level, info.samples) == (3, 600)
            assert info.created > 0

    arun(main())


def test_store_refuses_what_is_not_a_dictionary(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="dicts") as client:
            store = await DictionaryStore.open(client)
            with pytest.raises(ValueError, match="not a zstd dictionary"):
                await store.put(b"plain bytes")

    arun(main())


def test_store_refuses_a_different_dictionary_under_a_used_id(
    nats_url: str, dictionary: bytes
) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="dicts") as client:
            store = await DictionaryStore.open(client)
            await store.put(dictionary)
            forged = dictionary[:-1] + bytes((dictionary[-1] ^ 1,))
            with pytest.raises(DictionaryError, match="already stored"):
                await store.put(forged)

    arun(main())


def test_missing_dictionary_is_not_found(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="dicts") as client:
            empty = await DictionaryStore.open(client, create=False)
            with pytest.raises(DictionaryNotFound, match="ever stored"):
                await empty.get(123_456)
            store = await DictionaryStore.open(client)
            with pytest.raises(DictionaryNotFound) as info:
                await store.get(123_456)
            assert info.value.dictionary == 123_456
            assert "123456" in str(info.value)

    arun(main())


def test_concurrent_gets_share_one_fetch(nats_url: str, dictionary: bytes) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="dicts") as client:
            dictionary_id = await (await DictionaryStore.open(client)).put(dictionary)
            store = await DictionaryStore.open(client)
            found = await asyncio.gather(*(store.get(dictionary_id) for _ in range(50)))
            assert found == [dictionary] * 50
            assert store.stats.fetches == 1
            missing = await asyncio.gather(
                *(store.get(999_999) for _ in range(20)), return_exceptions=True
            )
            assert all(isinstance(e, DictionaryNotFound) for e in missing)
            assert store.stats.fetches == 2

    arun(main())


def test_a_cancelled_fetch_leaves_the_waiters_served(nats_url: str, dictionary: bytes) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="dicts") as client:
            dictionary_id = await (await DictionaryStore.open(client)).put(dictionary)
            store = await DictionaryStore.open(client)
            leader = asyncio.create_task(store.get(dictionary_id))
            await asyncio.sleep(0)  # the leader's fetch is under way
            waiters = [asyncio.create_task(store.get(dictionary_id)) for _ in range(5)]
            await asyncio.sleep(0)  # the waiters wait on it
            leader.cancel()
            assert await asyncio.gather(*waiters) == [dictionary] * 5
            assert leader.cancelled()
            assert store.stats.fetches == 2  # the cancelled one, and one for the waiters

    arun(main())


def test_a_hung_store_times_out(nats_server: NatsServer, dictionary: bytes) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_server.url, name="dicts") as client:
            dictionary_id = await (await DictionaryStore.open(client)).put(dictionary)
            store = await DictionaryStore.open(client, timeout=0.5)
            nats_server.pause()
            try:
                with pytest.raises(DictionaryNotFound, match=r"did not answer within 0\.5s"):
                    await store.get(dictionary_id)
            finally:
                nats_server.resume()

    arun(main())


def test_store_cache_is_bounded(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="dicts") as client:
            writer = await DictionaryStore.open(client)
            ids = [await writer.put(train(_json_corpus(120, seed=s), size=2048)) for s in range(3)]
            store = await DictionaryStore.open(client, cache_size=2)
            for dictionary_id in ids:
                await store.get(dictionary_id)
            assert store.stats.evictions == 1
            await store.get(ids[2])  # still cached
            await store.get(ids[0])  # pushed out: read again
            assert store.stats.fetches == 4
            assert store.stats.hits == 1

    arun(main())


def test_store_needs_jetstream(tmp_path: Path) -> None:
    async def main(url: str) -> None:
        async with await MeshClient.connect(url, name="dicts") as client:
            with pytest.raises(JetStreamUnavailable, match="JetStream"):
                await DictionaryStore.open(client)

    with NatsServer(jetstream=False, store_dir=tmp_path / "store") as server:
        arun(main(server.url))


def test_engine_fetches_an_unseen_dictionary_once(nats_url: str, dictionary: bytes) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="dicts") as client:
            dictionary_id = await (await DictionaryStore.open(client)).put(dictionary)
            store = await DictionaryStore.open(client)
            engine = CodecEngine(store)
            bodies = _json_corpus(10, seed=11)
            envelope = _envelope(dictionary=dictionary_id)
            frames = [_compress(body, dictionary) for body in bodies]
            assert engine.decode_cached(frames[0], envelope, SUBJECT) is None
            decoded = await asyncio.gather(*(engine.decode(f, envelope, SUBJECT) for f in frames))
            assert decoded == bodies
            assert engine.stats.dictionary_fetches == 1
            assert store.stats.fetches == 1
            assert engine.decode_cached(frames[1], envelope, SUBJECT) == bodies[1]

    arun(main())


def test_engine_prepare_loads_the_policy_dictionary(nats_url: str, dictionary: bytes) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="dicts") as client:
            store = await DictionaryStore.open(client)
            dictionary_id = await store.put(dictionary)
            engine = CodecEngine(await DictionaryStore.open(client))
            policy = _zstd(3, dictionary_id)
            body = _json_corpus(1, seed=12)[0]
            assert engine.encode(body, policy)[1] is Codec.NONE
            await engine.prepare(policy)
            _, codec, used, _ = engine.encode(body, policy)
            assert (codec, used) == (Codec.ZSTD, dictionary_id)
            with pytest.raises(DictionaryNotFound):
                await engine.prepare(_zstd(3, 555_555))

    arun(main())


def test_engine_decode_with_an_unknown_dictionary_names_it(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="dicts") as client:
            store = await DictionaryStore.open(client)
            engine = CodecEngine(store)
            envelope = _envelope(dictionary=424_242)
            frame = _compress(b"abc" * 100, _dictionary_with_id(424_242))
            for _ in range(3):
                with pytest.raises(MalformedMessage, match="dictionary 424242") as info:
                    await engine.decode(frame, envelope, SUBJECT)
                assert info.value.subject == SUBJECT
            assert store.stats.fetches == 1  # recently missing: not asked again at once
            assert engine.stats.decode_failures == 3

    arun(main())


# ------------------------------------------------------------------ sampling


def test_sample_subject_collects_raw_bodies(nats_url: str, dictionary: bytes) -> None:
    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="sampler") as client,
            await MeshClient.connect(nats_url, name="sender") as sender,
        ):
            store = await DictionaryStore.open(client)
            dictionary_id = await store.put(dictionary)
            bodies = _json_corpus(6, seed=13)
            started = asyncio.Event()
            sampling = asyncio.create_task(
                sample_subject(
                    client,
                    "tasks.>",
                    max_messages=5,
                    seconds=20,
                    codec=CodecEngine(store),
                    started=started,
                )
            )
            await asyncio.wait_for(started.wait(), 10)
            plain = encode_frame(Envelope(id="1", sender="s"), bodies[0])
            zstd = encode_frame(_envelope(Codec.ZSTD), _compress(bodies[1]))
            with_dict = encode_frame(
                _envelope(Codec.ZSTD, dictionary_id), _compress(bodies[2], dictionary)
            )
            bad = encode_frame(_envelope(Codec.ZSTD), b"not zstd")
            for data in (plain, zstd, with_dict, bad, bodies[3], bodies[4], bodies[5]):
                await sender.nc.publish("tasks.a", data)
            await sender.flush()
            assert await sampling == bodies[:3] + bodies[3:5]

    arun(main())


def test_sample_subject_stops_after_its_time(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="sampler") as client:
            assert await sample_subject(client, "quiet.>", seconds=0.1) == []
            assert client.stats().received == 0

    arun(main())


# ------------------------------------------------------------------ more hostile frames


def _with_dictionary_id(frame: bytes, dictionary: int) -> bytes:
    """``frame`` claiming dictionary ``dictionary`` instead: its 4-byte id field rewritten."""
    descriptor = frame[4]
    assert descriptor & 0x03 == 3, "the frame must carry a 4-byte dictionary id"
    at = 5 if descriptor & 0x20 else 6  # after the window byte unless single-segment
    return frame[:at] + dictionary.to_bytes(4, "little") + frame[at + 4 :]


def test_declared_size_must_be_the_actual_size() -> None:
    frame = _compress(b"hello world" * 3)  # single segment: a one-byte content size
    assert zstandard.get_frame_parameters(frame).content_size == 33
    engine = CodecEngine()
    for declared in (32, 34, 200):
        damaged = bytearray(frame)
        damaged[5] = declared
        assert zstandard.get_frame_parameters(bytes(damaged)).content_size == declared
        _refused(engine, bytes(damaged), _envelope())


def test_a_frame_declaring_no_content_is_checked_to_its_end() -> None:
    # zstandard's one-shot decompress() returns b"" for such a frame without reading on.
    empty = _compress(b"")
    assert zstandard.get_frame_parameters(empty).content_size == 0
    engine = CodecEngine()
    assert engine.decode_cached(empty, _envelope(), SUBJECT) == b""
    assert engine.decode_cached(memoryview(empty), _envelope(), SUBJECT) == b""
    damaged = [
        empty + b"\0",
        empty + empty,
        empty[:-1],
        empty[:-1] + bytes((empty[-1] ^ 1,)),  # the checksum
        empty[:6] + b"\xff" * 20,
    ]
    for body in damaged:
        _refused(engine, body, _envelope())
    assert engine.stats.decode_failures == 2 * len(damaged)


def test_skippable_frames_are_refused() -> None:
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"data"
    for body in (skippable, skippable + _compress(b"abc" * 200)):
        _refused(CodecEngine(), body, _envelope())


def _corrupt_dictionary(dictionary: bytes) -> bytes:
    """``dictionary`` with its header and id intact and its entropy tables garbled."""
    return dictionary[:8] + b"\xff" * 64 + dictionary[72:]


def test_a_dictionary_zstd_cannot_load_is_refused(dictionary: bytes) -> None:
    corrupt = _corrupt_dictionary(dictionary)
    assert dictionary_id(corrupt) == dictionary_id(dictionary)
    with pytest.raises(ValueError, match="cannot load dictionary"):
        check_dictionary(corrupt)
    engine = CodecEngine()
    with pytest.raises(ValueError, match="cannot load dictionary"):
        engine.add_dictionary(corrupt)
    frame = _compress(b"abc" * 200, dictionary)
    reason = _refused(engine, frame, _envelope(dictionary=dictionary_id(dictionary))).reason
    assert "no dictionary store" in reason  # never installed


def test_the_frame_header_is_checked_before_a_dictionary_is_fetched(
    nats_url: str, dictionary: bytes
) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="dicts") as client:
            store = await DictionaryStore.open(client)
            engine = CodecEngine(store)
            unknown = _envelope(dictionary=5_555_555)
            good_header = _with_dictionary_id(_compress(b"abc" * 200, dictionary), 5_555_555)
            hopeless = [
                b"garbage, not zstd",
                good_header[:8],  # truncated
                _with_dictionary_id(_compress(b"abc" * 200, dictionary), 6_666_666),
                _with_dictionary_id(
                    _compress(b"abc" * 200, dictionary, write_checksum=False), 5_555_555
                ),
            ]
            for body in hopeless:
                with pytest.raises(MalformedMessage):
                    await engine.decode(body, unknown, SUBJECT)
            assert store.stats.fetches == 0
            assert engine.decode_cached(good_header, unknown, SUBJECT) is None  # worth a fetch
            with pytest.raises(MalformedMessage, match="unavailable"):
                await engine.decode(good_header, unknown, SUBJECT)
            assert store.stats.fetches == 1

    arun(main())


def test_fetches_of_unknown_dictionaries_are_bounded(nats_url: str, dictionary: bytes) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="dicts") as client:
            store = await DictionaryStore.open(client)
            engine = CodecEngine(store)
            frame = _compress(b"abc" * 200, dictionary)
            sent = MISSING_BURST + 20
            for i in range(sent):
                invented = 1_000_000 + i
                with pytest.raises(MalformedMessage, match=str(invented)):
                    await engine.decode(
                        _with_dictionary_id(frame, invented),
                        _envelope(dictionary=invented),
                        SUBJECT,
                    )
            stats = engine.stats
            assert stats.decode_failures == sent
            # The burst, and what the budget regained while they were refused.
            assert MISSING_BURST <= store.stats.fetches < sent
            assert stats.fetches_refused == sent - store.stats.fetches
            # A dictionary the store has is still fetched and used: it costs no budget.
            real = dictionary_id(dictionary)
            await store.put(dictionary)
            with pytest.raises(MalformedMessage, match="not fetched"):
                await engine.decode(frame, _envelope(dictionary=real), SUBJECT)

    arun(main())


def test_a_corrupt_stored_dictionary_is_refused_as_malformed(
    nats_url: str, dictionary: bytes
) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="dicts") as client:
            store = await DictionaryStore.open(client)
            corrupt = _corrupt_dictionary(dictionary)
            with pytest.raises(ValueError, match="cannot load dictionary"):
                await store.put(corrupt)
            # Another writer of the bucket stores it anyway, under the name put() would use.
            bucket = await client.nc.jetstream().object_store(BUCKET)
            real = dictionary_id(dictionary)
            await bucket.put(f"dict-{real}", corrupt)
            engine = CodecEngine(await DictionaryStore.open(client))
            frame = _compress(b"abc" * 200, dictionary)
            with pytest.raises(MalformedMessage, match="no usable one"):
                await engine.decode(frame, _envelope(dictionary=real), SUBJECT)
            assert engine.stats.decode_failures == 1

    arun(main())


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        (b'{"name": "dict-1", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}", "nests too deeply"),
        (b'{"name": "\xff"}', "(?i)utf-8"),
        (b"x" * (MAX_META_BYTES + 1), "over"),
        (b"[1, 2]", "Expected `object`"),
    ],
)
def test_unreadable_object_metadata_is_a_value_error(meta: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _decode_object_info(meta)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('{"subject": "t", "tool": "other"}', "unknown field"),
        ("free text", "malformed"),
        ('{"subject": "t", "x": ' + "[" * 10_000 + "]" * 10_000 + "}", "unknown field"),
    ],
)
def test_a_description_written_elsewhere_is_refused(text: str, match: str) -> None:
    ours = '{"subject": "tasks.x", "created": 5, "level": 3, "samples": 9}'
    assert _decode_description(ours).samples == 9
    with pytest.raises(ValueError, match=match):
        _decode_description(text)
