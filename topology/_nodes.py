"""The graph's nodes and agent-to-agent links, from its publish and delivery edges.

- Subject nodes: a published subject's inbound side (what its publishers sent) and a
  pattern's outbound side (what subscriptions made with exactly that pattern got). A
  concrete subject's subscribers are every subscription whose pattern matches it,
  found with a token trie once per subject; a wildcard pattern lists the published
  subjects it matches. Foreign subscriptions are matched the same way (for a pattern:
  any foreign pattern overlapping it).
- Links: who talks to whom, from each subscription's ``senders``; their latency and
  failures are the sender's own on the subjects linking them.
- Agent nodes: instances' totals, and external senders (no telemetry of their own).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Final

import msgspec

from topology._foreign import ForeignClient
from topology._graph import AgentNode, InstanceNode, Link, Publication, SubjectNode, Subscriber
from topology._match import PatternIndex, is_wildcard, overlaps
from topology._sparse import Distribution, Summaries

__all__ = [
    "AGGREGATE_SENDER_PREFIX",
    "Agent",
    "Inbound",
    "Outbound",
    "Talk",
    "agent_nodes",
    "links",
    "subject_nodes",
]

#: Sender names starting with this are buckets of several senders (a node's sender table
#: overflowed), not agents: they count in a subscription but make no link.
AGGREGATE_SENDER_PREFIX: Final = "~"


class Inbound(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What was published to one subject, over its publishers (rates per second)."""

    publishers: tuple[str, ...] = ()
    msgs: int = 0
    requests: int = 0
    failed: int = 0
    msgs_s: float = 0.0
    failed_s: float = 0.0
    raw_s: float = 0.0
    wire_s: float = 0.0
    dist: Distribution | None = None


class Outbound(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What the subscriptions made with one pattern received, over them."""

    subscribers: tuple[Subscriber, ...] = ()
    msgs: int = 0
    handled: int = 0
    errors: int = 0
    timeouts: int = 0
    replies: int = 0
    dropped: int = 0
    decode_failures: int = 0
    redelivered: int = 0
    dead_lettered: int = 0
    pending: int = 0
    msgs_s: float = 0.0
    errors_s: float = 0.0
    raw_s: float = 0.0
    wire_s: float = 0.0
    dist: Distribution | None = None


_NO_INBOUND: Final = Inbound()
_NO_OUTBOUND: Final = Outbound()


class Agent:
    """An agent's totals, summed while the edges are made."""

    __slots__ = (
        "backlog",
        "dists",
        "handled_s",
        "instances",
        "received_s",
        "sent_s",
        "sent_wire_s",
    )

    def __init__(self) -> None:
        self.instances: list[InstanceNode] = []
        self.received_s = self.handled_s = self.sent_s = self.sent_wire_s = 0.0
        #: Messages the server holds for its reliable subscriptions.
        self.backlog = 0
        #: Handler time distributions of its subscriptions.
        self.dists: list[Distribution] = []


class Talk:
    """Messages from one sender to one receiving agent, summed over subscriptions."""

    __slots__ = ("msgs", "msgs_s", "patterns", "raw_s", "wire_s")

    def __init__(self) -> None:
        self.msgs = 0
        self.msgs_s = self.raw_s = self.wire_s = 0.0
        #: The receiver's patterns, in name order: deliveries are made pattern by pattern
        #: in name order, so a pattern is appended once, after the ones before it.
        self.patterns: list[str] = []


def subject_nodes(
    inbound: dict[str, Inbound], outbound: dict[str, Outbound], foreign: list[ForeignClient]
) -> tuple[tuple[SubjectNode, ...], dict[str, list[str]]]:
    """Subject nodes by name, and for each pattern the published subjects it matches."""
    index = PatternIndex(outbound)
    reach: dict[str, list[str]] = {}
    for name in sorted(inbound):
        for pattern in index.match(name):
            reach.setdefault(pattern, []).append(name)
    by_pattern: dict[str, list[str]] = {}
    for client in foreign:
        for fsub in client.subscriptions:
            by_pattern.setdefault(fsub.subject, []).append(client.label)
    foreign_index = PatternIndex(by_pattern)
    nodes = []
    for name in sorted(inbound.keys() | outbound.keys()):
        pub = inbound.get(name, _NO_INBOUND)
        out = outbound.get(name, _NO_OUTBOUND)
        labels: Iterable[str] = ()
        wildcard = is_wildcard(name)
        if wildcard:
            subscribers = out.subscribers
            matched = tuple(reach.get(name, ()))
            if by_pattern:
                labels = {x for f, who in by_pattern.items() if overlaps(name, f) for x in who}
        else:
            patterns = index.match(name)
            if patterns == (name,):
                subscribers, matched = out.subscribers, ()
            else:
                subscribers = tuple([s for p in patterns for s in outbound[p].subscribers])
                matched = tuple([p for p in patterns if p != name])
            if by_pattern:
                labels = {x for p in foreign_index.match(name) for x in by_pattern[p]}
        nodes.append(
            SubjectNode(
                name=name,
                wildcard=wildcard,
                publishers=pub.publishers,
                subscribers=subscribers,
                matched=matched,
                foreign_subscribers=tuple(sorted(labels)) if labels else (),
                msgs_in=pub.msgs,
                requests=pub.requests,
                failed=pub.failed,
                msgs_in_per_s=pub.msgs_s,
                failed_per_s=pub.failed_s,
                raw_in_per_s=pub.raw_s,
                wire_in_per_s=pub.wire_s,
                round_trip=pub.dist.latency if pub.dist is not None else None,
                msgs_out=out.msgs,
                handled=out.handled,
                errors=out.errors,
                timeouts=out.timeouts,
                replies=out.replies,
                dropped=out.dropped,
                decode_failures=out.decode_failures,
                redelivered=out.redelivered,
                dead_lettered=out.dead_lettered,
                msgs_out_per_s=out.msgs_s,
                errors_per_s=out.errors_s,
                raw_out_per_s=out.raw_s,
                wire_out_per_s=out.wire_s,
                pending=out.pending,
                handler=out.dist.latency if out.dist is not None else None,
            )
        )
    return tuple(nodes), reach


def links(
    talks: dict[str, dict[str, Talk]],
    published: dict[tuple[str, str], tuple[Publication, Distribution | None]],
    reach: dict[str, list[str]],
    summaries: Summaries,
) -> tuple[Link, ...]:
    """Agent-to-agent links by source then target.

    ``published`` maps (subject, agent) to the publication edge and its round-trip
    distribution: a link's latency and failures are the sender's on the subjects that
    reached the receiver's subscriptions.
    """
    requesters = {agent for (_, agent), (pub, _) in published.items() if pub.requests}
    result = []
    for source, target, talk in _by_name(talks):
        patterns = talk.patterns
        failed = 0
        dist = None
        if source in requesters:
            dists = []
            seen = set()
            for pattern in patterns:
                for subject in reach.get(pattern, ()):
                    edge = published.get((subject, source))
                    if edge is not None and subject not in seen and edge[0].requests:
                        seen.add(subject)
                        failed += edge[0].failed
                        if edge[1] is not None:
                            dists.append(edge[1])
            dist = summaries.combine(dists)
        result.append(
            Link(
                source=source,
                target=target,
                subjects=tuple(patterns),
                msgs=talk.msgs,
                msgs_per_s=talk.msgs_s,
                raw_bytes_per_s=talk.raw_s,
                wire_bytes_per_s=talk.wire_s,
                failed=failed,
                latency=dist.latency if dist is not None else None,
            )
        )
    return tuple(result)


def _by_name(talks: dict[str, dict[str, Talk]]) -> Iterator[tuple[str, str, Talk]]:
    """The talks by source, then target."""
    for source in sorted(talks):
        to = talks[source]
        for target in sorted(to) if len(to) > 1 else to:
            yield source, target, to[target]


def agent_nodes(
    agents: dict[str, Agent], talk_links: tuple[Link, ...], summaries: Summaries
) -> tuple[AgentNode, ...]:
    """Agent nodes by name: the agents with instances, and external senders."""
    external = Agent()
    for link in talk_links:
        if link.source not in agents:
            agents[link.source] = external
    nodes = []
    for name in sorted(agents):
        a = agents[name]
        insts = a.instances
        service = summaries.combine(a.dists)
        nodes.append(
            AgentNode(
                name=name,
                external=not insts,
                instances=tuple([i.instance for i in insts]),
                cpu=sum([i.cpu for i in insts], 0.0),
                rss=sum([i.rss for i in insts]),
                max_concurrency=sum([i.max_concurrency for i in insts]),
                received_per_s=a.received_s,
                handled_per_s=a.handled_s,
                sent_per_s=a.sent_s,
                sent_wire_bytes_per_s=a.sent_wire_s,
                service=service.latency if service is not None else None,
                pending=sum([i.pending[-1] for i in insts]),
                backlog=a.backlog,
                untracked=sum([i.untracked for i in insts]),
                policy_rejected=sum([i.policy_rejected for i in insts]),
            )
        )
    return tuple(nodes)
