"""`mesh bench reliable`: reliable publish and consume rates, the mesh against raw
nats-py JetStream, in one run against one server.

- **publish**: ``messages`` messages of ``size`` bytes into a work-queue stream with
  ``WINDOW`` acknowledgements outstanding at most. Raw nats-py uses
  ``js.publish_async`` (``publish_async_max_pending=WINDOW``) and waits for every
  acknowledgement; the mesh runs ``WINDOW`` tasks each awaiting
  ``publish(..., reliable=True)`` (envelope, ``Nats-Msg-Id``, stream acknowledgement).
- **consume**: the stream filled beforehand, the time from the first message taken to
  the last one acknowledged (consumer setup not counted). Raw nats-py pulls with a
  durable consumer (``fetch`` of ``BATCH``, ``ack_sync`` each, a batch's at once);
  the mesh runs a node with a reliable handler that only counts (pull of ``BATCH``,
  the handler in its own task, acknowledged after it). Both sides wait for
  JetStream to confirm each acknowledgement, as a reliable node must to run a
  message once across a server failover.

Each side has its own subject and stream; rounds alternate which side goes first,
and the best round of each is reported. Storage is the server's file store.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Final

import msgspec

from mesh._bench_report import human_size

WINDOW: Final = 256
BATCH: Final = 64
SIDES: Final = ("raw", "mesh")


class Rate(msgspec.Struct, frozen=True):
    side: str
    what: str  # "publish" or "consume"
    messages: int
    seconds: float
    cpu_s: float

    @property
    def msgs_s(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us(self) -> float:
        return self.cpu_s / self.messages * 1e6 if self.messages else 0.0


class ReliableBench(msgspec.Struct, frozen=True):
    messages: int
    size: int
    rounds: int
    rates: list[Rate]

    def best(self, side: str, what: str) -> Rate:
        return max(
            (r for r in self.rates if r.side == side and r.what == what), key=lambda r: r.msgs_s
        )

    def ratio(self, what: str) -> float:
        raw = self.best("raw", what).msgs_s
        return self.best("mesh", what).msgs_s / raw if raw else 0.0


class _Span:
    """Wall and CPU clocks at the first and the last message of a run."""

    def __init__(self) -> None:
        self.first = self.last = self.cpu_first = self.cpu_last = 0.0

    def start(self) -> None:
        self.first, self.cpu_first = time.perf_counter(), time.process_time()

    def stop(self) -> None:
        self.last, self.cpu_last = time.perf_counter(), time.process_time()

    def rate(self, what: str, side: str, messages: int) -> Rate:
        return Rate(
            side=side,
            what=what,
            messages=messages,
            seconds=self.last - self.first,
            cpu_s=self.cpu_last - self.cpu_first,
        )


async def _raw_publish(nc: Any, subject: str, payload: bytes, messages: int) -> None:
    js = nc.jetstream(publish_async_max_pending=WINDOW)
    for n in range(messages):
        await js.publish_async(subject, payload, headers={"Nats-Msg-Id": f"raw-{subject}-{n}"})
    await asyncio.wait_for(js.publish_async_completed(), 120)


async def _mesh_publish(client: Any, subject: str, payload: bytes, messages: int) -> None:
    queue = iter(range(messages))

    async def publisher() -> None:
        for _ in queue:
            await client.publish(subject, payload, reliable=True)

    async with asyncio.TaskGroup() as group:
        for _ in range(min(WINDOW, messages)):
            group.create_task(publisher())


async def _raw_consume(nc: Any, subject: str, stream: str, messages: int, span: _Span) -> None:
    from nats.errors import TimeoutError as NatsTimeout
    from nats.js import api

    js = nc.jetstream()
    psub = await js.pull_subscribe(
        subject,
        durable="bench-raw",
        stream=stream,
        config=api.ConsumerConfig(ack_policy=api.AckPolicy.EXPLICIT, max_ack_pending=1000),
    )
    done = 0
    while done < messages:
        try:
            msgs = await psub.fetch(BATCH, timeout=5)
        except NatsTimeout:
            raise RuntimeError(f"raw consumer stalled at {done}/{messages}") from None
        if not done:
            span.start()
        # Confirmed acknowledgements, as a reliable node sends them: a batch's at once.
        await asyncio.gather(*(msg.ack_sync() for msg in msgs))
        done += len(msgs)
    span.stop()
    await nc.flush()
    await psub.unsubscribe()


async def _mesh_consume(client: Any, subject: str, stream: str, messages: int, span: _Span) -> None:
    from nodes import Node, NodeRuntime

    node = Node("bench-reliable", max_concurrency=BATCH)
    counted = [0]
    finished = asyncio.Event()

    @node.handles(subject, reliable=True)
    async def count(payload: bytes) -> None:
        if not counted[0]:
            span.start()
        counted[0] += 1
        if counted[0] >= messages:
            span.stop()
            finished.set()

    async with NodeRuntime(node, client, register=False, telemetry_interval=3600):
        await asyncio.wait_for(finished.wait(), 300)
        # Acknowledged, not only handled: the work queue empties.
        jsm = client.nc.jsm()
        for _ in range(3000):
            if not (await jsm.stream_info(stream)).state.messages:
                return
            await asyncio.sleep(0.01)
        raise RuntimeError("the mesh consumer handled every message but some stayed unacknowledged")


async def run_reliable_bench(
    url: str, *, messages: int = 20_000, size: int = 256, rounds: int = 2
) -> ReliableBench:
    """Publish then consume ``messages`` per side per round against ``url``."""
    import nats

    from mesh._bench import progress
    from mesh._bench_worker import RAW_OPTIONS
    from mesh._client import MeshClient
    from mesh._reliable import ReliableStreams, stream_name

    run_id = os.urandom(4).hex()
    payload = os.urandom(size)
    client = await MeshClient.connect(url, name="bench-reliable")
    raw = await nats.connect(url.split(","), name="bench-raw", **RAW_OPTIONS)
    streams = ReliableStreams(client.nc)
    rates: list[Rate] = []
    try:
        for index in range(rounds):
            order = SIDES if index % 2 == 0 else SIDES[::-1]
            for side in order:
                subject = f"bench.{run_id}.reliable.{side}.{index}"
                stream = await streams.ensure(subject)  # the same stream for both sides
                progress(f"round {index + 1}/{rounds}  {side}: publish {messages:,} …")
                span = _Span()
                span.start()
                if side == "raw":
                    await _raw_publish(raw, subject, payload, messages)
                else:
                    await _mesh_publish(client, subject, payload, messages)
                span.stop()
                rate = span.rate("publish", side, messages)
                rates.append(rate)
                progress(f"    {rate.msgs_s:,.0f} msg/s, {rate.cpu_us:.1f} µs CPU per message")
                progress(f"round {index + 1}/{rounds}  {side}: consume {messages:,} …")
                span = _Span()
                if side == "raw":
                    await _raw_consume(raw, subject, stream, messages, span)
                else:
                    await _mesh_consume(client, subject, stream, messages, span)
                # From the first message taken to the last: consumer setup is not counted.
                rate = span.rate("consume", side, messages - 1)
                rates.append(rate)
                progress(f"    {rate.msgs_s:,.0f} msg/s, {rate.cpu_us:.1f} µs CPU per message")
                await client.nc.jsm().delete_stream(stream_name(subject))
    finally:
        await raw.close()
        await client.aclose()
    return ReliableBench(messages=messages, size=size, rounds=rounds, rates=rates)


def format_reliable_bench(result: ReliableBench) -> str:
    from mesh._cli import format_table

    rows = []
    for what in ("publish", "consume"):
        raw, mesh = result.best("raw", what), result.best("mesh", what)
        rows.append(
            (
                what,
                f"{raw.msgs_s:,.0f}",
                f"{mesh.msgs_s:,.0f}",
                f"{result.ratio(what):.2f}×",
                f"{raw.cpu_us:.1f}",
                f"{mesh.cpu_us:.1f}",
            )
        )
    headers = ("reliable", "raw msg/s", "mesh msg/s", "mesh/raw", "raw CPU µs", "mesh CPU µs")
    return (
        f"{result.messages:,} messages of {human_size(result.size)} per side, best of"
        f" {result.rounds} rounds (publish: {WINDOW} acknowledgements outstanding;"
        f" consume: pulls of {BATCH})\n\n" + format_table(rows, headers)
    )


def to_json(result: ReliableBench) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(result)
    out["ratios"] = {what: result.ratio(what) for what in ("publish", "consume")}
    return out
