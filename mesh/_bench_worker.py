"""The processes `mesh bench` starts: a counting subscriber and an echo responder.

Started as ``python -m mesh._bench_worker ROLE --impl raw|mesh --url URL --subject S``
by :class:`WorkerProcess`, which holds the other end of the pipes. The two talk one
JSON object per line:

- stdout: ``{"event": "ready"}`` once the server holds the worker's subscriptions
  (see :func:`barrier`); later ``{"event": "report", ...}`` with its counts, or
  ``{"event": "error", "message": ...}``.
- stdin: ``report`` makes a worker settle (a subscriber waits for the publisher's
  end marker and works through its queue), print its report and exit. End of
  input makes it exit at once and quietly, so a worker never outlives an
  orchestrator that died.

``raw`` uses nats-py as its documentation shows; ``mesh`` uses :class:`MeshClient`
(and, for the responder, a :class:`nodes.Node` served by :class:`NodeRuntime`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final

import nats
import nats.errors
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased

from mesh._bench_report import UNTALLIED
from mesh._client import (
    DEFAULT_PENDING_BYTES,
    DEFAULT_PENDING_MSGS,
    DEFAULT_RECONNECT_BUFFER,
    MeshClient,
)
from mesh._errors import MeshError
from mesh._tracing import Tracing

TRACING_MODES: Final = ("unsampled", "off", "sampled")
ROLES: Final = ("sub", "echo")
IMPLS: Final = ("raw", "mesh", UNTALLIED)
#: How long the orchestrator waits for a worker to start (interpreter, imports, connect,
#: subscribe) on a loaded machine, and for it to exit when told to.
READY_TIMEOUT: Final = 30.0
EXIT_TIMEOUT: Final = 5.0
#: How long a worker waits for the server to confirm its subscriptions.
BARRIER_TIMEOUT: Final = 10.0
#: How long a subscriber may take to work through its backlog when asked to report.
SETTLE_TIMEOUT: Final = 60.0
#: Connection options both sides share, so only the mesh's own code differs.
RAW_OPTIONS: Final[dict[str, Any]] = {
    "pending_size": DEFAULT_RECONNECT_BUFFER,
    "connect_timeout": 2,
}


class CountingExporter(SpanExporter):
    """An in-memory exporter that keeps nothing: it counts the spans it is given.

    The spans are still built, sampled, batched and handed over, so the cost of
    real tracing shows, with no collector and no memory growth.
    """

    def __init__(self) -> None:
        self.spans = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        self.spans += len(spans)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def make_tracing(mode: str, service: str) -> tuple[Tracing | None, CountingExporter | None]:
    """The mesh side's tracing for ``mode`` (see :data:`TRACING_MODES`).

    ``unsampled``: tracing is on and nothing is sampled, so there is no exporter;
    ``sampled``: every chain is sampled and its spans go to a :class:`CountingExporter`;
    ``off``: no tracing object at all.
    """
    if mode == "off":
        return None, None
    if mode == "unsampled":
        return Tracing(TracerProvider(sampler=ParentBased(ALWAYS_OFF)), sample_ratio=0.0), None
    if mode == "sampled":
        exporter = CountingExporter()
        provider = TracerProvider(sampler=ParentBased(ALWAYS_ON))
        provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=16_384))
        return Tracing(provider, sample_ratio=1.0), exporter
    raise ValueError(f"unknown tracing mode {mode!r}: use one of {', '.join(TRACING_MODES)}")


def emit(event: str, **fields: Any) -> None:
    """Write one protocol line on stdout."""
    sys.stdout.write(json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


async def stdin_reader() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


class Orphan:
    """Set once the orchestrator is gone: from then on the worker only winds down."""

    orphaned = False


async def wait_for_report(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Wait for the orchestrator's ``report``: True when asked, False when it is gone.

    Gone means end of input (it exited or died) or ``timeout``; the worker then has
    nobody to tell about the errors of winding down (its server may be gone too), so
    logging is switched off.
    """
    try:
        line = await asyncio.wait_for(reader.readline(), timeout)
    except TimeoutError:
        line = b""
    if line.strip() == b"report":
        return True
    Orphan.orphaned = True
    logging.disable(logging.CRITICAL)
    return False


class Counter:
    """Messages received, and when the first and the last arrived."""

    __slots__ = ("count", "first_ns", "last_ns")

    def __init__(self) -> None:
        self.count = 0
        self.first_ns = 0
        self.last_ns = 0

    def report(self) -> dict[str, Any]:
        elapsed = (self.last_ns - self.first_ns) / 1e9
        return {
            "received": self.count,
            "seconds": elapsed,
            "msgs_s": (self.count - 1) / elapsed if self.count > 1 and elapsed > 0 else 0.0,
        }


# ------------------------------------------------------------------ subscriber


class Receiver:
    """A counting subscription, raw or mesh, and what it saw besides messages."""

    def __init__(self, nc: Nats, close: Callable[[], Awaitable[None]]) -> None:
        self.nc = nc
        self.close = close
        self.counter = Counter()
        self.dropped: Callable[[], int] = lambda: 0
        self.pending: Callable[[], int] = lambda: 0
        self.disconnects: Callable[[], int] = lambda: 0
        self.spans: Callable[[], int] = lambda: 0


def counting_callback(counter: Counter) -> Callable[[Any], Awaitable[None]]:
    """The same callback body for both sides: count, and stamp the first and last."""
    clock = time.perf_counter_ns

    async def cb(msg: Any) -> None:
        now = clock()
        if not counter.count:
            counter.first_ns = now
        counter.count += 1
        counter.last_ns = now

    return cb


async def raw_receiver(args: argparse.Namespace) -> Receiver:
    drops = [0]
    disconnects = [0]

    async def on_error(exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            drops[0] += 1

    async def on_disconnect() -> None:
        disconnects[0] += 1

    nc = await nats.connect(
        args.url.split(","),
        name="bench-sub-raw",
        error_cb=on_error,
        disconnected_cb=on_disconnect,
        **RAW_OPTIONS,
    )
    receiver = Receiver(nc, nc.close)
    # The mesh's default bounds, so both sides drop at the same point.
    sub = await nc.subscribe(
        args.subject,
        cb=counting_callback(receiver.counter),
        pending_msgs_limit=DEFAULT_PENDING_MSGS,
        pending_bytes_limit=DEFAULT_PENDING_BYTES,
    )
    receiver.dropped = lambda: drops[0]
    receiver.pending = lambda: int(sub.pending_msgs)
    receiver.disconnects = lambda: disconnects[0]
    return receiver


async def mesh_receiver(args: argparse.Namespace) -> Receiver:
    tracing, exporter = make_tracing(args.tracing, "bench-sub")
    client = await MeshClient.connect(
        args.url, name="bench-sub-mesh", tracing=tracing, telemetry=args.impl != UNTALLIED
    )
    receiver = Receiver(client.nc, client.aclose)
    sub = await client.subscribe(args.subject, counting_callback(receiver.counter))
    receiver.dropped = lambda: sub.dropped
    receiver.pending = lambda: sub.pending
    receiver.disconnects = lambda: client.stats().disconnects
    if exporter is not None:
        receiver.spans = lambda: exporter.spans
    return receiver


async def barrier(nc: Nats, subject: str) -> None:
    """Return once the server has processed every command sent before on ``nc``.

    It publishes to ``subject`` and waits for its own copy (NATS echoes a client's
    messages to its own subscriptions). ``nc.flush()`` is not enough: nats-py 2.16
    writes the PING straight to the socket, ahead of the commands still buffered.
    """
    sub = await nc.subscribe(subject)
    try:
        await nc.publish(subject, b"")
        await sub.next_msg(timeout=BARRIER_TIMEOUT)
    finally:
        await sub.unsubscribe()


async def run_subscriber(args: argparse.Namespace) -> dict[str, Any]:
    receiver = await (raw_receiver(args) if args.impl == "raw" else mesh_receiver(args))
    try:
        ended = asyncio.Event()

        async def on_end(msg: Msg) -> None:
            ended.set()

        # The orchestrator publishes this after its last message, on the same connection.
        await receiver.nc.subscribe(end_subject(args.subject), cb=on_end)
        await barrier(receiver.nc, f"{args.subject}.ready")
        emit("ready")
        reader = await stdin_reader()
        cpu_start = time.process_time()
        if not await wait_for_report(reader, args.lifetime):
            return {}
        # The end marker came after every message: once it is here, the rest is at
        # least queued; then let the callback work through the queue.
        await asyncio.wait_for(ended.wait(), SETTLE_TIMEOUT)
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while time.monotonic() < deadline:
            if receiver.pending() == 0:  # no event for this in nats-py: poll
                break
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.01)  # the callback of the last message taken off the queue
        cpu = time.process_time() - cpu_start
        return {
            **receiver.counter.report(),
            "cpu_s": cpu,
            "dropped": receiver.dropped(),
            "disconnects": receiver.disconnects(),
            "spans": receiver.spans(),
        }
    finally:
        await receiver.close()


def end_subject(subject: str) -> str:
    """Where the publisher marks the end of a pub→sub case."""
    return f"{subject}.end"


# ------------------------------------------------------------------- responder


async def run_responder(args: argparse.Namespace) -> dict[str, Any]:
    handled = [0]
    if args.impl == "raw":
        nc = await nats.connect(args.url.split(","), name="bench-echo-raw", **RAW_OPTIONS)

        async def echo_raw(msg: Msg) -> None:
            handled[0] += 1
            await msg.respond(msg.data)

        await nc.subscribe(args.subject, cb=echo_raw)
        try:
            await barrier(nc, f"{args.subject}.ready")
            emit("ready")
            reader = await stdin_reader()
            cpu = time.process_time()
            if not await wait_for_report(reader, args.lifetime):
                return {}
            return {"handled": handled[0], "cpu_s": time.process_time() - cpu, "spans": 0}
        finally:
            await nc.close()

    from nodes import Node, NodeRuntime

    node = Node("bench-echo")

    @node.handles(args.subject)
    async def echo(payload: bytes) -> bytes:
        handled[0] += 1
        return payload

    tracing, exporter = make_tracing(args.tracing, "bench-echo")
    client = await MeshClient.connect(args.url, name="bench-echo-mesh", tracing=tracing)
    async with client:
        async with NodeRuntime(node, client, register=False):
            await barrier(client.nc, f"{args.subject}.ready")
            emit("ready")
            reader = await stdin_reader()
            cpu = time.process_time()
            asked = await wait_for_report(reader, args.lifetime)
            cpu = time.process_time() - cpu
        if not asked:
            return {}
        spans = exporter.spans if exporter is not None else 0
        return {"handled": handled[0], "cpu_s": cpu, "spans": spans}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mesh._bench_worker")
    parser.add_argument("role", choices=ROLES)
    parser.add_argument("--impl", choices=IMPLS, required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--subject", required=True)
    parser.add_argument("--tracing", choices=TRACING_MODES, default="unsampled")
    parser.add_argument(
        "--lifetime", type=float, default=600.0, help="Exit after this many seconds regardless."
    )
    return parser.parse_args(argv)


async def amain(args: argparse.Namespace) -> None:
    run = run_subscriber if args.role == "sub" else run_responder
    report = await run(args)
    if report:
        emit("report", **report)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        asyncio.run(amain(args))
    except BaseException as exc:
        if Orphan.orphaned:
            return 0  # winding down after the orchestrator went away: nobody to tell
        if isinstance(exc, KeyboardInterrupt):
            return 130
        if isinstance(exc, OSError | TimeoutError | nats.errors.Error | MeshError):
            emit("error", message=f"{type(exc).__name__}: {exc}")
            return 1
        raise
    return 0


# ------------------------------------------------- the orchestrator's handle


class BenchFailed(MeshError):
    """A worker did not start, answer or report in time; the message says which."""


class WorkerProcess:
    """A worker started by the orchestrator; ``async with`` waits for it to be
    ready and ends it on the way out, however the block exits.

    It runs in its own session, so Ctrl-C reaches only the orchestrator, which
    then closes the worker's stdin (a worker exits at the end of its input) and
    kills it if it has not gone within :data:`EXIT_TIMEOUT`.
    """

    def __init__(
        self, role: str, impl: str, url: str, subject: str, *, tracing: str, lifetime: float
    ) -> None:
        self.label = f"{impl} {'subscriber' if role == 'sub' else 'responder'}"
        self.argv = [sys.executable, "-m", "mesh._bench_worker", role, "--impl", impl]
        self.argv += ["--url", url, "--subject", subject, "--tracing", tracing]
        self.argv += ["--lifetime", f"{lifetime:g}"]
        self.proc: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> WorkerProcess:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            start_new_session=True,
        )
        try:
            await self._expect("ready", READY_TIMEOUT)
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def finish(self, timeout: float) -> dict[str, Any]:
        """Ask for the report, read it, and let the process exit."""
        stdin = self._pipes()[0]
        stdin.write(b"report\n")
        await stdin.drain()
        report = await self._expect("report", timeout)
        await self.aclose()
        return report

    async def aclose(self) -> None:
        """End the process: close its stdin, kill it if it lingers (idempotent)."""
        proc, self.proc = self.proc, None
        if proc is None or proc.returncode is not None:
            return
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT)
        except TimeoutError:
            _kill(proc)
            await asyncio.wait_for(proc.wait(), EXIT_TIMEOUT)
        except asyncio.CancelledError:
            _kill(proc)
            raise

    def _pipes(self) -> tuple[asyncio.StreamWriter, asyncio.StreamReader]:
        proc = self.proc
        if proc is None or proc.stdin is None or proc.stdout is None:
            raise RuntimeError(f"the {self.label} is not running")
        return proc.stdin, proc.stdout

    async def _expect(self, event: str, timeout: float) -> dict[str, Any]:
        stdout = self._pipes()[1]
        deadline = time.monotonic() + timeout
        while True:
            remaining = max(0.0, deadline - time.monotonic())
            try:
                line = await asyncio.wait_for(stdout.readline(), remaining)
            except TimeoutError:
                raise BenchFailed(
                    f"the {self.label} did not send {event!r} within {timeout:g}s"
                ) from None
            if not line:
                code = await self._exit_code()
                raise BenchFailed(
                    f"the {self.label} exited (code {code}) before sending {event!r}; "
                    "its errors are above"
                )
            try:
                message = json.loads(line)
            except json.JSONDecodeError:
                continue  # something printed on stdout that is not ours
            if message.get("event") == "error":
                raise BenchFailed(f"the {self.label} failed: {message.get('message')}")
            if message.get("event") == event:
                return dict(message)

    async def _exit_code(self) -> int | None:
        if self.proc is None:
            return None
        try:
            return await asyncio.wait_for(self.proc.wait(), EXIT_TIMEOUT)
        except TimeoutError:
            return None


def _kill(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        proc.kill()


if __name__ == "__main__":
    sys.exit(main())
