"""``mesh up``: run a whole mesh from one command.

    mesh up --demo     embedded nats-server, the demo agents as processes, steady traffic
    mesh up [FILE]     the nodes a mesh.toml lists, restarted when they crash, until Ctrl-C

A mesh.toml (validated; unknown keys are errors)::

    nats = "nats://127.0.0.1:4222"     # optional: default --nats / MESH_NATS_URL
    embedded_server = false            # true: run a nats-server there (port 0: a free one)

    [[node]]
    app = "nodes.examples.echo:node"   # MODULE:ATTR, as for `mesh node run`
    replicas = 2                       # 1..64

Every node replica is a child process, ``python -m mesh node run SPEC --nats URL``, in its
own process group (a Ctrl-C in the terminal reaches only ``mesh up``, which then stops
things in order) and, on Linux, set to receive SIGTERM if ``mesh up`` itself dies.
Shutdown order: stop traffic, wait for in-flight requests, SIGTERM the nodes (they drain
and deregister), SIGKILL stragglers, close the client, stop the embedded server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final
from urllib.parse import urlsplit

import msgspec
import nats.errors
import typer

from mesh._client import DEFAULT_URL, MeshClient
from mesh._errors import MeshError, RemoteError
from mesh._fleet import (
    STOP_TIMEOUT,
    Console,
    ConsoleLog,
    NodeFleet,
    Shutdown,
    _count,
)
from mesh._telemetry import TelemetryEmitter
from topology import LatencyHistogram

if TYPE_CHECKING:
    from mesh._server import NatsServer
    from mesh._tracing import Tracing

DEMO_NODES: Final = (
    ("nodes.examples.echo:node", 1),
    ("nodes.examples.pipeline:planner", 1),
    ("nodes.examples.pipeline:researcher", 3),
    ("nodes.examples.pipeline:writer", 1),
)
DEFAULT_FILE: Final = "mesh.toml"
DEFAULT_RATE: Final = 10.0
MAX_RATE: Final = 1000.0
MAX_INFLIGHT: Final = 64
MAX_REPLICAS: Final = 64
MAX_PROCESSES: Final = 256
READY_TIMEOUT: Final = 60.0
REQUEST_TIMEOUT: Final = 10.0
MAX_ERROR_KINDS: Final = 32
EXIT_INTERRUPTED: Final = 130
_TOPICS: Final = (
    "solid-state batteries",
    "urban heat islands",
    "protein structure prediction",
    "carbon capture at cement plants",
    "open-source chip design",
    "vertical farming",
    "grid-scale storage",
    "antibiotic resistance",
    "small modular reactors",
    "satellite internet latency",
    "coral reef restoration",
    "federated learning in hospitals",
)
_TRACES_HINT: Final = """\
traces: to see one trace per task in Jaeger, run Jaeger with OTLP and export to it:
  docker run --rm -p 16686:16686 -p 4317:4317 -p 4318:4318 jaegertracing/all-in-one:latest
  OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317 mesh up --demo
  then open http://localhost:16686 (the node processes inherit OTEL_* from `mesh up`)"""


# ------------------------------------------------------------------- mesh.toml


class NodeEntry(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """One ``[[node]]`` table: the app to run and how many replicas."""

    app: str
    replicas: Annotated[int, msgspec.Meta(ge=1, le=MAX_REPLICAS)] = 1


class MeshFile(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    """A ``mesh.toml``: where NATS is and which nodes to run."""

    node: Annotated[list[NodeEntry], msgspec.Meta(min_length=1)]
    nats: str | None = None
    embedded_server: bool = False


class MeshFileError(ValueError):
    """A mesh.toml that cannot be read or does not validate."""


def load_mesh_file(path: Path) -> MeshFile:
    """Read and validate ``path``; raises :class:`MeshFileError` saying what is wrong."""
    import tomllib

    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise MeshFileError("no such file (write one, or try `mesh up --demo`)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise MeshFileError(getattr(exc, "strerror", None) or str(exc)) from None
    try:
        config = msgspec.convert(tomllib.loads(text), MeshFile)
    except tomllib.TOMLDecodeError as exc:
        raise MeshFileError(f"invalid TOML: {exc}") from None
    except msgspec.ValidationError as exc:
        raise MeshFileError(_readable(str(exc))) from None
    for i, entry in enumerate(config.node):
        module, sep, attr = entry.app.partition(":")
        if not (sep and _dotted(module) and _dotted(attr)):
            raise MeshFileError(
                f"node[{i}].app = {entry.app!r} must look like MODULE:ATTR, "
                "e.g. nodes.examples.echo:node"
            )
    total = sum(entry.replicas for entry in config.node)
    if total > MAX_PROCESSES:
        raise MeshFileError(f"{total} replicas in all; at most {MAX_PROCESSES} are allowed")
    if config.nats is not None and not config.nats.strip():
        raise MeshFileError("nats must be a URL such as nats://127.0.0.1:4222")
    return config


def _readable(error: str) -> str:
    """msgspec's "… - at `$.node[0]`" as "… (at node[0])", with a hint for a missing node."""
    text, _, where = error.partition(" - at `$")
    where = where.rstrip("`").lstrip(".")
    if text == "Object missing required field `node`" and not where:
        text += ': add a [[node]] table with app = "MODULE:ATTR"'
    return f"{text} (at {where})" if where else text


def _dotted(name: str) -> bool:
    return all(part.isidentifier() for part in name.split("."))


def embedded_server_for(url: str) -> NatsServer:
    """A NatsServer listening where ``url`` points (a free port when it names none)."""
    from mesh._server import NatsServer

    if "," in url:
        raise MeshFileError("embedded_server needs a single nats URL, not a list")
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    try:
        port = parts.port or 0
    except ValueError:
        raise MeshFileError(f"nats = {url!r} has an invalid port") from None
    # Monitoring on a free loopback port: `mesh topology` learns foreign clients from it.
    return NatsServer(host=parts.hostname or "127.0.0.1", port=port, monitor_port=0)


# ------------------------------------------------------------------- demo traffic


class Traffic:
    """Demo tasks on ``demo.plan`` at a steady rate with at most ``max_inflight`` open."""

    def __init__(self, client: MeshClient, rate: float, max_inflight: int = MAX_INFLIGHT) -> None:
        self.client = client
        self.rate = rate
        self.max_inflight = max_inflight
        self.total = LatencyHistogram()
        self.recent = LatencyHistogram()  # since the last status line
        self.errors: Counter[str] = Counter()
        self.sent = self.done = self.shed = self.aborted = 0
        self.started = self.stopped = 0.0
        self._inflight: set[asyncio.Task[None]] = set()
        self._run = client.new_id()[-6:]
        from nodes.examples.pipeline import Report, Task

        self._task_type, self._report_type = Task, Report

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def roll(self) -> LatencyHistogram:
        """The latencies since the last roll (they move into :attr:`total`)."""
        window = self.recent
        self.total.merge(window)
        self.recent = LatencyHistogram()
        return window

    async def run(
        self, shutdown: Shutdown, duration: float | None, drain: Callable[[], float]
    ) -> None:
        """Send tasks until a stop or ``duration``, then wait ``drain()`` s for the open ones."""
        interval = 1.0 / self.rate
        self.started = time.monotonic()
        end = self.started + duration if duration is not None else math.inf
        tick = 0
        async with asyncio.TaskGroup() as group:
            while not shutdown.requested.is_set():
                now = time.monotonic()
                if now >= end:
                    break
                due = self.started + tick * interval
                if due > now:
                    await shutdown.wait(min(due, end) - now)
                    continue
                late = int((now - due) / interval)
                if late > self.rate:  # over a second behind (the loop stalled): skip ahead
                    self.shed += late
                    tick += late
                tick += 1
                if len(self._inflight) >= self.max_inflight:
                    self.shed += 1
                    continue
                self.sent += 1
                task = group.create_task(self._one(self.sent))
                self._inflight.add(task)
                task.add_done_callback(self._inflight.discard)
            self.stopped = time.monotonic()
            for task in await shutdown.settle(set(self._inflight), drain()):
                task.cancel()
        self.roll()

    async def _one(self, n: int) -> None:
        task = self._task_type(id=f"{self._run}-{n}", topic=_TOPICS[n % len(_TOPICS)])
        started = time.perf_counter_ns()
        try:
            await self.client.request(
                "demo.plan", task, type=self._report_type, timeout=REQUEST_TIMEOUT
            )
        except asyncio.CancelledError:
            self.aborted += 1
            raise
        except Exception as exc:  # every failure is counted by kind, none stops the traffic
            kind = f"RemoteError({exc.error_type})" if isinstance(exc, RemoteError) else ""
            kind = kind or type(exc).__name__
            if kind not in self.errors and len(self.errors) >= MAX_ERROR_KINDS:
                kind = "other"
            self.errors[kind] += 1
            return
        self.recent.record(time.perf_counter_ns() - started)
        self.done += 1


# ------------------------------------------------------------------- status line


class StatusLine:
    """Refreshes the status line until closed; also watches the embedded server."""

    def __init__(
        self,
        console: Console,
        fleet: NodeFleet,
        client: MeshClient,
        shutdown: Shutdown,
        server: NatsServer | None,
        traffic: Traffic | None,
    ) -> None:
        self.console = console
        self.fleet = fleet
        self.client = client
        self.shutdown = shutdown
        self.server = server
        self.traffic = traffic
        self.interval = 1.0 if console.tty else 5.0
        self.started = time.monotonic()
        self._up = "?"
        self._done = 0
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StatusLine:
        self._task = asyncio.get_running_loop().create_task(self._loop())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
            error = None if task.cancelled() else task.exception()
            if error is not None:  # a bug: report it, never hide it
                raise error
        self.console.clear()

    async def _loop(self) -> None:
        last = time.monotonic()
        while True:
            await asyncio.sleep(self.interval)
            if self.server is not None and not self.server.running:
                self.shutdown.request("the embedded nats-server exited", failed=True)
            try:
                self._up = str(await asyncio.wait_for(self.fleet.registered(self.client), 2.0))
            except (TimeoutError, MeshError, OSError, nats.errors.Error):
                self._up = "?"
            now = time.monotonic()
            self.console.status(self.render(now - last))
            last = now

    def render(self, period: float) -> str:
        fleet = self.fleet
        parts = [f"{time.monotonic() - self.started:5.0f}s"]
        traffic = self.traffic
        if traffic is not None:
            window = traffic.roll()
            rate = (traffic.done - self._done) / period if period > 0 else 0.0
            self._done = traffic.done
            parts += [
                f"tasks {traffic.sent} sent {traffic.done} done",
                f"{rate:5.1f}/s",
                f"p50 {_ms(window.quantile(0.5))} p99 {_ms(window.quantile(0.99))}"
                if window.count
                else "p50 - p99 -",
                f"errors {traffic.failed}",
            ]
            if traffic.shed:
                parts.append(f"shed {traffic.shed}")
        parts.append(f"nodes {self._up}/{len(fleet.replicas)}")
        if fleet.restarts:
            parts.append(f"restarts {fleet.restarts}")
        return "  ".join(parts)


def _ms(ns: int) -> str:
    return f"{ns / 1e6:.1f}ms"


# ------------------------------------------------------------------- orchestration


async def run_up(
    nodes: list[tuple[str, int]],
    *,
    url: str,
    server: NatsServer | None,
    demo: bool,
    rate: float,
    duration: float | None,
    verbose: bool,
    console: Console,
    tracing: Tracing | None = None,
) -> int:
    """Bring the mesh up, run until stopped, bring it down; returns the exit code."""
    shutdown = Shutdown(console)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, shutdown.on_signal, sig)
    traffic: Traffic | None = None
    fleet: NodeFleet | None = None

    def lost() -> bool:
        # A Ctrl-C in a terminal reaches the embedded server too: once it is gone nothing
        # can drain or deregister, and waiting for that would only delay the exit.
        return server is not None and not server.running

    try:
        async with contextlib.AsyncExitStack() as stack:
            if server is not None:
                console.say("starting nats-server…")
                await stack.enter_async_context(server)
                url = server.url
                console.say(f"nats-server ready at {url}")
            client = await MeshClient.connect(url, name="mesh-up", tracing=tracing)
            stack.push_async_callback(client.aclose, 5.0)
            # The demo's task source shows in `mesh topology` like any agent.
            telemetry = TelemetryEmitter(client, agent="mesh-up", instance=client.new_id())
            await stack.enter_async_context(telemetry)
            fleet = await stack.enter_async_context(NodeFleet(nodes, url, console, verbose=verbose))
            await fleet.start()
            listing = ", ".join(f"{spec} ×{n}" for spec, n in nodes)
            console.say(f"started {_count(len(fleet.replicas), 'node process')}: {listing}")
            if not await fleet.wait_ready(client, shutdown, READY_TIMEOUT):
                console.say("interrupted before the nodes were ready")
                return EXIT_INTERRUPTED
            console.say(f"all {_count(len(fleet.replicas), 'node')} registered on {url}")
            console.say(_inspect_hint(url, server))
            if demo:
                console.say(_traces_hint())
                traffic = Traffic(client, rate)
                console.say(f"sending {rate:g} tasks/s to demo.plan — Ctrl-C to stop")
            else:
                console.say("running — Ctrl-C to stop")
            async with StatusLine(console, fleet, client, shutdown, server, traffic):
                if traffic is not None:
                    await traffic.run(
                        shutdown, duration, lambda: 0.0 if lost() else REQUEST_TIMEOUT + 1.0
                    )
                else:
                    await shutdown.wait(duration)
            if lost():
                console.say(
                    "the embedded nats-server has stopped too (a Ctrl-C in the terminal "
                    "reaches it): stopping the nodes without waiting for them to drain"
                )
                await client.aclose(0.5)
            console.say(f"stopping {_count(len(fleet.replicas), 'node process')}…")
            await fleet.stop(2.0 if lost() else STOP_TIMEOUT, shutdown)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        console.clear()
    _summary(fleet, traffic, shutdown)
    if shutdown.failed or (fleet is not None and fleet.crashes):
        return 1
    if traffic is not None and traffic.sent and not traffic.done:
        return 1
    return 0


def _inspect_hint(url: str, server: NatsServer | None) -> str:
    env = f"MESH_NATS_URL={url}"
    if server is not None and server.monitor_url:
        env += f" MESH_NATS_MONITOR={server.monitor_url}"
    return f"inspect: {env} mesh topology --watch   (or mesh stats, mesh policy ls)"


def _traces_hint() -> str:
    endpoint = os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    )
    if endpoint:
        return (
            f"traces: exporting to {endpoint} (the node processes inherit OTEL_* from "
            "`mesh up`); with Jaeger, open http://localhost:16686"
        )
    return _TRACES_HINT


def _summary(fleet: NodeFleet | None, traffic: Traffic | None, shutdown: Shutdown) -> None:
    lines = [f"mesh up: stopped ({shutdown.reason or 'duration reached'})"]
    if traffic is not None:
        seconds = max((traffic.stopped or time.monotonic()) - traffic.started, 1e-9)
        hist = traffic.total
        lines.append(
            f"  tasks       {traffic.sent} sent, {traffic.done} done, {traffic.failed} errors, "
            f"{traffic.shed} shed, {traffic.aborted} aborted"
        )
        lines.append(f"  throughput  {traffic.done / seconds:.1f} tasks/s over {seconds:.1f}s")
        if hist.count:
            lines.append(
                "  latency     "
                + "  ".join(f"p{q} {_ms(hist.quantile(q / 100))}" for q in (50, 90, 99))
                + f"  max {_ms(hist.max)}"
            )
        if traffic.errors:
            kinds = ", ".join(f"{kind} ×{n}" for kind, n in traffic.errors.most_common())
            lines.append(f"  errors      {kinds}")
    if fleet is not None:
        gave_up = sum(r.gave_up for r in fleet.replicas)
        lines.append(
            f"  nodes       {_count(len(fleet.replicas), 'process')}, {fleet.crashes} crashed, "
            f"{fleet.restarts} restarts" + (f", {gave_up} given up" if gave_up else "")
        )
    print("\n".join(lines), flush=True)


# ------------------------------------------------------------------- the command


def up(
    ctx: typer.Context,
    file: Annotated[
        Path | None,
        typer.Argument(
            metavar="FILE",
            help=f"TOML file listing the nodes (default ./{DEFAULT_FILE}).",
            show_default=False,
        ),
    ] = None,
    demo: Annotated[
        bool, typer.Option("--demo", help="Embedded nats-server, the demo agents and traffic.")
    ] = False,
    duration: Annotated[
        float | None,
        typer.Option(
            help="Stop after this many seconds (default: run until Ctrl-C).", show_default=False
        ),
    ] = None,
    rate: Annotated[float, typer.Option(help="Demo tasks per second.")] = DEFAULT_RATE,
    nats: Annotated[
        str,
        typer.Option("--nats", envvar="MESH_NATS_URL", help="NATS server URL(s), comma-separated."),
    ] = DEFAULT_URL,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Log at INFO level; show the nodes' output.")
    ] = False,
) -> None:
    """Run a mesh: the nodes of a mesh.toml, or the whole demo.

    `mesh up --demo` starts an embedded nats-server on a free port (or uses
    --nats when given on the command line), the demo agents (echo, planner,
    3 researchers, writer) as processes, and sends tasks to demo.plan at
    --rate, showing throughput and latency. `mesh up FILE` runs the node
    tables of FILE (default ./mesh.toml) and restarts crashed nodes.
    Ctrl-C, SIGTERM or --duration stops everything in order, then a summary
    is printed.
    """
    from mesh._cli import EXIT_USAGE, cli_tracing, fail, run

    if sys.platform == "win32":
        raise fail("mesh up needs a POSIX system (process groups and signals)")
    if demo and file is not None:
        raise fail("give either FILE or --demo, not both", EXIT_USAGE)
    if duration is not None and not (0 < duration < math.inf):
        raise fail("--duration must be a positive number of seconds", EXIT_USAGE)
    if not 0 < rate <= MAX_RATE:
        raise fail(f"--rate must be above 0 and at most {MAX_RATE:g} tasks/s", EXIT_USAGE)
    source = ctx.get_parameter_source("nats")
    explicit_nats = source is not None and source.name == "COMMANDLINE"
    server: NatsServer | None = None
    if demo:
        nodes = list(DEMO_NODES)
        if not explicit_nats:
            server = embedded_server_for("nats://127.0.0.1")
    else:
        path = file if file is not None else Path(DEFAULT_FILE)
        try:
            config = load_mesh_file(path)
            if config.nats is not None and not explicit_nats:
                nats = config.nats
            if config.embedded_server:
                server = embedded_server_for(nats)
        except MeshFileError as exc:
            raise fail(f"{path}: {exc}", EXIT_USAGE) from None
        nodes = [(entry.app, entry.replicas) for entry in config.node]
    tracing = cli_tracing("mesh-up") if demo else None
    console = Console(sys.stderr)
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, handlers=[ConsoleLog(console)]
    )
    try:
        code = run(
            run_up(
                nodes,
                url=nats,
                server=server,
                demo=demo,
                rate=rate,
                duration=duration,
                verbose=verbose,
                console=console,
                tracing=tracing,
            )
        )
    finally:
        if tracing is not None:
            tracing.shutdown()
    if code:
        raise typer.Exit(code)


def register(app: typer.Typer) -> None:
    """Add ``mesh up`` to the CLI."""
    app.command("up")(up)
