"""`analyse`: the rules that turn a :class:`Graph` into a :class:`Report`, and the
per-subject rows of ``mesh stats``. The rules are documented on :func:`analyse`."""

from __future__ import annotations

import statistics
from collections.abc import Iterable
from itertools import pairwise
from typing import Final

import msgspec

from topology._foreign import is_internal_subject
from topology._gc import gc_paused
from topology._graph import Delivery, Graph, InstanceNode, Publication, SubjectNode
from topology._report import (
    AgentReport,
    Bottleneck,
    CriticalPath,
    DecodeFailure,
    Hop,
    HotSender,
    Report,
    SilentSubject,
    SinglePoint,
    SubjectReport,
    Thresholds,
)
from topology._sparse import Latency

__all__ = ["DEFAULT_THRESHOLDS", "SubjectRow", "analyse", "pending_grows", "subject_rows"]

DEFAULT_THRESHOLDS: Final = Thresholds()


def analyse(graph: Graph, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> Report:
    """What ``graph`` shows, by these rules (thresholds from ``thresholds``).

    **Utilisation** of an agent is its arrival rate (messages/s on its subscriptions) × its
    mean handler service time ÷ its instances: the fraction of time an instance would be
    busy if it ran one handler at a time. (An instance running handlers concurrently can
    exceed 1 without queueing; a growing backlog is the direct sign of saturation.)

    **Pending grows** on an instance when its pending series (messages waiting for a
    handler, summed over subscriptions, one value per snapshot in seq order) has at least
    ``Thresholds.pending_samples`` values, never decreases from one to the next, and its
    last value is at least ``Thresholds.pending_growth`` above its first.

    The **backlog grows** on an instance by the same rule, applied to the messages the
    server holds for its reliable subscriptions (their JetStream consumers), which its
    node never sees as pending: it pulls only what it can run.

    A **bottleneck** is an agent with utilisation above ``Thresholds.utilisation``, an
    instance whose pending grows, or one whose backlog grows (reported once per agent:
    the instances of a queue group share a backlog).

    A **single point of failure** is a subject with at least one subscriber where every
    group receiving it has exactly one instance. A group is a queue group (pattern, queue)
    or one agent's broadcast subscription (pattern, agent). Concrete subjects are judged on
    every subscription that matches them; a wildcard pattern only when it matches no
    published subject (otherwise the subjects it matches are judged).

    A **silent subject** had messages published in the window but no subscription of any
    mesh instance matches it and no foreign connection subscribes to it. Inbox, ``$`` and
    ``_MESH.`` subjects are never silent.

    **Hot senders** are the agents with telemetry ranked by wire bytes/s out (published plus
    replies); an agent is hot when it sends more than ``max(hot_factor × median, hot_share ×
    total)`` over all senders with bytes — so it takes at least three senders for one to
    stand out. At most ``hot_max`` are reported, largest first. External senders are left
    out: only what they delivered is known, not what they sent.

    The **critical path** follows request chains. Roots are request subjects whose requesters
    include an agent that handles no requested subject (a client of the mesh), and
    subscriptions that answered requests from external senders. From a root subject the path
    goes to the agent handling it (of several, the one with the highest handler p99), then
    to that agent's outbound request subject with the highest p99 round trip (as the agent
    measured it), and so on until an agent makes no requests. A subject whose handler is
    already on the path closes a cycle: it is reported in ``cycle`` and not followed. The
    root with the largest p99 round trip is chosen (for an external root, whose round trip
    nobody measured, its handler's p99 stands in).

    This is an approximation: telemetry carries no per-request causality, so an agent's
    outbound calls are attributed to whatever it handles (an agent handling several subjects
    mixes them); calls are assumed sequential with the slowest one dominating; and the p99s
    of different hops do not add up to the p99 of the chain. It says where to look first,
    not how a request's time divides exactly.

    Subjects are flagged ``spof``, ``silent``, ``foreign`` (a foreign subscriber), and
    ``errors``, ``timeouts``, ``failed`` (requests), ``decode``, ``dropped``,
    ``redelivered`` and ``dead`` (dead-lettered, reliable subjects) when those counts are
    not zero. Every list in the report is sorted, so the same graph gives the
    same report.
    """
    with gc_paused():
        return _analyse(graph, thresholds)


def _analyse(graph: Graph, thresholds: Thresholds) -> Report:
    agents = _agents(graph, thresholds)
    single = [
        SinglePoint(subject=node.name, subscribers=node.subscribers)
        for node in graph.subjects
        if _single_point(node)
    ]
    silent = [
        SilentSubject(subject=node.name, publishers=node.publishers, msgs_per_s=node.msgs_in_per_s)
        for node in graph.subjects
        if _silent(node)
    ]
    flags = {p.subject: ["spof"] for p in single}
    for s in silent:
        flags.setdefault(s.subject, []).append("silent")
    failures = [
        DecodeFailure(sender=sender, subject=d.subject, agent=d.agent, count=n)
        for d in graph.deliveries
        for sender, n in d.decode_failures.items()
        if n
    ]
    failures.sort(key=lambda f: (-f.count, f.sender, f.subject, f.agent))
    bottlenecks = sorted(
        (
            Bottleneck(
                agent=a.name,
                utilisation=a.utilisation,
                pending=a.pending,
                backlog=a.backlog,
                reason=a.reason,
            )
            for a in agents
            if a.bottleneck
        ),
        key=lambda b: (-b.utilisation, b.agent),
    )
    return Report(
        window_seconds=graph.seconds,
        snapshots=graph.snapshots,
        lost=graph.lost,
        thresholds=thresholds,
        agents=tuple(agents),
        subjects=tuple(_subject(node, flags.get(node.name, [])) for node in graph.subjects),
        edges=(*graph.publications, *graph.deliveries, *graph.links),
        bottlenecks=tuple(bottlenecks),
        critical_path=_critical_path(graph),
        single_points=tuple(single),
        silent=tuple(silent),
        hot_senders=_hot_senders(agents, thresholds),
        foreign=graph.foreign,
        decode_failures=tuple(failures),
        policy_rejected=sum(i.policy_rejected for i in graph.instances),
    )


def pending_grows(series: tuple[int, ...], thresholds: Thresholds) -> bool:
    """The pending-growth rule (see :func:`analyse`)."""
    return (
        len(series) >= max(2, thresholds.pending_samples)
        and series[-1] - series[0] >= thresholds.pending_growth
        and all(a <= b for a, b in pairwise(series))
    )


def _agents(graph: Graph, thresholds: Thresholds) -> list[AgentReport]:
    by_agent: dict[str, list[InstanceNode]] = {}
    for inst in graph.instances:
        by_agent.setdefault(inst.agent, []).append(inst)
    reports = []
    for agent in graph.agents:
        service = agent.service
        replicas = len(agent.instances)
        mean_s = service.mean_ns / 1e9 if service is not None else 0.0
        utilisation = agent.received_per_s * mean_s / replicas if replicas else 0.0
        reasons = []
        if utilisation > thresholds.utilisation:
            reasons.append(f"utilisation {utilisation:.2f} > {thresholds.utilisation:.2f}")
        growing = False
        backlogs = []
        for inst in by_agent.get(agent.name, ()):
            if pending_grows(inst.pending, thresholds):
                growing = True
                series = inst.pending
                reasons.append(
                    f"pending {series[0]}→{series[-1]} over {len(series)} snapshots"
                    f" on {inst.instance}"
                )
            if pending_grows(inst.backlog, thresholds):
                backlogs.append((inst.backlog[0] - inst.backlog[-1], inst.instance, inst.backlog))
        if backlogs:
            _, name, series = min(backlogs)  # the largest growth
            reasons.append(
                f"backlog {series[0]}→{series[-1]} over {len(series)} snapshots on {name}"
            )
        reports.append(
            AgentReport(
                name=agent.name,
                external=agent.external,
                instances=replicas,
                cpu=agent.cpu,
                rss=agent.rss,
                arrival_per_s=agent.received_per_s,
                handled_per_s=agent.handled_per_s,
                sent_per_s=agent.sent_per_s,
                sent_wire_bytes_per_s=agent.sent_wire_bytes_per_s,
                service=service,
                utilisation=utilisation,
                pending=agent.pending,
                pending_growing=growing,
                backlog=agent.backlog,
                backlog_growing=bool(backlogs),
                bottleneck=bool(reasons),
                reason="; ".join(reasons),
                untracked=agent.untracked,
                policy_rejected=agent.policy_rejected,
            )
        )
    return reports


def _single_point(node: SubjectNode) -> bool:
    if node.wildcard and node.matched:
        return False
    groups: dict[tuple[str, str, str], int] = {}
    for sub in node.subscribers:
        key = (sub.subject, sub.queue, "") if sub.queue else (sub.subject, "", sub.agent)
        groups[key] = groups.get(key, 0) + sub.instances
    return bool(groups) and all(n == 1 for n in groups.values())


def _silent(node: SubjectNode) -> bool:
    return (
        not node.wildcard
        and node.msgs_in > 0
        and not node.subscribers
        and not node.foreign_subscribers
        and not is_internal_subject(node.name)
    )


def _subject(node: SubjectNode, flags: list[str]) -> SubjectReport:
    if node.foreign_subscribers:
        flags.append("foreign")
    for flag, count in (
        ("errors", node.errors),
        ("timeouts", node.timeouts),
        ("failed", node.failed),
        ("decode", node.decode_failures),
        ("dropped", node.dropped),
        ("redelivered", node.redelivered),
        ("dead", node.dead_lettered),
    ):
        if count:
            flags.append(flag)
    raw, wire = (
        (node.raw_in_per_s, node.wire_in_per_s)
        if node.wire_in_per_s
        else (node.raw_out_per_s, node.wire_out_per_s)
    )
    return SubjectReport(
        name=node.name,
        wildcard=node.wildcard,
        publishers=node.publishers,
        subscribers=node.subscribers,
        matched=node.matched,
        foreign_subscribers=node.foreign_subscribers,
        msgs_in_per_s=node.msgs_in_per_s,
        msgs_out_per_s=node.msgs_out_per_s,
        raw_in_per_s=node.raw_in_per_s,
        wire_in_per_s=node.wire_in_per_s,
        raw_out_per_s=node.raw_out_per_s,
        wire_out_per_s=node.wire_out_per_s,
        ratio=raw / wire if wire else None,
        request=node.round_trip,
        handler=node.handler,
        errors_per_s=node.errors_per_s + node.failed_per_s,
        failed=node.failed,
        timeouts=node.timeouts,
        decode_failures=node.decode_failures,
        dropped=node.dropped,
        redelivered=node.redelivered,
        dead_lettered=node.dead_lettered,
        flags=tuple(sorted(flags)),
    )


def _hot_senders(agents: Iterable[AgentReport], thresholds: Thresholds) -> tuple[HotSender, ...]:
    rates = [(a.sent_wire_bytes_per_s, a.name) for a in agents if not a.external]
    rates = [r for r in rates if r[0] > 0]
    if not rates:
        return ()
    total = sum(rate for rate, _ in rates)
    limit = max(
        thresholds.hot_factor * statistics.median(r for r, _ in rates), thresholds.hot_share * total
    )
    hot = sorted((r for r in rates if r[0] > limit), key=lambda r: (-r[0], r[1]))
    return tuple(
        HotSender(agent=name, wire_bytes_per_s=rate, share=rate / total)
        for rate, name in hot[: thresholds.hot_max]
    )


def _critical_path(graph: Graph) -> CriticalPath | None:
    """The critical path of request chains (see :func:`analyse`), or None."""
    nodes = {node.name: node for node in graph.subjects}
    external = {a.name for a in graph.agents if a.external}
    handlers_of = _handlers(graph, nodes)
    handlers = {agent for options in handlers_of.values() for agent, _ in options}
    requests: dict[str, list[Publication]] = {}
    requesters: dict[str, list[str]] = {}
    for pub in graph.publications:
        if pub.requests:
            requests.setdefault(pub.agent, []).append(pub)
            requesters.setdefault(pub.subject, []).append(pub.agent)
    roots: dict[str, tuple[int, bool]] = {}
    for node in graph.subjects:
        if any(a not in handlers for a in requesters.get(node.name, ())):
            roots[node.name] = (_p99(node.round_trip), False)
    for d in graph.deliveries:
        if d.replies and d.subject not in roots and any(s in external for s in d.senders):
            roots[d.subject] = (_p99(d.latency), True)
    if not roots:
        return None
    root = min(roots, key=lambda name: (-roots[name][0], name))
    rtt, is_external = roots[root]
    hops: list[Hop] = []
    visited: set[str] = set()
    subject, hop_rtt, cycle = root, rtt, ""
    while True:
        options = handlers_of.get(subject, [])
        if not options:
            hops.append(Hop(subject=subject, agent="", round_trip_p99_ns=hop_rtt, handler_p99_ns=0))
            break
        agent, handler_p99 = min(options, key=lambda o: (-o[1], o[0]))
        if agent in visited:
            cycle = subject
            break
        visited.add(agent)
        hops.append(
            Hop(subject=subject, agent=agent, round_trip_p99_ns=hop_rtt, handler_p99_ns=handler_p99)
        )
        calls = [(_p99(p.latency), p.subject) for p in requests.get(agent, ())]
        if not calls:
            break
        hop_rtt, subject = min(calls, key=lambda c: (-c[0], c[1]))
    return CriticalPath(
        root=root,
        external=is_external,
        round_trip_p99_ns=rtt,
        hops=tuple(hops),
        cycle=cycle,
    )


def _p99(latency: Latency | None) -> int:
    return latency.p99_ns if latency is not None else 0


def _handlers(graph: Graph, nodes: dict[str, SubjectNode]) -> dict[str, list[tuple[str, int]]]:
    """For each requested subject (or answered subscription): (agent, handler p99) options."""
    deliveries: dict[tuple[str, str, str], Delivery] = {
        (d.agent, d.subject, d.queue): d for d in graph.deliveries
    }
    handlers: dict[str, list[tuple[str, int]]] = {}
    for node in graph.subjects:
        if not node.requests:
            continue
        handlers[node.name] = [
            (s.agent, _p99(deliveries[s.agent, s.subject, s.queue].latency))
            for s in node.subscribers
        ]
    for d in graph.deliveries:
        if d.replies and d.subject not in handlers:
            handlers[d.subject] = [
                (s.agent, _p99(deliveries[s.agent, s.subject, s.queue].latency))
                for s in nodes[d.subject].subscribers
            ]
    return handlers


class SubjectRow(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One subject in ``mesh stats``.

    Bytes and the average size are the published side's (what senders put on the
    wire), or the received side's for a pattern nobody publishes to literally. The
    latency is the request round trip when the subject carries requests, else the
    handler time (``latency`` says which: "request", "handler" or "").
    """

    subject: str
    msgs_in_per_s: float
    msgs_out_per_s: float
    raw_bytes_per_s: float
    wire_bytes_per_s: float
    avg_size: float
    ratio: float | None
    latency: str
    p50_ns: int
    p99_ns: int
    errors_per_s: float


def subject_rows(graph: Graph) -> list[SubjectRow]:
    """One :class:`SubjectRow` per subject node of ``graph``, by name."""
    rows = []
    for node in graph.subjects:
        if node.msgs_in:
            msgs, raw, wire = node.msgs_in_per_s, node.raw_in_per_s, node.wire_in_per_s
        else:
            msgs, raw, wire = node.msgs_out_per_s, node.raw_out_per_s, node.wire_out_per_s
        kind, latency = "", None
        if node.requests and node.round_trip is not None:
            kind, latency = "request", node.round_trip
        elif node.handler is not None:
            kind, latency = "handler", node.handler
        rows.append(
            SubjectRow(
                subject=node.name,
                msgs_in_per_s=node.msgs_in_per_s,
                msgs_out_per_s=node.msgs_out_per_s,
                raw_bytes_per_s=raw,
                wire_bytes_per_s=wire,
                avg_size=raw / msgs if msgs else 0.0,
                ratio=raw / wire if wire else None,
                latency=kind if latency is not None else "",
                p50_ns=latency.p50_ns if latency is not None else 0,
                p99_ns=latency.p99_ns if latency is not None else 0,
                errors_per_s=node.errors_per_s + node.failed_per_s,
            )
        )
    return rows
