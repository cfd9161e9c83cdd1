"""MeshClient against a real nats-server: publish, request, subscribe, errors, interop."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from _util import arun, eventually, free_port

from mesh import (
    ClientClosed,
    ClientStats,
    ConnectionFailed,
    InvalidName,
    MalformedMessage,
    MeshClient,
    MeshError,
    Message,
    NoResponders,
    PayloadTooLarge,
    RemoteError,
    RequestTimeout,
)
from mesh._server import NatsServer
from mesh._wire import ContentType, Kind, decode_frame


class Task(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    n: int = 0


class Inbox:
    """A subscription callback that keeps what it receives."""

    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.event = asyncio.Event()

    async def __call__(self, msg: Message) -> None:
        self.messages.append(msg)
        self.event.set()

    async def wait(self, n: int = 1, timeout: float = 5.0) -> list[Message]:
        await eventually(lambda: len(self.messages) >= n, timeout)
        return self.messages


# ------------------------------------------------------------------ round trips


def test_publish_subscribe_round_trip(nats_url: str) -> None:
    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="producer") as pub,
            await MeshClient.connect(nats_url, name="consumer") as sub,
        ):
            inbox = Inbox()
            await sub.subscribe("tasks.summarize", inbox)
            await sub.flush()
            await pub.publish("tasks.summarize", {"text": "hi", "n": 1})
            await pub.publish("tasks.summarize", Task(text="struct", n=2))
            await pub.publish("tasks.summarize", b"\x00\xffraw")
            msgs = await inbox.wait(3)
            as_dict, as_struct, as_bytes = msgs
            for msg in msgs:
                assert msg.subject == "tasks.summarize"
                assert msg.sender == "producer"
                assert msg.envelope is not None
                assert msg.envelope.kind is Kind.EVENT
                assert msg.envelope.id
                assert msg.envelope.created > 0
                assert msg.reply == ""
            assert as_dict.decode() == {"text": "hi", "n": 1}
            assert as_dict.decode(Task) == Task(text="hi", n=1)
            assert as_struct.decode(Task) == Task(text="struct", n=2)
            assert as_struct.content_type is ContentType.JSON
            assert as_bytes.content_type is ContentType.BYTES
            assert as_bytes.decode() == b"\x00\xffraw"
            assert as_bytes.data == b"\x00\xffraw"
            assert len({m.envelope.id for m in msgs if m.envelope}) == 3
            stats = pub.stats()
            assert isinstance(stats, ClientStats)
            assert stats.published == 3
            assert stats.published_bytes > 0
            assert sub.stats().received == 3

    arun(main())


def test_wildcard_subscribe(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="wild") as client:
            star, full = Inbox(), Inbox()
            await client.subscribe("events.*.done", star)
            await client.subscribe("events.>", full)
            await client.flush()
            for subject in ("events.research.done", "events.a.b.c", "events.x.done", "other.x"):
                await client.publish(subject, {"s": subject})
            await full.wait(3)
            await star.wait(2)
            await client.flush()
            assert sorted(m.subject for m in star.messages) == [
                "events.research.done",
                "events.x.done",
            ]
            assert [m.decode()["s"] for m in full.messages] == [
                "events.research.done",
                "events.a.b.c",
                "events.x.done",
            ]

    arun(main())


def test_flush_makes_new_subscriptions_live(nats_url: str) -> None:
    """After flush(), a message published on another connection reaches a subscription
    made just before (a bare nats-py flush can overtake the SUB under load)."""

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="subscriber") as client,
            await MeshClient.connect(nats_url, name="publisher") as pub,
        ):
            for i in range(20):
                inbox = Inbox()
                await client.subscribe(f"fresh.{i}", inbox)
                await client.flush()
                await pub.publish(f"fresh.{i}", {"i": i})
                (msg,) = await inbox.wait(1)
                assert msg.decode() == {"i": i}
            await client.aclose()
            with pytest.raises(MeshError, match="closed"):
                await client.flush()

    arun(main())


def test_request_reply(nats_url: str) -> None:
    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="server-side") as server,
            await MeshClient.connect(nats_url, name="caller") as caller,
        ):
            seen: list[Message] = []

            async def handle(msg: Message) -> None:
                seen.append(msg)
                value = msg.decode()
                if isinstance(value, bytes):
                    await server.respond(msg, value[::-1])
                else:
                    await server.respond(msg, {"got": value, "from": msg.sender})

            await server.subscribe("demo.echo", handle)
            await server.flush()
            reply = await caller.request("demo.echo", {"text": "hi"}, timeout=5)
            assert reply == {"got": {"text": "hi"}, "from": "caller"}
            typed = await caller.request("demo.echo", Task(text="t"), type=dict)
            assert typed["got"] == {"text": "t", "n": 0}
            assert await caller.request("demo.echo", b"abc") == b"cba"
            assert seen[0].envelope is not None
            assert seen[0].envelope.kind is Kind.REQUEST
            assert seen[0].envelope.deadline > seen[0].envelope.created
            assert seen[0].reply

    arun(main())


def test_request_reply_into_a_struct(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="one") as client:

            async def handle(msg: Message) -> None:
                task = msg.decode(Task)
                await client.respond(msg, Task(text=task.text.upper(), n=task.n + 1))

            await client.subscribe("tasks.upper", handle)
            reply = await client.request("tasks.upper", Task(text="abc", n=1), type=Task)
            assert reply == Task(text="ABC", n=2)
            with pytest.raises(MalformedMessage):
                await client.request("tasks.upper", Task(text="abc"), type=list[int])

    arun(main())


def test_no_responders(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="lonely") as client:
            with pytest.raises(NoResponders) as info:
                await client.request("nobody.home", {}, timeout=5)
            assert info.value.subject == "nobody.home"
            assert "mesh nodes" in str(info.value)

    arun(main())


def test_request_timeout_is_a_timeout_error(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="waiter") as client:
            never = asyncio.Event()

            async def silent(msg: Message) -> None:
                await asyncio.wait_for(never.wait(), 10)

            await client.subscribe("slow.task", silent)
            with pytest.raises(RequestTimeout) as info:
                await client.request("slow.task", {}, timeout=0.3)
            assert isinstance(info.value, TimeoutError)
            assert info.value.timeout == 0.3
            never.set()

    arun(main())


def test_remote_error_carries_type_and_message(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="failing") as client:

            async def handle(msg: Message) -> None:
                try:
                    raise KeyError("no such document")
                except KeyError as exc:
                    await client.respond_error(msg, type(exc).__name__, str(exc))

            await client.subscribe("docs.get", handle)
            with pytest.raises(RemoteError) as info:
                await client.request("docs.get", {"id": 1})
            err = info.value
            assert err.error_type == "KeyError"
            assert "no such document" in err.error_message
            assert err.node == "failing"
            assert "KeyError" in str(err)

    arun(main())


def test_invalid_subjects_fail_before_sending(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="strict") as client:
            for bad in ("a b", "tasks.>", "$SRV.PING", "a..b"):
                with pytest.raises(InvalidName):
                    await client.publish(bad, {})
                with pytest.raises(InvalidName):
                    await client.request(bad, {})
            with pytest.raises(InvalidName):
                await client.subscribe("a.>.b", Inbox())
            with pytest.raises(InvalidName):
                await client.subscribe("a.b", Inbox(), queue="bad group")
            assert client.stats().published == 0
        with pytest.raises(InvalidName):
            await MeshClient.connect(nats_url, name="bad name")

    arun(main())


def test_unencodable_payload(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="enc") as client:
            with pytest.raises(TypeError, match="cannot encode a object"):
                await client.publish("x.y", object())

    arun(main())


# ------------------------------------------------------------------ limits and failures


def test_payload_too_large_before_sending(tmp_path: Path) -> None:
    conf = tmp_path / "small.conf"
    conf.write_text("max_payload: 4096\n")
    with NatsServer(config_file=conf, jetstream=False) as server:

        async def main() -> None:
            async with await MeshClient.connect(server.url, name="big") as client:
                assert client.max_payload == 4096
                inbox = Inbox()
                await client.subscribe("blobs.x", inbox)
                with pytest.raises(PayloadTooLarge) as info:
                    await client.publish("blobs.x", b"x" * 5000)
                err = info.value
                assert err.max_payload == 4096
                assert err.size > 5000
                assert err.subject == "blobs.x"
                assert "max_payload" in str(err)
                with pytest.raises(PayloadTooLarge):
                    await client.request("blobs.x", {"data": "y" * 5000})
                assert client.stats().published == 0
                # The connection survived: small messages still flow.
                await client.publish("blobs.x", b"small")
                msgs = await inbox.wait(1)
                assert msgs[0].data == b"small"
                assert client.connected

        arun(main())


def test_payload_over_the_default_max(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="big") as client:
            with pytest.raises(PayloadTooLarge):
                await client.publish("blobs.y", b"x" * (client.max_payload + 1))
            assert client.connected

    arun(main())


def test_connection_failed_for_a_closed_port() -> None:
    url = f"nats://127.0.0.1:{free_port()}"

    async def main() -> None:
        with pytest.raises(ConnectionFailed) as info:
            await MeshClient.connect(url, name="nowhere", connect_timeout=1)
        err = info.value
        assert isinstance(err, ConnectionError)
        assert err.url == url
        assert url in str(err)
        assert "mesh server" in str(err)
        assert err.reason
        assert "Traceback" not in str(err)

    arun(main(), timeout=15)


def test_aclose_is_idempotent(nats_url: str) -> None:
    async def main() -> None:
        client = await MeshClient.connect(nats_url, name="closer")
        async with client:
            await client.publish("x.y", {})
        await client.aclose()
        await client.aclose()
        assert not client.connected
        with pytest.raises(MeshError, match="closed"):
            await client.publish("x.y", {})
        with pytest.raises(ClientClosed):
            await client.request("x.y", {})
        with pytest.raises(ClientClosed):
            await client.subscribe("x.y", Inbox())

    arun(main())


def test_timeouts_must_be_positive_and_finite(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="timer") as client:
            for bad in (0.0, -1.0, float("nan"), float("inf")):
                with pytest.raises(ValueError, match="timeout"):
                    await client.request("x.y", {}, timeout=bad)

    arun(main())


def test_aclose_drains_pending_messages(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="pub") as pub:
            client = await MeshClient.connect(nats_url, name="drainer")
            handled: list[int] = []

            async def slow(msg: Message) -> None:
                await asyncio.sleep(0.005)
                handled.append(msg.decode()["i"])

            await client.subscribe("drain.me", slow)
            await client.flush()
            for i in range(50):
                await pub.publish("drain.me", {"i": i})
            await pub.flush()
            await eventually(lambda: len(handled) > 0)
            await client.aclose()
            assert handled == list(range(50))

    arun(main())


# ------------------------------------------------------------------ interop with plain NATS


def test_plain_client_request_to_a_mesh_handler(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="mesh-side") as client:
            seen: list[Message] = []

            async def handle(msg: Message) -> None:
                seen.append(msg)
                await client.respond(msg, {"echo": msg.decode()})

            await client.subscribe("demo.echo", handle)
            await client.flush()
            nc = await nats.connect(nats_url)
            try:
                reply = await nc.request("demo.echo", b'{"text": "plain"}', timeout=5)
            finally:
                await nc.close()
            assert json.loads(reply.data) == {"echo": {"text": "plain"}}
            assert seen[0].envelope is None
            assert seen[0].sender == ""

    arun(main())


def test_plain_client_gets_json_error(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="mesh-side") as client:

            async def handle(msg: Message) -> None:
                await client.respond_error(msg, "ValueError", "bad input")

            await client.subscribe("demo.fail", handle)
            await client.flush()
            nc = await nats.connect(nats_url)
            try:
                reply = await nc.request("demo.fail", b"{}", timeout=5)
            finally:
                await nc.close()
            body = json.loads(reply.data)
            assert body["error"]["type"] == "ValueError"
            assert body["error"]["message"] == "bad input"
            assert reply.headers is not None
            assert "ValueError" in reply.headers["Nats-Service-Error"]
            assert reply.headers["Nats-Service-Error-Code"] == "500"

    arun(main())


def test_plain_publish_reaches_a_mesh_subscriber(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="listener") as client:
            inbox = Inbox()
            await client.subscribe("plain.events", inbox)
            await client.flush()
            nc = await nats.connect(nats_url)
            try:
                await nc.publish("plain.events", b'{"k": [1, 2]}')
                await nc.publish("plain.events", b"not json")
                await nc.flush()
            finally:
                await nc.close()
            first, second = await inbox.wait(2)
            assert first.envelope is None
            assert first.sender == ""
            assert first.decode() == {"k": [1, 2]}
            assert second.decode(bytes) == b"not json"
            with pytest.raises(MalformedMessage):
                second.decode()

    arun(main())


def test_mesh_request_answered_by_a_plain_responder(nats_url: str) -> None:
    async def main() -> None:
        nc = await nats.connect(nats_url)
        try:

            async def respond(msg: Any) -> None:
                if msg.subject == "plain.json":
                    await msg.respond(b'{"answer": 42}')
                elif msg.subject == "plain.text":
                    await msg.respond(b"just text")
                else:
                    await msg.respond(b"\xc1\x01\x00\x05garbage")

            await nc.subscribe("plain.*", cb=respond)
            # nats-py's flush can overtake a SUB still queued for its flusher task (see
            # MeshClient.flush): the first round trip gets it written, the second confirms it.
            await nc.flush()
            await nc.flush()
            async with await MeshClient.connect(nats_url, name="asker") as client:
                assert await client.request("plain.json", {"q": 1}) == {"answer": 42}
                assert await client.request("plain.json", {}, type=dict) == {"answer": 42}
                assert await client.request("plain.text", {}) == b"just text"
                with pytest.raises(MalformedMessage):
                    await client.request("plain.bad", {})
        finally:
            await nc.close()

    arun(main())


def test_micro_service_error_from_a_plain_responder(nats_url: str) -> None:
    async def main() -> None:
        nc = await nats.connect(nats_url)
        try:

            async def respond(msg: Any) -> None:
                await nc.publish(
                    msg.reply,
                    b"",
                    headers={
                        "Nats-Service-Error": "quota exceeded",
                        "Nats-Service-Error-Code": "429",
                    },
                )

            await nc.subscribe("micro.fails", cb=respond)
            await nc.flush()
            await nc.flush()
            async with await MeshClient.connect(nats_url, name="asker") as client:
                with pytest.raises(RemoteError) as info:
                    await client.request("micro.fails", {})
                assert info.value.error_type == "ServiceError 429"
                assert info.value.error_message == "quota exceeded"
        finally:
            await nc.close()

    arun(main())


def test_closed_subscriptions_are_forgotten_but_counted(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="churn") as client:
            inbox = Inbox()
            for i in range(50):
                sub = await client.subscribe(f"churn.{i}", inbox)
                await client.flush()
                await client.publish(f"churn.{i}", {"i": i})
                await inbox.wait(i + 1)
                await (sub.drain() if i % 2 else sub.unsubscribe())
            assert client._subs == {}  # memory does not grow with subscription churn
            assert client.stats().received == 50

    arun(main())


# ------------------------------------------------------------------ slow consumers and garbage


def test_slow_consumer_drops_are_counted(nats_url: str) -> None:
    published = 1000

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="slowpoke") as client,
            await MeshClient.connect(nats_url, name="firehose") as pub,
        ):
            release = asyncio.Event()
            handled = 0

            async def blocked(msg: Message) -> None:
                nonlocal handled
                await asyncio.wait_for(release.wait(), 20)
                handled += 1

            sub = await client.subscribe("fire.hose", blocked, pending_msgs=10)
            await client.flush()
            for i in range(published):
                await pub.publish("fire.hose", {"i": i})
            await pub.flush()
            # Every message arrives either in the bounded queue or as a counted drop.
            await eventually(lambda: sub.dropped + sub.received + sub.pending >= published)
            assert sub.dropped > 0
            release.set()
            await eventually(lambda: sub.dropped + sub.received == published)
            await eventually(lambda: handled == sub.received)
            assert sub.received <= 12
            stats = client.stats()
            assert stats.dropped == sub.dropped
            assert stats.received == sub.received
            assert stats.dropped + stats.received == published

    arun(main())


def test_malformed_frames_are_counted_answered_and_survived(nats_url: str) -> None:
    garbage = b"\xc1\x01\x00\x09not msgpack at all"

    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="sturdy") as client:
            inbox = Inbox()

            async def handle(msg: Message) -> None:
                await inbox(msg)
                if msg.reply:
                    await client.respond(msg, {"ok": True})

            await client.subscribe("work.items", handle)
            await client.flush()
            nc = await nats.connect(nats_url)
            try:
                await nc.publish("work.items", garbage)
                await nc.publish("work.items", b"\xc1")
                await nc.flush()
                await eventually(lambda: client.stats().malformed == 2)
                # A raw requester gets an error frame back.
                reply = await nc.request("work.items", garbage, timeout=5)
                envelope, body = decode_frame(reply.data)
                assert envelope.kind is Kind.ERROR
                assert envelope.sender == "sturdy"
                failure = json.loads(bytes(body))
                assert failure["type"] == "MalformedMessage"
                assert "work.items" in failure["message"]
                assert client.stats().malformed == 3
            finally:
                await nc.close()
            assert inbox.messages == []
            # A mesh requester whose frame is garbage gets a RemoteError.
            async with await MeshClient.connect(nats_url, name="asker") as asker:
                raw = await asker.nc.request("work.items", b"\xc1\x01\xff\xff", timeout=5)
                with pytest.raises(RemoteError) as info:
                    await asker._read_reply("work.items", raw, Any)
                assert info.value.error_type == "MalformedMessage"
                # ...and the subscription keeps working.
                assert await asker.request("work.items", {"fine": 1}) == {"ok": True}
            await client.publish("work.items", {"after": 1})
            msgs = await inbox.wait(2)
            assert msgs[-1].decode() == {"after": 1}
            assert client.stats().malformed == 4

    arun(main())


# ------------------------------------------------------------------ reconnect


def test_reconnects_after_a_server_restart(nats_server: NatsServer) -> None:
    url = nats_server.url

    async def main() -> None:
        async with await MeshClient.connect(url, name="survivor") as client:
            inbox = Inbox()
            await client.subscribe("after.restart", inbox)
            await client.flush()
            await asyncio.to_thread(nats_server.restart)
            assert nats_server.url == url
            await eventually(lambda: client.connected and client.stats().reconnects >= 1, 15)
            assert client.stats().disconnects >= 1
            async with await MeshClient.connect(url, name="prober") as prober:

                async def came_back() -> bool:
                    await prober.publish("after.restart", {"hello": "again"})
                    await prober.flush()
                    return bool(inbox.messages)

                await eventually(came_back, 10, 0.1, "the subscription never came back")
            assert inbox.messages[0].decode() == {"hello": "again"}
            assert inbox.messages[0].sender == "prober"

    arun(main(), timeout=40)
