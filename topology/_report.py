"""The analysis result: :class:`Report`, its parts, and its JSON form.

Every tuple in a report is sorted: agents and subjects by name; edges publish (by
subject, agent), then deliver (by pattern, queue, agent), then talk (by source, target);
findings worst first (bottlenecks by utilisation, decode failures and hot senders by
size), then by name. The same graph always gives byte-for-byte the same JSON. Latencies
are in nanoseconds, rates per second, bytes as counted by the nodes: *raw* before
compression, *wire* the frames sent.
"""

from __future__ import annotations

from typing import Final, TypeAlias

import msgspec

from topology._foreign import ForeignClient
from topology._graph import Delivery, Link, Publication, Subscriber
from topology._sparse import Latency

#: An edge of the graph: ``publish`` agent → subject (latency: request round trips),
#: ``deliver`` subscription pattern → agent (latency: handler time), ``talk`` agent →
#: agent (latency: the sender's round trips); JSON tells them apart by ``kind``.
Edge: TypeAlias = Publication | Delivery | Link

__all__ = [
    "AgentReport",
    "Bottleneck",
    "CriticalPath",
    "DecodeFailure",
    "Edge",
    "Hop",
    "HotSender",
    "Report",
    "SilentSubject",
    "SinglePoint",
    "SubjectReport",
    "Thresholds",
    "report_json",
]


class Thresholds(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """When the analysis flags something (see :func:`topology.analyse`)."""

    #: An agent is a bottleneck above this utilisation (1.0: its instances always busy).
    utilisation: float = 0.8
    #: ...or when an instance's pending messages (or the backlog of its reliable
    #: subscriptions) grew by at least this much
    pending_growth: int = 10
    #: ...over at least this many snapshots, never decreasing.
    pending_samples: int = 3
    #: A hot sender sends more wire bytes/s than ``hot_factor`` × the median sender...
    hot_factor: float = 3.0
    #: ...and more than this share of all senders' wire bytes/s.
    hot_share: float = 0.10
    #: At most this many hot senders are reported.
    hot_max: int = 5


class AgentReport(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An agent over the window; an external one (no telemetry) has only its name."""

    name: str
    external: bool
    instances: int
    #: CPU cores in use, resident memory (bytes), both summed over instances.
    cpu: float
    rss: int
    arrival_per_s: float
    handled_per_s: float
    sent_per_s: float
    sent_wire_bytes_per_s: float
    service: Latency | None
    #: arrival rate × mean service time ÷ instances.
    utilisation: float
    #: Messages waiting for a handler now, and whether an instance's pending grows.
    pending: int
    pending_growing: bool
    #: Messages the server holds for its reliable subscriptions, and whether they grow.
    backlog: int
    backlog_growing: bool
    bottleneck: bool
    #: Why it is a bottleneck ("" if it is not).
    reason: str
    untracked: int
    policy_rejected: int


class SubjectReport(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A subject or subscription pattern, with its flags (see :func:`topology.analyse`)."""

    name: str
    wildcard: bool
    publishers: tuple[str, ...]
    subscribers: tuple[Subscriber, ...]
    matched: tuple[str, ...]
    foreign_subscribers: tuple[str, ...]
    #: Published into it, and received by subscriptions with exactly this pattern.
    msgs_in_per_s: float
    msgs_out_per_s: float
    raw_in_per_s: float
    wire_in_per_s: float
    raw_out_per_s: float
    wire_out_per_s: float
    #: raw ÷ wire bytes (published side if any, else received); None without bytes.
    ratio: float | None
    #: Request round trips seen by its publishers, handler times of its subscriptions.
    request: Latency | None
    handler: Latency | None
    errors_per_s: float
    failed: int
    timeouts: int
    decode_failures: int
    dropped: int
    redelivered: int
    dead_lettered: int
    flags: tuple[str, ...]


class Bottleneck(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An agent over the utilisation threshold, or with a growing backlog."""

    agent: str
    utilisation: float
    pending: int
    backlog: int
    reason: str


class Hop(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A request to ``subject`` handled by ``agent`` ("" when no mesh agent handles it)."""

    subject: str
    agent: str
    round_trip_p99_ns: int
    handler_p99_ns: int


class CriticalPath(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    root: str
    #: The root was requested by an external sender (its round trip is not measured:
    #: the handler's p99 stands in for it).
    external: bool
    round_trip_p99_ns: int
    hops: tuple[Hop, ...]
    #: The request subject that led back to an agent already on the path ("" if none).
    cycle: str


class SinglePoint(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A subject every receiving group of which has a single instance."""

    subject: str
    subscribers: tuple[Subscriber, ...]


class SilentSubject(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A subject published to that nobody subscribes to."""

    subject: str
    publishers: tuple[str, ...]
    msgs_per_s: float


class HotSender(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An agent sending far more wire bytes than the others."""

    agent: str
    wire_bytes_per_s: float
    #: Of all senders' wire bytes/s.
    share: float


class DecodeFailure(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """Frames from ``sender`` that ``agent`` could not decode on subscription ``subject``."""

    sender: str
    subject: str
    agent: str
    count: int


class Report(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What :func:`topology.analyse` found in one graph."""

    window_seconds: float
    snapshots: int
    lost: int
    thresholds: Thresholds
    agents: tuple[AgentReport, ...]
    subjects: tuple[SubjectReport, ...]
    edges: tuple[Edge, ...]
    bottlenecks: tuple[Bottleneck, ...]
    critical_path: CriticalPath | None
    single_points: tuple[SinglePoint, ...]
    silent: tuple[SilentSubject, ...]
    hot_senders: tuple[HotSender, ...]
    foreign: tuple[ForeignClient, ...]
    decode_failures: tuple[DecodeFailure, ...]
    policy_rejected: int


# "deterministic": dict keys (senders, decode failures, policy versions) sorted.
_encoder: Final = msgspec.json.Encoder(order="deterministic")


def report_json(report: Report) -> bytes:
    """The report as JSON (deterministic: the same report gives the same bytes)."""
    return _encoder.encode(report)
