"""Running a :class:`Node` on a connected client: dispatch, bounds, drain.

Dispatch is one task per message, bounded by a semaphore: while the node is at
``max_concurrency`` the subscription stops being read, so NATS buffers (and,
past the subscription's bound, drops and counts) instead of memory growing.

Shutdown order: stop intake (drain the subscriptions, which hands every
already-received message to dispatch), wait for in-flight handlers (bounded by
``drain_timeout``), deregister, flush.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Final

from opentelemetry.trace import SpanKind, Status, StatusCode

from mesh import MeshClient
from mesh._client import Message, Subscription, current_deadline, span_attributes
from mesh._errors import MalformedMessage, MeshError
from mesh._tracing import activate, current_trace, deactivate
from mesh._wire import TRACE_NONE
from nodes._micro import MicroResponder
from nodes._node import Context, Handler, Node
from nodes._registry import Registration

log = logging.getLogger("mesh.node")

_NS: Final = 1_000_000_000
#: How long shutdown waits for queued messages to be refused after drain_timeout.
_REFUSE_TIMEOUT: Final = 2.0


class NodeRuntime:
    """One running instance of a node. Use as an async context manager."""

    def __init__(self, node: Node, client: MeshClient, *, register: bool = True) -> None:
        self.node = node
        self.client = client
        self.instance = client.new_id()
        self.started = time.time()
        self._register = register
        self._sem = asyncio.Semaphore(node.max_concurrency)
        self._inflight: set[asyncio.Task[None]] = set()
        self._subs: list[Subscription] = []
        self._micro = MicroResponder(node, self.instance, client, self.started)
        self._registration: Registration | None = None
        self._closed = False
        self._refusing = False  # set when draining ran out of time

    @property
    def inflight(self) -> int:
        return len(self._inflight)

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subs)

    async def __aenter__(self) -> NodeRuntime:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Subscribe every handler, answer discovery and register the instance."""
        try:
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
            await asyncio.wait({drained}, timeout=self.node.drain_timeout)
            if not drained.done():
                # Out of time with messages still queued behind busy handlers: refuse the
                # queued ones and cancel the running ones, so every requester hears back.
                self._refusing = True
                log.warning("drain timed out: cancelling %d handlers", len(self._inflight))
                for task in set(self._inflight):
                    task.cancel()
                await asyncio.wait({drained}, timeout=_REFUSE_TIMEOUT)
            if drained.done():
                drained.result()  # re-raise what a drain raised
            else:
                drained.cancel()
            if self._inflight:
                remaining = max(0.1, deadline - time.monotonic())
                _, pending = await asyncio.wait(set(self._inflight), timeout=remaining)
                if pending:
                    log.warning("drain timed out: cancelling %d handlers", len(pending))
                    for task in pending:
                        task.cancel()
                    await asyncio.wait(pending, timeout=1.0)
        finally:
            await self._micro.aclose()
            if self._registration is not None:
                await self._registration.aclose()
            try:
                await self.client.flush(timeout=2)
            except Exception as exc:  # a dead connection cannot be flushed; nothing to keep
                log.debug("flush on close: %s", exc)

    def _dispatcher(self, handler: Handler) -> Any:
        sem = self._sem
        inflight = self._inflight
        run = self._run

        async def dispatch(msg: Message) -> None:
            await sem.acquire()
            if self._refusing:
                sem.release()
                await self._reply_failure(
                    msg, "Cancelled", "the node shut down before handling the message"
                )
                return
            task = asyncio.get_running_loop().create_task(run(handler, msg))
            inflight.add(task)
            task.add_done_callback(inflight.discard)

        return dispatch

    async def _run(self, handler: Handler, msg: Message) -> None:
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
        if span is not None:
            tokens = activate(span)
        elif field:
            current_trace.set(field)
        timeout = handler.timeout or self.node.handler_timeout
        if envelope is not None and envelope.deadline:
            current_deadline.set(envelope.deadline)
            timeout = min(timeout, (envelope.deadline - time.time_ns()) / _NS)
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
            try:
                async with asyncio.timeout(timeout) as cm:
                    result = await handler.func(*args)
            except TimeoutError as exc:
                if not cm.expired():
                    raise
                stats.timeouts += 1
                self._record_error(handler, exc, span, f"handler timed out after {timeout:g}s")
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
            self._sem.release()
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
