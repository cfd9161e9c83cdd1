"""Telemetry snapshots against a real nats-server: counts are exact, intervals add up."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import threading
import time
from typing import Any

import msgspec
import pytest
from _util import arun, eventually
from hypothesis import given
from hypothesis import strategies as st

from mesh import MeshClient, RemoteError
from mesh._inspect import foreign_clients, gather
from mesh._message import Message
from mesh._telemetry import MAX_SENDERS, MAX_SUBJECTS, OTHER_SENDER, TelemetryEmitter
from nodes import Node, NodeRuntime
from topology import LatencyHistogram, Window
from topology._snapshot import MAX_SNAPSHOT_BYTES, TELEMETRY_SUBJECT, Snapshot, decode_snapshot


def make_node() -> Node:
    node = Node("tele", max_concurrency=8)

    @node.handles("t.echo")
    async def echo(message: dict) -> dict:  # type: ignore[type-arg]
        if message.get("fail"):
            raise ValueError("asked to fail")
        return message

    @node.handles("t.events.>")
    async def sink(message: dict) -> None:  # type: ignore[type-arg]
        return None

    return node


async def collect(client: MeshClient, into: list[Snapshot]) -> None:
    async def on_snapshot(msg: Message) -> None:
        into.append(decode_snapshot(msg.data))

    await client.subscribe(f"{TELEMETRY_SUBJECT}.>", on_snapshot, internal=True, traced=False)
    await client.flush()


def test_snapshots_count_every_message_exactly_once(nats_url: str) -> None:
    async def main() -> None:
        snaps: list[Snapshot] = []
        async with (
            await MeshClient.connect(nats_url, name="watcher") as watcher,
            await MeshClient.connect(nats_url, name="caller") as caller,
            await MeshClient.connect(nats_url, name="tele") as nc,
        ):
            await collect(watcher, snaps)
            runtime = NodeRuntime(make_node(), nc, register=False, telemetry_interval=0.2)
            await runtime.start()
            caller_tel = TelemetryEmitter(caller, agent="caller", instance="c1", interval=0.2)
            caller_tel.start()
            for i in range(40):
                await caller.request("t.echo", {"i": i})
            failures = 0
            for _ in range(3):
                try:
                    await caller.request("t.echo", {"fail": True})
                except RemoteError:
                    failures += 1
            for i in range(25):
                await caller.publish(f"t.events.e{i % 5}", {"i": i})
            await caller.flush()
            await eventually(lambda: runtime.inflight == 0 and _handled(snaps) >= 68, 10)
            await runtime.aclose()  # the last partial interval is sent on close
            await caller_tel.aclose()
            await watcher.flush()
            await eventually(lambda: _handled(snaps) == 68 and _sent(snaps, "t.echo") == 43, 10)

            node_snaps = [s for s in snaps if s.agent == "tele"]
            seqs = [s.seq for s in node_snaps]
            assert seqs == list(range(len(seqs)))  # in order, none lost on loopback
            echo = [r for s in node_snaps for r in s.received if r.subject == "t.echo"]
            assert sum(r.msgs for r in echo) == 43
            assert sum(r.handled for r in echo) == 43
            assert sum(r.errors for r in echo) == failures == 3
            assert sum(r.replies for r in echo) == 43
            assert sum(r.senders.get("caller", 0) for r in echo) == 43
            assert {r.queue for r in echo} == {"tele"}
            hist = LatencyHistogram()
            for r in echo:
                if r.latency is not None:
                    hist.merge(LatencyHistogram.from_counts(r.latency))
            assert hist.count == 43
            events = [r for s in node_snaps for r in s.received if r.subject == "t.events.>"]
            assert sum(r.msgs for r in events) == 25
            assert sum(r.replies for r in events) == 0

            caller_snaps = [s for s in snaps if s.agent == "caller"]
            sent = [x for s in caller_snaps for x in s.sent]
            echo_sent = [x for x in sent if x.subject == "t.echo"]
            assert sum(x.requests for x in echo_sent) == 43
            assert sum(x.failed for x in echo_sent) == 3
            rtt = LatencyHistogram()
            for x in echo_sent:
                if x.latency is not None:
                    rtt.merge(LatencyHistogram.from_counts(x.latency))
            assert rtt.count == 40  # failed requests are not round-trip samples
            per_subject = {x.subject for x in sent} - {"t.echo"}
            assert per_subject == {f"t.events.e{i}" for i in range(5)}
            assert sum(x.msgs for x in sent if x.subject.startswith("t.events.")) == 25
            for x in sent:
                assert x.wire_bytes > x.raw_bytes > 0  # the envelope is on the wire
            assert all(s.interval > 0 for s in snaps)
            assert all(s.rss > 0 for s in snaps)

    arun(main())


def _handled(snaps: list[Snapshot]) -> int:
    return sum(r.handled for s in snaps for r in s.received)


def _sent(snaps: list[Snapshot], subject: str) -> int:
    return sum(x.msgs for s in snaps for x in s.sent if x.subject == subject)


def test_tables_are_bounded(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="many") as client:
            emitter = TelemetryEmitter(client, agent="many", instance="m1", interval=60)
            got: list[Message] = []

            async def keep(msg: Message) -> None:
                got.append(msg)

            sub = await client.subscribe("b.>", keep)
            await client.flush()
            for i in range(MAX_SUBJECTS + 10):
                await client.publish(f"b.s{i}", b"x")
            await eventually(lambda: len(got) == MAX_SUBJECTS + 10)
            # Many senders on one subscription: the table keeps MAX_SENDERS names.
            for i in range(MAX_SENDERS + 5):
                sub.counters.add_sender(f"sender{i}").msgs += 1
            snap = emitter.snapshot()
            assert len(snap.sent) == MAX_SUBJECTS
            assert snap.untracked == 10
            (received,) = snap.received
            assert received.msgs == MAX_SUBJECTS + 10 + MAX_SENDERS + 5
            assert len(received.senders) <= MAX_SENDERS + 1
            assert received.senders[OTHER_SENDER] >= 5
            # A snapshot starts a new interval: the next one is empty.
            again = emitter.snapshot()
            assert again.sent == []
            assert again.untracked == 0
            assert again.received[0].msgs == 0
            assert again.seq == snap.seq + 1

    arun(main())


def test_snapshot_is_compact_msgpack(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="small") as client:
            emitter = TelemetryEmitter(client, agent="small", instance="s1", interval=60)
            for _ in range(100):
                await client.publish("c.one", {"k": "v"})
            raw = msgspec.msgpack.encode(emitter.snapshot())
            assert len(raw) < 512
            assert decode_snapshot(raw).sent[0].msgs == 100

    arun(main())


def test_a_closed_subscription_reports_its_last_counts(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="closer") as client:
            emitter = TelemetryEmitter(client, agent="closer", instance="x1", interval=60)
            got = asyncio.Event()

            async def on_msg(msg: Message) -> None:
                got.set()

            sub = await client.subscribe("d.one", on_msg)
            await client.flush()
            await client.publish("d.one", b"1")
            await asyncio.wait_for(got.wait(), 5)
            await sub.unsubscribe()
            snap = emitter.snapshot()
            assert [(r.subject, r.msgs) for r in snap.received] == [("d.one", 1)]
            assert emitter.snapshot().received == []

    arun(main())


def test_a_client_with_telemetry_off_counts_nothing_but_still_delivers(nats_url: str) -> None:
    """`mesh bench telemetry` compares against such a client: only the counting differs."""

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="quiet", telemetry=False) as quiet,
            await MeshClient.connect(nats_url, name="loud") as loud,
        ):
            got: list[bytes] = []

            async def on_msg(msg: Message) -> None:
                got.append(bytes(msg.data))

            quiet_sub = await quiet.subscribe("q.one", on_msg)
            loud_sub = await loud.subscribe("q.one", on_msg)
            await quiet.flush()
            await loud.flush()
            await quiet.publish("q.one", b"from quiet")
            await loud.publish("q.one", b"from loud")
            await eventually(lambda: len(got) == 4)
            quiet_snap = TelemetryEmitter(quiet, agent="quiet", instance="q1").snapshot()
            loud_snap = TelemetryEmitter(loud, agent="loud", instance="l1").snapshot()
            assert quiet_snap.sent == []
            assert [(r.subject, r.msgs) for r in quiet_snap.received] == [("q.one", 0)]
            assert quiet_sub.received == 2  # the subscription's own totals still count
            assert [(s.subject, s.msgs) for s in loud_snap.sent] == [("q.one", 1)]
            assert [(r.subject, r.msgs, r.senders) for r in loud_snap.received] == [
                ("q.one", 2, {"quiet": 1, "loud": 1})
            ]
            assert loud_sub.received == 2

    arun(main())


# ------------------------------------------------------------------ hostile snapshots


def _snapshot_map(**changes: Any) -> dict[str, Any]:
    return {"instance": "i1", "agent": "a", "seq": 0, "time": 1, "interval": 1, **changes}


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (msgspec.msgpack.encode(_snapshot_map(extra=1)), "unknown field"),
        (
            msgspec.msgpack.encode(_snapshot_map(received=[{"subject": "x", "extra": 1}])),
            "unknown field",
        ),
        (msgspec.msgpack.encode(_snapshot_map(sent=[{"subject": "x", "x": 2}])), "unknown field"),
        (msgspec.msgpack.encode(_snapshot_map(agent=5)), "Expected `str`"),
        (msgspec.msgpack.encode(_snapshot_map()).replace(b"\xa1a", b"\xa1\xff"), "(?i)utf-8"),
        (b"\x91" * 5000 + b"\xc0", "Expected `object`"),
        (b"\x00" * (MAX_SNAPSHOT_BYTES + 1), "over"),
    ],
)
def test_decode_snapshot_refuses_what_is_not_a_snapshot(data: bytes, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        decode_snapshot(data)


def _deep_snapshot(depth: int) -> bytes:
    """A snapshot whose histogram holds an unknown field nested ``depth`` deep (a histogram
    skips unknown fields, so its nesting is the only way in that deep)."""
    marker = {"counts": {}, "zz": 1}
    data = msgspec.msgpack.encode(_snapshot_map(received=[{"subject": "x", "latency": marker}]))
    return data.replace(b"\xa2zz\x01", b"\xa2zz" + b"\x91" * depth + b"\xc0")


def test_deep_nesting_inside_a_snapshot_is_a_value_error() -> None:
    assert decode_snapshot(_deep_snapshot(10)).received[0].latency is not None
    with pytest.raises(ValueError, match="nests too deeply"):
        decode_snapshot(_deep_snapshot(10_000))


@given(st.binary(max_size=300))
def test_decode_snapshot_only_raises_value_error(data: bytes) -> None:
    with contextlib.suppress(ValueError):
        assert isinstance(decode_snapshot(data), Snapshot)


def test_topology_counts_malformed_snapshots_and_keeps_the_rest(nats_url: str) -> None:
    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="viewer") as viewer,
            await MeshClient.connect(nats_url, name="hostile") as hostile,
        ):
            window = Window(seconds=60)
            gathering = asyncio.create_task(gather(viewer, window, 1.5, None))
            await eventually(lambda: any(s.internal for s in viewer._subs.values()))
            await viewer.flush()
            good = Snapshot(instance="i1", agent="a", seq=0, time=time.time_ns(), interval=1)
            bad = [
                b"garbage",
                _deep_snapshot(10_000),
                msgspec.msgpack.encode(_snapshot_map(extra=1)),
                msgspec.msgpack.encode(_snapshot_map()).replace(b"\xa1a", b"\xa1\xff"),
            ]
            for data in [*bad, msgspec.msgpack.encode(good)]:
                await hostile.nc.publish(f"{TELEMETRY_SUBJECT}.i1", data)
            await hostile.flush()
            state = await gathering
            assert state.malformed == len(bad)
            assert list(window.snapshots()) == [good]

    arun(main())


class _DeepConnz(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b'{"connections": [], "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def test_an_unreadable_connz_is_reported_not_raised() -> None:
    server = http.server.HTTPServer(("127.0.0.1", 0), _DeepConnz)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        found, note = arun(foreign_clients(url))
    finally:
        server.shutdown()
        server.server_close()
    assert found is None
    assert "unreadable /connz" in note
