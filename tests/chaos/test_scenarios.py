"""Chaos scenarios on a three-server cluster, checked like Jepsen's total-queue.

Each scenario runs real nats-server processes and real node processes spread over
the servers (each node gets a different server as its seed), injects one fault,
records every publish outcome and every delivery in a `checker.History`, and
reports its counts and verdict through the ``scenario`` fixture: the session ends
with one table of every scenario's counts. Every wait is bounded; every test has a
timeout. Run the suite on its own with ``pytest -q tests/chaos``.

Scenarios:

- ``all-servers-down``: a fire-and-forget publisher keeps publishing while all three
  servers are stopped for 10 s and restarted. Its reconnect buffer stays bounded,
  publishing raises PublishBufferFull once it is full, and everything confirmed
  before the outage and after the mesh healed is delivered.
- ``slow-subscriber``: a flood into a `fire` subscriber with a slow callback and
  small pending limits: every message not delivered is a drop the client reported,
  and the subscriber's memory does not grow with the flood.
- ``sigterm-under-load``: three instances of one agent (a queue group), one per
  server, under requests and events; the instance carrying the load gets SIGTERM,
  drains and exits while its peers carry on: every request answered, every event
  processed, nothing twice.

Reliable delivery (``publish(..., reliable=True, msg_id=...)``: acknowledged is OK,
PublishNotConfirmed is UNKNOWN and tried again with the same id, PublishRefused is
FAILED; three worker instances with a reliable handler that records before its
acknowledgement):

- ``kill-follower-then-leader``: 50,000 reliable publishes; kill -9 a follower of
  the stream, restart it once 25,000 are acknowledged and wait until it caught up,
  then kill -9 the stream's leader. Every publish acknowledged, none lost, none
  processed twice, publishes resume under a new leader.
- ``sigstop-leader``: the stream's leader frozen (SIGSTOP) for 15 s in the middle of
  30,000 paced publishes, then SIGCONT: none acknowledged is lost. Duplicates are
  counted, not forbidden: a worker whose acknowledgement hangs with the frozen
  server may see its message handed to a peer.
- ``kill-consumer``: kill -9 an instance in the middle of slow handlers, holding
  unacknowledged messages: every one it held is delivered to the other instances
  after the ack wait, none processed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from _util import arun, eventually, retrying, within
from chaos_nodes import (
    EVENT_SUBJECT,
    RECORD_SUFFIX,
    TAKEN_SUFFIX,
    TASK_SUBJECT,
    WORK_SUBJECT,
    WORKER,
    message_id,
    payload,
)
from checker import (
    NO_DUPLICATES,
    NO_LOSS,
    NO_UNEXPECTED,
    History,
    Outcome,
    at_least,
    at_most,
    equal,
)
from harness import (
    DeliveryLog,
    Proc,
    Processes,
    Publisher,
    ReliablePublisher,
    Scenario,
    connection_names,
    kib,
)

from mesh import MeshClient, NoResponders, PublishBufferFull, RemoteError, RequestTimeout
from mesh._cluster import NatsCluster
from mesh._reliable import consumer_name, stream_name
from mesh._server import NatsServer

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, sends signals"),
]


# -- all servers down ---------------------------------------------------------------

OUTAGE_SECONDS = 10.0
PUBLISH_RATE = 4000.0  # messages per second
PUBLISH_SIZE = 512
RECONNECT_BUFFER = 256 * 1024
BEFORE_MSGS = 4000  # confirmed and delivered before the outage
AFTER_MSGS = 4000  # confirmed after the mesh healed


@pytest.mark.timeout(150)
def test_all_servers_down(
    scenario: Scenario, nats_cluster: NatsCluster, processes: Processes
) -> None:
    history = History(limit=200_000)
    log = DeliveryLog(scenario.records, history)
    servers = nats_cluster.servers

    def stop_all() -> None:
        for server in servers:
            server.kill(signal.SIGTERM)  # all at once, not one after the other
        for server in servers:
            server.stop()

    def start_all() -> None:
        for server in servers:
            server.start()  # the same ports and store: they live under the test's tmp_path

    async def main() -> None:
        sink = await processes.node("sink@n2", nats_cluster.urls[1], scenario.records)
        async with await MeshClient.connect(
            nats_cluster.urls,
            name="chaos-publisher",
            reconnect_buffer=RECONNECT_BUFFER,
            dont_randomize=True,  # n1 first: the publisher and the sink on different servers
        ) as client:
            buffered = await publish_through_outage(client)
        sink.signal(signal.SIGTERM)
        history.note("sink_exit", await sink.exited())
        log.poll()
        history.note("buffered", len(buffered))
        history.note("buffered_delivered", sum(1 for mid in buffered if history.deliveries(mid)))

    async def publish_through_outage(client: MeshClient) -> list[str]:
        """Publish before, during and after the outage; return the ids buffered meanwhile."""
        nc = client.nc
        peak_pending = down_bytes = 0
        buffered: list[str] = []  # bounded: what fits in the buffer, per disconnection

        async def send(mid: str, data: bytes) -> Outcome:
            nonlocal peak_pending, down_bytes
            connected = client.connected
            if not connected:
                down_bytes += len(data)
            try:
                await client.publish(EVENT_SUBJECT, data)
            except PublishBufferFull:
                if not history.counters.get("buffer_full"):
                    history.note("full_at_kib", kib(nc.pending_data_size))
                history.count("buffer_full")
                return Outcome.FAILED
            if not connected:
                buffered.append(mid)
            peak_pending = max(peak_pending, nc.pending_data_size)
            return Outcome.UNKNOWN  # until a flush confirms it

        publisher = Publisher(history, send, rate=PUBLISH_RATE, size=PUBLISH_SIZE)
        stop = asyncio.Event()
        publishing = asyncio.create_task(publisher.run(stop))
        try:
            await eventually(lambda: publisher.seq >= BEFORE_MSGS, 30)
            history.note("ok_before", await publisher.confirm(0, client.flush))
            await log.until(lambda: history.undelivered_ok() == 0, 30)
            await asyncio.to_thread(stop_all)
            await asyncio.sleep(OUTAGE_SECONDS)
            await asyncio.to_thread(start_all)
            await eventually(lambda: client.connected, 30, message="no reconnection")
            reconnected = publisher.seq

            def healed() -> bool:
                # A message published after the reconnection reached the sink: it has
                # subscribed again, and the route between their servers is up.
                ids = map(publisher.id, range(reconnected, publisher.seq))
                return any(history.deliveries(mid) for mid in ids)

            history.note("healed", await log.until(healed, 30))
            since = publisher.seq
            await eventually(lambda: publisher.seq >= since + AFTER_MSGS, 30)
            stop.set()
            await publishing
            history.note("ok_after_heal", await publisher.confirm(since, client.flush))
            await log.until(lambda: history.undelivered_ok() == 0, 30)
        finally:
            stop.set()
            await publishing
        history.note("reconnects", client.stats().reconnects)
        history.note("peak_pending_kib", kib(peak_pending))
        history.note("down_kib", kib(down_bytes))
        return buffered

    arun(main(), timeout=130)
    result = scenario.report(
        history,
        [
            NO_LOSS,
            NO_DUPLICATES,
            NO_UNEXPECTED,
            at_least("buffer_full", 1),
            equal("failed", "buffer_full"),
            # Raised once the buffer is full: it then lacks less than one message.
            at_least("full_at_kib", kib(RECONNECT_BUFFER - PUBLISH_SIZE - 1024)),
            at_least("buffered", 1),
            # nats-py checks the payload, not the whole command, against the bound.
            at_most("peak_pending_kib", kib(RECONNECT_BUFFER + PUBLISH_SIZE + 1024)),
            at_least("down_kib", 4 * kib(RECONNECT_BUFFER)),
            at_least("ok_before", BEFORE_MSGS),
            at_least("ok_after_heal", AFTER_MSGS),
            at_least("reconnects", 1),
            equal("healed", 1),
            equal("sink_exit", 0),
        ],
    )
    assert result.passed, result.explain()


# -- slow subscriber ---------------------------------------------------------------

FLOOD_MSGS = 40_000
FLOOD_SIZE = 1024
SLOW_PENDING_MSGS = 200
SLOW_PENDING_BYTES = 256 * 1024
#: What the subscriber's peak memory may grow by during the flood: a fraction of the flood.
SLOW_MEMORY_KIB = 16 * 1024
assert FLOOD_MSGS * FLOOD_SIZE >= 2 * SLOW_MEMORY_KIB * 1024, "the flood must dwarf the bound"


@pytest.mark.timeout(120)
def test_slow_subscriber(
    scenario: Scenario, nats_cluster: NatsCluster, processes: Processes
) -> None:
    history = History(limit=FLOOD_MSGS)
    log = DeliveryLog(scenario.records, history)
    stats_path = processes.directory / "slow.json"

    def stats() -> dict[str, int]:
        try:
            counters: dict[str, int] = json.loads(stats_path.read_text())
        except FileNotFoundError:
            return {}
        return counters

    async def main() -> None:
        subscriber = processes.spawn(
            "slow@n2",
            [
                sys.executable,
                "-m",
                "tests.chaos.slow_subscriber",
                "--nats",
                nats_cluster.urls[1],
                "--subject",
                EVENT_SUBJECT,
                "--pending-msgs",
                str(SLOW_PENDING_MSGS),
                "--pending-bytes",
                str(SLOW_PENDING_BYTES),
                "--work",
                "0.001",
                "--record-dir",
                str(scenario.records),
                "--consumer",
                "slow@n2",
                "--stats",
                str(stats_path),
            ],
        )
        await subscriber.ready("ready")
        rss_before, _ = subscriber.memory_kib()
        async with await MeshClient.connect(nats_cluster.urls[0], name="chaos-flood") as client:
            for n in range(FLOOD_MSGS):
                mid = f"m{n}"
                await client.publish(EVENT_SUBJECT, payload(mid, FLOOD_SIZE))
                history.publish(mid, Outcome.UNKNOWN)
            await client.flush(timeout=30)  # the server has every message: confirmed
            for n in range(FLOOD_MSGS):
                history.confirm(f"m{n}")
        history.note("flood_kib", kib(FLOOD_MSGS * FLOOD_SIZE))

        def accounted(*names: str) -> bool:
            counters = stats()
            return sum(counters.get(name, 0) for name in names) >= FLOOD_MSGS

        # Every message arrived (handled, dropped or waiting): the most memory it needs.
        await eventually(
            lambda: accounted("received", "dropped", "pending"), 60, message="flood not received"
        )
        _, peak = subscriber.memory_kib()
        history.note("rss_growth_kib", max(0, peak - rss_before))
        await log.until(lambda: accounted("received", "dropped"), 30)  # pending ones handled
        subscriber.signal(signal.SIGTERM)
        history.note("exit", await subscriber.exited())
        counters = stats()
        for name in ("received", "dropped", "reconnects"):
            history.note(name, counters[name])
        log.poll()

    arun(main(), timeout=100)
    result = scenario.report(
        history,
        [
            equal("ok", FLOOD_MSGS),
            equal("lost", "dropped"),
            equal("delivered", "received"),
            at_least("dropped", 1),
            at_least("received", 1),
            NO_DUPLICATES,
            NO_UNEXPECTED,
            equal("reconnects", 0),
            equal("exit", 0),
            at_most("rss_growth_kib", SLOW_MEMORY_KIB),
        ],
    )
    assert result.passed, result.explain()


# -- SIGTERM under load ------------------------------------------------------------

REQUESTERS = 48
REQUEST_TIMEOUT = 5.0
WORK_SECONDS = 0.01
WARMUP_ANSWERED = 1000  # before the SIGTERM
AFTER_EXIT_ANSWERED = 1000  # issued after the instance exited


@pytest.mark.timeout(150)
def test_sigterm_under_load(
    scenario: Scenario, nats_cluster: NatsCluster, processes: Processes
) -> None:
    history = History(limit=100_000)
    log = DeliveryLog(scenario.records, history)

    async def main() -> None:
        workers = await asyncio.gather(
            *(
                processes.node(f"worker@n{i + 1}", url, scenario.records, work=WORK_SECONDS)
                for i, url in enumerate(nats_cluster.urls)
            )
        )
        per_server = await asyncio.to_thread(
            lambda: [connection_names(s).count(f"mesh:{WORKER}") for s in nats_cluster.servers]
        )
        history.note("servers_with_one_worker", per_server.count(1))
        issued = 0
        exited_at: int | None = None  # the first number issued after the victim exited
        answered_after_exit = 0
        answered = 0

        async def request(client: MeshClient, n: int) -> None:
            """Send request ``r<n>`` until it is answered, recording every attempt."""
            nonlocal answered, answered_after_exit
            rid = f"r{n}"
            data = payload(rid)
            while True:
                try:
                    reply = await client.request(WORK_SUBJECT, data, timeout=REQUEST_TIMEOUT)
                except RequestTimeout:  # it may have been processed: retry, count duplicates
                    history.publish(rid, Outcome.UNKNOWN)
                    history.count("retries")
                    continue
                except NoResponders:
                    history.publish(rid, Outcome.FAILED)
                    history.count("no_responders")
                    await asyncio.sleep(0.1)
                    continue
                except RemoteError as exc:  # refused by a node shutting down: not processed
                    history.publish(rid, Outcome.FAILED)
                    history.count(f"remote_{exc.error_type}")
                    continue
                history.publish(rid, Outcome.OK)
                if message_id(reply) != rid:
                    history.count("wrong_replies")
                answered += 1
                if exited_at is not None and n >= exited_at:
                    answered_after_exit += 1
                return

        async def load(client: MeshClient, stop: asyncio.Event) -> None:
            nonlocal issued
            while not stop.is_set():
                n = issued
                issued += 1
                eid = f"e{n}"
                await client.publish(EVENT_SUBJECT, payload(eid))
                history.publish(eid, Outcome.UNKNOWN)  # until a flush confirms it
                await request(client, n)

        async with await MeshClient.connect(nats_cluster.urls[0], name="chaos-load") as client:
            stop = asyncio.Event()
            loaders = [asyncio.create_task(load(client, stop)) for _ in range(REQUESTERS)]
            try:
                await eventually(lambda: answered >= WARMUP_ANSWERED, 60, message="no load")
                log.poll()
                consumers = history.consumers()
                victim = max(workers, key=lambda w: consumers.get(w.label, 0))
                share = consumers.get(victim.label, 0)
                history.note("victim_share", share)
                victim.signal(signal.SIGTERM)
                history.note("victim_exit", await victim.exited())
                history.note("victim_drained", int("draining on SIGTERM" in victim.output()))
                log.poll()
                # What it finished after the signal (at most: some may precede it): the
                # drain had work in flight.
                history.note(
                    "victim_after_signal", history.consumers().get(victim.label, 0) - share
                )
                exited_at = issued
                # The other instances carry on (or the counts below say they did not).
                await within(lambda: answered_after_exit >= AFTER_EXIT_ANSWERED, 60)
            finally:
                stop.set()
                await asyncio.gather(*loaders)
            history.note("answered_after_exit", answered_after_exit)
            upto = issued
            await client.flush()
            for n in range(upto):
                history.confirm(f"e{n}")
        await log.until(lambda: history.undelivered_ok() == 0, 30)
        peers = [worker for worker in workers if worker is not victim]
        for peer in peers:
            peer.signal(signal.SIGTERM)
        history.note("peer_exit_codes", sum([abs(await peer.exited()) for peer in peers]))
        log.poll()

    arun(main(), timeout=130)
    result = scenario.report(
        history,
        [
            NO_LOSS,
            NO_DUPLICATES,
            NO_UNEXPECTED,
            equal("unknown", 0),  # every request answered in the end, every event confirmed
            equal("failed", 0),
            equal("servers_with_one_worker", 3),
            at_least("victim_share", 1),
            equal("victim_exit", 0),
            equal("victim_drained", 1),
            at_least("answered_after_exit", AFTER_EXIT_ANSWERED),
            equal("peer_exit_codes", 0),
        ],
    )
    assert result.passed, result.explain()


# -- reliable delivery: the stream's servers killed, paused; a consumer killed ---------


async def stream_leader(client: MeshClient) -> tuple[str, list[str]]:
    """The stream of the reliable tasks: its leader's name and its followers'."""

    async def ask() -> tuple[str, list[str]]:
        info = await client.nc.jsm(timeout=5).stream_info(stream_name(TASK_SUBJECT))
        cluster = info.cluster
        if cluster is None or not cluster.leader:
            raise LookupError(f"the tasks' stream has no leader: {info}")
        return cluster.leader, [peer.name for peer in cluster.replicas or []]

    return await retrying(ask, (Exception,), 30, interval=0.2)  # through an election


async def workers_leader(client: MeshClient) -> str | None:
    """The server leading the workers' durable consumer (None if it cannot be told)."""

    async def ask() -> str | None:
        info = await client.nc.jsm(timeout=2).consumer_info(
            stream_name(TASK_SUBJECT), consumer_name(WORKER)
        )
        return info.cluster.leader if info.cluster is not None else None

    try:  # a member catching up, an election: ask again
        return await retrying(ask, (Exception,), 5, interval=0.5)
    except Exception:
        return None


async def in_sync(client: MeshClient) -> bool:
    """A leader, and every follower current and online."""
    try:
        info = await client.nc.jsm(timeout=2).stream_info(stream_name(TASK_SUBJECT))
    except Exception:
        return False
    cluster = info.cluster
    peers = (cluster.replicas or []) if cluster is not None else []
    return (
        cluster is not None
        and bool(cluster.leader)
        and len(peers) == 2
        and all(peer.current and not peer.offline for peer in peers)
    )


def server_named(cluster: NatsCluster, name: str) -> NatsServer:
    return next(server for server in cluster.servers if server.server_name == name)


async def workers_on_every_server(
    processes: Processes, cluster: NatsCluster, scenario: Scenario, **options: Any
) -> list[Proc]:
    """One chaos worker per server (each seeded with a different one)."""
    return list(
        await asyncio.gather(
            *(
                processes.node(f"worker@n{i + 1}", url, scenario.records, **options)
                for i, url in enumerate(cluster.urls)
            )
        )
    )


async def stop_workers(workers: list[Proc], history: History) -> None:
    for worker in workers:
        if worker.returncode is None:
            worker.signal(signal.SIGTERM)
    codes = [await worker.exited() for worker in workers]
    history.note("worker_exit_codes", sum(abs(code) for code in codes))


@contextlib.asynccontextmanager
async def running(publisher: ReliablePublisher) -> AsyncIterator[asyncio.Task[None]]:
    """``publisher.run()`` as a task for the block, cancelled if still running after it."""
    task = asyncio.create_task(publisher.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def finish(log: DeliveryLog, history: History, workers: list[Proc]) -> None:
    """Wait (bounded) until every acknowledged publish was processed, stop the
    workers, and read their last records."""
    await log.until(lambda: history.undelivered_ok() == 0, 60)
    await stop_workers(workers, history)
    log.poll()


KILL_TOTAL = 50_000
KILL_PARALLEL = 128
KILL_AT = (10_000, 25_000)  # acknowledged publishes before the follower, then the leader, dies


@pytest.mark.timeout(240)
def test_kill_follower_then_leader(
    scenario: Scenario, nats_cluster: NatsCluster, processes: Processes
) -> None:
    history = History(limit=KILL_TOTAL)
    log = DeliveryLog(scenario.records, history)

    async def main() -> None:
        workers = await workers_on_every_server(processes, nats_cluster, scenario)
        async with await MeshClient.connect(nats_cluster.urls, name="chaos-reliable") as client:
            publisher = ReliablePublisher(history, client, total=KILL_TOTAL, parallel=KILL_PARALLEL)
            async with running(publisher) as publishing:
                await eventually(lambda: publisher.ok >= KILL_AT[0], 60, message="no publishes")
                leader, followers = await stream_leader(client)
                follower = server_named(nats_cluster, followers[0])
                await asyncio.to_thread(follower.kill)
                history.note("follower_killed_at", publisher.ok)
                await eventually(lambda: publisher.ok >= KILL_AT[1], 60, message="stalled")
                # Held while the follower catches up, so that the leader dies with
                # publishes still to come.
                publisher.gate.clear()
                await asyncio.to_thread(follower.start)
                history.note(
                    "follower_caught_up", int(await within(lambda: in_sync(client), 60, 0.2))
                )
                consumer_leader = await workers_leader(client)
                history.note("consumer_leader_killed", int(consumer_leader == leader))
                publisher.gate.set()
                killed_at = publisher.ok
                history.note("leader_killed_at", killed_at)
                await asyncio.to_thread(server_named(nats_cluster, leader).kill)
                await publishing
                history.note("ok_after_leader_kill", publisher.ok - killed_at)
                history.note("longest_stall_s", round(publisher.longest_stall(), 1))
                await asyncio.to_thread(server_named(nats_cluster, leader).start)
                new_leader, _ = await stream_leader(client)
                history.note("leader_changed", int(new_leader != leader))
        await finish(log, history, workers)

    arun(main(), timeout=220)
    result = scenario.report(
        history,
        [
            NO_LOSS,
            NO_DUPLICATES,
            NO_UNEXPECTED,
            equal("ok", KILL_TOTAL),
            equal("follower_caught_up", 1),
            at_least("ok_after_leader_kill", 1),
            equal("leader_changed", 1),
            equal("worker_exit_codes", 0),
        ],
    )
    assert result.passed, result.explain()


PAUSE_SECONDS = 15.0
PAUSE_TOTAL = 30_000
PAUSE_RATE = 1000.0  # publishes per second: the pause falls in the middle
PAUSE_AFTER = 5_000  # acknowledged publishes before the leader is paused


@pytest.mark.timeout(240)
def test_sigstop_leader(
    scenario: Scenario, nats_cluster: NatsCluster, processes: Processes
) -> None:
    history = History(limit=PAUSE_TOTAL)
    log = DeliveryLog(scenario.records, history)

    async def main() -> None:
        workers = await workers_on_every_server(processes, nats_cluster, scenario)
        async with await MeshClient.connect(nats_cluster.urls[0], name="chaos-probe") as probe:
            leader_name, followers = await stream_leader(probe)
        leader = server_named(nats_cluster, leader_name)
        # The publisher starts on a follower: it sees the leader hang, not its own server.
        seed = server_named(nats_cluster, followers[0]).url
        async with await MeshClient.connect(seed, name="chaos-reliable") as client:
            publisher = ReliablePublisher(
                history, client, total=PAUSE_TOTAL, parallel=64, rate=PAUSE_RATE
            )
            async with running(publisher) as publishing:
                await eventually(lambda: publisher.ok >= PAUSE_AFTER, 60, message="no publishes")
                paused_at = publisher.ok
                leader.pause()
                try:
                    await asyncio.sleep(PAUSE_SECONDS)
                finally:
                    leader.resume()
                history.note("ok_during_pause", publisher.ok - paused_at)
                await publishing
                new_leader, _ = await stream_leader(client)
                history.note("leader_changed", int(new_leader != leader_name))
                history.note("longest_stall_s", round(publisher.longest_stall(), 1))
        await finish(log, history, workers)

    arun(main(), timeout=220)
    result = scenario.report(
        history,
        [
            NO_LOSS,
            NO_UNEXPECTED,  # redeliveries of messages whose ack hung with the leader: counted
            equal("ok", PAUSE_TOTAL),
            equal("worker_exit_codes", 0),
        ],
    )
    assert result.passed, result.explain()


CONSUMER_TOTAL = 4_000
CONSUMER_RATE = 400.0
VICTIM_WORK = 2.0  # seconds per task in the consumer that gets killed
VICTIM_CONCURRENCY = 8


@pytest.mark.timeout(180)
def test_kill_consumer(scenario: Scenario, nats_cluster: NatsCluster, processes: Processes) -> None:
    history = History(limit=CONSUMER_TOTAL)
    log = DeliveryLog(scenario.records, history)

    def lines(path: Path) -> list[str]:
        return path.read_text().splitlines() if path.exists() else []

    async def main() -> None:
        urls = nats_cluster.urls
        victim, *peers = await asyncio.gather(
            processes.node(
                "victim@n1",
                urls[0],
                scenario.records,
                work=VICTIM_WORK,
                concurrency=VICTIM_CONCURRENCY,
            ),
            processes.node("worker@n2", urls[1], scenario.records, work=0.005),
            processes.node("worker@n3", urls[2], scenario.records, work=0.005),
        )
        done_path = scenario.records / f"{victim.label}{RECORD_SUFFIX}"
        taken_path = scenario.records / f"{victim.label}{TAKEN_SUFFIX}"
        async with await MeshClient.connect(urls[1], name="chaos-reliable") as client:
            publisher = ReliablePublisher(
                history, client, total=CONSUMER_TOTAL, parallel=32, rate=CONSUMER_RATE
            )
            async with running(publisher) as publishing:
                # A batch finished, and the next started: the victim is in the middle of
                # its handlers' work (VICTIM_WORK), holding them unacknowledged.
                await eventually(lambda: len(lines(done_path)) >= VICTIM_CONCURRENCY, 60)
                await eventually(
                    lambda: len(lines(taken_path)) - len(lines(done_path)) >= VICTIM_CONCURRENCY,
                    30,
                )
                await asyncio.sleep(VICTIM_WORK / 4)
                info = await client.nc.jsm(timeout=5).consumer_info(
                    stream_name(TASK_SUBJECT), consumer_name(WORKER)
                )
                history.note("unacked_at_kill", info.num_ack_pending)
                victim.kill()
                history.note("victim_exit", victim.returncode or 0)
                await publishing
        held = set(lines(taken_path)) - set(lines(done_path))
        history.note("held", len(held))
        await finish(log, history, peers)
        history.note("held_redelivered", sum(1 for mid in held if history.deliveries(mid)))

    arun(main(), timeout=160)
    result = scenario.report(
        history,
        [
            NO_LOSS,
            NO_DUPLICATES,
            NO_UNEXPECTED,
            equal("ok", CONSUMER_TOTAL),
            equal("victim_exit", -signal.SIGKILL),
            at_least("held", VICTIM_CONCURRENCY),
            equal("held_redelivered", "held"),
            equal("worker_exit_codes", 0),
        ],
    )
    assert result.passed, result.explain()
