"""The policy plane end to end against a real nats-server: a codec value written to
the bucket reaches running nodes, changes the bytes on the wire and nothing else.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec
import pytest
import zstandard
from _util import arun, eventually

from mesh import MeshClient, RemoteError
from mesh._dictionaries import DictionaryStore, train
from mesh._enforcer import APPLIED_SUBJECT, PolicyApplied, PolicyEnforcer, decode_applied
from mesh._message import Message
from mesh._policy import CodecPolicy, PolicyRecord, PolicyTable, policy_key
from mesh._policy_store import PolicyStore
from mesh._wire import Codec, ContentType, Envelope, Kind, decode_frame, encode_frame
from nodes import Node, NodeRuntime
from topology._snapshot import TELEMETRY_SUBJECT, Snapshot, decode_snapshot


def document(i: int) -> dict[str, Any]:
    """Agent-style JSON: repetitive keys and phrases, varying values."""
    return {
        "task_id": f"task-{i:06d}",
        "agent": "researcher",
        "status": "done" if i % 3 else "pending",
        "summary": f"The research on topic {i % 17} found {i % 5} relevant sources "
        "about distributed systems, message buses and agent coordination.",
        "sources": [{"url": f"https://example.org/paper/{i * 7 % 101}", "score": i % 10}],
    }


def make_node(seen: list[Any]) -> Node:
    node = Node("sink", max_concurrency=4)

    @node.handles("z.docs")
    async def docs(message: dict) -> dict:  # type: ignore[type-arg]
        seen.append(message)
        return {"echo": message}

    return node


class Wire:
    """A raw nats-py subscriber: the exact frames on the wire."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    async def start(self, client: MeshClient, subject: str) -> None:
        async def keep(msg: Any) -> None:
            self.frames.append(msg.data)

        await client.nc.subscribe(subject, cb=keep)
        await client.flush()

    def envelopes(self) -> list[Envelope]:
        return [decode_frame(f)[0] for f in self.frames]


async def acks_for(client: MeshClient, into: list[PolicyApplied]) -> None:
    async def on_ack(msg: Message) -> None:
        into.append(decode_applied(msg.data))

    await client.subscribe(f"{APPLIED_SUBJECT}.>", on_ack, internal=True)
    await client.flush()


def test_codec_policy_reaches_a_node_and_compresses_its_traffic(nats_url: str) -> None:
    async def main() -> None:
        seen: list[Any] = []
        acks: list[PolicyApplied] = []
        async with (
            await MeshClient.connect(nats_url, name="sender") as sender,
            await MeshClient.connect(nats_url, name="sink") as nc,
            await MeshClient.connect(nats_url, name="operator") as op,
        ):
            store = await PolicyStore.open(op)
            await acks_for(op, acks)
            runtime = NodeRuntime(make_node(seen), nc, register=False)
            await runtime.start()
            enforcer = PolicyEnforcer(sender, agent="sender", instance="sender-1")
            await enforcer.start()
            wire = Wire()
            await wire.start(op, "z.docs")

            await sender.publish("z.docs", document(0))
            record = await store.set(
                "z.docs",
                CodecPolicy(algorithm="zstd", level=3, min_size=64),
                author="test",
                reason="docs are large and repetitive",
            )
            key = policy_key("z.docs", "codec")
            await eventually(
                lambda: (
                    {a.instance for a in acks if a.key == key and a.version == 1}
                    >= {"sender-1", runtime.instance}
                )
            )
            assert record.version == 1
            reply = await sender.request("z.docs", document(1))
            await sender.publish("z.docs", document(2))
            await eventually(lambda: len(seen) == 3 and len(wire.frames) == 3)
            assert seen == [document(0), document(1), document(2)]  # nothing else changed
            assert reply == {"echo": document(1)}
            codecs = [e.codec for e in wire.envelopes()]
            assert codecs == [Codec.NONE, Codec.ZSTD, Codec.ZSTD]
            assert wire.envelopes()[1].level == 3
            plain = json.dumps(document(1), separators=(",", ":")).encode()
            assert len(decode_frame(wire.frames[1])[1]) < len(plain)

            # Removing the section turns compression off again on every node.
            await store.delete("z.docs", author="test", reason="done")
            await eventually(lambda: any(a.key == key and a.version == 0 for a in acks))
            await eventually(lambda: sender.policy is not None and len(sender.policy) == 0)
            await sender.publish("z.docs", document(3))
            await eventually(lambda: len(wire.frames) == 4)
            assert wire.envelopes()[3].codec == Codec.NONE
            await enforcer.aclose()
            await runtime.aclose()

    arun(main())


def test_a_dictionary_is_fetched_once_by_the_receiver(nats_url: str) -> None:
    async def main() -> None:
        seen: list[Any] = []
        async with (
            await MeshClient.connect(nats_url, name="sender") as sender,
            await MeshClient.connect(nats_url, name="sink") as nc,
            await MeshClient.connect(nats_url, name="operator") as op,
        ):
            samples = [msgspec.json.encode(document(i)) for i in range(400)]
            data = train(samples, size=16 * 1024, subject="z.docs")
            dictionaries = await DictionaryStore.open(op)
            dict_id = await dictionaries.put(data, subject="z.docs", samples=len(samples))
            store = await PolicyStore.open(op)
            await store.set(
                "z.docs",
                CodecPolicy(algorithm="zstd", level=3, dictionary=dict_id, min_size=64),
                author="test",
                reason="trained",
            )
            runtime = NodeRuntime(make_node(seen), nc, register=False)
            await runtime.start()
            enforcer = PolicyEnforcer(sender, agent="sender", instance="sender-1")
            await enforcer.start()
            assert sender.codec.stats.dictionary_fetches == 1  # before the policy applied
            wire = Wire()
            await wire.start(op, "z.docs")
            for i in range(1000, 1010):
                await sender.publish("z.docs", document(i))
            await eventually(lambda: len(seen) == 10)
            assert seen == [document(i) for i in range(1000, 1010)]
            envelopes = wire.envelopes()
            assert {e.dictionary for e in envelopes} == {dict_id}
            assert nc.codec.stats.dictionary_fetches == 1
            with_dict = sum(len(f) for f in wire.frames)
            plain = sum(len(msgspec.json.encode(document(i))) for i in range(1000, 1010))
            assert with_dict * 2 < plain  # a trained dictionary at least halves these
            await enforcer.aclose()
            await runtime.aclose()

    arun(main())


def test_a_frame_whose_dictionary_is_unobtainable_is_refused_and_reported(
    nats_url: str,
) -> None:
    async def main() -> None:
        seen: list[Any] = []
        snaps: list[Snapshot] = []
        async with (
            await MeshClient.connect(nats_url, name="rogue") as rogue,
            await MeshClient.connect(nats_url, name="sink") as nc,
            await MeshClient.connect(nats_url, name="watcher") as watcher,
        ):

            async def on_snapshot(msg: Message) -> None:
                snaps.append(decode_snapshot(msg.data))

            await watcher.subscribe(f"{TELEMETRY_SUBJECT}.>", on_snapshot, internal=True)
            await watcher.flush()
            runtime = NodeRuntime(make_node(seen), nc, register=False, telemetry_interval=0.2)
            await runtime.start()
            # A dictionary the store never had: the receiver cannot decode with it.
            samples = [msgspec.json.encode(document(i)) for i in range(400)]
            secret = zstandard.ZstdCompressionDict(train(samples, size=8 * 1024))
            body = zstandard.ZstdCompressor(dict_data=secret, write_checksum=True).compress(
                msgspec.json.encode(document(7))
            )
            frame = encode_frame(
                Envelope(
                    id="x1",
                    sender="rogue",
                    kind=Kind.REQUEST,
                    codec=Codec.ZSTD,
                    content_type=ContentType.JSON,
                    dictionary=secret.dict_id(),
                    level=3,
                ),
                body,
            )
            reply = await rogue.nc.request("z.docs", frame, timeout=5)
            with pytest.raises(RemoteError) as info:
                await rogue._read_reply("z.docs", reply, Any)
            assert info.value.error_type == "MalformedMessage"
            assert str(secret.dict_id()) in info.value.error_message
            await eventually(
                lambda: any(r.decode_failures.get("rogue") for s in snaps for r in s.received),
                message="the sender is told through telemetry",
            )
            assert seen == []  # never handed to the handler mis-decoded
            await runtime.aclose()

    arun(main())


def test_a_forged_policy_value_is_ignored_and_counted(nats_url: str) -> None:
    async def main() -> None:
        snaps: list[Snapshot] = []
        async with (
            await MeshClient.connect(nats_url, name="sink") as nc,
            await MeshClient.connect(nats_url, name="operator") as op,
        ):

            async def on_snapshot(msg: Message) -> None:
                snaps.append(decode_snapshot(msg.data))

            await op.subscribe(f"{TELEMETRY_SUBJECT}.>", on_snapshot, internal=True)
            store = await PolicyStore.open(op)
            good = CodecPolicy(algorithm="zstd", level=5)
            await store.set("z.docs", good, author="test", reason="good")
            runtime = NodeRuntime(make_node([]), nc, register=False, telemetry_interval=0.2)
            await runtime.start()
            assert nc.policy is not None
            assert nc.policy.codec_for("z.docs") == good
            key = policy_key("z.docs", "codec")
            await store.kv.put(key, b'{"subject": "z.docs", "version": 99')  # garbage
            impossible = (
                b'{"subject":"z.docs","version":7,"author":"x","reason":"y","time":1,'
                b'"value":{"section":"codec","algorithm":"zstd","level":42}}'
            )
            await store.kv.put(key, impossible)
            await eventually(
                lambda: sum(s.policy_rejected for s in snaps) >= 2,
                message="rejections are counted in telemetry",
            )
            assert nc.policy.codec_for("z.docs") == good  # the last good value holds
            await runtime.aclose()

    arun(main())


def test_receivers_decode_whatever_the_sender_used(nats_url: str) -> None:
    """Senders and receivers change at different moments: the envelope says how to decode."""

    async def main() -> None:
        got: list[Any] = []
        async with (
            await MeshClient.connect(nats_url, name="a") as a,
            await MeshClient.connect(nats_url, name="b") as b,
        ):

            async def keep(msg: Message) -> None:
                got.append(msg.decode())

            await b.subscribe("z.mixed", keep)  # b has no policy at all
            await b.flush()
            for level in (1, 9, 19):
                table = PolicyTable()
                table.apply(
                    PolicyRecord(
                        subject="z.mixed",
                        version=1,
                        author="t",
                        reason="r",
                        time=1,
                        value=CodecPolicy(algorithm="zstd", level=level, min_size=1),
                    )
                )
                a.policy = table  # the sender switches; the receiver does not know
                await a.publish("z.mixed", document(level))
            a.policy = None
            await a.publish("z.mixed", document(0))
            await eventually(lambda: len(got) == 4)
            assert got == [document(1), document(9), document(19), document(0)]

    arun(main())
