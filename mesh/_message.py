"""What a subscription hands to its callback, and the subscription itself."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import nats.errors
from nats.aio.subscription import Subscription as NatsSubscription

from mesh._telemetry import ReceivedCounters
from mesh._wire import ContentType, Envelope, decode_payload

log = logging.getLogger("mesh.client")


class ClientStats(msgspec.Struct, frozen=True, kw_only=True):
    """A snapshot of a client's counters."""

    published: int
    published_bytes: int
    received: int
    dropped: int
    malformed: int
    disconnects: int
    reconnects: int


class Message:
    """A received message: subject, reply subject, envelope (if any) and body."""

    __slots__ = ("body", "envelope", "reply", "subject")

    def __init__(
        self, subject: str, reply: str, body: bytes | memoryview, envelope: Envelope | None
    ) -> None:
        self.subject = subject
        self.reply = reply
        self.body = body
        self.envelope = envelope

    @property
    def data(self) -> bytes:
        """The payload bytes (decompressed, without the envelope)."""
        return bytes(self.body)

    @property
    def sender(self) -> str:
        """The sending agent's name, or ``""`` for a plain NATS client."""
        return self.envelope.sender if self.envelope is not None else ""

    @property
    def content_type(self) -> ContentType:
        return self.envelope.content_type if self.envelope is not None else ContentType.JSON

    def decode(self, type: Any = Any) -> Any:
        """Decode the payload into ``type`` (a Struct, ``dict``, ``bytes``…).

        A message from a plain NATS client is read as JSON, or as bytes when
        ``type`` is ``bytes``. Raises :class:`MalformedMessage` if it does not fit.
        """
        return decode_payload(self.body, self.content_type, type, self.subject)


Callback = Callable[[Message], Awaitable[None]]


class Subscription:
    """A live subscription; counts what it received and what it had to drop."""

    __slots__ = (
        "_on_close",
        "_sub",
        "backlog",
        "counters",
        "dropped",
        "internal",
        "queue",
        "received",
        "subject",
    )

    def __init__(self, subject: str, queue: str, *, internal: bool = False) -> None:
        self.subject = subject
        self.queue = queue
        #: A mesh-internal subscription (telemetry, discovery): not in telemetry itself.
        self.internal = internal
        self.received = 0
        self.dropped = 0
        #: Messages the server holds for this subscription, not yet delivered (a reliable
        #: handler's JetStream consumer sets it; a core subscription has none).
        self.backlog = 0
        #: This interval's telemetry counts (swapped by the telemetry emitter).
        self.counters = ReceivedCounters()
        self._sub: NatsSubscription | None = None
        self._on_close: Callable[[Subscription, int], None] | None = None

    @property
    def pending(self) -> int:
        """Messages received and not yet handled."""
        return self._sub.pending_msgs if self._sub is not None else 0

    async def unsubscribe(self) -> None:
        """Stop receiving at once; pending messages are discarded."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                log.debug("unsubscribe %s: %s", self.subject, exc)
            self._closed(sub)

    async def drain(self) -> None:
        """Stop intake, then wait until every pending message has been handled."""
        if self._sub is not None:
            sub, self._sub = self._sub, None
            try:
                await sub.drain()  # type: ignore[no-untyped-call]
            except nats.errors.Error as exc:
                log.debug("drain %s: %s", self.subject, exc)
            self._closed(sub)

    def _closed(self, sub: NatsSubscription) -> None:
        if self._on_close is not None:
            self._on_close(self, sub._id)


def span_attributes(msg: Message, queue: str = "") -> dict[str, Any]:
    """The messaging attributes of a span about a received message."""
    attributes: dict[str, Any] = {"messaging.message.body.size": len(msg.body)}
    if msg.envelope is not None:
        attributes["messaging.message.id"] = msg.envelope.id
        attributes["messaging.client.id"] = msg.envelope.sender
    if queue:
        attributes["messaging.consumer.group.name"] = queue
    return attributes
