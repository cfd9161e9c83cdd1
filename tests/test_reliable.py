"""Reliable delivery against a real JetStream server: work-queue streams, publish
dedup, acknowledgement after the handler, bounded redelivery, dead letters and
`mesh dlq`."""

from __future__ import annotations

import asyncio
import json
import urllib.request
from typing import Any

import msgspec
import pytest
from _util import arun, eventually
from test_cli import amesh, mesh

from mesh import (
    InvalidName,
    JetStreamUnavailable,
    MeshClient,
    PublishNotConfirmed,
)
from mesh._cluster import NatsCluster
from mesh._reliable import (
    DLQ_STREAM,
    H_ATTEMPTS,
    H_REASON,
    H_SUBJECT,
    dlq_subject,
    store,
    stream_name,
)
from mesh._server import NatsServer
from mesh._wire import Envelope, encode_frame
from nodes import Node, NodeRuntime

FAST = (0.05,)  # backoff for tests: redeliveries come at once


class Task(msgspec.Struct):
    n: int
    fail_times: int = 0


async def stream_messages(client: MeshClient, name: str) -> int:
    info = await client.nc.jsm().stream_info(name)
    return int(info.state.messages)


async def publish_one_envelope_twice(producer: MeshClient, task: Task) -> None:
    """Two stream messages (different Nats-Msg-Id) with one envelope id: what a lost
    acknowledgement looks like to the consumer."""
    frame = encode_frame(Envelope(id="same-envelope", sender="producer"), msgspec.json.encode(task))
    js = producer.nc.jetstream()
    await js.publish("work.tasks", frame, headers={"Nats-Msg-Id": "a"})
    await js.publish("work.tasks", frame, headers={"Nats-Msg-Id": "b"})


def worker(
    name: str, seen: list[int], *, max_deliver: int = 5, delay: float = 0.0, fixed: bool = False
) -> Node:
    """A node that records each task it finished; a task fails its first ``fail_times``
    attempts (unless the worker is ``fixed``)."""
    node = Node(name, handler_timeout=5)
    attempts: dict[int, int] = {}

    @node.handles("work.tasks", reliable=True, max_deliver=max_deliver, backoff=FAST)
    async def handle(task: Task) -> None:
        attempts[task.n] = attempts.get(task.n, 0) + 1
        if attempts[task.n] <= task.fail_times and not fixed:
            raise RuntimeError(f"task {task.n} failed on attempt {attempts[task.n]}")
        if delay:
            await asyncio.sleep(delay)
        seen.append(task.n)

    return node


def test_every_published_task_is_handled_once_and_acknowledged(nats_url: str) -> None:
    async def main() -> None:
        seen: list[int] = []
        async with (
            await MeshClient.connect(nats_url, name="producer") as producer,
            await MeshClient.connect(nats_url, name="worker") as consumer,
        ):
            # Published before any node runs: the stream keeps them.
            for n in range(50):
                await producer.publish("work.tasks", Task(n), reliable=True)
            assert await stream_messages(producer, stream_name("work.tasks")) == 50
            async with NodeRuntime(worker("worker", seen), consumer, register=False) as runtime:
                for n in range(50, 100):
                    await producer.publish("work.tasks", Task(n), reliable=True)
                await eventually(lambda: len(seen) == 100, timeout=20)
                feed = runtime._consumers[0]
                assert feed.redelivered == 0
                assert feed.subscription.received == 100
            assert sorted(seen) == list(range(100))
            # Acknowledged messages leave the work queue.
            await eventually(
                lambda: _zero(stream_messages(producer, stream_name("work.tasks"))), timeout=10
            )

    arun(main(), timeout=60)


def test_a_repeated_message_id_is_stored_once(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="producer") as producer:
            for _ in range(3):
                await producer.publish("work.once", b"x", reliable=True, msg_id="order-17")
            await producer.publish("work.once", b"y", reliable=True)
            assert await stream_messages(producer, stream_name("work.once")) == 2
            with pytest.raises(InvalidName, match="message id"):
                await producer.publish("work.once", b"z", reliable=True, msg_id="has space")

    arun(main())


def test_a_failing_task_is_redelivered_until_it_succeeds(nats_url: str) -> None:
    async def main() -> None:
        seen: list[int] = []
        async with (
            await MeshClient.connect(nats_url, name="producer") as producer,
            await MeshClient.connect(nats_url, name="worker") as consumer,
            NodeRuntime(worker("worker", seen), consumer, register=False) as runtime,
        ):
            await producer.publish("work.tasks", Task(1, fail_times=2), reliable=True)
            await eventually(lambda: seen == [1], timeout=20)
            assert runtime._consumers[0].redelivered == 2
            assert runtime.node.handlers[0].stats.errors == 2
            await eventually(
                lambda: _zero(stream_messages(producer, stream_name("work.tasks"))), timeout=10
            )

    arun(main(), timeout=60)


async def _zero(count: Any) -> bool:
    return await count == 0


def test_a_task_that_keeps_failing_becomes_a_dead_letter_and_can_be_replayed(
    nats_url: str,
) -> None:
    seen: list[int] = []

    async def fail_then_replay() -> None:
        failing = worker("worker", seen, max_deliver=3)
        async with (
            await MeshClient.connect(nats_url, name="producer") as producer,
            await MeshClient.connect(nats_url, name="worker") as consumer,
            NodeRuntime(failing, consumer, register=False) as runtime,
        ):
            await producer.publish("work.tasks", Task(7, fail_times=99), reliable=True)
            await producer.publish("work.tasks", Task(8), reliable=True)
            await eventually(lambda: runtime._consumers[0].dead_lettered == 1, timeout=20)
            assert seen == [8]
            dead = await producer.nc.jsm().get_msg(DLQ_STREAM, seq=1)
            assert dead.subject == "_MESH.dlq.work.tasks"
            assert dead.headers[H_SUBJECT] == "work.tasks"
            assert dead.headers[H_ATTEMPTS] == "3"
            assert "task 7 failed on attempt 3" in dead.headers[H_REASON]

    arun(fail_then_replay(), timeout=60)

    listed = mesh("dlq", "ls", "--json", "--nats", nats_url)
    assert listed.code == 0, listed.err
    entries = json.loads(listed.out)
    assert [(e["seq"], e["subject"], e["agent"], e["attempts"]) for e in entries] == [
        (1, "work.tasks", "worker", 3)
    ]
    table = mesh("dlq", "ls", "--nats", nats_url)
    assert "work.tasks" in table.out
    assert "RuntimeError" in table.out
    shown = mesh("dlq", "show", "1", "--json", "--nats", nats_url)
    assert json.loads(shown.out)["payload"] == {"n": 7, "fail_times": 99}
    missing = mesh("dlq", "show", "99", "--nats", nats_url)
    assert missing.code == 1
    assert missing.err.startswith("error: no dead letter #99")
    assert "Traceback" not in missing.err
    usage = mesh("dlq", "replay", "--nats", nats_url)
    assert usage.code == 2
    assert "--all" in usage.err

    async def healed() -> None:
        # Replayed to a worker whose bug was fixed meanwhile.
        async with (
            await MeshClient.connect(nats_url, name="worker") as consumer,
            NodeRuntime(worker("worker", seen, fixed=True), consumer, register=False),
        ):
            replayed = await amesh("dlq", "replay", "--all", "--nats", nats_url)
            assert replayed.code == 0, replayed.err
            assert "replayed 1 dead letter" in replayed.out
            await eventually(lambda: 7 in seen, timeout=20)
        assert json.loads((await amesh("dlq", "ls", "--json", "--nats", nats_url)).out) == []

    arun(healed(), timeout=60)
    assert sorted(seen) == [7, 8]


def test_a_frame_that_does_not_decode_is_dead_lettered_at_once(nats_url: str) -> None:
    async def main() -> None:
        seen: list[int] = []
        async with (
            await MeshClient.connect(nats_url, name="producer") as producer,
            await MeshClient.connect(nats_url, name="worker") as consumer,
            NodeRuntime(worker("worker", seen), consumer, register=False) as runtime,
        ):
            await producer.publish("work.tasks", Task(1), reliable=True)  # creates the stream
            ack = await producer.nc.jetstream().publish("work.tasks", b"\xa7not a mesh frame")
            assert ack.seq == 2
            await producer.publish("work.tasks", Task(2), reliable=True)
            feed = runtime._consumers[0]
            await eventually(lambda: feed.dead_lettered == 1 and sorted(seen) == [1, 2])
            dead = await producer.nc.jsm().get_msg(DLQ_STREAM, seq=1)
            assert dead.data == b"\xa7not a mesh frame"
            assert dead.headers[H_REASON].startswith("MalformedMessage")
            assert dead.headers[H_ATTEMPTS] == "1"
            assert sum(feed.subscription.counters.decode_failures.values()) == 1

    arun(main(), timeout=60)


def test_a_redelivered_message_already_handled_is_acknowledged_without_running(
    nats_url: str,
) -> None:
    """What happens when an acknowledgement is lost: the same envelope comes again."""

    async def main() -> None:
        seen: list[int] = []
        async with (
            await MeshClient.connect(nats_url, name="producer") as producer,
            await MeshClient.connect(nats_url, name="worker") as consumer,
            NodeRuntime(worker("worker", seen), consumer, register=False) as runtime,
        ):
            await producer.publish("work.tasks", Task(0), reliable=True)
            await publish_one_envelope_twice(producer, Task(5))
            feed = runtime._consumers[0]
            await eventually(lambda: feed.duplicates == 1 and sorted(seen) == [0, 5])
            await asyncio.sleep(0.2)
            assert sorted(seen) == [0, 5]

    arun(main(), timeout=60)


def test_shutdown_hands_unfinished_tasks_to_another_instance(nats_url: str) -> None:
    async def main() -> None:
        seen: list[int] = []
        async with (
            await MeshClient.connect(nats_url, name="producer") as producer,
            await MeshClient.connect(nats_url, name="w1") as first,
            await MeshClient.connect(nats_url, name="w2") as second,
        ):
            slow = worker("worker", seen, delay=0.05)
            slow.drain_timeout = 0.2  # shorter than the work it holds: the rest is cancelled
            one = NodeRuntime(slow, first, register=False)
            await one.start()
            for n in range(60):
                await producer.publish("work.tasks", Task(n), reliable=True)
            await eventually(lambda: len(seen) >= 5, timeout=20)
            await one.aclose()
            async with NodeRuntime(worker("worker", seen), second, register=False):
                await eventually(lambda: len(set(seen)) == 60, timeout=30)
            assert sorted(set(seen)) == list(range(60))

    arun(main(), timeout=90)


def test_reliable_handlers_need_a_concrete_subject_and_a_queue() -> None:
    node = Node("picky")
    with pytest.raises(ValueError, match="concrete subject"):
        node.handles("work.*", reliable=True)
    with pytest.raises(ValueError, match="broadcast"):
        node.handles("work.x", reliable=True, broadcast=True)
    with pytest.raises(ValueError, match="max_deliver"):
        node.handles("work.x", reliable=True, max_deliver=0)
    with pytest.raises(ValueError, match="backoff"):
        node.handles("work.x", reliable=True, backoff=())


def test_an_unacknowledged_publish_says_its_outcome_is_unknown(tmp_path: Any) -> None:
    server = NatsServer(port=0, monitor_port=None, store_dir=tmp_path / "store")
    server.start()

    async def main() -> None:
        async with await MeshClient.connect(server.url, name="producer") as producer:
            await producer.publish("work.lost", b"1", reliable=True)
            server.stop()
            with pytest.raises(PublishNotConfirmed, match="may or may not be stored") as caught:
                await producer.publish(
                    "work.lost", b"2", reliable=True, msg_id="retry-me", ack_timeout=0.5
                )
            assert caught.value.msg_id == "retry-me"

    try:
        arun(main())
    finally:
        server.stop()


@pytest.mark.cluster
def test_on_a_cluster_streams_are_replicated_and_synced(nats_cluster: NatsCluster) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_cluster.urls, name="producer") as producer:
            await producer.publish("work.safe", b"1", reliable=True)
            info = await producer.nc.jsm().stream_info(stream_name("work.safe"))
            assert info.config.num_replicas == 3
            assert info.config.retention == "workqueue"
            assert len(info.cluster.replicas or []) == 2  # and the leader

    arun(main(), timeout=60)
    url = nats_cluster.servers[0].monitor_url
    assert url is not None
    with urllib.request.urlopen(f"{url}/varz", timeout=10) as answer:
        varz = json.load(answer)
    assert varz["jetstream"]["config"]["sync_always"] is True


@pytest.mark.parametrize("already_dead", [False, True], ids=["settled-never", "term-unconfirmed"])
def test_a_message_never_settled_is_dead_lettered_from_the_advisory(
    nats_url: str, already_dead: bool
) -> None:
    """An instance that took a message on its last delivery and died: nothing would
    deliver it again, so the agent's other instance moves it to the dead letters. If
    the dying instance had stored it there already (only its termination was lost), it
    is removed from its stream and not counted twice."""

    async def main() -> None:
        node = Node("worker", handler_timeout=0.5)  # ack_wait 5.5 s

        @node.handles("work.fragile", reliable=True, max_deliver=1)
        async def fragile(payload: bytes) -> None:
            return None

        async with (
            await MeshClient.connect(nats_url, name="producer") as producer,
            await MeshClient.connect(nats_url, name="worker") as consumer,
            NodeRuntime(node, consumer, register=False) as runtime,
        ):
            feed = runtime._consumers[0]
            feed._stopping = True  # this instance stops taking work...
            assert feed._pull is not None
            await feed._pull
            await asyncio.sleep(1.5)  # its last pull request expires on the server too
            # ...and a doomed one takes the next message and never settles it.
            doomed = await producer.nc.jetstream().pull_subscribe_bind(
                feed.durable, stream=stream_name("work.fragile")
            )
            await producer.publish("work.fragile", b"lost?", reliable=True, msg_id="m-1")
            taken = await doomed.fetch(1, timeout=5)
            assert taken[0].metadata.num_delivered == 1
            if already_dead:
                seq = taken[0].metadata.sequence.stream
                await store(
                    producer.nc,
                    dlq_subject("work.fragile"),
                    taken[0].data,
                    f"dlq:{stream_name('work.fragile')}:{seq}",
                    headers={H_REASON: "RuntimeError: stored by the doomed instance"},
                )
                await eventually(
                    lambda: _zero(stream_messages(producer, stream_name("work.fragile"))),
                    timeout=20,
                )
                assert feed.dead_lettered == 0
                assert feed.subscription.counters.dead_lettered == 0
                assert await stream_messages(producer, DLQ_STREAM) == 1
                return
            await eventually(lambda: feed.dead_lettered == 1, timeout=20)
            dead = await producer.nc.jsm().get_msg(DLQ_STREAM, seq=1)
            assert dead.headers[H_REASON].startswith("no acknowledgement after 1 deliveries")
            assert dead.headers["Mesh-Msg-Id"] == "m-1"
            assert await stream_messages(producer, stream_name("work.fragile")) == 0

    arun(main(), timeout=60)


def test_mesh_publish_reliable_stores_the_messages(nats_url: str) -> None:
    done = mesh("publish", "work.cli", '{"n": 1}', "--reliable", "--count", "3", "--nats", nats_url)
    assert done.code == 0, done.err
    assert "published 3 message(s) to work.cli (stored)" in done.err

    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="checker") as client:
            assert await stream_messages(client, stream_name("work.cli")) == 3

    arun(main())


def test_reliable_without_jetstream_is_a_clear_error() -> None:
    """A server without JetStream: a reliable publish and a reliable handler say so,
    after a short grace (a restarting server also has no responders for a moment)."""
    seen: list[int] = []

    async def main(url: str) -> None:
        async with await MeshClient.connect(url, name="producer") as producer:
            with pytest.raises(JetStreamUnavailable, match="JetStream"):
                await producer.publish("work.tasks", Task(n=1), reliable=True)
            with pytest.raises(JetStreamUnavailable, match="JetStream"):
                async with NodeRuntime(worker("w", seen), producer, register=False):
                    pass
        assert not seen

    with NatsServer(port=0, monitor_port=None, jetstream=False) as server:
        arun(main(server.url))


def test_a_redelivery_to_another_instance_asks_the_one_that_handled_it(nats_url: str) -> None:
    """An acknowledgement lost for good (as with a consumer leader killed before it
    replicated it): the message comes back to another instance, which asks its peers,
    hears that one of them handled it, and acknowledges it without running it."""
    handled: list[tuple[str, int]] = []

    def instance(label: str) -> Node:
        node = Node("worker", handler_timeout=0.5)  # ack wait: 5.5 s

        @node.handles("work.tasks", reliable=True, backoff=FAST)
        async def handle(task: Task) -> None:
            handled.append((label, task.n))

        return node

    async def no_ack(*_: Any) -> None:  # the acknowledgement that never lands
        return None

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="producer") as producer,
            await MeshClient.connect(nats_url, name="w1") as first,
            await MeshClient.connect(nats_url, name="w2") as second,
            NodeRuntime(instance("a"), first, register=False) as a,
        ):
            feed_a = a._consumers[0]
            feed_a._confirm = no_ack  # type: ignore[method-assign]
            await producer.publish("work.tasks", Task(7), reliable=True)
            await eventually(lambda: handled == [("a", 7)], timeout=10)
            feed_a._stopping = True  # a pulls no more, but still answers its peers
            await eventually(lambda: feed_a._pull is not None and feed_a._pull.done(), 10)
            async with NodeRuntime(instance("b"), second, register=False) as b:
                feed_b = b._consumers[0]
                await eventually(lambda: feed_b.peer_duplicates == 1, timeout=30)
                stream = stream_name("work.tasks")

                async def emptied() -> bool:
                    return await stream_messages(producer, stream) == 0

                await eventually(emptied, 10)
            assert handled == [("a", 7)]

    arun(main(), timeout=90)


def test_a_reliable_handlers_backlog_is_in_its_telemetry(nats_url: str) -> None:
    """The messages its JetStream consumer still holds reach telemetry as ``backlog``
    (the node itself holds at most what it pulled), and fall back to 0 when another
    instance drained them, though this one's last delivery said some were left."""
    from test_telemetry import collect

    from topology import Snapshot, build_graph

    handled: list[str] = []

    def instance(label: str, delay: float, concurrency: int) -> Node:
        node = Node("worker", handler_timeout=5, max_concurrency=concurrency)

        @node.handles("work.tasks", reliable=True, backoff=FAST)
        async def handle(task: Task) -> None:
            await asyncio.sleep(delay)
            handled.append(label)

        return node

    def backlogs(snaps: list[Snapshot], instance: str) -> list[int]:
        return [
            rs.backlog
            for snap in snaps
            if snap.instance == instance
            for rs in snap.received
            if rs.subject == "work.tasks"
        ]

    async def main() -> None:
        snaps: list[Snapshot] = []
        async with (
            await MeshClient.connect(nats_url, name="producer") as producer,
            await MeshClient.connect(nats_url, name="watcher") as watcher,
            await MeshClient.connect(nats_url, name="w1") as first,
            await MeshClient.connect(nats_url, name="w2") as second,
        ):
            await collect(watcher, snaps)
            slow = NodeRuntime(
                instance("slow", 0.3, 1), first, register=False, telemetry_interval=0.2
            )
            async with slow:
                for n in range(60):
                    await producer.publish("work.tasks", Task(n), reliable=True)
                await eventually(lambda: max(backlogs(snaps, slow.instance), default=0) >= 40, 10)
                fast = NodeRuntime(
                    instance("fast", 0.0, 64), second, register=False, telemetry_interval=0.2
                )
                async with fast:
                    await eventually(lambda: len(handled) == 60, timeout=20)
                    # Both instances end at 0: the slow one asks the consumer once its
                    # pulls come back empty.
                    await eventually(
                        lambda: all(backlogs(snaps, x.instance)[-1:] == [0] for x in (slow, fast)),
                        timeout=10,
                    )
            assert "fast" in handled
            peak = max(backlogs(snaps, slow.instance))
            graph = build_graph(snaps)
            (inst,) = [i for i in graph.instances if i.instance == slow.instance]
            assert max(inst.backlog) == peak

    arun(main(), timeout=90)


def test_redeliveries_duplicates_and_dead_letters_are_in_telemetry_and_the_topology(
    nats_url: str,
) -> None:
    from test_telemetry import collect

    from topology import ReliableStats, Snapshot, analyse, build_graph

    def settled(snaps: list[Snapshot]) -> ReliableStats:
        total = ReliableStats()
        for snap in snaps:
            for rs in snap.received:
                if rs.subject == "work.tasks" and rs.reliable is not None:
                    total += rs.reliable
        return total

    async def main() -> None:
        seen: list[int] = []
        snaps: list[Snapshot] = []
        async with (
            await MeshClient.connect(nats_url, name="producer") as producer,
            await MeshClient.connect(nats_url, name="watcher") as watcher,
            await MeshClient.connect(nats_url, name="worker") as consumer,
        ):
            await collect(watcher, snaps)
            runtime = NodeRuntime(
                worker("worker", seen, max_deliver=3),
                consumer,
                register=False,
                telemetry_interval=0.2,
            )
            async with runtime:
                feed = runtime._consumers[0]
                await producer.publish("work.tasks", Task(1, fail_times=2), reliable=True)
                await producer.publish("work.tasks", Task(7, fail_times=99), reliable=True)
                await publish_one_envelope_twice(producer, Task(5))
                await eventually(
                    lambda: feed.dead_lettered == 1 and feed.duplicates == 1 and len(seen) == 2,
                    timeout=20,
                )
                # Every snapshot swaps the counters: none of the counts is lost on the way.
                expected = ReliableStats(redelivered=4, duplicates=1, dead_lettered=1)
                assert (feed.redelivered, feed.unconfirmed) == (4, 0)
            # Closing sends the last interval's snapshot.
            await eventually(lambda: settled(snaps) == expected, timeout=10)

        graph = build_graph(snaps)
        (delivery,) = [d for d in graph.deliveries if d.subject == "work.tasks"]
        assert delivery.reliable == expected
        (subject,) = [s for s in analyse(graph).subjects if s.name == "work.tasks"]
        assert (subject.redelivered, subject.dead_lettered) == (4, 1)
        assert {"dead", "redelivered", "errors"} <= set(subject.flags)

    arun(main(), timeout=60)
