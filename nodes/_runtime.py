"""Running a :class:`Node` on a connected client: dispatch, bounds, drain.

Each message runs in a task of its own (so context variables a handler sets
never leak into the next message), at most ``max_concurrency`` at once: while
every slot is taken the subscription stops being read, so NATS buffers (and,
past the subscription's bound, drops and counts) instead of memory growing.
One sweeper task enforces every handler timeout, instead of a timer per call.

Shutdown order: stop intake (drain the subscriptions, which hands every
already-received message to dispatch), wait for the running handlers (bounded
by ``drain_timeout``; past it, they are cancelled and messages still arriving
refused, each with an error reply), deregister, flush.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Final

from opentelemetry.trace import SpanKind, Status, StatusCode

from mesh import MeshClient
from mesh._client import current_deadline
from mesh._enforcer import PolicyEnforcer
from mesh._errors import MalformedMessage
from mesh._message import Message, Subscription, span_attributes
from mesh._telemetry import DEFAULT_INTERVAL, TelemetryEmitter
from mesh._tracing import activate, current_trace, deactivate
from mesh._wire import TRACE_NONE, TRACE_UNSAMPLED
from nodes._micro import MicroResponder
from nodes._node import Context, Handler, Node
from nodes._registry import Registration
from nodes._reliable import ReliableConsumer

log = logging.getLogger("mesh.node")

_NS: Final = 1_000_000_000
#: How long shutdown waits for queued messages to be refused after drain_timeout.
_REFUSE_TIMEOUT: Final = 2.0
#: How often running handlers are checked against their deadlines (at most).
_SWEEP_INTERVAL: Final = 0.05


class NodeRuntime:
    """One running instance of a node. Use as an async context manager."""

    def __init__(
        self,
        node: Node,
        client: MeshClient,
        *,
        register: bool = True,
        telemetry_interval: float = DEFAULT_INTERVAL,
    ) -> None:
        self.node = node
        self.client = client
        self.instance = secrets.token_hex(11)  # 22 characters, like a NATS micro id
        self.started = time.time()
        self._register = register
        self._slots = asyncio.Semaphore(node.max_concurrency)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._sweeper: asyncio.Task[None] | None = None
        # Running handlers' deadlines (time.monotonic()), by task; the sweeper cancels
        # an overdue task and marks it expired, so it answers HandlerTimeout.
        self._deadlines: dict[asyncio.Task[Any], float] = {}
        self._expired: set[asyncio.Task[Any]] = set()
        self._has_deadlines = asyncio.Event()
        self._subs: list[Subscription] = []
        self._consumers: list[ReliableConsumer] = []  # the reliable handlers' feeds
        self._index: dict[int, int] = {}  # id(subscription) -> handler index
        self._inflight = [0] * len(node.handlers)  # handler calls running, by handler
        self._enforcer = PolicyEnforcer(client, agent=node.name, instance=self.instance)
        self._telemetry = TelemetryEmitter(
            client,
            agent=node.name,
            instance=self.instance,
            interval=telemetry_interval,
            max_concurrency=node.max_concurrency,
            inflight=self._inflight_of,
            policy=self._enforcer.telemetry,
        )
        self._micro = MicroResponder(node, self.instance, client, self.started)
        self._registration: Registration | None = None
        self._closed = False
        self._refusing = False  # set when draining ran out of time

    @property
    def inflight(self) -> int:
        """Handlers running now."""
        return len(self._tasks)

    def _inflight_of(self, sub: Subscription) -> int:
        index = self._index.get(id(sub))
        return self._inflight[index] if index is not None else 0

    async def __aenter__(self) -> NodeRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Subscribe every handler, answer discovery and register the instance."""
        loop = asyncio.get_running_loop()
        try:
            self._sweeper = loop.create_task(self._sweep(), name=f"{self.node.name}-timeouts")
            # Policy first: the first message out already follows it.
            await self._enforcer.start()
            for index, handler in enumerate(self.node.handlers):
                if handler.reliable:
                    consumer = ReliableConsumer(self, handler, index)
                    self._consumers.append(consumer)
                    await consumer.start()
                    sub = consumer.subscription
                else:
                    sub = await self.client.subscribe(
                        handler.subject,
                        self._dispatcher(handler, index, loop),
                        queue=handler.queue,
                        traced=False,
                    )
                self._subs.append(sub)
                self._index[id(sub)] = index
            self._telemetry.start()
            await self._micro.start()
            if self._register:
                self._registration = Registration(
                    self.client, self.node, self.instance, self.started
                )
                await self._registration.start()
            await self.client.flush()  # every subscription is live before start returns
        except BaseException:
            await self.aclose()
            raise

    async def aclose(self) -> None:
        """Drain: stop intake, finish in-flight work, deregister, flush (idempotent)."""
        if self._closed:
            return
        self._closed = True
        deadline = time.monotonic() + self.node.drain_timeout
        try:
            drained = asyncio.ensure_future(
                asyncio.gather(
                    *(sub.drain() for sub in self._subs),
                    *(consumer.stop() for consumer in self._consumers),
                )
            )
            # Intake first: until the drain returns, received messages still start tasks.
            await asyncio.wait({drained}, timeout=self.node.drain_timeout)
            while self._tasks and time.monotonic() < deadline:
                await asyncio.wait(set(self._tasks), timeout=deadline - time.monotonic())
            if self._tasks or not drained.done():
                # Out of time: cancel running handlers and refuse what still arrives, so
                # every requester hears back rather than waiting for its timeout.
                self._refusing = True
                log.warning("drain timed out: cancelling %d handlers", len(self._tasks))
                await self._cancel(self._tasks)
                await asyncio.wait({drained}, timeout=_REFUSE_TIMEOUT)
                await self._cancel(self._tasks)  # what a last dispatch started meanwhile
            if drained.done():
                drained.result()  # re-raise what a drain raised
            else:
                drained.cancel()
        finally:
            if self._sweeper is not None:
                await self._cancel({self._sweeper})
            await self._telemetry.aclose()  # the last interval's counts, drain included
            await self._enforcer.aclose()
            await self._micro.aclose()
            if self._registration is not None:
                await self._registration.aclose()
            try:
                await self.client.flush(timeout=2)
            except Exception as exc:  # a dead connection cannot be flushed; nothing to keep
                log.debug("flush on close: %s", exc)

    @staticmethod
    async def _cancel(tasks: set[asyncio.Task[Any]]) -> None:
        pending = [t for t in tasks if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.wait(pending, timeout=_REFUSE_TIMEOUT)

    def _dispatcher(self, handler: Handler, index: int, loop: asyncio.AbstractEventLoop) -> Any:
        slots = self._slots
        tasks = self._tasks
        run = self._run

        async def dispatch(msg: Message) -> None:
            await slots.acquire()  # backpressure: at the bound, the subscription waits
            if self._refusing:
                slots.release()
                await self._reply_failure(
                    msg, "Cancelled", "the node shut down before handling the message"
                )
                return
            # A task of its own: the handler's context variables die with it.
            task = loop.create_task(run(handler, index, msg))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

        return dispatch

    async def _sweep(self) -> None:
        deadlines = self._deadlines
        while True:
            if not deadlines:
                self._has_deadlines.clear()
                await self._has_deadlines.wait()
            await asyncio.sleep(_SWEEP_INTERVAL)
            now = time.monotonic()
            for task, due in list(deadlines.items()):
                if due <= now and task not in self._expired:
                    self._expired.add(task)
                    task.cancel()

    def _take_expiry(self, me: asyncio.Task[Any]) -> bool:
        """True (once) if the sweeper cancelled ``me`` for running past its deadline.

        Raises CancelledError when a second cancellation (shutdown) is pending too:
        that one must not be swallowed.
        """
        if me not in self._expired:
            return False
        self._expired.discard(me)
        if me.uncancel() > 0:
            raise asyncio.CancelledError
        return True

    async def _run(self, handler: Handler, index: int, msg: Message) -> str:
        """Handle one message (a slot is held; it is released here). Returns "" when
        the handler succeeded, else what went wrong."""
        me = asyncio.current_task()
        assert me is not None
        client = self.client
        stats = handler.stats
        started = time.perf_counter_ns()
        envelope = msg.envelope
        field = envelope.trace if envelope is not None else TRACE_NONE
        tracing = client.tracing
        span = None
        if tracing is not None:
            span = tracing.start_inbound(
                "process",
                SpanKind.SERVER if msg.reply else SpanKind.CONSUMER,
                msg.subject,
                field,
                lambda: span_attributes(msg, handler.queue),
            )
            if span is None:
                field = TRACE_UNSAMPLED  # this process decided: nothing downstream samples
        # This task's own context: set, never reset.
        tokens = activate(span) if span is not None else None
        if span is None:
            current_trace.set(field)
        deadline_ns = envelope.deadline if envelope is not None else 0
        current_deadline.set(deadline_ns)
        timeout = handler.timeout or self.node.handler_timeout
        if deadline_ns:
            timeout = min(timeout, (deadline_ns - time.time_ns()) / _NS)
        errors_before, timeouts_before = stats.errors, stats.timeouts
        sent = 0  # reply bytes
        outcome = ""
        self._inflight[index] += 1
        try:
            stats.requests += 1
            if timeout <= 0:
                # An error reply like any other: NATS micro's num_errors counts it.
                stats.timeouts += 1
                stats.errors += 1
                stats.last_error = outcome = "DeadlineExceeded: the deadline passed before handling"
                sent = await client.respond_error(
                    msg, "DeadlineExceeded", "the request's deadline passed before it was handled"
                )
                return outcome
            try:
                payload = msg.decode(handler.input_type)
            except MalformedMessage as exc:
                self._record_error(handler, exc, span)
                sent = await client.respond_error(msg, "MalformedMessage", str(exc))
                return f"MalformedMessage: {exc}"
            args = (
                (payload, Context(self.node.name, msg, client))
                if handler.wants_context
                else (payload,)
            )
            deadlines = self._deadlines
            if not deadlines:
                self._has_deadlines.set()
            deadlines[me] = time.monotonic() + timeout
            failure: BaseException | None = None
            expired = False
            try:
                result = await handler.func(*args)
            except asyncio.CancelledError as exc:
                expired = self._take_expiry(me)
                if not expired and me.cancelling():
                    raise  # the node is shutting down
                # Otherwise the handler awaited something cancelled: its own failure.
                failure = exc
            except Exception as exc:
                # The handler may have turned our cancellation into an error of its own.
                expired = self._take_expiry(me)
                failure = exc
            else:
                # A handler that swallowed the cancellation and finished anyway: keep
                # its result, forget the cancellation.
                self._take_expiry(me)
            finally:
                deadlines.pop(me, None)
            if expired:
                stats.timeouts += 1
                outcome = f"HandlerTimeout: did not finish within {timeout:g}s"
                self._record_error(handler, failure, span, f"handler timed out after {timeout:g}s")
                sent = await client.respond_error(
                    msg, "HandlerTimeout", f"{handler.name} did not finish within {timeout:g}s"
                )
            elif failure is not None:
                log.error("handler %s failed on %s", handler.name, msg.subject, exc_info=failure)
                self._record_error(handler, failure, span)
                outcome = f"{type(failure).__name__}: {failure}"
                sent = await self._reply_failure(msg, type(failure).__name__, str(failure))
            else:
                sent = await client.respond(msg, result)
        except asyncio.CancelledError:
            sent = await self._reply_failure(
                msg, "Cancelled", "the node shut down before finishing"
            )
            raise
        except Exception as exc:  # sending the reply failed
            log.warning("could not reply on %s: %s", msg.subject, exc)
        finally:
            elapsed = time.perf_counter_ns() - started
            stats.processing_ns += elapsed
            self._inflight[index] -= 1
            counters = self._subs[index].counters if index < len(self._subs) else None
            if counters is not None:
                counters.handler_done(
                    elapsed,
                    error=stats.errors > errors_before,
                    timeout=stats.timeouts > timeouts_before,
                )
                if sent:
                    counters.replies += 1
                    counters.reply_bytes += sent
            self._slots.release()
            if tokens is not None:
                deactivate(tokens)
            if span is not None:
                span.end()
        return outcome

    async def _reply_failure(self, msg: Message, error_type: str, message: str) -> int:
        try:
            return await self.client.respond_error(msg, error_type, message)
        except Exception as exc:  # the connection may be gone; the requester times out
            log.warning("could not send the error reply on %s: %s", msg.subject, exc)
            return 0

    @staticmethod
    def _record_error(
        handler: Handler, exc: BaseException | None, span: Any, text: str | None = None
    ) -> None:
        handler.stats.errors += 1
        handler.stats.last_error = text or f"{type(exc).__name__}: {exc}"
        if span is not None:
            if exc is not None:
                span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, handler.stats.last_error))
