"""`mesh bench`: the mesh against raw nats-py, in one run against one server.

- pub→sub at 128 B, 1 KiB and 16 KiB: a subscriber process counts what it
  receives while this process publishes as fast as it can; the rate is the
  messages received over the time from the first to the last one.
- request/reply at 256 B against an echo responder process: percentiles of
  sequential requests, then requests per second with 64 in flight.

Both sides use the same server and the same connection and subscription bounds,
so the difference is the mesh's own code. Rounds alternate which side goes first
and the best round of each side is reported, because this machine is shared.
CPU time per message is reported too: unlike rates, it hardly depends on what
else the machine is doing. Workers are :mod:`mesh._bench_worker` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import os
import platform
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Final

import typer

from mesh._bench_report import (
    IMPLS,
    INFLIGHT,
    REQUEST_SIZE,
    SIZES,
    UNTALLIED,
    PubSub,
    ReqRep,
    human_size,
    percentile,
    render,
    summarize,
)

if TYPE_CHECKING:
    from nats.aio.client import Client as Nats

    from mesh._client import MeshClient

REPORT_TIMEOUT: Final = 90.0  # a subscriber working through its backlog
END_TIMEOUT: Final = 30.0  # the server routing what the publisher had buffered
REQUEST_TIMEOUT: Final = 5.0
PUBLISH_BATCH: Final = 256  # publishes between two looks at the clock
LATENCY_BLOCK: Final = 100  # sequential requests to one side before switching to the other


class TracingMode(enum.StrEnum):
    unsampled = "unsampled"
    off = "off"
    sampled = "sampled"


@dataclass(frozen=True)
class Settings:
    seconds: float
    rounds: int
    requests: int
    warmup: int
    tracing: str
    run_id: str

    @property
    def worker_lifetime(self) -> float:
        """A bound on a worker's life, far above what a case needs."""
        return self.seconds * 4 + 300


# --------------------------------------------------------------------- cases


@dataclass
class Sides:
    """The clients this process measures with, connected to the same server: raw
    nats-py, the mesh, and (for `mesh bench telemetry`) the mesh without telemetry."""

    url: str
    raw: Nats
    mesh: MeshClient
    stop: asyncio.Event  # set by Ctrl-C
    untallied: MeshClient | None = None

    def check(self) -> None:
        """Raise the cancellation Ctrl-C asked for.

        Called between batches: nats-py swallows a cancellation that lands in a
        flush (``Client._flush_pending``), which is where a publisher spends its waits.
        """
        if self.stop.is_set():
            raise asyncio.CancelledError

    def client(self, impl: str) -> MeshClient:
        if impl == UNTALLIED and self.untallied is not None:
            return self.untallied
        return self.mesh

    def publish(self, impl: str) -> Callable[[str, bytes], Awaitable[None]]:
        return self.raw.publish if impl == "raw" else self.client(impl).publish

    def request(self, impl: str, subject: str, payload: bytes) -> Callable[[], Awaitable[Any]]:
        raw, mesh = self.raw, self.client(impl)

        def raw_request() -> Awaitable[Any]:
            return raw.request(subject, payload, timeout=REQUEST_TIMEOUT)

        def mesh_request() -> Awaitable[Any]:
            return mesh.request(subject, payload, timeout=REQUEST_TIMEOUT)

        return raw_request if impl == "raw" else mesh_request

    def nc(self, impl: str) -> Nats:
        return self.raw if impl == "raw" else self.client(impl).nc


async def pubsub_case(sides: Sides, impl: str, size: int, settings: Settings) -> PubSub:
    from mesh._bench_worker import WorkerProcess, end_subject

    subject = f"bench.{settings.run_id}.pubsub.{impl}.{size}"
    payload = os.urandom(size)
    publish = sides.publish(impl)
    nc = sides.nc(impl)
    async with WorkerProcess(
        "sub", impl, sides.url, subject, tracing=settings.tracing, lifetime=settings.worker_lifetime
    ) as worker:
        # Our own copy of the end marker says the server has routed every message before
        # it (nc.flush() does not: nats-py sends its PING ahead of buffered publishes).
        echo = await nc.subscribe(end_subject(subject))
        try:
            published = 0
            cpu = time.process_time()
            started = time.perf_counter()
            deadline = started + settings.seconds
            while True:
                for _ in range(PUBLISH_BATCH):
                    await publish(subject, payload)
                published += PUBLISH_BATCH
                sides.check()
                if time.perf_counter() >= deadline:
                    break
            await nc.publish(end_subject(subject), b"")
            await echo.next_msg(timeout=END_TIMEOUT)
            pub_seconds = time.perf_counter() - started
            pub_cpu = time.process_time() - cpu
        finally:
            await echo.unsubscribe()
        report = await worker.finish(REPORT_TIMEOUT)
    return PubSub(
        impl=impl,
        size=size,
        published=published,
        pub_seconds=pub_seconds,
        pub_cpu_s=pub_cpu,
        received=int(report["received"]),
        sub_seconds=float(report["seconds"]),
        sub_cpu_s=float(report["cpu_s"]),
        dropped=int(report["dropped"]),
        disconnects=int(report["disconnects"]),
        spans=int(report["spans"]),
    )


async def reqrep_round(sides: Sides, order: tuple[str, ...], settings: Settings) -> list[ReqRep]:
    """Both responders up at once; sequential requests alternate between the sides in
    blocks, so both meet the same noise from the rest of the machine; then each side
    in turn keeps 64 requests in flight."""
    from mesh._bench_worker import BenchFailed, WorkerProcess

    payload = os.urandom(REQUEST_SIZE)
    request: dict[str, Callable[[], Awaitable[Any]]] = {}
    workers: dict[str, WorkerProcess] = {}
    latencies: dict[str, list[int]] = {impl: [] for impl in order}
    cpu = dict.fromkeys(order, 0.0)
    throughput: dict[str, tuple[int, int, float]] = {}
    async with contextlib.AsyncExitStack() as stack:
        for impl in order:
            subject = f"bench.{settings.run_id}.reqrep.{impl}"
            workers[impl] = await stack.enter_async_context(
                WorkerProcess(
                    "echo",
                    impl,
                    sides.url,
                    subject,
                    tracing=settings.tracing,
                    lifetime=settings.worker_lifetime,
                )
            )
            request[impl] = sides.request(impl, subject, payload)
            reply = await request[impl]()
            if (reply.data if impl == "raw" else reply) != payload:
                raise BenchFailed(f"the {impl} responder did not echo the request")
            for _ in range(settings.warmup):
                await request[impl]()
        clock = time.perf_counter_ns
        for block in range(0, settings.requests, LATENCY_BLOCK):
            count = min(LATENCY_BLOCK, settings.requests - block)
            for impl in order if block // LATENCY_BLOCK % 2 == 0 else order[::-1]:
                sides.check()
                send, samples = request[impl], latencies[impl]
                started_cpu = time.process_time()
                for _ in range(count):
                    started = clock()
                    await send()
                    samples.append(clock() - started)
                cpu[impl] += time.process_time() - started_cpu
        for impl in order:
            started_cpu = time.process_time()
            throughput[impl] = await inflight(request[impl], settings.seconds)
            cpu[impl] += time.process_time() - started_cpu
        reports = {impl: await workers[impl].finish(REPORT_TIMEOUT) for impl in order}
    results = []
    for impl in order:
        samples = sorted(latencies[impl])
        completed, errors, seconds = throughput[impl]
        handled = int(reports[impl]["handled"])
        results.append(
            ReqRep(
                impl=impl,
                p50_us=percentile(samples, 0.50) / 1000,
                p90_us=percentile(samples, 0.90) / 1000,
                p99_us=percentile(samples, 0.99) / 1000,
                max_us=samples[-1] / 1000,
                sequential=len(samples),
                inflight64_req_s=completed / seconds if seconds > 0 else 0.0,
                inflight_requests=completed,
                errors=errors,
                requester_cpu_us=cpu[impl] / max(1, len(samples) + completed + errors) * 1e6,
                responder_cpu_us=float(reports[impl]["cpu_s"]) / max(1, handled) * 1e6,
            )
        )
    return results


async def inflight(request: Callable[[], Awaitable[Any]], seconds: float) -> tuple[int, int, float]:
    """Keep ``INFLIGHT`` requests outstanding for ``seconds``: (completed, timed out, elapsed)."""
    counts = [0, 0]
    started = time.perf_counter()
    deadline = started + seconds

    async def requester() -> None:
        while time.perf_counter() < deadline:
            try:
                await request()
            except TimeoutError:  # nats-py's and the mesh's timeouts both subclass it
                counts[1] += 1
            else:
                counts[0] += 1

    async with asyncio.TaskGroup() as group:
        for _ in range(INFLIGHT):
            group.create_task(requester())
    return counts[0], counts[1], time.perf_counter() - started


# ------------------------------------------------------------------- the run


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


async def measure(url: str, settings: Settings) -> dict[str, Any]:
    """Run every case for both sides, ``settings.rounds`` times; return the report."""
    import nats
    import nats.errors

    from mesh._bench_worker import RAW_OPTIONS, make_tracing
    from mesh._client import MeshClient
    from mesh._errors import ConnectionFailed

    tracing, exporter = make_tracing(settings.tracing, "bench")
    mesh = await MeshClient.connect(url, name="bench-mesh", tracing=tracing)
    try:
        raw = await nats.connect(url.split(","), name="bench-raw", **RAW_OPTIONS)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        await mesh.aclose()
        raise ConnectionFailed(url, str(exc) or type(exc).__name__) from None
    sides = Sides(url, raw, mesh, asyncio.Event())
    main_task = asyncio.current_task()
    loop = asyncio.get_running_loop()

    def interrupt() -> None:
        if sides.stop.is_set():
            raise KeyboardInterrupt  # pressed again: leave now (workers still end on EOF)
        sides.stop.set()
        if main_task is not None:
            main_task.cancel()

    loop.add_signal_handler(signal.SIGINT, interrupt)
    environment = describe_environment(raw, url, settings)
    pubsub: list[PubSub] = []
    reqrep: list[ReqRep] = []
    try:
        for index in range(settings.rounds):
            order = IMPLS if index % 2 == 0 else IMPLS[::-1]
            tag = f"round {index + 1}/{settings.rounds}"
            pad = " " * len(tag)
            for size in SIZES:
                for impl in order:
                    progress(f"{tag}  pub→sub {human_size(size):>6}  {impl} …")
                    ps = await pubsub_case(sides, impl, size, settings)
                    pubsub.append(ps)
                    progress(
                        f"{pad}  {ps.msgs_s:,.0f} msg/s received, published {ps.pub_msgs_s:,.0f}/s,"
                        f" dropped {ps.dropped}; CPU µs/msg pub {ps.pub_cpu_us:.2f}"
                        f" sub {ps.sub_cpu_us:.2f}; {ps.bound}-bound"
                    )
            progress(f"{tag}  request/reply {human_size(REQUEST_SIZE)}  {' and '.join(order)} …")
            for rr in await reqrep_round(sides, order, settings):
                reqrep.append(rr)
                progress(
                    f"{pad}  {rr.impl}: p50 {rr.p50_us:,.0f} µs  p90 {rr.p90_us:,.0f} µs"
                    f"  p99 {rr.p99_us:,.0f} µs; {rr.inflight64_req_s:,.0f} req/s with"
                    f" {INFLIGHT} in flight ({rr.errors} timed out); CPU µs/request"
                    f" requester {rr.requester_cpu_us:.1f} responder {rr.responder_cpu_us:.1f}"
                )
    except asyncio.CancelledError:
        if not sides.stop.is_set():
            raise
        # Closing after Ctrl-C, nats-py may log an InvalidStateError for the PONG of a
        # flush it abandoned (its own bug, harmless); keep it off the terminal.
        logging.getLogger("nats.aio.client").setLevel(logging.CRITICAL)
        raise KeyboardInterrupt from None
    finally:
        loop.remove_signal_handler(signal.SIGINT)
        await raw.close()
        await mesh.aclose()
        if tracing is not None:
            tracing.shutdown()
    if exporter is not None:
        environment["spans_exported_by_bench"] = exporter.spans
    return summarize(pubsub, reqrep, environment)


def describe_environment(raw: Nats, url: str, settings: Settings) -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    def package(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "?"

    server = raw.connected_server_version
    return {
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "nats_py": package("nats-py"),
        "msgspec": package("msgspec"),
        "opentelemetry_sdk": package("opentelemetry-sdk"),
        "nats_server": f"{server.major}.{server.minor}.{server.patch}",
        "nats_url": url,
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "platform": platform.platform(),
        "tracing": settings.tracing,
        "rounds": settings.rounds,
        "seconds": settings.seconds,
        "sequential_requests": settings.requests,
        "run_id": settings.run_id,
    }


# --------------------------------------------------------------- the command


def register(app: typer.Typer) -> None:
    """Add ``mesh bench`` and its sub-benchmarks to the ``mesh`` CLI."""
    from mesh._bench_policy import bench_policy

    bench_app = typer.Typer(
        help="Benchmarks: the mesh against raw nats-py (default), and the control plane.",
    )
    bench_app.callback(invoke_without_command=True)(bench)
    bench_app.command("policy")(bench_policy)
    bench_app.command("codec")(bench_codec)
    bench_app.command("topology")(bench_topology)
    bench_app.command("telemetry")(bench_telemetry)
    bench_app.command("reliable")(bench_reliable)
    app.add_typer(bench_app, name="bench")


def bench_codec(
    messages: Annotated[int, typer.Option(min=200, max=100_000, help="Demo messages.")] = 2000,
    seed: Annotated[int, typer.Option(help="Seed of the demo traffic.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Compression ratio and CPU per message on the demo's traffic, per codec setting.

    Builds the demo pipeline's messages (tasks, queries, findings, drafts, reports),
    trains a 64 KiB dictionary on a disjoint sample, and measures none, zstd:1,
    zstd:3, zstd:3 with the dictionary and zstd:9 with it: the ratio over whole frames
    (envelope included) and encode/decode CPU µs per message.
    """
    import msgspec

    from mesh._bench_codec import format_codec_bench, run_codec_bench

    progress(f"codec bench: {messages} demo messages…")
    result = run_codec_bench(messages=messages, seed=seed)
    typer.echo(msgspec.json.encode(result).decode() if as_json else format_codec_bench(result))


def bench_topology(
    agents: Annotated[int, typer.Option(min=2, max=100_000, help="Agents in the mesh.")] = 1000,
    edges: Annotated[int, typer.Option(min=1, max=1_000_000, help="Edges between them.")] = 5000,
    rounds: Annotated[int, typer.Option(min=1, max=100, help="Timed rounds.")] = 5,
    seed: Annotated[int, typer.Option(help="Seed of the synthetic mesh.")] = 0,
    snapshots: Annotated[
        int,
        typer.Option(
            min=1,
            max=64,
            help="Snapshots per instance, one a second: 10 is mesh topology's window.",
        ),
    ] = 1,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Time the topology analysis (graph + every rule) on a synthetic mesh.

    Generates telemetry snapshots for --agents agents and --edges edges (1-4
    instances each, requests and events, wildcards, errors), then times building
    the graph and analysing it. The goal: 1,000 agents and 5,000 edges in 100 ms.
    """
    import msgspec

    from mesh._bench_topology import format_topology_bench, run_topology_bench

    progress(
        f"topology bench: {agents} agents, {edges} edges, "
        f"{snapshots} snapshot{'s' if snapshots > 1 else ''} per instance, {rounds} rounds…"
    )
    result = run_topology_bench(
        agents=agents, edges=edges, rounds=rounds, seed=seed, snapshots_per_instance=snapshots
    )
    typer.echo(msgspec.json.encode(result).decode() if as_json else format_topology_bench(result))


def bench_telemetry(
    nats: Annotated[
        str,
        typer.Option(
            "--nats",
            help="Measure against this NATS server (default: start an embedded one for the run).",
        ),
    ] = "",
    seconds: Annotated[float, typer.Option(min=0.05, help="Seconds per case.")] = 2.0,
    rounds: Annotated[
        int, typer.Option(min=1, max=50, help="Rounds, rotating which side goes first.")
    ] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """What telemetry counting costs pub→sub: the mesh against the mesh with counting off.

    Runs the pub→sub case of `mesh bench` at 128 B and 1 KiB for raw nats-py, the
    mesh, and the mesh with telemetry counting off, in rotating order. Reports the
    best rate and the median CPU per message of each, and the cost: the mesh's
    throughput below the untallied mesh's (goal: at most 5%) and the extra CPU.
    """
    from mesh._bench_telemetry import format_telemetry_bench, run_telemetry_bench, to_json
    from mesh._cli import run

    with _bench_server(nats) as (url, _):
        result = run(run_telemetry_bench(url, seconds=seconds, rounds=rounds))
    typer.echo(json.dumps(to_json(result), indent=2) if as_json else format_telemetry_bench(result))


def bench_reliable(
    nats: Annotated[
        str,
        typer.Option(
            "--nats",
            help="Measure against this NATS server, with JetStream (default: an embedded one).",
        ),
    ] = "",
    messages: Annotated[
        int, typer.Option(min=100, max=10_000_000, help="Messages per side per round.")
    ] = 20_000,
    size: Annotated[int, typer.Option(min=1, max=1 << 20, help="Payload bytes.")] = 256,
    rounds: Annotated[int, typer.Option(min=1, max=20, help="Rounds, alternating sides.")] = 2,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Reliable publish and consume rates: the mesh against raw nats-py JetStream.

    Publish: raw `js.publish_async` with 256 acknowledgements outstanding against 256
    tasks awaiting `publish(..., reliable=True)`. Consume: a filled work-queue stream
    drained by a raw durable pull consumer (fetch 64, confirmed acks) against a node with a
    reliable handler. Best round of each side, and mesh/raw.
    """
    from mesh._bench_reliable import format_reliable_bench, run_reliable_bench, to_json
    from mesh._cli import run

    with _bench_server(nats, jetstream=True) as (url, _):
        result = run(run_reliable_bench(url, messages=messages, size=size, rounds=rounds))
    typer.echo(json.dumps(to_json(result), indent=2) if as_json else format_reliable_bench(result))


@contextlib.contextmanager
def _bench_server(url: str, *, jetstream: bool = False) -> Iterator[tuple[str, int | None]]:
    """``url``, or an embedded server's URL and pid (started, and stopped on the way out)."""
    from mesh._cli import fail
    from mesh._errors import MeshError
    from mesh._server import NatsServer

    if url:
        yield url, None
        return
    server = NatsServer(port=0, jetstream=jetstream, monitor_port=None)
    try:
        server.start()
    except MeshError as exc:
        raise fail(str(exc)) from None
    progress(f"embedded nats-server (pid {server.pid}) at {server.url}")
    try:
        yield server.url, server.pid
    finally:
        server.stop()


def bench(
    ctx: typer.Context,
    nats: Annotated[
        str,
        typer.Option(
            "--nats",
            help="Measure against this NATS server (default: start an embedded one for the run).",
        ),
    ] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    quick: Annotated[
        bool, typer.Option(help="Small counts for a smoke test (0.5 s per case, one round).")
    ] = False,
    seconds: Annotated[
        float | None,
        typer.Option(min=0.05, help="Seconds per throughput case (default 3; 0.5 with --quick)."),
    ] = None,
    rounds: Annotated[
        int | None,
        typer.Option(
            min=1, help="Rounds, alternating which side goes first (default 2; 1 with --quick)."
        ),
    ] = None,
    tracing: Annotated[
        TracingMode,
        typer.Option(help="The mesh side's tracing: on but unsampled, off, or sampled."),
    ] = TracingMode.unsampled,
) -> None:
    """Measure the mesh against raw nats-py: pub→sub msg/s and request/reply latency.

    Pub→sub at 128 B, 1 KiB and 16 KiB, subscriber in its own process; request/reply
    at 256 B against a responder process: p50/p90/p99 of sequential requests, and
    req/s with 64 in flight. Prints mesh/raw ratios against the targets; exits 0 even
    when one is missed, since it is a measurement. Progress goes to stderr.

    Sub-benchmarks: `mesh bench policy` (policy propagation to N node processes),
    `mesh bench topology` (the analysis on a synthetic mesh), `mesh bench codec`
    (compression ratio and CPU on the demo's traffic).
    """
    if ctx.invoked_subcommand is not None:
        return
    from mesh._cli import run

    settings = Settings(
        seconds=seconds if seconds is not None else (0.5 if quick else 3.0),
        rounds=rounds if rounds is not None else (1 if quick else 2),
        requests=500 if quick else 5000,
        warmup=100 if quick else 500,
        tracing=tracing.value,
        run_id=os.urandom(6).hex(),
    )
    with _bench_server(nats) as (url, pid):
        report = run(measure(url, settings))
    if pid is not None:
        report["environment"]["embedded_server_pid"] = pid
    typer.echo(json.dumps(report, indent=2, ensure_ascii=False) if as_json else render(report))
