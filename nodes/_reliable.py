"""Feeding a reliable handler from its subject's JetStream work-queue stream.

Every instance of an agent pulls from one durable consumer named after its queue
group, so the instances share the work as a queue group would, and a message is
taken by one of them at a time. Each message runs through the runtime's normal
path (same concurrency slots, timeouts, tracing, telemetry), then is settled:

- the handler returned: acknowledged, and the acknowledgement confirmed by
  JetStream (repeated until it is, up to ACK_GRACE past the ack wait: one lost
  with a dying server would let another instance run the message again); its id is
  remembered, so a redelivery to this instance is acknowledged without running,
  and a redelivery to another instance asks its peers first (a consumer leader
  that dies can take confirmed acknowledgements with it: the instance that ran
  the message says so within PEER_WAIT, and it is acknowledged without running);
- it raised or timed out: redelivered after the handler's backoff, up to its
  ``max_deliver`` deliveries (defaults :data:`~mesh._reliable.BACKOFF` and
  :data:`~mesh._reliable.MAX_DELIVER`), then moved to ``_MESH.dlq.<subject>``
  with the reason;
- its frame does not decode: moved to the dead letters at once;
- the node shuts down before it ran, or while it runs: handed back (nak) so
  another instance takes it now rather than after the acknowledgement timeout;
- its last delivery was never settled (the instance died or hung while handling
  it): JetStream publishes a max-deliveries advisory, one instance of the agent
  (a queue group on the advisory) moves the message to the dead letters and
  deletes it from the work queue, where nothing would deliver it again.

A message whose handler is still running when ``ack_wait`` passes would be
delivered again, so ``ack_wait`` is the handler's timeout plus a margin.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
from typing import TYPE_CHECKING, Any, Final

import msgspec
import nats.errors
import nats.js.errors
from aiocache import SimpleMemoryCache
from nats.aio.msg import Msg
from nats.js import api

from mesh._errors import InvalidName, MalformedMessage, MeshError, ReliableSetupError
from mesh._message import Message, Subscription
from mesh._reliable import (
    H_AGENT,
    H_ATTEMPTS,
    H_MSG_ID,
    H_REASON,
    H_STREAM_SEQ,
    H_SUBJECT,
    MAX_MSG_ID,
    ReliableStreams,
    busy_when_unavailable,
    consumer_name,
    dlq_subject,
    reason_header,
    store,
    validate_msg_id,
    while_busy,
)
from mesh._wire import Codec, decode_frame

if TYPE_CHECKING:
    from nodes._node import Handler
    from nodes._runtime import NodeRuntime

log = logging.getLogger("mesh.node.reliable")

#: Seconds one pull request waits for messages before asking again.
FETCH_WAIT: Final = 1.0
#: Messages asked for at once (at most the node's concurrency).
FETCH_BATCH: Final = 64
#: Acknowledgement wait beyond the handler's own timeout.
ACK_MARGIN: Final = 5.0
#: Unacknowledged messages the consumer hands out at once, over all instances.
MAX_ACK_PENDING: Final = 1000
#: Seconds one acknowledgement waits for JetStream's confirmation before it is repeated.
ACK_ATTEMPT: Final = 1.0
#: Seconds past the ack wait an unconfirmed acknowledgement is still repeated.
ACK_GRACE: Final = 10.0
#: Pauses before an acknowledgement is repeated: the first, doubling up to the last.
ACK_PAUSE: Final = 0.1
ACK_MAX_PAUSE: Final = 0.4
#: Where instances of an agent ask each other about a redelivered id
#: (``<prefix><stream>.<durable>``).
PEER_SEEN_PREFIX: Final = "_MESH.seen."
#: Seconds a redelivery waits for a peer that handled it to say so.
PEER_WAIT: Final = 0.25
#: Pause after a failed pull (connection lost, leader election) before the next.
RETRY_PAUSE: Final = 0.5
#: How long to wait for the consumer's backlog figure, and how long to go without
#: asking again after it did not come.
BACKLOG_WAIT: Final = 0.5
BACKLOG_RETRY: Final = 10.0
#: Ids of handled messages remembered per handler, to skip redeliveries.
SEEN_IDS: Final = 100_000
#: Tokens of a JetStream ack subject in its first form ($JS.ACK.<stream>.<consumer>...).
_V1_ACK_TOKENS: Final = 9
#: Where JetStream says a message used up its deliveries (``.<stream>.<consumer>``).
MAX_DELIVERIES_ADVISORY: Final = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES"


class SeenIds:
    """Ids of messages handled successfully: the last :data:`SEEN_IDS` (oldest
    forgotten first), in an aiocache memory cache."""

    def __init__(self, limit: int = SEEN_IDS) -> None:
        # timeout=0: no asyncio.wait_for around each call (it costs more than the lookup).
        self._cache = SimpleMemoryCache(timeout=0)
        self._order: collections.deque[str] = collections.deque()
        self._limit = limit

    def __len__(self) -> int:
        return len(self._order)

    async def seen(self, msg_id: str) -> bool:
        return bool(await self._cache.exists(msg_id))

    async def add(self, msg_id: str) -> None:
        try:
            await self._cache.add(msg_id, True)
        except ValueError:  # aiocache: the key is there already
            return
        self._order.append(msg_id)
        if len(self._order) > self._limit:
            await self._cache.delete(self._order.popleft())

    async def close(self) -> None:
        await self._cache.clear()
        self._order.clear()


class ReliableConsumer:
    """Pulls one reliable handler's messages and settles each one."""

    def __init__(self, runtime: NodeRuntime, handler: Handler, index: int) -> None:
        self.runtime = runtime
        self.handler = handler
        self.index = index
        self.subject = handler.subject
        self.durable = consumer_name(handler.queue)
        timeout = handler.timeout or runtime.node.handler_timeout
        self.ack_wait = timeout + ACK_MARGIN
        #: Telemetry counts, reported like a subscription's.
        self.subscription = Subscription(handler.subject, handler.queue)
        self.seen = SeenIds()
        # Since start; telemetry reports the same per interval (ReceivedStats).
        self.redelivered = 0  # deliveries after the first
        self.duplicates = 0  # already handled: acknowledged without running
        self.peer_duplicates = 0  # of which another instance had handled
        self.dead_lettered = 0
        self.unconfirmed = 0  # acknowledgements never confirmed (the message comes back)
        self._streams = ReliableStreams(runtime.client.nc)
        self._psub: Any = None
        self._sid = 0
        self._pull: asyncio.Task[None] | None = None
        self._advisories: Any = None
        self._peers: Any = None
        self._peer_subject = ""
        self._stream = ""
        self._stopping = False
        #: Loop time before which the backlog is not asked for again (it failed).
        self._backlog_retry = 0.0

    async def start(self) -> None:
        """Create the stream and the dead-letter stream if needed, bind the durable
        consumer, and start pulling."""
        client = self.runtime.client
        stream = await self._streams.ensure(self.subject)
        await self._streams.ensure_dlq()
        config = api.ConsumerConfig(
            durable_name=self.durable,
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=api.DeliverPolicy.ALL,
            max_deliver=self.handler.max_deliver,
            ack_wait=self.ack_wait,
            max_ack_pending=MAX_ACK_PENDING,
            filter_subject=self.subject,
        )
        self._psub = await self._bind(stream, config)
        self._sid = self._psub._sub._id
        # Reported by the telemetry emitter with the client's subscriptions.
        client._subs[self._sid] = self.subscription
        self._stream = stream
        self._advisories = await client.nc.subscribe(
            f"{MAX_DELIVERIES_ADVISORY}.{stream}.{self.durable}",
            queue=self.durable,
            cb=self._on_max_deliveries,
        )
        # Every instance (no queue group) answers whether it handled an id.
        self._peer_subject = f"{PEER_SEEN_PREFIX}{stream}.{self.durable}"
        self._peers = await client.nc.subscribe(self._peer_subject, cb=self._on_peer_query)
        self._pull = asyncio.get_running_loop().create_task(
            self._pull_loop(), name=f"{self.runtime.node.name}-reliable-{self.subject}"
        )

    async def _bind(self, stream: str, config: api.ConsumerConfig) -> Any:
        """Create or bind the durable consumer, for up to SETUP_TIMEOUT seconds while
        JetStream is busy (an election, other instances binding at once)."""
        js = self.runtime.client.nc.jetstream(timeout=10)

        async def attempt(_: float) -> Any:
            try:
                with busy_when_unavailable():  # "not now" leaves as Busy, not an APIError
                    return await js.pull_subscribe(
                        self.subject, durable=self.durable, stream=stream, config=config
                    )
            except nats.js.errors.APIError as exc:
                raise ReliableSetupError(
                    self.subject,
                    f"{exc.description or exc} (a work-queue subject takes one consumer: "
                    "is another agent handling it reliably?)",
                ) from None

        return await while_busy(self.subject, attempt)

    async def stop(self) -> None:
        """Stop pulling (the pull in progress finishes, and what it brought is handed
        back), then unsubscribe; handlers already running go on."""
        self._stopping = True
        if self._pull is not None:
            done, _ = await asyncio.wait({self._pull}, timeout=FETCH_WAIT + 2)
            if not done:
                self._pull.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._pull
        for sub in (self._advisories, self._peers, self._psub):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        if self._psub is not None:
            self.runtime.client._forget(self.subscription, self._sid)
        await self.seen.close()

    async def _pull_loop(self) -> None:
        runtime = self.runtime
        slots = runtime._slots
        loop = asyncio.get_running_loop()
        batch = max(1, min(FETCH_BATCH, runtime.node.max_concurrency))
        failures = 0
        while not self._stopping:
            try:
                msgs = await self._psub.fetch(batch, timeout=FETCH_WAIT)
            except nats.errors.TimeoutError:
                if self.subscription.backlog and loop.time() >= self._backlog_retry:
                    await self._refresh_backlog()
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                return
            except Exception as exc:  # disconnected, leader election: try again shortly
                failures += 1
                log_at = logging.WARNING if failures in (1, 10) or failures % 100 == 0 else 0
                if log_at:
                    log.log(log_at, "pulling %s failed (%d times): %s", self.subject, failures, exc)
                await asyncio.sleep(RETRY_PAUSE)
                continue
            failures = 0
            fetched = loop.time()  # JetStream's ack wait runs from (about) now
            if msgs:
                self.subscription.backlog = _backlog(msgs[-1].reply)
            for jsmsg in msgs:
                await slots.acquire()
                if self._stopping:
                    slots.release()
                    await self._settle(jsmsg.nak())  # another instance takes it now
                    continue
                task = loop.create_task(self._process(jsmsg, fetched))
                runtime._tasks.add(task)
                task.add_done_callback(runtime._tasks.discard)

    async def _refresh_backlog(self) -> None:
        """Ask the consumer how many messages it holds: a pull that got nothing means
        none are left, unless the consumer is at its limit of unacknowledged ones (then
        many may be). Asked only while the last delivery said some were left; the pull
        loop waits at most BACKLOG_WAIT for it, and after a failure does not ask again
        for BACKLOG_RETRY (no consumer leader: the next pulls matter more)."""
        try:
            info = await asyncio.wait_for(self._psub.consumer_info(), BACKLOG_WAIT)
        except Exception as exc:  # no leader, disconnected: the last figure stands
            log.debug("consumer info for %s: %s", self.subject, exc)
            self._backlog_retry = asyncio.get_running_loop().time() + BACKLOG_RETRY
            return
        self.subscription.backlog = info.num_pending or 0

    async def _process(self, jsmsg: Msg, delivered: float) -> None:
        """Run one message, delivered at loop time ``delivered``, through the handler
        (its slot is held) and settle it."""
        runtime = self.runtime
        held = True  # the slot, until _run takes it over
        handled = False  # the handler succeeded: never hand this one back
        # Confirmation is sought past the ack wait: while an election leaves the
        # consumer without a leader nothing is redelivered, and a late
        # acknowledgement of work done is never wrong.
        settle_by = delivered + self.ack_wait + ACK_GRACE
        try:
            attempt = _deliveries(jsmsg.reply)
            if attempt > 1:
                self.redelivered += 1
                self.subscription.counters.redelivered += 1
            data = jsmsg.data
            body: bytes | memoryview
            try:
                envelope, body = decode_frame(data, self.subject)
                if envelope.codec:
                    body = await runtime.client.codec.decode(body, envelope, self.subject)
                    envelope = msgspec.structs.replace(envelope, codec=Codec.NONE, dictionary=0)
            except MalformedMessage as exc:
                self.subscription.counters.decode_failed("")
                runtime._slots.release()
                held = False
                await self._dead_letter(jsmsg, attempt, f"MalformedMessage: {exc}")
                return
            self.subscription.received += 1
            # Taken here, after the decode awaited: the emitter swaps counters at every snapshot.
            counters = self.subscription.counters
            try:
                counts = counters.senders[envelope.sender]
            except KeyError:
                counts = counters.add_sender(envelope.sender)
            counts.msgs += 1
            counts.wire += len(data)
            counts.raw += len(body)
            if await self.seen.seen(envelope.id) or (
                attempt > 1 and await self._peer_handled(envelope.id)
            ):
                self.duplicates += 1
                self.subscription.counters.duplicates += 1
                runtime._slots.release()
                held = False
                await self._confirm(jsmsg, Msg.Ack.Ack, settle_by)
                return
            held = False
            outcome = await runtime._run(
                self.handler, self.index, Message(self.subject, "", body, envelope)
            )
            if not outcome:
                handled = True
                await self.seen.add(envelope.id)
                await self._confirm(jsmsg, Msg.Ack.Ack, settle_by)
            elif attempt >= self.handler.max_deliver:
                await self._dead_letter(jsmsg, attempt, outcome)
            else:
                backoff = self.handler.backoff
                await self._settle(jsmsg.nak(delay=backoff[min(attempt, len(backoff)) - 1]))
        except asyncio.CancelledError:
            # Shutting down: hand it back so another instance takes it now, unless
            # its work is done and only the confirmation was pending: one last ack.
            with contextlib.suppress(Exception):
                if handled:
                    await runtime.client.nc.publish(jsmsg.reply, Msg.Ack.Ack)
                else:
                    await asyncio.wait_for(jsmsg.nak(), 1)
            raise
        finally:
            if held:
                runtime._slots.release()

    async def _peer_handled(self, msg_id: str) -> bool:
        """Whether another instance of the agent says it handled ``msg_id`` (asked on
        redeliveries only: an acknowledgement lost with a consumer leader that died
        is redelivered to any instance, while the one that ran it remembers)."""
        try:
            await self.runtime.client.nc.request(
                self._peer_subject, msg_id.encode(), timeout=PEER_WAIT
            )
        except Exception:  # nobody answered: nobody remembers it
            return False
        self.peer_duplicates += 1
        return True

    async def _on_peer_query(self, msg: Any) -> None:
        """Answer a peer's question when this instance handled the id (else stay
        silent: the asker waits PEER_WAIT for a yes)."""
        data = msg.data
        if not msg.reply or not 0 < len(data) <= MAX_MSG_ID:
            return
        try:
            handled = await self.seen.seen(data.decode())
        except UnicodeDecodeError:
            return
        if handled:
            with contextlib.suppress(Exception):
                await self.runtime.client.nc.publish(msg.reply, b"1")

    async def _dead_letter(self, jsmsg: Msg, attempt: int, reason: str) -> None:
        """Store the message in the dead-letter stream, then remove it from its own."""
        meta = jsmsg.metadata
        seq = meta.sequence.stream if meta.sequence is not None else 0
        stream = meta.stream or ""
        headers = {
            H_SUBJECT: self.subject,
            H_REASON: reason_header(reason),
            H_ATTEMPTS: str(attempt),
            H_AGENT: self.runtime.node.name,
            H_STREAM_SEQ: f"{stream}:{seq}",
        }
        msg_id = _frame_id(jsmsg.data)
        if msg_id:
            headers[H_MSG_ID] = msg_id
        try:
            await store(
                self.runtime.client.nc,
                dlq_subject(self.subject),
                jsmsg.data,
                f"dlq:{stream}:{seq}",
                headers=headers,
            )
        except MeshError as exc:
            # Not stored: leave the message in its stream, unacknowledged; it is
            # delivered again after ack_wait while attempts remain.
            log.error("could not dead-letter %s #%s: %s", self.subject, seq, exc)
            return
        self.dead_lettered += 1
        self.subscription.counters.dead_lettered += 1
        log.warning(
            "dead-lettered %s #%s after %d attempts: %s", self.subject, seq, attempt, reason
        )
        give_up = asyncio.get_running_loop().time() + ACK_ATTEMPT * 3
        await self._confirm(jsmsg, Msg.Ack.Term, give_up)

    async def _on_max_deliveries(self, msg: Any) -> None:
        """Dead-letter a message whose last delivery was never settled."""
        try:
            advisory = _advisory_decoder.decode(msg.data)
        except (msgspec.DecodeError, ValueError, RecursionError):
            log.warning("ignored a malformed max-deliveries advisory on %s", msg.subject)
            return
        nc = self.runtime.client.nc
        try:
            stored = await nc.jsm(timeout=5).get_msg(self._stream, seq=advisory.stream_seq)
        except nats.js.errors.NotFoundError:
            return  # settled after all (acknowledged, or dead-lettered by its handler)
        except Exception as exc:
            log.error(
                "could not read %s #%d to dead-letter it: %s",
                self._stream,
                advisory.stream_seq,
                exc,
            )
            return
        data: bytes = stored.data or b""
        headers = {
            H_SUBJECT: self.subject,
            H_REASON: (
                f"no acknowledgement after {advisory.deliveries} deliveries: the handler never"
                " finished (its instance died or hung)"
            ),
            H_ATTEMPTS: str(advisory.deliveries),
            H_AGENT: self.runtime.node.name,
            H_STREAM_SEQ: f"{self._stream}:{advisory.stream_seq}",
        }
        msg_id = _frame_id(data)
        if msg_id:
            headers[H_MSG_ID] = msg_id
        try:
            stored_ack = await store(
                nc,
                dlq_subject(self.subject),
                data,
                f"dlq:{self._stream}:{advisory.stream_seq}",
                headers=headers,
            )
            await nc.jsm(timeout=5).delete_msg(self._stream, advisory.stream_seq)
        except Exception as exc:
            log.error("could not dead-letter %s #%d: %s", self._stream, advisory.stream_seq, exc)
            return
        if stored_ack.duplicate:
            # Its handler dead-lettered it already (and counted it); only the
            # termination was never confirmed.
            return
        self.dead_lettered += 1
        self.subscription.counters.dead_lettered += 1
        log.warning(
            "dead-lettered %s #%d: never acknowledged in %d deliveries",
            self.subject,
            advisory.stream_seq,
            advisory.deliveries,
        )

    async def _confirm(self, jsmsg: Msg, verdict: bytes, settle_by: float) -> None:
        """Acknowledge (or terminate) ``jsmsg`` and wait for JetStream to confirm it,
        trying again until ``settle_by``.

        A plain acknowledgement is lost when the server it goes through, or the
        consumer's leader, dies with it in flight: the message is then delivered
        again after the ack wait, to any instance, and runs twice. Asking for a
        confirmation (JetStream's "double ack") and repeating an unconfirmed one
        (an acknowledgement is idempotent) closes that gap while the acknowledgement
        can still arrive in time.
        """
        nc = self.runtime.client.nc
        loop = asyncio.get_running_loop()
        pause = ACK_PAUSE
        while True:
            remaining = settle_by - loop.time()
            try:
                await nc.request(
                    jsmsg.reply, verdict, timeout=max(0.05, min(remaining, ACK_ATTEMPT))
                )
                return
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
                return
            except Exception as exc:  # no answer (a failover), no responders, reconnecting
                if loop.time() + pause >= settle_by:
                    self.unconfirmed += 1
                    self.subscription.counters.unconfirmed += 1
                    if self.unconfirmed == 1 or self.unconfirmed % 100 == 0:
                        log.warning(
                            "%s: %d acknowledgement(s) never confirmed (last: %s); those "
                            "messages may run again",
                            self.subject,
                            self.unconfirmed,
                            str(exc) or type(exc).__name__,
                        )
                    return
            # Spread out: with no consumer leader, every pending one fails at once.
            await asyncio.sleep(pause * random.uniform(0.5, 1.5))
            pause = min(pause * 2, ACK_MAX_PAUSE)

    @staticmethod
    async def _settle(call: Any) -> None:
        """Send an ack/nak/term; a lost one only means a redelivery later."""
        try:
            await call
        except Exception as exc:
            log.debug("could not settle a reliable message: %s", exc)


def _ack_number(reply: str, v1: int, v2: int, default: int) -> int:
    """A number in a JetStream ack subject: token ``v1`` of the 9-token form, ``v2`` of
    the longer one (``Msg.metadata`` parses every field, timestamp included: ten times
    the cost, on every message)."""
    tokens = reply.split(".")
    try:
        return int(tokens[v1] if len(tokens) == _V1_ACK_TOKENS else tokens[v2])
    except (IndexError, ValueError):
        return default


def _deliveries(reply: str) -> int:
    """How many times this message has been delivered, this time included."""
    return _ack_number(reply, 4, Msg.Ack.NumDelivered, 1)


def _backlog(reply: str) -> int:
    """How many messages the consumer still held, undelivered, after this one."""
    return _ack_number(reply, 8, Msg.Ack.NumPending, 0)


class _MaxDeliveries(msgspec.Struct, frozen=True):
    """JetStream's max-deliveries advisory (the fields used here)."""

    stream_seq: int
    deliveries: int = 0


_advisory_decoder: Final = msgspec.json.Decoder(_MaxDeliveries)


def _frame_id(data: bytes) -> str:
    """The envelope id of a frame, if it is fit for a header ("" otherwise)."""
    try:
        return validate_msg_id(decode_frame(data)[0].id)
    except (MalformedMessage, InvalidName):
        return ""
