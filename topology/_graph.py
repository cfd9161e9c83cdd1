"""The mesh as a bipartite graph: the model :func:`topology.build_graph` returns.

Nodes are agents and subjects. An agent **publishes** to a concrete subject
(:class:`Publication`, from its instances' ``sent`` stats); a subscription pattern
**delivers** to an agent (:class:`Delivery`, from ``received`` stats). A published subject
reaches every subscription pattern that matches it under NATS rules. Agents also
**talk** to agents (:class:`Link`): the ``senders`` of a subscription say who sent what
it received; a sender that publishes no snapshots (the CLI, a plain NATS client, named
``""``) is an *external* agent.

Counts are exact sums over the window; rates are per second (an instance's counts over
the sum of its snapshots' intervals, summed over instances); gauges (pending, inflight,
rss) are each instance's last value, summed, except a subscription's ``backlog``, which
its instances share (the highest they reported). Latencies are summaries
(:class:`Latency`) of the exact bucket-wise merge of the instances' histograms.

The three edge kinds are tagged (``kind``: ``publish``, ``deliver``, ``talk``) so a report
lists them together and its JSON says which is which.
"""

from __future__ import annotations

import msgspec

from topology._foreign import ForeignClient
from topology._snapshot import ReliableStats
from topology._sparse import Latency

__all__ = [
    "AgentNode",
    "Delivery",
    "Graph",
    "InstanceNode",
    "Link",
    "Publication",
    "SubjectNode",
    "Subscriber",
]


class InstanceNode(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One process of an agent, over the window."""

    instance: str
    agent: str
    snapshots: int
    #: Sum of the snapshots' intervals: the time the counts cover.
    seconds: float
    #: Snapshots missing between the first and last seq in the window.
    lost: int
    #: CPU cores used (CPU seconds over ``seconds``).
    cpu: float
    rss: int
    max_concurrency: int
    #: Messages waiting for a handler, summed over subscriptions, per snapshot in seq order.
    pending: tuple[int, ...]
    #: Messages the server held for its reliable subscriptions, summed over them, per
    #: snapshot in seq order.
    backlog: tuple[int, ...]
    inflight: int
    untracked: int
    policy_rejected: int
    policy: dict[str, int]


class Publication(
    msgspec.Struct, frozen=True, kw_only=True, gc=False, tag_field="kind", tag="publish"
):
    """Agent → concrete subject: what the agent's instances published there."""

    agent: str
    subject: str
    instances: int
    msgs: int
    requests: int
    failed: int
    msgs_per_s: float
    failed_per_s: float
    raw_bytes_per_s: float
    wire_bytes_per_s: float
    #: Request round trips, as the publishing instances measured them.
    latency: Latency | None


class Delivery(
    msgspec.Struct, frozen=True, kw_only=True, gc=False, tag_field="kind", tag="deliver"
):
    """Subscription pattern → agent: what one subscription of the agent's instances got."""

    subject: str
    queue: str
    agent: str
    instances: int
    msgs: int
    handled: int
    errors: int
    timeouts: int
    replies: int
    dropped: int
    msgs_per_s: float
    handled_per_s: float
    errors_per_s: float
    raw_bytes_per_s: float
    wire_bytes_per_s: float
    reply_bytes_per_s: float
    #: Messages by sending agent ("": plain NATS clients).
    senders: dict[str, int]
    #: Frames that could not be decoded, by sending agent.
    decode_failures: dict[str, int]
    pending: int
    inflight: int
    #: Messages the server held for the subscription, not yet delivered (a reliable
    #: subscription's JetStream consumer; the highest its instances reported).
    backlog: int
    #: How its instances settled reliable messages (None: nothing to report).
    reliable: ReliableStats | None
    #: Handler service times.
    latency: Latency | None


class Link(msgspec.Struct, frozen=True, kw_only=True, gc=False, tag_field="kind", tag="talk"):
    """Agent → agent: messages ``target`` received from ``source``.

    ``msgs`` is exact (the receiver counts by sender). The rates are each receiving
    subscription's, shared out by message count: exact for messages per second when the
    receiver's instances cover the same time, for bytes when message sizes are alike.
    ``latency`` and ``failed`` are the sender's own request round trips and failures on
    the subjects through which they talk (none for an external sender).
    """

    source: str
    target: str
    #: The receiver's subscription patterns the messages came through.
    subjects: tuple[str, ...]
    msgs: int
    msgs_per_s: float
    raw_bytes_per_s: float
    wire_bytes_per_s: float
    failed: int
    latency: Latency | None


class AgentNode(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """An agent: its instances together (or an external sender)."""

    name: str
    #: Publishes no telemetry: known only from what others received from it.
    external: bool
    instances: tuple[str, ...]
    cpu: float
    rss: int
    max_concurrency: int
    #: Messages arriving on its subscriptions, handler calls finished.
    received_per_s: float
    handled_per_s: float
    #: What it published, and its wire bytes out including replies.
    sent_per_s: float
    sent_wire_bytes_per_s: float
    #: Handler service times over all its subscriptions.
    service: Latency | None
    pending: int
    #: Messages the server held for its reliable subscriptions.
    backlog: int
    untracked: int
    policy_rejected: int


class Subscriber(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A subscription that receives a subject: its pattern, queue group and agent."""

    subject: str
    queue: str
    agent: str
    instances: int


class SubjectNode(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A concrete subject someone published to, or a subscription pattern.

    The ``*_in`` side is what was published to it (concrete subjects only); the ``*_out``
    side is what subscriptions with exactly this pattern received (a wildcard
    subscription's traffic is on the pattern's node, not split by concrete subject).
    """

    name: str
    wildcard: bool
    publishers: tuple[str, ...]
    #: Concrete: every subscription matching it; pattern: the subscriptions made with it.
    subscribers: tuple[Subscriber, ...]
    #: Concrete: the other patterns that match it; pattern: the published subjects it matches.
    matched: tuple[str, ...]
    #: Foreign connections subscribed to it (or, for a pattern, to an overlapping one).
    foreign_subscribers: tuple[str, ...]
    msgs_in: int
    requests: int
    failed: int
    msgs_in_per_s: float
    failed_per_s: float
    raw_in_per_s: float
    wire_in_per_s: float
    round_trip: Latency | None
    msgs_out: int
    handled: int
    errors: int
    timeouts: int
    replies: int
    dropped: int
    decode_failures: int
    #: Reliable messages delivered again, and moved to the dead letters.
    redelivered: int
    dead_lettered: int
    msgs_out_per_s: float
    errors_per_s: float
    raw_out_per_s: float
    wire_out_per_s: float
    pending: int
    handler: Latency | None


class Graph(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The mesh over one window; every tuple sorted by its names."""

    seconds: float
    snapshots: int
    lost: int
    instances: tuple[InstanceNode, ...]
    agents: tuple[AgentNode, ...]
    subjects: tuple[SubjectNode, ...]
    publications: tuple[Publication, ...]
    deliveries: tuple[Delivery, ...]
    links: tuple[Link, ...]
    foreign: tuple[ForeignClient, ...]
