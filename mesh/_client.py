"""The mesh client: publish, request and subscribe over one NATS connection.

Every message leaves as a frame (see :mod:`mesh._wire`) and every received
message is accepted with or without one, so plain NATS clients interoperate.
Lower-level errors from nats-py are translated here into the mesh's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import itertools
import logging
import os
import time
from typing import Any, Final, TypeVar, overload

import msgspec
import nats
import nats.errors
from nats.aio.client import Client as Nats
from nats.aio.msg import Msg
from opentelemetry.trace import SpanKind, Status, StatusCode

from mesh import _denials
from mesh._auth import connect_options, refusal
from mesh._codec import CodecEngine
from mesh._dictionaries import DictionaryStore
from mesh._errors import (
    ClientClosed,
    ConnectionFailed,
    CredentialsRefused,
    FlushTimeout,
    MalformedMessage,
    MeshError,
    NoResponders,
    PayloadTooLarge,
    PublishBufferFull,
    RemoteError,
    RequestTimeout,
)
from mesh._message import (
    Callback,
    ClientStats,
    Message,
    Subscription,
    span_attributes,
)
from mesh._names import validate_agent_name, validate_queue_group, validate_subject
from mesh._policy import PolicyTable
from mesh._reliable import PUBLISH_TIMEOUT, ReliableStreams, store, validate_msg_id
from mesh._telemetry import MAX_RETIRED, MAX_SUBJECTS, SentCounters
from mesh._tracing import Tracing, activate, current_trace, deactivate
from mesh._wire import (
    MAGIC,
    TRACE_NONE,
    TRACE_UNSAMPLED,
    Codec,
    ContentType,
    Envelope,
    ErrorReply,
    Kind,
    RemoteFailure,
    decode_failure,
    decode_frame,
    decode_payload,
    encode_frame,
    encode_payload,
    is_frame,
)

log = logging.getLogger("mesh.client")
#: Set on log records of permission violations; the CLI reports them as its error.
DENIED_LOG_KEY: Final = "mesh_denied"

T = TypeVar("T")

DEFAULT_URL: Final = "nats://127.0.0.1:4222"
DEFAULT_CONNECT_TIMEOUT: Final = 2.0
DEFAULT_REQUEST_TIMEOUT: Final = 5.0
MAX_TIMEOUT: Final = 86_400.0
DEFAULT_DRAIN_TIMEOUT: Final = 10.0
DEFAULT_FLUSH_TIMEOUT: Final = 5.0
#: Messages and bytes a subscription may hold before the oldest are dropped (counted).
DEFAULT_PENDING_MSGS: Final = 65_536
DEFAULT_PENDING_BYTES: Final = 64 * 1024 * 1024
#: Bytes of publishes buffered while reconnecting; past this publish raises PublishBufferFull.
DEFAULT_RECONNECT_BUFFER: Final = 8 * 1024 * 1024
#: A server that stops answering (hung, paused, a half-open connection) is left for
#: another after about ping_interval × (max_outstanding_pings + 1) seconds, well
#: within a reliable message's acknowledgement wait (nats-py waits minutes).
_LIVENESS: Final[dict[str, Any]] = {"ping_interval": 2, "max_outstanding_pings": 2}

# The deadline (Unix ns, 0 for none) of the request being handled in this task.
current_deadline: contextvars.ContextVar[int] = contextvars.ContextVar("mesh_deadline", default=0)

#: The NATS connection name of a mesh client is this prefix and its agent name.
CONNECTION_PREFIX: Final = "mesh:"
_ERROR_HEADER: Final = "Nats-Service-Error"
_CLOSED: Final = (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError)
# Errors that mean "the connection dropped": the disconnect callback reports those.
_CONNECTION_LOST: Final = (
    nats.errors.UnexpectedEOF,
    nats.errors.StaleConnectionError,
    ConnectionResetError,
    BrokenPipeError,
)
_ERROR_CODE_HEADER: Final = "Nats-Service-Error-Code"
_error_json = msgspec.json.Encoder().encode


class MeshClient:
    """A connected mesh client. Create it with :meth:`connect`; use it as an async
    context manager so it is drained and closed.
    """

    def __init__(
        self, nc: Nats, *, name: str, tracing: Tracing | None = None, telemetry: bool = True
    ) -> None:
        self.nc = nc
        self.name = name
        self.tracing = tracing
        #: Count traffic for telemetry (off only to measure what counting costs).
        self.telemetry = telemetry
        # Message ids: a random per-client prefix and a counter, 22 characters like a NUID
        # at a tenth of its cost (nats-py's NUID is pure Python).
        self._id_prefix = os.urandom(6).hex()
        self._id_seq = itertools.count()
        self._subs: dict[int, Subscription] = {}
        # Telemetry: this interval's outbound counts by subject (swapped by the emitter),
        # messages past the subject bound, and closed subscriptions not reported yet.
        self._sent: dict[str, SentCounters] = {}
        self._untracked = 0
        self._retired: list[Subscription] = []
        #: The per-subject policy in force (a node's policy watcher fills it); None: none.
        self.policy: PolicyTable | None = None
        #: Compression: bodies are encoded by policy; dictionaries come from the store,
        #: opened on first need.
        self.codec = CodecEngine(DictionaryStore(nc.jetstream(timeout=5), None))
        #: Reliable subjects' streams, created on first use.
        self._streams: ReliableStreams | None = None
        # Counts of subscriptions already closed, so stats stay totals.
        self._closed_received = 0
        self._closed_dropped = 0
        self._published = 0
        self._published_bytes = 0
        self._malformed = 0
        self._flushed_denials = _denials.mark()
        self._disconnects = 0
        self._reconnects = 0
        self._closed = False

    # -- lifecycle -----------------------------------------------------------------

    @classmethod
    async def connect(
        cls,
        url: str | list[str] = DEFAULT_URL,
        *,
        name: str = "mesh-client",
        tracing: Tracing | None = None,
        telemetry: bool = True,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        reconnect_buffer: int = DEFAULT_RECONNECT_BUFFER,
        **options: Any,
    ) -> MeshClient:
        """Connect to NATS at ``url`` (one URL, a comma-separated list, or a list).

        Raises :class:`ConnectionFailed` if no server answers within
        ``connect_timeout`` seconds. After the first connection the client
        reconnects forever, buffering up to ``reconnect_buffer`` bytes of
        publishes meanwhile. Extra ``options`` go to ``nats.connect``
        (credentials, TLS); those not given come from the ``NATS_*`` variables
        (:func:`mesh._auth.connect_options`: :class:`InvalidCredentials` if they
        cannot work, :class:`CredentialsRefused` if the server refuses them).
        """
        validate_agent_name(name)
        servers = [u.strip() for u in url.split(",")] if isinstance(url, str) else list(url)
        # Credentials, TLS and inbox prefix from NATS_* (mesh._auth); the caller's win.
        options = {**connect_options(servers=servers), **options}
        nc = Nats()
        client = cls(nc, name=name, tracing=tracing, telemetry=telemetry)
        last_error: list[BaseException] = []
        connected = False

        async def on_error(exc: Exception) -> None:
            if not connected:
                last_error[:] = [exc]  # reported once, by ConnectionFailed
                return
            client._on_error(exc)

        async def on_disconnect() -> None:
            client._disconnects += 1
            if not client._closed:
                log.warning("disconnected from NATS; reconnecting")

        async def on_reconnect() -> None:
            client._reconnects += 1
            log.warning(
                "reconnected to NATS at %s", nc.connected_url.netloc if nc.connected_url else "?"
            )

        try:
            await asyncio.wait_for(
                nc.connect(
                    servers,
                    # The prefix tells mesh connections from foreign ones in the server's
                    # monitoring data (`mesh topology` lists the foreign ones).
                    name=f"{CONNECTION_PREFIX}{name}",
                    connect_timeout=max(1, int(connect_timeout)),
                    reconnect_time_wait=0.5,  # type: ignore[arg-type]  # nats-py accepts floats
                    max_reconnect_attempts=-1,
                    pending_size=reconnect_buffer,
                    error_cb=on_error,
                    disconnected_cb=on_disconnect,
                    reconnected_cb=on_reconnect,
                    skip_subject_validation=True,  # the mesh validates names itself
                    **{**_LIVENESS, **options},
                ),
                timeout=connect_timeout,
            )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            client._closed = True
            await _close_quietly(nc)
            reason = last_error[0] if last_error else exc
            if refused := refusal(reason, nc._server_info or {}):
                raise CredentialsRefused(", ".join(servers), refused) from None
            raise ConnectionFailed(", ".join(servers), _describe(reason)) from None
        connected = True
        return client

    async def __aenter__(self) -> MeshClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    async def aclose(self, timeout: float = DEFAULT_DRAIN_TIMEOUT) -> None:
        """Drain subscriptions, flush publishes and close (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.shield(asyncio.wait_for(self._drain_and_close(), timeout))
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            log.debug("close: %s", exc)
            await _close_quietly(self.nc)

    async def _drain_and_close(self) -> None:
        if self.nc.is_connected:
            await self.nc.drain()
        await self.nc.close()

    async def flush(self, timeout: float = DEFAULT_FLUSH_TIMEOUT) -> None:
        """Return once the server has processed everything sent so far, subscriptions
        included: a message published after this reaches a subscription made before it.

        Raises :class:`FlushTimeout` (a TimeoutError) after ``timeout`` seconds, and
        :class:`PermissionDenied` when the server refused a publish or subscription
        this client made since its previous flush.
        """
        mark = self._flushed_denials
        self._flushed_denials = _denials.mark()
        try:
            async with asyncio.timeout(timeout):
                # nats-py writes a flush's PING straight to the socket, ahead of commands its
                # flusher task has not written yet (a SUB just made), so the PONG alone proves
                # nothing about them: let the flusher write them first.
                delay = 0.0
                while self.nc._pending and self.nc.is_connected:
                    await asyncio.sleep(delay)
                    delay = 0.001
                await self.nc.flush()
        except _CLOSED:
            raise ClientClosed() from None
        except (TimeoutError, nats.errors.TimeoutError):
            raise FlushTimeout(timeout) from None
        denied = _denials.since(mark, owner=id(self))
        if denied is not None:
            raise denied

    @property
    def connected(self) -> bool:
        return bool(self.nc.is_connected)

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    def new_id(self) -> str:
        """A new message id, unique across clients (48 random bits + a counter)."""
        return f"{self._id_prefix}{next(self._id_seq):010x}"

    def stats(self) -> ClientStats:
        return ClientStats(
            published=self._published,
            published_bytes=self._published_bytes,
            received=self._closed_received + sum(s.received for s in self._subs.values()),
            dropped=self._closed_dropped + sum(s.dropped for s in self._subs.values()),
            malformed=self._malformed,
            disconnects=self._disconnects,
            reconnects=self._reconnects,
        )

    def _forget(self, sub: Subscription, sid: int) -> None:
        if self._subs.pop(sid, None) is not None:
            self._closed_received += sub.received
            self._closed_dropped += sub.dropped
            if not sub.internal and len(self._retired) < MAX_RETIRED:
                self._retired.append(sub)  # its last counts go in the next snapshot

    def _track(self, subject: str) -> SentCounters | None:
        """The counters of a subject not yet published to this interval (None: table full)."""
        if len(self._sent) >= MAX_SUBJECTS:
            self._untracked += 1
            return None
        counters = self._sent[subject] = SentCounters()
        return counters

    def _on_error(self, exc: Exception) -> None:
        if isinstance(exc, nats.errors.SlowConsumerError):
            sub = self._subs.get(exc.sid)
            if sub is not None:
                sub.dropped += 1
                sub.counters.dropped += 1
            return
        if self._closed:
            return
        denied = _denials.record(str(exc), id(self))
        if denied is not None:
            # The call waiting on it reports it too; the CLI shows only that (one line).
            log.warning("%s", denied, extra={DENIED_LOG_KEY: True})
            return
        if self.nc.is_connected and not isinstance(exc, _CONNECTION_LOST):
            log.warning("NATS error: %s", _describe(exc))
        else:
            # A failed reconnect attempt: the disconnect was reported once already.
            log.debug("reconnect attempt failed: %s", _describe(exc))

    # -- sending -------------------------------------------------------------------

    async def publish(
        self,
        subject: str,
        payload: Any = b"",
        *,
        priority: int = 0,
        content_type: ContentType | None = None,
        reliable: bool = False,
        msg_id: str | None = None,
        ack_timeout: float = PUBLISH_TIMEOUT,
    ) -> None:
        """Publish an event: fire-and-forget, or with ``reliable=True`` stored in the
        subject's JetStream stream before this returns.

        ``payload`` may be a msgspec Struct, JSON-able value, or bytes. A reliable
        publish creates the subject's stream on first use and raises
        :class:`PublishNotConfirmed` when the stream's acknowledgement does not come
        within ``ack_timeout`` (publish again with the same ``msg_id`` to be sure: the
        stream stores an id once) and :class:`PublishRefused` when it says no.
        ``msg_id`` (default: a new unique id) becomes the envelope's id.
        """
        # The hot path: one coroutine, no helper hops (each costs ~0.2 µs per message).
        validate_subject(subject)
        if content_type is None and type(payload) is bytes:
            body, ctype = payload, ContentType.BYTES
        else:
            body, ctype = encode_payload(payload, content_type)
        raw = len(body)
        codec, dictionary, level = Codec.NONE, 0, 0
        table = self.policy
        if table is not None:
            policy = table.codec_for(subject)
            if policy is not None:
                body, codec, dictionary, level = self.codec.encode(body, policy)
        tracing = self.tracing
        if tracing is None:
            span = None
            field = current_trace.get()
        else:
            span, field = tracing.start_outbound("publish", SpanKind.PRODUCER, subject)
        try:
            mid = (
                f"{self._id_prefix}{next(self._id_seq):010x}"
                if msg_id is None
                else validate_msg_id(msg_id)
            )
            frame = encode_frame(
                Envelope(
                    id=mid,
                    sender=self.name,
                    created=time.time_ns(),
                    # No deadline: an event outlives the request that caused it.
                    priority=priority,
                    trace=field,
                    codec=codec,
                    content_type=ctype,
                    dictionary=dictionary,
                    level=level,
                ),
                body,
            )
            size = len(frame)
            nc = self.nc
            if size > nc._max_payload:
                raise PayloadTooLarge(subject, size, nc._max_payload)
            if reliable:
                await self._store(subject, frame, mid, ack_timeout)
            else:
                try:
                    await nc.publish(subject, frame)
                except nats.errors.OutboundBufferLimitError:
                    raise PublishBufferFull(subject, nc._max_pending_size) from None
                except _CLOSED:
                    raise ClientClosed() from None
            self._published += 1
            self._published_bytes += size
            if self.telemetry:
                counters = self._sent.get(subject) or self._track(subject)
                if counters is not None:
                    counters.msgs += 1
                    counters.raw += raw
                    counters.wire += size
                    if codec:
                        counters.compressed += 1
        finally:
            if span is not None:
                span.end()

    @overload
    async def request(
        self,
        subject: str,
        payload: Any = ...,
        *,
        type: type[T],
        timeout: float = ...,
        priority: int = ...,
        content_type: ContentType | None = ...,
    ) -> T: ...

    @overload
    async def request(
        self,
        subject: str,
        payload: Any = ...,
        *,
        timeout: float = ...,
        priority: int = ...,
        content_type: ContentType | None = ...,
    ) -> Any: ...

    async def request(
        self,
        subject: str,
        payload: Any = b"",
        *,
        type: Any = Any,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
        priority: int = 0,
        content_type: ContentType | None = None,
    ) -> Any:
        """Send a request and return the decoded reply.

        Raises :class:`NoResponders`, :class:`RequestTimeout`,
        :class:`RemoteError` (the handler raised) or :class:`PayloadTooLarge`.
        Inside a handler the caller's deadline caps ``timeout``.
        """
        validate_subject(subject)
        if not 0 < timeout <= MAX_TIMEOUT:  # also refuses NaN
            raise ValueError(
                f"timeout must be between 0 and {MAX_TIMEOUT:g} seconds, not {timeout}"
            )
        body, ctype = encode_payload(payload, content_type)
        raw = len(body)
        body, codec, dictionary, level = self._compress(subject, body)
        now = time.time_ns()
        deadline = now + int(timeout * 1e9)
        inherited = current_deadline.get()
        if inherited and inherited < deadline:
            deadline = inherited
            timeout = max(0.0, (deadline - now) / 1e9)
        tracing = self.tracing
        span = None
        field = current_trace.get()
        if tracing is not None:
            span, field = tracing.start_outbound("request", SpanKind.CLIENT, subject)
        try:
            envelope = Envelope(
                id=self.new_id(),
                sender=self.name,
                kind=Kind.REQUEST,
                created=now,
                deadline=deadline,
                priority=priority,
                trace=field,
                codec=codec,
                content_type=ctype,
                dictionary=dictionary,
                level=level,
            )
            frame = encode_frame(envelope, body)
            self._check_size(subject, frame)
            counters = (self._sent.get(subject) or self._track(subject)) if self.telemetry else None
            if counters is not None:
                counters.msgs += 1
                counters.requests += 1
                counters.raw += raw
                counters.wire += len(frame)
                if codec:
                    counters.compressed += 1
            started = time.perf_counter_ns()
            mark = _denials.mark()
            try:
                try:
                    reply = await self.nc.request(subject, frame, timeout=timeout)
                except nats.errors.NoRespondersError:
                    raise NoResponders(subject) from None
                except nats.errors.TimeoutError:
                    # Refused by the server (the request or our inbox), not unanswered?
                    me = id(self)
                    denied = _denials.since(mark, owner=me, subject=subject) or _denials.since(
                        mark, owner=me, prefix=self.nc._inbox_prefix.decode()
                    )
                    raise denied or RequestTimeout(subject, timeout) from None
                except nats.errors.OutboundBufferLimitError:
                    raise PublishBufferFull(subject, self.nc._max_pending_size) from None
                except _CLOSED:
                    raise ClientClosed() from None
                self._published += 1
                self._published_bytes += len(frame)
                result = await self._read_reply(subject, reply, type)
            except MeshError:
                if counters is not None:
                    counters.failed += 1
                raise
            if counters is not None:
                counters.record_latency(time.perf_counter_ns() - started)
            return result
        except MeshError as exc:
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, str(exc)))
                span.record_exception(exc)
            raise
        finally:
            if span is not None:
                span.end()

    async def _store(self, subject: str, frame: bytes, msg_id: str, timeout: float) -> None:
        """Store a frame in ``subject``'s stream (created on first use)."""
        if self._streams is None:
            self._streams = ReliableStreams(self.nc)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        await self._streams.ensure(subject, timeout=timeout)
        # Creating the stream (once) took part of the caller's time, not all of it.
        await store(self.nc, subject, frame, msg_id, timeout=max(0.5, deadline - loop.time()))

    def _compress(self, subject: str, body: bytes) -> tuple[bytes, Codec, int, int]:
        """``body`` encoded by ``subject``'s codec policy: (body, codec, dictionary, level)."""
        table = self.policy
        if table is not None:
            policy = table.codec_for(subject)
            if policy is not None:
                return self.codec.encode(body, policy)
        return body, Codec.NONE, 0, 0

    async def _reply(
        self,
        subject: str,
        kind: Kind,
        body: bytes,
        content_type: ContentType,
        trace: str,
        policy_subject: str = "",
    ) -> int:
        """Send a REPLY or ERROR frame to a requester's inbox.

        The body is compressed by the codec policy of ``policy_subject`` (the request's
        subject), when given.
        """
        codec, dictionary, level = Codec.NONE, 0, 0
        if policy_subject:
            body, codec, dictionary, level = self._compress(policy_subject, body)
        envelope = Envelope(
            id=self.new_id(),
            sender=self.name,
            kind=kind,
            created=time.time_ns(),
            trace=trace,
            codec=codec,
            content_type=content_type,
            dictionary=dictionary,
            level=level,
        )
        return await self._send_raw(subject, encode_frame(envelope, body))

    async def _send_raw(
        self, subject: str, data: bytes, reply: str = "", headers: dict[str, str] | None = None
    ) -> int:
        """Send ``data`` as it is; return its size."""
        self._check_size(subject, data)
        try:
            await self.nc.publish(subject, data, reply=reply, headers=headers)
        except nats.errors.OutboundBufferLimitError:
            raise PublishBufferFull(subject, self.nc._max_pending_size) from None
        except _CLOSED:
            raise ClientClosed() from None
        self._published += 1
        self._published_bytes += len(data)
        return len(data)

    def _check_size(self, subject: str, data: bytes) -> None:
        if len(data) > self.nc._max_payload:
            raise PayloadTooLarge(subject, len(data), self.nc._max_payload)

    # -- replying (used by handlers) -----------------------------------------------

    async def respond(self, msg: Message, value: Any) -> int:
        """Send ``value`` as the reply to ``msg`` (a no-op if it expects none).

        A request from a plain NATS client gets a bare JSON (or bytes) reply.
        Returns the bytes sent (0 when nothing was).
        """
        if not msg.reply:
            return 0
        body, ctype = encode_payload(value)
        try:
            if msg.envelope is None:
                return await self._send_raw(msg.reply, body)
            return await self._reply(
                msg.reply, Kind.REPLY, body, ctype, current_trace.get(), msg.subject
            )
        except PayloadTooLarge as exc:
            return await self.respond_error(msg, "PayloadTooLarge", str(exc))

    async def respond_error(self, msg: Message, error_type: str, message: str) -> int:
        """Reply to ``msg`` with a structured error the requester raises as RemoteError.

        Returns the bytes sent (0 when nothing was).
        """
        if not msg.reply:
            return 0
        failure = RemoteFailure(type=error_type, message=message[:4096], node=self.name)
        if msg.envelope is None:
            # Plain clients see JSON plus the NATS micro error headers.
            return await self._send_raw(
                msg.reply,
                _error_json(ErrorReply(error=failure)),
                headers={
                    _ERROR_HEADER: f"{error_type}: {message[:512]}",
                    _ERROR_CODE_HEADER: "500",
                },
            )
        return await self._reply(
            msg.reply, Kind.ERROR, _error_json(failure), ContentType.JSON, current_trace.get()
        )

    # -- receiving -----------------------------------------------------------------

    async def subscribe(
        self,
        subject: str,
        cb: Callback,
        *,
        queue: str = "",
        pending_msgs: int = DEFAULT_PENDING_MSGS,
        pending_bytes: int = DEFAULT_PENDING_BYTES,
        internal: bool = False,
        traced: bool = True,
    ) -> Subscription:
        """Call ``cb`` for each message on ``subject`` (wildcards allowed).

        Callbacks run one at a time, in order; with ``traced`` (the default) each
        runs inside a CONSUMER span when its message is sampled. At most ``pending_msgs`` messages
        or ``pending_bytes`` bytes wait for the callback; beyond that NATS drops
        messages and :attr:`Subscription.dropped` counts them.
        """
        validate_subject(subject, wildcards=True, internal=internal)
        validate_queue_group(queue)
        sub = Subscription(subject, queue, internal=internal)
        tracing = self.tracing
        on_malformed = self._on_malformed
        decompress = self.codec.decode
        counting = self.telemetry

        async def on_msg(m: Msg) -> None:
            data = m.data
            body: bytes | memoryview
            counters = sub.counters
            if data and data[0] == MAGIC:
                try:
                    envelope, body = decode_frame(data, m.subject)
                except MalformedMessage as exc:
                    counters.decode_failed("")
                    await on_malformed(m, exc)
                    return
                field = envelope.trace
                sender = envelope.sender
                if envelope.codec:
                    try:
                        body = await decompress(body, envelope, m.subject)
                    except MalformedMessage as exc:
                        # Counted in this interval's counters: a dictionary fetch may
                        # have outlived the snapshot that swapped them.
                        sub.counters.decode_failed(sender)
                        await on_malformed(m, exc)
                        return
                    counters = sub.counters
                    # The message handed on describes the body it carries: plain.
                    envelope = msgspec.structs.replace(envelope, codec=Codec.NONE, dictionary=0)
            else:
                envelope, body, field, sender = None, data, TRACE_NONE, ""
            sub.received += 1
            if counting:
                try:
                    counts = counters.senders[sender]
                except KeyError:
                    counts = counters.add_sender(sender)
                counts.msgs += 1
                counts.wire += len(data)
                counts.raw += len(body)
            msg = Message(m.subject, m.reply, body, envelope)
            if not traced:
                await cb(msg)
                return
            if tracing is not None:
                span = tracing.start_inbound(
                    "process", SpanKind.CONSUMER, m.subject, field, lambda: span_attributes(msg)
                )
                if span is not None:
                    tokens = activate(span)
                    try:
                        await cb(msg)
                    except Exception as exc:
                        span.record_exception(exc)
                        span.set_status(Status(StatusCode.ERROR, str(exc)))
                        raise
                    finally:
                        deactivate(tokens)
                        span.end()
                    return
                field = TRACE_UNSAMPLED  # this process decided: nothing downstream samples
            # Callbacks run in the subscription's own task, so the variable is that
            # task's alone: set it only when it changes, never reset it.
            if current_trace.get() != field:
                current_trace.set(field)
            await cb(msg)

        try:
            nsub = await self.nc.subscribe(
                subject,
                queue=queue,
                cb=on_msg,
                pending_msgs_limit=pending_msgs,
                pending_bytes_limit=pending_bytes,
            )
        except _CLOSED:
            raise ClientClosed() from None
        sub._sub = nsub
        self._subs[nsub._id] = sub
        sub._on_close = self._forget
        return sub

    async def _read_reply(self, subject: str, reply: Msg, type_: Any) -> Any:
        data = reply.data
        if is_frame(data):
            body: bytes | memoryview
            envelope, body = decode_frame(data, subject)
            if envelope.codec:
                body = await self.codec.decode(body, envelope, subject)
            if envelope.kind is Kind.ERROR:
                failure = decode_failure(body, subject)
                raise RemoteError(subject, failure.type, failure.message, failure.node)
            return decode_payload(body, envelope.content_type, type_, subject)
        headers = reply.headers
        if headers and _ERROR_HEADER in headers:
            # A NATS micro service error: the header holds the message, the code a status.
            code = headers.get(_ERROR_CODE_HEADER, "")
            error_type = f"ServiceError {code}".strip()
            raise RemoteError(subject, error_type, headers[_ERROR_HEADER])
        if type_ is Any:
            try:
                return decode_payload(data, ContentType.JSON, Any, subject)
            except MalformedMessage:
                return bytes(data)
        return decode_payload(data, ContentType.JSON, type_, subject)

    async def _on_malformed(self, m: Msg, exc: MalformedMessage) -> None:
        self._malformed += 1
        log.debug("%s", exc)
        if m.reply:
            failure = RemoteFailure(type="MalformedMessage", message=str(exc), node=self.name)
            with contextlib.suppress(MeshError):
                await self._reply(
                    m.reply, Kind.ERROR, _error_json(failure), ContentType.JSON, TRACE_NONE
                )


def _describe(exc: BaseException) -> str:
    text = str(exc).strip()
    if isinstance(exc, TimeoutError | asyncio.TimeoutError) and not text:
        return "timed out"
    if isinstance(exc, nats.errors.NoServersError):
        return "no servers available"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    return text or type(exc).__name__


async def _close_quietly(nc: Nats) -> None:
    try:
        await nc.close()
    except Exception as exc:  # closing a half-open connection may fail in many ways
        log.debug("close: %s", exc)
