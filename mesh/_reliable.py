"""Reliable delivery over JetStream: one work-queue stream per subject, and the
dead-letter stream.

A subject published or handled with ``reliable=True`` is stored in its own stream,
``MESH_R_<subject>_<hash>``, with work-queue retention: a message stays until a
consumer acknowledges it, and only one consumer (one agent's queue of instances)
may take from it. Publishers send the envelope's id as ``Nats-Msg-Id``, so within
:data:`DUPLICATE_WINDOW` a retried publish is stored once. Streams are file-backed,
bounded (:data:`STREAM_MAX_MSGS`, :data:`STREAM_MAX_BYTES`; past them a publish is
refused rather than older work dropped), and replicated on three servers when the
client is connected to a cluster. Whoever touches a reliable subject first, a
publisher or a node, creates its stream; the configuration is the same from both.

A message whose handler keeps failing is moved, after :data:`MAX_DELIVER` attempts
(or at once if its frame does not decode), to ``_MESH.dlq.<subject>`` in the
``MESH_DLQ`` stream (limits retention, bounded by count, bytes and age), with
headers saying where it came from and why. ``mesh dlq`` lists, shows and replays
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, Final, TypeVar

import msgspec
import nats.errors
import nats.js.errors
from nats.js import api

from mesh import _denials
from mesh._errors import (
    ClientClosed,
    InvalidName,
    JetStreamUnavailable,
    PublishBufferFull,
    PublishNotConfirmed,
    PublishRefused,
    ReliableSetupError,
)

if TYPE_CHECKING:
    from nats.aio.client import Client as Nats

log = logging.getLogger("mesh.reliable")
T = TypeVar("T")

STREAM_PREFIX: Final = "MESH_R_"
DLQ_STREAM: Final = "MESH_DLQ"
DLQ_PREFIX: Final = "_MESH.dlq."
#: Seconds within which a repeated ``Nats-Msg-Id`` is stored once.
DUPLICATE_WINDOW: Final = 120.0
#: Deliveries of one message before it goes to the dead-letter stream.
MAX_DELIVER: Final = 5
#: Delays before the 2nd, 3rd... delivery after a handler failure (seconds).
BACKOFF: Final = (0.5, 2.0, 8.0, 30.0)
STREAM_MAX_MSGS: Final = 1_000_000
STREAM_MAX_BYTES: Final = 1 << 30
DLQ_MAX_MSGS: Final = 100_000
DLQ_MAX_BYTES: Final = 1 << 30
DLQ_MAX_AGE: Final = 14 * 24 * 3600.0
#: How long a reliable publish waits for the stream's acknowledgement, retries included.
PUBLISH_TIMEOUT: Final = 5.0
#: One attempt's wait, and the pauses between attempts (doubling).
ATTEMPT_TIMEOUT: Final = 2.0
RETRY_PAUSE: Final = 0.05
MAX_RETRY_PAUSE: Final = 0.5
#: Seconds setting up a stream or consumer is retried while JetStream is busy.
SETUP_TIMEOUT: Final = 30.0
#: Seconds of "no responders" on the JetStream API before it counts as not enabled
#: (rather than a server restarting).
NO_JETSTREAM_GRACE: Final = 3.0
#: Streams remembered as ready per client (more are checked again on use).
MAX_KNOWN_STREAMS: Final = 1024

MSG_ID_HEADER: Final = "Nats-Msg-Id"
#: Dead-letter headers.
H_SUBJECT: Final = "Mesh-Subject"
H_REASON: Final = "Mesh-Reason"
H_ATTEMPTS: Final = "Mesh-Attempts"
H_AGENT: Final = "Mesh-Agent"
H_MSG_ID: Final = "Mesh-Msg-Id"
H_STREAM_SEQ: Final = "Mesh-Stream-Seq"
MAX_REASON: Final = 500

_UNSAFE: Final = re.compile(r"[^A-Za-z0-9_-]")
_CLOSED: Final = (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError)
# JetStream API error codes met here.
_ERR_STREAM_NAME_IN_USE: Final = 10058
_ERR_SUBJECTS_OVERLAP: Final = 10065
_ERR_REPLICAS_NOT_SUPPORTED: Final = 10074
_UNAVAILABLE: Final = 503


#: Longest message id.
MAX_MSG_ID: Final = 128
_MSG_ID: Final = re.compile(rf"[!-~]{{1,{MAX_MSG_ID}}}")


def validate_msg_id(msg_id: str) -> str:
    """A message id chosen by the caller: 1 to MAX_MSG_ID visible ASCII characters (it
    travels in a header, so no spaces or line breaks)."""
    if not _MSG_ID.fullmatch(msg_id):
        raise InvalidName("message id", msg_id, f"use 1-{MAX_MSG_ID} visible ASCII characters")
    return msg_id


def stream_name(subject: str) -> str:
    """The stream of a reliable subject: readable, and unique by a hash of the subject."""
    digest = hashlib.sha256(subject.encode()).hexdigest()[:10]
    return f"{STREAM_PREFIX}{_UNSAFE.sub('_', subject)[:64]}_{digest}"


def consumer_name(group: str) -> str:
    """A durable consumer name for a queue group (names allow no dots)."""
    digest = hashlib.sha256(group.encode()).hexdigest()[:6]
    return f"{_UNSAFE.sub('_', group)[:64]}_{digest}"


def dlq_subject(subject: str) -> str:
    return f"{DLQ_PREFIX}{subject}"


def stream_config(subject: str, replicas: int, max_msg_size: int) -> api.StreamConfig:
    return api.StreamConfig(
        name=stream_name(subject),
        description=f"natsmesh reliable subject {subject}",
        subjects=[subject],
        retention=api.RetentionPolicy.WORK_QUEUE,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW,
        max_msgs=STREAM_MAX_MSGS,
        max_bytes=STREAM_MAX_BYTES,
        max_msg_size=max_msg_size,
        discard=api.DiscardPolicy.NEW,
    )


def dlq_config(replicas: int) -> api.StreamConfig:
    return api.StreamConfig(
        name=DLQ_STREAM,
        description="natsmesh dead letters: messages whose handler kept failing",
        subjects=[f"{DLQ_PREFIX}>"],
        retention=api.RetentionPolicy.LIMITS,
        storage=api.StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=DUPLICATE_WINDOW,
        max_msgs=DLQ_MAX_MSGS,
        max_bytes=DLQ_MAX_BYTES,
        max_age=DLQ_MAX_AGE,
        discard=api.DiscardPolicy.OLD,
    )


class _ApiError(msgspec.Struct, frozen=True):
    code: int = 0
    err_code: int = 0
    description: str = ""


class PubAck(msgspec.Struct, frozen=True):
    """JetStream's answer to a publish."""

    stream: str = ""
    seq: int = 0
    duplicate: bool = False
    error: _ApiError | None = None


_pub_ack_decoder: Final = msgspec.json.Decoder(PubAck)


async def store(
    nc: Nats,
    subject: str,
    frame: bytes,
    msg_id: str,
    *,
    timeout: float = PUBLISH_TIMEOUT,
    headers: dict[str, str] | None = None,
) -> PubAck:
    """Publish ``frame`` to the stream of ``subject`` and wait for its acknowledgement.

    Within ``timeout`` an attempt that got no answer, or found no stream leader (an
    election after a server died), is repeated with the same ``msg_id``, which the
    stream stores once. Raises :class:`PublishNotConfirmed` when the outcome is
    unknown (an attempt may have been stored), :class:`PublishRefused` when JetStream
    said no (or nothing ever answered for the subject), :class:`PublishBufferFull`
    and :class:`ClientClosed` as publish does.
    """
    hdrs = {MSG_ID_HEADER: msg_id}
    if headers:
        hdrs.update(headers)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    uncertain = ""  # why an earlier attempt may have been stored
    refused = ""
    mark = _denials.mark()
    pause = RETRY_PAUSE
    while (remaining := deadline - loop.time()) > 0:
        try:
            reply = await nc.request(
                subject, frame, timeout=min(remaining, ATTEMPT_TIMEOUT), headers=hdrs
            )
        except nats.errors.NoRespondersError:
            refused = "no JetStream server answered for it (no stream, or a leader election)"
        except nats.errors.TimeoutError:
            uncertain = f"no acknowledgement from JetStream within {timeout:g}s"
        except nats.errors.OutboundBufferLimitError:
            raise PublishBufferFull(subject, nc._max_pending_size) from None
        except _CLOSED:
            raise ClientClosed() from None
        except nats.errors.Error as exc:  # the connection dropped with the request in flight
            uncertain = str(exc) or type(exc).__name__
        else:
            try:
                ack = _pub_ack_decoder.decode(reply.data)
            except (msgspec.DecodeError, ValueError, RecursionError) as exc:
                uncertain = f"unreadable answer: {exc}"
            else:
                if ack.error is None:
                    return ack
                description = ack.error.description or f"error {ack.error.err_code}"
                if ack.error.code != _UNAVAILABLE:
                    raise PublishRefused(subject, description)
                refused = description  # JetStream temporarily unavailable: try again
        await asyncio.sleep(min(pause, max(0.0, deadline - loop.time())))
        pause = min(pause * 2, MAX_RETRY_PAUSE)
    denied = _denials.since(mark, subject=subject)
    if denied is not None:
        raise denied  # never stored: the server refused the publish
    if uncertain:
        raise PublishNotConfirmed(subject, msg_id, timeout, uncertain)
    raise PublishRefused(subject, f"{refused or 'no answer'}, for {timeout:g}s")


class ReliableStreams:
    """Creates reliable subjects' streams (and the dead-letter stream) on first use.

    Creation is idempotent and done once per subject per client (concurrent first
    uses share one attempt). ``replicas`` defaults to 3 when the server is part of
    a cluster, else 1.
    """

    def __init__(self, nc: Nats, *, replicas: int | None = None) -> None:
        self._nc = nc
        self._replicas = replicas
        self._ready: dict[str, str] = {}
        self._pending: dict[str, asyncio.Future[str]] = {}

    def replicas(self) -> int:
        if self._replicas is not None:
            return self._replicas
        info = getattr(self._nc, "_server_info", None) or {}
        return 3 if info.get("cluster") else 1

    async def ensure(self, subject: str, timeout: float = SETUP_TIMEOUT) -> str:
        """The name of ``subject``'s stream, created if missing (tried for up to
        ``timeout`` seconds while JetStream is busy)."""
        name = self._ready.get(subject)
        if name is not None:
            return name
        return await self._once(
            subject,
            lambda: self._create(
                subject, stream_config(subject, self.replicas(), self._nc.max_payload), timeout
            ),
        )

    async def ensure_dlq(self) -> str:
        """The dead-letter stream's name, created if missing."""
        name = self._ready.get(DLQ_PREFIX)
        if name is not None:
            return name
        return await self._once(
            DLQ_PREFIX,
            lambda: self._create(DLQ_PREFIX, dlq_config(self.replicas()), SETUP_TIMEOUT),
        )

    async def _once(self, key: str, create: Any) -> str:
        pending = self._pending.get(key)
        if pending is None:
            pending = self._pending[key] = asyncio.ensure_future(create())
            # Every caller may be cancelled: the outcome is still retrieved.
            pending.add_done_callback(lambda f: f.cancelled() or f.exception())
        try:
            name: str = await asyncio.shield(pending)
        finally:
            if pending.done():
                self._pending.pop(key, None)
        if len(self._ready) >= MAX_KNOWN_STREAMS:
            self._ready.clear()
        self._ready[key] = name
        return name

    async def _create(self, subject: str, config: api.StreamConfig, timeout: float) -> str:
        """Look the stream up, create it if missing, for up to ``timeout`` seconds while
        JetStream is busy (:func:`while_busy`)."""
        return await while_busy(
            subject, lambda remaining: self._create_once(subject, config, remaining), timeout
        )

    async def _create_once(self, subject: str, config: api.StreamConfig, remaining: float) -> str:
        name = config.name
        assert name is not None
        jsm = self._nc.jsm(timeout=max(0.1, min(PUBLISH_TIMEOUT, remaining)))
        try:
            with busy_when_unavailable():  # "not now" leaves as Busy, not an APIError
                try:
                    await jsm.stream_info(name)
                    return name
                except nats.js.errors.NotFoundError:
                    pass
                await jsm.add_stream(config)
        except nats.js.errors.APIError as exc:
            if exc.err_code == _ERR_STREAM_NAME_IN_USE:
                return name  # created meanwhile by another client
            if exc.err_code == _ERR_REPLICAS_NOT_SUPPORTED and (config.num_replicas or 1) > 1:
                config.num_replicas = 1
                return await self._create_once(subject, config, remaining)
            if exc.err_code == _ERR_SUBJECTS_OVERLAP:
                raise ReliableSetupError(
                    subject,
                    "another stream already stores this subject; delete it or pick another subject",
                ) from None
            raise ReliableSetupError(subject, exc.description or str(exc)) from None
        log.info("created stream %s for %s (R%s)", name, subject, config.num_replicas)
        return name


class Busy(Exception):
    """JetStream did not answer, or said it is not ready: worth another try."""

    def __init__(self, reason: str, *, no_responders: bool = False) -> None:
        super().__init__(reason)
        self.no_responders = no_responders


@contextlib.contextmanager
def busy_when_unavailable() -> Iterator[None]:
    """Turn a JetStream API call's "not now" (no answer, no responders, 503) into
    :class:`Busy`."""
    try:
        yield
    except nats.js.errors.ServiceUnavailableError as exc:
        # Without an error code it is the server's "no responders" status: nobody
        # serves the JetStream API (not enabled, or a server restarting).
        raise Busy(
            exc.description or "no JetStream server answered",
            no_responders=exc.err_code is None,
        ) from None
    except nats.errors.NoRespondersError:
        raise Busy("no JetStream server answered", no_responders=True) from None
    except nats.errors.TimeoutError:
        raise Busy("JetStream did not answer in time") from None


async def while_busy(
    subject: str, attempt: Callable[[float], Awaitable[T]], timeout: float = SETUP_TIMEOUT
) -> T:
    """``await attempt(remaining_seconds)`` again, with growing pauses, while it raises
    :class:`Busy` (a leader election, several instances setting up at once, a server
    restarting), for up to ``timeout`` seconds: then :class:`ReliableSetupError`.
    No responders for :data:`NO_JETSTREAM_GRACE` seconds is :class:`JetStreamUnavailable`."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + timeout
    pause = RETRY_PAUSE
    while True:
        try:
            return await attempt(deadline - loop.time())
        except Busy as busy:
            now = loop.time()
            if busy.no_responders and now - start >= NO_JETSTREAM_GRACE:
                raise JetStreamUnavailable(f"the stream of {subject!r}", "no JetStream") from None
            if now + pause > deadline:
                raise ReliableSetupError(subject, f"{busy} (tried for {timeout:g}s)") from None
            log.debug("setting up %s: %s; trying again", subject, busy)
        await asyncio.sleep(pause)
        pause = min(pause * 2, MAX_RETRY_PAUSE * 4)


def reason_header(text: str) -> str:
    """A failure text fit for a header: one line, bounded."""
    line = " ".join(text.split())
    return line if len(line) <= MAX_REASON else line[: MAX_REASON - 1] + "…"
