"""Telemetry snapshots: what one node instance says about itself about once a second.

A node publishes a :class:`Snapshot` (msgpack) on ``_MESH.telemetry.<instance>``.
Counters are **deltas** over the snapshot's interval, so snapshots from any number of
instances and intervals merge exactly by adding them (histograms merge by adding
bucket counts). Gauges (``pending``, ``inflight``, ``backlog``, ``rss``) are the value
at the end of the interval. ``seq`` grows by one per snapshot of an instance: a gap
means snapshots were lost (telemetry is at-most-once, like any core NATS message).

Outbound traffic is broken down by concrete subject (what was published to), inbound
traffic by subscription (the subject pattern and queue group the instance subscribed
with), so an edge is a sender's subject matched against a subscriber's pattern. Replies
travel to inboxes and are counted on the subscription that answered them.

Schema evolution is append-only: new fields get defaults, so a newer reader takes an
older snapshot. A reader refuses fields it does not know, as every control-plane record
of the mesh does (a forged or garbled snapshot is counted as malformed, not half read):
a field added here reaches readers (``mesh topology``, the sidecars) before the nodes
that write it. Only the data-plane envelope skips unknown fields (see :mod:`mesh._wire`).
"""

from __future__ import annotations

from typing import Final

import msgspec

from topology._histogram import HistogramCounts

#: Subject prefix snapshots are published under; the instance id is the last token.
TELEMETRY_SUBJECT: Final = "_MESH.telemetry"
#: Largest snapshot decoded: four times the server's default ``max_payload``, so no
#: snapshot a node can send under the default limits is refused.
MAX_SNAPSHOT_BYTES: Final = 4 * 1024 * 1024


class SentStats(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """What an instance published on one subject during the interval."""

    subject: str
    #: Messages published (events and requests).
    msgs: int = 0
    #: Payload bytes before compression (the user's encoded body).
    raw_bytes: int = 0
    #: Frame bytes on the wire (envelope + compressed body).
    wire_bytes: int = 0
    #: Of ``msgs``, how many were requests.
    requests: int = 0
    #: Requests that got no good reply: timeout, no responders, remote error.
    failed: int = 0
    #: Of ``msgs``, how many were sent compressed.
    compressed: int = 0
    #: Request round trips as this instance measured them (ns).
    latency: HistogramCounts | None = None


class ReliableStats(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """A reliable subscription's settling during the interval."""

    #: Deliveries after the first: a handler failed or timed out, its instance died or
    #: hung, or an instance shutting down handed back what it had not run.
    redelivered: int = 0
    #: Messages handled already (by this instance or, said a peer, another one):
    #: acknowledged without running them again.
    duplicates: int = 0
    #: Messages moved to the dead letters (attempts used up, or undecodable).
    dead_lettered: int = 0
    #: Acknowledgements JetStream never confirmed: those messages may run again.
    unconfirmed: int = 0

    def __add__(self, other: ReliableStats) -> ReliableStats:
        return ReliableStats(
            redelivered=self.redelivered + other.redelivered,
            duplicates=self.duplicates + other.duplicates,
            dead_lettered=self.dead_lettered + other.dead_lettered,
            unconfirmed=self.unconfirmed + other.unconfirmed,
        )


class ReceivedStats(
    msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True
):
    """What arrived on one subscription of an instance during the interval."""

    #: The subscription's subject (may hold wildcards).
    subject: str
    #: Its queue group ("" for a broadcast subscription).
    queue: str = ""
    msgs: int = 0
    raw_bytes: int = 0
    wire_bytes: int = 0
    #: Messages by sending agent name; "" counts plain NATS clients (no mesh frame).
    senders: dict[str, int] = {}
    #: Handler calls finished, and of those the ones that failed or timed out.
    handled: int = 0
    errors: int = 0
    timeouts: int = 0
    #: Handler service time (ns): the time a handler call took.
    latency: HistogramCounts | None = None
    #: Replies sent for messages of this subscription, and their wire bytes.
    replies: int = 0
    reply_bytes: int = 0
    #: Frames that could not be decoded (bad envelope, corrupt compression, unknown
    #: dictionary), by sending agent: how a sender learns its frames are refused.
    decode_failures: dict[str, int] = {}
    #: Messages NATS dropped because the subscription's buffer was full.
    dropped: int = 0
    #: Gauges at the end of the interval: messages received but not yet dispatched,
    #: and handler calls running.
    pending: int = 0
    inflight: int = 0
    #: Gauge: messages the server still holds for the subscription, not yet delivered
    #: (a reliable subscription's JetStream consumer, as this instance last saw it; the
    #: instances of a queue group share it). 0 for a core NATS subscription.
    backlog: int = 0
    #: How a reliable subscription settled its messages; None when nothing of it
    #: happened (always, for a core NATS subscription).
    reliable: ReliableStats | None = None


class Snapshot(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One instance's telemetry for one interval."""

    instance: str
    agent: str
    #: 0, 1, 2… per instance; a gap means lost snapshots.
    seq: int
    #: Unix time (ns) at the end of the interval, and the interval's length (ns).
    time: int
    interval: int
    #: CPU seconds the process used during the interval, and its resident memory (bytes).
    cpu: float = 0.0
    rss: int = 0
    #: Handler calls the instance runs at once at most (0: not a node).
    max_concurrency: int = 0
    sent: list[SentStats] = []
    received: list[ReceivedStats] = []
    #: Messages not broken down by subject because the instance's subject table was full.
    untracked: int = 0
    #: Policy values this instance refused during the interval (stale or malformed).
    policy_rejected: int = 0
    #: Policy versions in force on this instance, by policy key.
    policy: dict[str, int] = {}


encode_snapshot = msgspec.msgpack.Encoder().encode
_snapshot_decoder: Final = msgspec.msgpack.Decoder(Snapshot)


def decode_snapshot(data: bytes) -> Snapshot:
    """Decode a snapshot.

    Raises ``ValueError`` (``msgspec.DecodeError`` is one) for anything that is not a
    snapshot of at most :data:`MAX_SNAPSHOT_BYTES` bytes, whatever the bytes: invalid
    msgpack or UTF-8, nesting too deep, unknown fields, wrong types.
    """
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise ValueError(
            f"snapshot of {len(data)} bytes is over the {MAX_SNAPSHOT_BYTES}-byte limit"
        )
    try:
        return _snapshot_decoder.decode(data)
    except RecursionError:
        raise ValueError("snapshot nests too deeply") from None
