"""`build_graph`: telemetry snapshots in, the :class:`Graph` out.

First, per instance: its snapshots in the window are summed exactly (counters added,
gauges from the last one, histograms kept as parts to combine; see :func:`sum_sent` and
:func:`sum_received`), so one snapshot of a whole stream and many snapshots of its
parts give the same graph; each of its stats is filed under its edge, with the
instance's rate factor (1 / the sum of its snapshots' intervals).

Then, edge by edge in name order (edges are filed by subject, then agent, so each
subject's publishers and subscriptions come together and are summed as they pass): an
edge's counts and rates are summed over its instances. Latency distributions are
declared per level (instances → edge → subject, agent or link; a lone part is shared,
not copied) and all summarised at the end in one pass (:class:`Summaries`). Subject
nodes, wildcard matching and agent-to-agent links are in :mod:`topology._nodes`.

This is the hot path of ``mesh topology`` on large meshes, hence plain loops on locals.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from topology._foreign import ForeignClient
from topology._gc import gc_paused
from topology._graph import Delivery, Graph, InstanceNode, Publication, Subscriber
from topology._histogram import SUB_BITS, HistogramCounts
from topology._nodes import (
    AGGREGATE_SENDER_PREFIX,
    Agent,
    Inbound,
    Outbound,
    Talk,
    agent_nodes,
    links,
    subject_nodes,
)
from topology._snapshot import ReceivedStats, ReliableStats, SentStats, Snapshot
from topology._sparse import Distribution, Summaries, add_counts, check_layout
from topology._window import Window

__all__ = ["build_graph", "sum_received", "sum_sent"]


def build_graph(
    source: Window | Iterable[Snapshot], *, foreign: Iterable[ForeignClient] = ()
) -> Graph:
    """The graph of the snapshots in ``source``, with ``foreign`` clients' subscriptions.

    A repeated ``(instance, seq)`` counts once. ``Graph.seconds`` is the window's length
    for a :class:`Window`, else the time the snapshots span. Raises ValueError for a
    histogram of another bucket layout (a :class:`Window` refuses those on ``add``).
    """
    with gc_paused():
        return _build(source, foreign)


#: Stats of one edge, per instance: the stats, the instance's rate factor, and for an
#: instance with several snapshots the histograms to use instead of the stats' own.
_Parts = list[HistogramCounts] | None
_Sent = list[tuple[SentStats, float, _Parts]]
_Received = list[tuple[ReceivedStats, float, _Parts]]
#: Edges are filed in nested dicts (subject, then agent; pattern, then queue and agent),
#: so putting them in name order sorts names, never tuples of names.
_SentEdges = dict[str, dict[str, _Sent]]
_ReceivedEdges = dict[str, dict[tuple[str, str], _Received]]


def _build(source: Window | Iterable[Snapshot], foreign: Iterable[ForeignClient]) -> Graph:
    by_instance: dict[str, dict[int, Snapshot]] = {}
    seconds: float | None = None
    if isinstance(source, Window):
        seconds = source.seconds
        source = source.snapshots()
    first_ns: int | None = None
    last_ns = 0
    for snap in source:
        by_instance.setdefault(snap.instance, {})[snap.seq] = snap
        start = snap.time - snap.interval
        if first_ns is None or start < first_ns:
            first_ns = start
        if snap.time > last_ns:
            last_ns = snap.time
    if seconds is None:
        seconds = (last_ns - first_ns) / 1e9 if first_ns is not None else 0.0
    instances: list[InstanceNode] = []
    sent: _SentEdges = {}
    received: _ReceivedEdges = {}
    for name in sorted(by_instance):
        seqs = by_instance[name]
        snaps = [seqs[seq] for seq in sorted(seqs)]
        instances.append(_file_instance(name, snaps, sent, received))
    agents: dict[str, Agent] = {}
    for inst in instances:
        if inst.agent not in agents:
            agents[inst.agent] = Agent()
        agents[inst.agent].instances.append(inst)
    summaries = Summaries()
    publications, inbound, published = _publications(sent, agents, summaries)
    talks: dict[str, dict[str, Talk]] = {}
    deliveries, outbound = _deliveries(received, agents, talks, summaries)
    clients = sorted({c.cid: c for c in foreign}.values(), key=lambda c: c.cid)
    subjects, reach = subject_nodes(inbound, outbound, clients)
    talk_links = links(talks, published, reach, summaries)
    agent_list = agent_nodes(agents, talk_links, summaries)
    summaries.summarise()
    return Graph(
        seconds=seconds,
        snapshots=sum([i.snapshots for i in instances]),
        lost=sum([i.lost for i in instances]),
        instances=tuple(instances),
        agents=agent_list,
        subjects=subjects,
        publications=publications,
        deliveries=deliveries,
        links=talk_links,
        foreign=tuple(clients),
    )


def _file_instance(
    name: str,
    snaps: list[Snapshot],
    sent: _SentEdges,
    received: _ReceivedEdges,
) -> InstanceNode:
    """File one instance's stats under their edges; its node."""
    last = snaps[-1]
    agent = last.agent
    out: Sequence[tuple[SentStats, _Parts]]
    into: Sequence[tuple[ReceivedStats, _Parts]]
    if len(snaps) == 1:
        interval_ns, cpu = last.interval, last.cpu
        out = [(st, None) for st in last.sent]
        into = [(rs, None) for rs in last.received]
        untracked, rejected = last.untracked, last.policy_rejected
        pending: tuple[int, ...] = (sum([r.pending for r in last.received]),)
        backlog: tuple[int, ...] = (sum([r.backlog for r in last.received]),)
    else:
        interval_ns = sum([s.interval for s in snaps])
        cpu = sum([s.cpu for s in snaps])
        out, into = sum_sent(snaps), sum_received(snaps)
        untracked = sum([s.untracked for s in snaps])
        rejected = sum([s.policy_rejected for s in snaps])
        pending = tuple([sum([r.pending for r in s.received]) for s in snaps])
        backlog = tuple([sum([r.backlog for r in s.received]) for s in snaps])
    inv = 1e9 / interval_ns if interval_ns > 0 else 0.0
    for st, parts in out:
        by_agent = sent.get(st.subject)
        if by_agent is None:
            sent[st.subject] = {agent: [(st, inv, parts)]}
        elif (edge := by_agent.get(agent)) is None:
            by_agent[agent] = [(st, inv, parts)]
        else:
            edge.append((st, inv, parts))
    for rs, parts in into:
        by_sub = received.get(rs.subject)
        key = (rs.queue, agent)
        if by_sub is None:
            received[rs.subject] = {key: [(rs, inv, parts)]}
        elif (redge := by_sub.get(key)) is None:
            by_sub[key] = [(rs, inv, parts)]
        else:
            redge.append((rs, inv, parts))
    return InstanceNode(
        instance=name,
        agent=agent,
        snapshots=len(snaps),
        seconds=interval_ns / 1e9,
        lost=last.seq - snaps[0].seq + 1 - len(snaps),
        cpu=cpu * inv,
        rss=last.rss,
        max_concurrency=last.max_concurrency,
        pending=pending,
        backlog=backlog,
        inflight=sum([r.inflight for r in last.received]),
        untracked=untracked,
        policy_rejected=rejected,
        policy=last.policy,
    )


def _histograms(stats: list[SentStats] | list[ReceivedStats], where: str) -> list[HistogramCounts]:
    parts = [st.latency for st in stats if st.latency is not None]
    for part in parts:
        check_layout(part, where)
    return parts


def sum_sent(snaps: list[Snapshot]) -> list[tuple[SentStats, list[HistogramCounts]]]:
    """One instance's outbound stats over several snapshots, per subject: the counters
    added up (the stats' own latency left empty) and the histograms to combine."""
    groups: dict[str, list[SentStats]] = {}
    for snap in snaps:
        for st in snap.sent:
            groups.setdefault(st.subject, []).append(st)
    where = f"instance {snaps[0].instance!r}, subject"
    return [
        (
            SentStats(
                subject=subject,
                msgs=sum([st.msgs for st in group]),
                raw_bytes=sum([st.raw_bytes for st in group]),
                wire_bytes=sum([st.wire_bytes for st in group]),
                requests=sum([st.requests for st in group]),
                failed=sum([st.failed for st in group]),
                compressed=sum([st.compressed for st in group]),
            ),
            _histograms(group, f"{where} {subject!r}"),
        )
        for subject, group in groups.items()
    ]


def sum_received(snaps: list[Snapshot]) -> list[tuple[ReceivedStats, list[HistogramCounts]]]:
    """One instance's inbound stats over several snapshots, per subscription, like
    :func:`sum_sent`; gauges (pending, inflight, backlog) are the last snapshot's."""
    groups: dict[tuple[str, str], list[ReceivedStats]] = {}
    for snap in snaps:
        for rs in snap.received:
            groups.setdefault((rs.subject, rs.queue), []).append(rs)
    summed = []
    for (subject, queue), group in groups.items():
        senders: dict[str, int] = {}
        failures: dict[str, int] = {}
        reliable: ReliableStats | None = None
        for rs in group:
            add_counts(senders, rs.senders)
            add_counts(failures, rs.decode_failures)
            if rs.reliable is not None:
                reliable = rs.reliable if reliable is None else reliable + rs.reliable
        stats = ReceivedStats(
            subject=subject,
            queue=queue,
            msgs=sum([rs.msgs for rs in group]),
            raw_bytes=sum([rs.raw_bytes for rs in group]),
            wire_bytes=sum([rs.wire_bytes for rs in group]),
            senders=senders,
            handled=sum([rs.handled for rs in group]),
            errors=sum([rs.errors for rs in group]),
            timeouts=sum([rs.timeouts for rs in group]),
            replies=sum([rs.replies for rs in group]),
            reply_bytes=sum([rs.reply_bytes for rs in group]),
            decode_failures=failures,
            dropped=sum([rs.dropped for rs in group]),
            pending=group[-1].pending,
            inflight=group[-1].inflight,
            backlog=group[-1].backlog,
            reliable=reliable,
        )
        where = f"instance {snaps[0].instance!r}, subscription {subject!r}"
        summed.append((stats, _histograms(group, where)))
    return summed


_Published = dict[tuple[str, str], tuple[Publication, Distribution | None]]


def _publications(
    sent: _SentEdges, agents: dict[str, Agent], summaries: Summaries
) -> tuple[tuple[Publication, ...], dict[str, Inbound], _Published]:
    """Publication edges by subject then agent, each subject's inbound side, and the
    edges with their round-trip distributions by (subject, agent)."""
    publications = []
    inbound: dict[str, Inbound] = {}
    published: _Published = {}
    for subject in sorted(sent):
        run = sent[subject]
        agents_of = []
        s_msgs = s_requests = s_failed = 0
        s_msgs_s = s_failed_s = s_raw_s = s_wire_s = 0.0
        s_dists = []
        for agent in sorted(run) if len(run) > 1 else run:
            group = run[agent]
            msgs = requests = failed = 0
            msgs_s = failed_s = raw_s = wire_s = 0.0
            parts = []
            for st, inv, more in group:
                msgs += st.msgs
                requests += st.requests
                failed += st.failed
                msgs_s += st.msgs * inv
                failed_s += st.failed * inv
                raw_s += st.raw_bytes * inv
                wire_s += st.wire_bytes * inv
                latency = st.latency
                if more is not None:
                    parts += more
                elif latency is not None:
                    if latency.sub_bits != SUB_BITS:
                        check_layout(latency, f"agent {agent!r}, subject {subject!r}")
                    parts.append(latency)
            dist = summaries.of_histograms(parts) if parts else None
            pub = Publication(
                agent=agent,
                subject=subject,
                instances=len(group),
                msgs=msgs,
                requests=requests,
                failed=failed,
                msgs_per_s=msgs_s,
                failed_per_s=failed_s,
                raw_bytes_per_s=raw_s,
                wire_bytes_per_s=wire_s,
                latency=dist.latency if dist is not None else None,
            )
            publications.append(pub)
            published[subject, agent] = (pub, dist)
            agents_of.append(agent)
            s_msgs += msgs
            s_requests += requests
            s_failed += failed
            s_msgs_s += msgs_s
            s_failed_s += failed_s
            s_raw_s += raw_s
            s_wire_s += wire_s
            if dist is not None:
                s_dists.append(dist)
            a = agents[agent]
            a.sent_s += msgs_s
            a.sent_wire_s += wire_s
        inbound[subject] = Inbound(
            publishers=tuple(agents_of),
            msgs=s_msgs,
            requests=s_requests,
            failed=s_failed,
            msgs_s=s_msgs_s,
            failed_s=s_failed_s,
            raw_s=s_raw_s,
            wire_s=s_wire_s,
            dist=summaries.combine(s_dists),
        )
    return tuple(publications), inbound, published


def _deliveries(
    received: _ReceivedEdges,
    agents: dict[str, Agent],
    talks: dict[str, dict[str, Talk]],
    summaries: Summaries,
) -> tuple[tuple[Delivery, ...], dict[str, Outbound]]:
    """Delivery edges by pattern, queue and agent, each pattern's outbound side; adds
    each subscription's senders to ``talks`` (by sender, then receiver)."""
    deliveries = []
    outbound: dict[str, Outbound] = {}
    for pattern in sorted(received):
        run = received[pattern]
        subscribers = []
        s_dists = []
        o_msgs = o_handled = o_errors = o_timeouts = o_replies = o_dropped = 0
        o_failures = o_pending = o_redelivered = o_dead = 0
        o_msgs_s = o_errors_s = o_raw_s = o_wire_s = 0.0
        for key in sorted(run) if len(run) > 1 else run:
            (queue, agent), group = key, run[key]
            if len(group) == 1:
                rs = group[0][0]
                senders, failures = rs.senders, rs.decode_failures
            else:
                senders, failures = {}, {}
                for rs, _, _ in group:
                    add_counts(senders, rs.senders)
                    add_counts(failures, rs.decode_failures)
            msgs = handled = errors = timeouts = replies = dropped = pending = inflight = 0
            backlog = 0
            reliable: ReliableStats | None = None
            msgs_s = handled_s = errors_s = raw_s = wire_s = reply_s = 0.0
            parts = []
            for rs, inv, more in group:
                msgs += rs.msgs
                handled += rs.handled
                errors += rs.errors
                timeouts += rs.timeouts
                replies += rs.replies
                dropped += rs.dropped
                pending += rs.pending
                inflight += rs.inflight
                if rs.backlog > backlog:  # the instances share it: each saw it at a moment
                    backlog = rs.backlog
                if rs.reliable is not None:
                    reliable = rs.reliable if reliable is None else reliable + rs.reliable
                msgs_s += rs.msgs * inv
                handled_s += rs.handled * inv
                errors_s += rs.errors * inv
                raw_s += rs.raw_bytes * inv
                wire_s += rs.wire_bytes * inv
                reply_s += rs.reply_bytes * inv
                latency = rs.latency
                if more is not None:
                    parts += more
                elif latency is not None:
                    if latency.sub_bits != SUB_BITS:
                        check_layout(latency, f"agent {agent!r}, subscription {pattern!r}")
                    parts.append(latency)
            dist = summaries.of_histograms(parts) if parts else None
            deliveries.append(
                Delivery(
                    subject=pattern,
                    queue=queue,
                    agent=agent,
                    instances=len(group),
                    msgs=msgs,
                    handled=handled,
                    errors=errors,
                    timeouts=timeouts,
                    replies=replies,
                    dropped=dropped,
                    msgs_per_s=msgs_s,
                    handled_per_s=handled_s,
                    errors_per_s=errors_s,
                    raw_bytes_per_s=raw_s,
                    wire_bytes_per_s=wire_s,
                    reply_bytes_per_s=reply_s,
                    senders=senders,
                    decode_failures=failures,
                    pending=pending,
                    inflight=inflight,
                    backlog=backlog,
                    reliable=reliable,
                    latency=dist.latency if dist is not None else None,
                )
            )
            subscribers.append(
                Subscriber(subject=pattern, queue=queue, agent=agent, instances=len(group))
            )
            o_msgs += msgs
            o_handled += handled
            o_errors += errors
            o_timeouts += timeouts
            o_replies += replies
            o_dropped += dropped
            o_pending += pending
            if failures:
                o_failures += sum(failures.values())
            if reliable is not None:
                o_redelivered += reliable.redelivered
                o_dead += reliable.dead_lettered
            o_msgs_s += msgs_s
            o_errors_s += errors_s
            o_raw_s += raw_s
            o_wire_s += wire_s
            a = agents[agent]
            a.received_s += msgs_s
            a.handled_s += handled_s
            a.sent_wire_s += reply_s
            a.backlog += backlog
            if dist is not None:
                s_dists.append(dist)
                a.dists.append(dist)
            if senders and msgs:
                # A sender's share of the subscription's rate and bytes is its share of
                # its messages.
                per_msg, raw_per_msg, wire_per_msg = msgs_s / msgs, raw_s / msgs, wire_s / msgs
                for sender, n in senders.items():
                    if sender.startswith(AGGREGATE_SENDER_PREFIX):
                        continue
                    to = talks.get(sender)
                    if to is None:
                        to = talks[sender] = {}
                    talk = to.get(agent)
                    if talk is None:
                        talk = to[agent] = Talk()
                    talk.msgs += n
                    talk.msgs_s += n * per_msg
                    talk.raw_s += n * raw_per_msg
                    talk.wire_s += n * wire_per_msg
                    if not talk.patterns or talk.patterns[-1] != pattern:
                        talk.patterns.append(pattern)
        outbound[pattern] = Outbound(
            subscribers=tuple(subscribers),
            msgs=o_msgs,
            handled=o_handled,
            errors=o_errors,
            timeouts=o_timeouts,
            replies=o_replies,
            dropped=o_dropped,
            decode_failures=o_failures,
            redelivered=o_redelivered,
            dead_lettered=o_dead,
            pending=o_pending,
            msgs_s=o_msgs_s,
            errors_s=o_errors_s,
            raw_s=o_raw_s,
            wire_s=o_wire_s,
            dist=summaries.combine(s_dists),
        )
    return tuple(deliveries), outbound
