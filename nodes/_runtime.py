"""Running a :class:`Node` on a connected client: dispatch, bounds, drain.

Dispatch feeds a queue of ``max_concurrency`` slots drained by as many worker
tasks: at most that many handlers run at once, and while every slot is taken
the subscription stops being read, so NATS buffers (and, past the
subscription's bound, drops and counts) instead of memory growing. A fixed pool
costs less per message than a task each, and one sweeper task enforces every
handler timeout instead of a timer per call.

Shutdown order: stop intake (drain the subscriptions, which hands every
already-received message to dispatch), let the workers finish the queue
(bounded by ``drain_timeout``; past it, running handlers are cancelled and
queued messages refused, each with an error reply), deregister, flush.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import Any, Final

from opentelemetry.trace import SpanKind, Status, StatusCode

from mesh import MeshClient
from mesh._client import Message, Subscription, current_deadline, span_attributes
from mesh._errors import MalformedMessage, MeshError
from mesh._tracing import activate, current_trace, deactivate
from mesh._wire import TRACE_NONE, TRACE_UNSAMPLED
from nodes._micro import MicroResponder
from nodes._node import Context, Handler, Node
from nodes._registry import Registration

log = logging.getLogger("mesh.node")

_NS: Final = 1_000_000_000
#: How long shutdown waits for queued messages to be refused after drain_timeout.
_REFUSE_TIMEOUT: Final = 2.0
#: How often running handlers are checked against their deadlines (at most).
_SWEEP_INTERVAL: Final = 0.05

Work = tuple[Handler, Message]


class NodeRuntime:
    """One running instance of a node. Use as an async context manager."""

    def __init__(self, node: Node, client: MeshClient, *, register: bool = True) -> None:
        self.node = node
        self.client = client
        self.instance = secrets.token_hex(11)  # 22 characters, like a NATS micro id
        self.started = time.time()
        self._register = register
        self._queue: asyncio.Queue[Work] = asyncio.Queue(node.max_concurrency)
        self._workers: list[asyncio.Task[None]] = []
        self._sweeper: asyncio.Task[None] | None = None
        # Running handlers' deadlines (time.monotonic()), keyed by their worker; the sweeper
        # cancels an overdue worker and marks it expired so it answers HandlerTimeout.
        self._deadlines: dict[asyncio.Task[None], float] = {}
        self._expired: set[asyncio.Task[None]] = set()
        self._has_deadlines = asyncio.Event()
        self._subs: list[Subscription] = []
        self._micro = MicroResponder(node, self.instance, client, self.started)
        self._registration: Registration | None = None
        self._closed = False
        self._refusing = False  # set when draining ran out of time

    @property
    def inflight(self) -> int:
        """Handlers running now."""
        return len(self._deadlines)

    @property
    def queued(self) -> int:
        """Messages received and waiting for a free worker."""
        return self._queue.qsize()

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subs)

    async def __aenter__(self) -> NodeRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Start the workers, subscribe every handler, answer discovery, register."""
        loop = asyncio.get_running_loop()
        try:
            self._workers = [
                loop.create_task(self._work(), name=f"{self.node.name}-worker-{i}")
                for i in range(self.node.max_concurrency)
            ]
            self._sweeper = loop.create_task(self._sweep(), name=f"{self.node.name}-timeouts")
            for handler in self.node.handlers:
                sub = await self.client.subscribe(
                    handler.subject, self._dispatcher(handler), queue=handler.queue, traced=False
                )
                self._subs.append(sub)
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
            drained = asyncio.ensure_future(asyncio.gather(*(sub.drain() for sub in self._subs)))
            finished = asyncio.ensure_future(self._queue.join())
            await asyncio.wait({drained}, timeout=self.node.drain_timeout)
            if drained.done():
                await asyncio.wait({finished}, timeout=max(0.0, deadline - time.monotonic()))
            if not (drained.done() and finished.done()):
                # Out of time: cancel running handlers and refuse queued messages, so
                # every requester hears back rather than waiting for its timeout.
                self._refusing = True
                log.warning(
                    "drain timed out: cancelling %d handlers, refusing %d queued messages",
                    self.inflight,
                    self.queued,
                )
                await self._stop_workers()
                await self._refuse_queued()
                await asyncio.wait({drained}, timeout=_REFUSE_TIMEOUT)
                await self._refuse_queued()  # what blocked dispatchers put meanwhile
            finished.cancel()
            if drained.done():
                drained.result()  # re-raise what a drain raised
            else:
                drained.cancel()
        finally:
            await self._stop_workers()
            await self._micro.aclose()
            if self._registration is not None:
                await self._registration.aclose()
            try:
                await self.client.flush(timeout=2)
            except Exception as exc:  # a dead connection cannot be flushed; nothing to keep
                log.debug("flush on close: %s", exc)

    async def _stop_workers(self) -> None:
        tasks = [t for t in (*self._workers, self._sweeper) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=_REFUSE_TIMEOUT)

    async def _refuse_queued(self) -> None:
        while not self._queue.empty():
            _, msg = self._queue.get_nowait()
            self._queue.task_done()
            await self._reply_failure(
                msg, "Cancelled", "the node shut down before handling the message"
            )

    def _dispatcher(self, handler: Handler) -> Any:
        queue = self._queue

        async def dispatch(msg: Message) -> None:
            if self._refusing:
                await self._reply_failure(
                    msg, "Cancelled", "the node shut down before handling the message"
                )
            elif queue.full():
                await queue.put((handler, msg))  # backpressure: the subscription waits
            else:
                queue.put_nowait((handler, msg))

        return dispatch

    async def _work(self) -> None:
        me = asyncio.current_task()
        assert me is not None
        queue = self._queue
        run = self._run
        while True:
            handler, msg = await queue.get()
            try:
                await run(handler, msg, me)
            finally:
                queue.task_done()

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

    def _take_expiry(self, me: asyncio.Task[None]) -> bool:
        """True (once) if the sweeper cancelled ``me`` for running past its deadline."""
        if me not in self._expired:
            return False
        self._expired.discard(me)
        me.uncancel()
        return True

    async def _run(self, handler: Handler, msg: Message, me: asyncio.Task[None]) -> None:
        client = self.client
        stats = handler.stats
        started = time.perf_counter_ns()
        envelope = msg.envelope
        field = envelope.trace if envelope is not None else TRACE_NONE
        tracing = client.tracing
        span = None
        tokens = None
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
        # Workers are reused: set this message's context, and put it back afterwards.
        if span is not None:
            tokens = activate(span)
            trace_token = None
        else:
            trace_token = current_trace.set(field)
        deadline_ns = envelope.deadline if envelope is not None else 0
        deadline_token = current_deadline.set(deadline_ns)
        timeout = handler.timeout or self.node.handler_timeout
        if deadline_ns:
            timeout = min(timeout, (deadline_ns - time.time_ns()) / _NS)
        try:
            stats.requests += 1
            if timeout <= 0:
                # An error reply like any other: NATS micro's num_errors counts it.
                stats.timeouts += 1
                stats.errors += 1
                stats.last_error = "DeadlineExceeded: the deadline passed before handling"
                await client.respond_error(
                    msg, "DeadlineExceeded", "the request's deadline passed before it was handled"
                )
                return
            try:
                payload = msg.decode(handler.input_type)
            except MalformedMessage as exc:
                self._record_error(handler, exc, span)
                await client.respond_error(msg, "MalformedMessage", str(exc))
                return
            args = (
                (payload, Context(self.node.name, msg, client))
                if handler.wants_context
                else (payload,)
            )
            deadlines = self._deadlines
            if not deadlines:
                self._has_deadlines.set()
            deadlines[me] = time.monotonic() + timeout
            try:
                result = await handler.func(*args)
            except asyncio.CancelledError as exc:
                if not self._take_expiry(me):
                    raise
                expired: BaseException | None = exc
            except Exception as exc:
                if not self._take_expiry(me):
                    raise
                expired = exc  # the handler turned our cancellation into an error
            else:
                # A handler that swallowed the cancellation and finished anyway: keep
                # its result, forget the cancellation.
                self._take_expiry(me)
                expired = None
            finally:
                deadlines.pop(me, None)
            if expired is not None:
                stats.timeouts += 1
                self._record_error(handler, expired, span, f"handler timed out after {timeout:g}s")
                await client.respond_error(
                    msg, "HandlerTimeout", f"{handler.name} did not finish within {timeout:g}s"
                )
                return
            await client.respond(msg, result)
        except asyncio.CancelledError:
            await self._reply_failure(msg, "Cancelled", "the node shut down before finishing")
            raise
        except Exception as exc:
            log.exception("handler %s failed on %s", handler.name, msg.subject)
            self._record_error(handler, exc, span)
            await self._reply_failure(msg, type(exc).__name__, str(exc))
        finally:
            stats.processing_ns += time.perf_counter_ns() - started
            current_deadline.reset(deadline_token)
            if trace_token is not None:
                current_trace.reset(trace_token)
            if tokens is not None:
                deactivate(tokens)
            if span is not None:
                span.end()

    async def _reply_failure(self, msg: Message, error_type: str, message: str) -> None:
        try:
            await self.client.respond_error(msg, error_type, message)
        except MeshError as exc:
            log.warning("could not send the error reply on %s: %s", msg.subject, exc)

    @staticmethod
    def _record_error(
        handler: Handler, exc: BaseException, span: Any, text: str | None = None
    ) -> None:
        handler.stats.errors += 1
        handler.stats.last_error = text or f"{type(exc).__name__}: {exc}"
        if span is not None:
            span.record_exception(exc)
            span.set_status(Status(StatusCode.ERROR, handler.stats.last_error))
