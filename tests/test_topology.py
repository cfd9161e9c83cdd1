"""Topology: the graph and every analysis rule on hand-built snapshots (a case that
flags and one that does not), the report's JSON, the renderers, the benchmark harness."""

from __future__ import annotations

import random
import re

import msgspec
import pytest

from mesh._bench_topology import format_topology_bench, run_topology_bench
from topology import (
    AgentReport,
    ForeignClient,
    ForeignSubscription,
    Graph,
    HistogramCounts,
    LatencyHistogram,
    Publication,
    ReceivedStats,
    ReliableStats,
    Report,
    SentStats,
    Snapshot,
    SubjectReport,
    Thresholds,
    analyse,
    build_graph,
    render_dot,
    render_mermaid,
    render_stats,
    render_text,
    report_json,
    subject_rows,
    synthetic_snapshots,
)

S = 1_000_000_000  # ns
MS = 1_000_000
T0 = 1_700_000_000 * S


def hist(*values: int, repeat: int = 1) -> HistogramCounts:
    h = LatencyHistogram()
    for value in values:
        for _ in range(repeat):
            h.record(value)
    return h.to_counts()


def snap(
    instance: str,
    agent: str | None = None,
    seq: int = 0,
    *,
    sent: list[SentStats] | None = None,
    received: list[ReceivedStats] | None = None,
    interval: int = S,
    time: int | None = None,
    **fields: object,
) -> Snapshot:
    """A snapshot of ``instance`` (agent: the instance name up to its last '-'), by
    default ending ``(seq + 1) * interval`` after T0."""
    return Snapshot(
        instance=instance,
        agent=agent if agent is not None else instance.rsplit("-", 1)[0],
        seq=seq,
        time=time if time is not None else T0 + (seq + 1) * interval,
        interval=interval,
        sent=sent or [],
        received=received or [],
        **fields,  # type: ignore[arg-type]
    )


def request(subject: str, msgs: int, p_ns: int, **fields: int) -> SentStats:
    """``msgs`` requests whose round trips all took ``p_ns``."""
    return SentStats(
        subject=subject,
        msgs=msgs,
        requests=msgs,
        raw_bytes=100 * msgs,
        wire_bytes=60 * msgs,
        latency=hist(p_ns, repeat=msgs),
        **fields,
    )


def handled(subject: str, msgs: int, p_ns: int, queue: str = "", **fields: object) -> ReceivedStats:
    """``msgs`` messages on a subscription, each handled in ``p_ns``, answered."""
    senders = fields.pop("senders", {"": msgs})
    return ReceivedStats(
        subject=subject,
        queue=queue,
        msgs=msgs,
        raw_bytes=100 * msgs,
        wire_bytes=60 * msgs,
        senders=senders,  # type: ignore[arg-type]
        handled=msgs,
        latency=hist(p_ns, repeat=msgs),
        **fields,  # type: ignore[arg-type]
    )


def report(*snapshots: Snapshot, foreign: tuple[ForeignClient, ...] = ()) -> Report:
    return analyse(build_graph(snapshots, foreign=foreign))


def subject(r: Report, name: str) -> SubjectReport:
    return next(s for s in r.subjects if s.name == name)


def agent(r: Report, name: str) -> AgentReport:
    return next(a for a in r.agents if a.name == name)


# ------------------------------------------------------------------- graph


def test_rates_are_per_instance_counts_over_its_intervals_summed_over_instances() -> None:
    a0 = [
        snap("pub-0", seq=0, sent=[SentStats(subject="x", msgs=10, wire_bytes=100)]),
        snap(
            "pub-0",
            seq=1,
            interval=3 * S,
            time=T0 + 4 * S,
            sent=[SentStats(subject="x", msgs=30, wire_bytes=300)],
        ),
    ]
    a1 = [snap("pub-1", seq=0, interval=2 * S, sent=[SentStats(subject="x", msgs=4, wire_bytes=8)])]
    graph = build_graph([*a0, *a1])
    (pub,) = graph.publications
    assert (pub.agent, pub.subject, pub.instances, pub.msgs) == ("pub", "x", 2, 44)
    # pub-0: 40 msgs over 4 s; pub-1: 4 msgs over 2 s.
    assert pub.msgs_per_s == pytest.approx(10 + 2)
    assert pub.wire_bytes_per_s == pytest.approx(100 + 4)
    (node,) = graph.subjects
    assert node.msgs_in_per_s == pytest.approx(12)
    assert node.publishers == ("pub",)
    assert graph.seconds == pytest.approx(4)  # the snapshots' span


def test_a_repeated_snapshot_counts_once() -> None:
    one = snap("pub-0", sent=[SentStats(subject="x", msgs=10)])
    assert build_graph([one, one]) == build_graph([one])


def test_wildcard_subscriptions_receive_the_subjects_they_match() -> None:
    graph = build_graph(
        [
            snap("pub-0", sent=[SentStats(subject="orders.eu.created", msgs=5)]),
            snap("audit-0", received=[handled("orders.>", 5, MS, senders={"pub": 5})]),
            snap("billing-0", received=[handled("orders.*.created", 5, MS, queue="billing")]),
        ]
    )
    nodes = {n.name: n for n in graph.subjects}
    concrete = nodes["orders.eu.created"]
    assert concrete.matched == ("orders.*.created", "orders.>")
    assert [(s.agent, s.subject) for s in concrete.subscribers] == [
        ("billing", "orders.*.created"),
        ("audit", "orders.>"),
    ]
    assert nodes["orders.>"].wildcard
    assert nodes["orders.>"].matched == ("orders.eu.created",)
    links = [(link.source, link.target, link.subjects, link.msgs) for link in graph.links]
    assert links == [("", "billing", ("orders.*.created",), 5), ("pub", "audit", ("orders.>",), 5)]


def test_senders_without_telemetry_are_external_agents_and_overflow_buckets_are_not() -> None:
    graph = build_graph(
        [
            snap(
                "echo-0",
                received=[handled("demo.echo", 12, MS, senders={"cli": 2, "": 3, "~other": 7})],
            )
        ]
    )
    agents = {a.name: a for a in graph.agents}
    assert set(agents) == {"", "cli", "echo"}
    assert agents["cli"].external
    assert agents[""].external
    assert not agents["echo"].external
    assert [(link.source, link.target, link.msgs) for link in graph.links] == [
        ("", "echo", 3),
        ("cli", "echo", 2),
    ]
    # Bytes are shared out by message count: 3 of 12 messages.
    assert graph.links[0].wire_bytes_per_s == pytest.approx(60 * 12 * 3 / 12)


def test_link_latency_is_the_senders_round_trip_on_the_linking_subject() -> None:
    graph = build_graph(
        [
            snap("api-0", sent=[request("svc.a", 10, 7 * MS, failed=1)]),
            snap("a-0", received=[handled("svc.a", 10, 5 * MS, senders={"api": 10}, replies=10)]),
        ]
    )
    (link,) = graph.links
    assert link.latency is not None
    assert link.latency.p99_ns == pytest.approx(7 * MS, rel=0.01)
    assert link.failed == 1


def test_a_histogram_of_another_layout_is_a_value_error() -> None:
    bad = HistogramCounts(counts={1: 1}, min=1, max=1, sum=1, sub_bits=3)
    with pytest.raises(ValueError, match="sub_bits=3"):
        build_graph([snap("a-0", sent=[SentStats(subject="x", msgs=1, latency=bad)])])


# ------------------------------------------------------------------- rules


def test_utilisation_over_the_threshold_is_a_bottleneck() -> None:
    # 100 msg/s × 10 ms each = one instance fully busy.
    busy = report(snap("slow-0", received=[handled("svc.slow", 100, 10 * MS)]))
    slow = agent(busy, "slow")
    assert slow.utilisation == pytest.approx(1.0, rel=0.01)
    assert slow.bottleneck
    assert "utilisation 1.00 > 0.80" in slow.reason
    assert [b.agent for b in busy.bottlenecks] == ["slow"]
    # Two replicas share the load: 0.5 each.
    shared = report(
        snap("slow-0", received=[handled("svc.slow", 50, 10 * MS)]),
        snap("slow-1", received=[handled("svc.slow", 50, 10 * MS)]),
    )
    assert agent(shared, "slow").utilisation == pytest.approx(0.5, rel=0.01)
    assert not shared.bottlenecks


@pytest.mark.parametrize(
    ("series", "grows"),
    [
        ((0, 5, 12), True),  # 3 samples, never down, +12
        ((3, 3, 3, 13), True),
        ((0, 12, 11), False),  # went down
        ((0, 12), False),  # too few samples
        ((3, 5, 12), False),  # only +9
    ],
)
def test_pending_growth(series: tuple[int, ...], grows: bool) -> None:
    snaps = [
        snap("q-0", seq=i, received=[handled("svc.q", 1, MS, pending=p)])
        for i, p in enumerate(series)
    ]
    r = report(*snaps)
    assert agent(r, "q").pending_growing is grows
    assert agent(r, "q").pending == series[-1]
    assert [b.agent for b in r.bottlenecks] == (["q"] if grows else [])


def test_a_reliable_backlog_is_shared_by_its_instances_and_growing_is_a_bottleneck() -> None:
    # Two instances of a queue group pull from one JetStream consumer: each reports the
    # backlog it last saw. The delivery holds the highest; the agent the backlog once.
    series = {"q-0": (10, 40, 90), "q-1": (12, 45, 80)}
    snaps = [
        snap(
            name,
            seq=i,
            received=[
                handled("svc.q", 1, MS, queue="q", backlog=b),
                handled("evt.q", 1, MS, queue="q", backlog=3),
            ],
        )
        for name, values in series.items()
        for i, b in enumerate(values)
    ]
    graph = build_graph(snaps)
    (delivery,) = [d for d in graph.deliveries if d.subject == "svc.q"]
    assert delivery.backlog == 90
    assert [i.backlog for i in graph.instances] == [(13, 43, 93), (15, 48, 83)]
    r = analyse(graph)
    q = agent(r, "q")
    assert (q.backlog, q.backlog_growing, q.pending_growing) == (93, True, False)
    # Reported once: the instance whose backlog grew most.
    assert q.reason == "backlog 13→93 over 3 snapshots on q-0"
    assert [(b.agent, b.backlog) for b in r.bottlenecks] == [("q", 93)]
    assert re.search(r"^q\s.*\s93↑\s+BOTTLE$", render_text(r), re.MULTILINE)
    # A backlog that falls is no bottleneck.
    falling = [
        snap("q-0", seq=i, received=[handled("s", 1, MS, backlog=b)])
        for i, b in enumerate((90, 40, 10))
    ]
    assert not analyse(build_graph(falling)).bottlenecks


def test_reliable_settling_adds_up_over_snapshots_and_instances_and_flags_the_subject() -> None:
    snaps = [
        # q-0: two snapshots (summed per instance first), one without settling news.
        snap(
            "q-0",
            seq=0,
            received=[handled("svc.q", 3, MS, queue="q", reliable=ReliableStats(redelivered=2))],
        ),
        snap("q-0", seq=1, received=[handled("svc.q", 3, MS, queue="q")]),
        snap(
            "q-0",
            seq=2,
            received=[
                handled(
                    "svc.q",
                    3,
                    MS,
                    queue="q",
                    reliable=ReliableStats(redelivered=1, dead_lettered=1, unconfirmed=1),
                )
            ],
        ),
        snap(
            "q-1",
            seq=0,
            received=[handled("svc.q", 2, MS, queue="q", reliable=ReliableStats(duplicates=2))],
        ),
        snap(
            "q-1",
            seq=0,
            received=[handled("svc.q", 2, MS, queue="q", reliable=ReliableStats(duplicates=2))],
        ),
        snap("e-0", seq=0, received=[handled("evt.e", 5, MS)]),
    ]
    graph = build_graph(snaps)
    (q,) = [d for d in graph.deliveries if d.subject == "svc.q"]
    # The repeated (q-1, 0) counts once.
    assert q.reliable == ReliableStats(redelivered=3, duplicates=2, dead_lettered=1, unconfirmed=1)
    (e,) = [d for d in graph.deliveries if d.subject == "evt.e"]
    assert e.reliable is None
    r = analyse(graph)
    assert (subject(r, "svc.q").redelivered, subject(r, "svc.q").dead_lettered) == (3, 1)
    assert {"dead", "redelivered"} <= set(subject(r, "svc.q").flags)
    assert not {"dead", "redelivered"} & set(subject(r, "evt.e").flags)


def test_thresholds_are_parameters() -> None:
    snaps = [
        snap("q-0", seq=i, received=[handled("s", 1, MS, pending=p)])
        for i, p in enumerate((0, 4, 5))
    ]
    assert not analyse(build_graph(snaps)).bottlenecks
    assert analyse(build_graph(snaps), Thresholds(pending_growth=5)).bottlenecks


def chain() -> list[Snapshot]:
    """api → svc.plan (planner) → svc.search (slow) and svc.cache (fast)."""
    return [
        snap("api-0", sent=[request("svc.plan", 10, 90 * MS)]),
        snap(
            "planner-0",
            sent=[request("svc.search", 10, 60 * MS), request("svc.cache", 10, 2 * MS)],
            received=[handled("svc.plan", 10, 80 * MS, senders={"api": 10}, replies=10)],
        ),
        snap(
            "search-0",
            received=[handled("svc.search", 10, 50 * MS, senders={"planner": 10}, replies=10)],
        ),
        snap(
            "cache-0", received=[handled("svc.cache", 10, MS, senders={"planner": 10}, replies=10)]
        ),
    ]


def test_critical_path_follows_the_slowest_request_from_the_slowest_root() -> None:
    path = report(*chain()).critical_path
    assert path is not None
    assert (path.root, path.external, path.cycle) == ("svc.plan", False, "")
    assert [(h.subject, h.agent) for h in path.hops] == [
        ("svc.plan", "planner"),
        ("svc.search", "search"),
    ]
    assert path.hops[0].round_trip_p99_ns == pytest.approx(90 * MS, rel=0.01)
    assert path.hops[1].round_trip_p99_ns == pytest.approx(60 * MS, rel=0.01)
    assert path.hops[1].handler_p99_ns == pytest.approx(50 * MS, rel=0.01)


def test_a_cycle_is_reported_not_followed() -> None:
    snaps = chain()
    snaps[2] = snap(
        "search-0",
        sent=[request("svc.plan", 10, 85 * MS)],
        received=[handled("svc.search", 10, 50 * MS, senders={"planner": 10}, replies=10)],
    )
    path = report(*snaps).critical_path
    assert path is not None
    assert path.root == "svc.plan"
    assert [h.agent for h in path.hops] == ["planner", "search"]
    assert path.cycle == "svc.plan"


def test_an_external_caller_makes_a_root_and_no_requests_make_no_path() -> None:
    r = report(
        snap("echo-0", received=[handled("demo.echo", 5, 3 * MS, senders={"cli": 5}, replies=5)])
    )
    assert r.critical_path is not None
    assert (r.critical_path.root, r.critical_path.external) == ("demo.echo", True)
    assert r.critical_path.round_trip_p99_ns == pytest.approx(3 * MS, rel=0.01)
    events = report(
        snap("pub-0", sent=[SentStats(subject="evt", msgs=5)]),
        snap("sub-0", received=[handled("evt", 5, MS, senders={"pub": 5})]),
    )
    assert events.critical_path is None


def test_single_points_of_failure() -> None:
    lone = report(
        snap("pub-0", sent=[SentStats(subject="svc.a", msgs=3)]),
        snap("a-0", received=[handled("svc.a", 3, MS, queue="a")]),
    )
    assert [p.subject for p in lone.single_points] == ["svc.a"]
    assert "spof" in subject(lone, "svc.a").flags
    replicated = report(
        snap("pub-0", sent=[SentStats(subject="svc.a", msgs=3)]),
        snap("a-0", received=[handled("svc.a", 2, MS, queue="a")]),
        snap("a-1", received=[handled("svc.a", 1, MS, queue="a")]),
        snap("log-0", received=[handled("svc.a", 3, MS)]),  # a broadcast copy, one instance
    )
    assert not replicated.single_points  # not *every* group has one instance
    # A wildcard subscription is judged on the subjects it matches.
    wild = report(
        snap("pub-0", sent=[SentStats(subject="evt.x", msgs=3)]),
        snap("log-0", received=[handled("evt.*", 3, MS)]),
    )
    assert [p.subject for p in wild.single_points] == ["evt.x"]


def test_silent_subjects() -> None:
    r = report(
        snap(
            "pub-0",
            sent=[
                SentStats(subject="evt.lonely", msgs=4),
                SentStats(subject="evt.quiet", msgs=0),
                SentStats(subject="_INBOX.abc", msgs=4),
                SentStats(subject="evt.heard", msgs=4),
            ],
        ),
        snap("sub-0", received=[handled("evt.heard", 4, MS)]),
    )
    assert [s.subject for s in r.silent] == ["evt.lonely"]
    assert r.silent[0].publishers == ("pub",)
    assert r.silent[0].msgs_per_s == 4
    assert "silent" in subject(r, "evt.lonely").flags
    tap = ForeignClient(cid=9, name="tap", subscriptions=(ForeignSubscription(subject="evt.>"),))
    heard = report(snap("pub-0", sent=[SentStats(subject="evt.lonely", msgs=4)]), foreign=(tap,))
    assert not heard.silent
    assert subject(heard, "evt.lonely").foreign_subscribers == ("tap#9",)
    assert "foreign" in subject(heard, "evt.lonely").flags


def test_hot_senders() -> None:
    def sender(name: str, wire: int) -> Snapshot:
        return snap(f"{name}-0", sent=[SentStats(subject=f"evt.{name}", msgs=1, wire_bytes=wire)])

    r = report(*(sender(n, 100) for n in "abcd"), sender("e", 10_000))
    assert [(h.agent, h.wire_bytes_per_s) for h in r.hot_senders] == [("e", 10_000)]
    assert r.hot_senders[0].share == pytest.approx(10_000 / 10_400)
    assert not report(*(sender(n, 100) for n in "abcde")).hot_senders
    many = report(*(sender(n, 1) for n in "abcdefghij"), *(sender(f"h{n}", 1000) for n in range(7)))
    assert len(many.hot_senders) == 5  # at most Thresholds.hot_max


def test_decode_failures_and_policy_rejections_are_reported() -> None:
    r = report(
        snap(
            "echo-0",
            received=[handled("demo.echo", 5, MS, decode_failures={"old": 3, "older": 1})],
            policy_rejected=2,
        )
    )
    assert [(f.sender, f.subject, f.agent, f.count) for f in r.decode_failures] == [
        ("old", "demo.echo", "echo", 3),
        ("older", "demo.echo", "echo", 1),
    ]
    assert "decode" in subject(r, "demo.echo").flags
    assert r.policy_rejected == 2
    assert not report(snap("echo-0", received=[handled("demo.echo", 5, MS)])).decode_failures


def test_agent_figures() -> None:
    r = report(
        snap(
            "w-0",
            cpu=0.5,
            rss=100,
            received=[handled("job", 10, 2 * MS, replies=10, reply_bytes=500)],
        ),
        snap("w-1", cpu=0.25, rss=50, received=[handled("job", 10, 4 * MS)]),
    )
    w = agent(r, "w")
    assert (w.instances, w.rss) == (2, 150)
    assert w.cpu == pytest.approx(0.75)
    assert w.arrival_per_s == pytest.approx(20)
    assert w.service is not None
    assert w.service.mean_ns == pytest.approx(3 * MS, rel=0.01)
    assert w.sent_wire_bytes_per_s == pytest.approx(500)  # replies


# ------------------------------------------------------------------- output


@pytest.fixture(scope="module")
def synthetic() -> tuple[Graph, Report]:
    graph = build_graph(synthetic_snapshots(agents=60, edges=240, seed=3, rounds=3))
    return graph, analyse(graph)


def test_synthetic_mesh_exercises_every_finding(synthetic: tuple[Graph, Report]) -> None:
    _, r = synthetic
    assert r.bottlenecks
    assert r.single_points
    assert r.silent
    assert r.decode_failures
    assert r.critical_path is not None
    assert len(r.critical_path.hops) >= 2
    assert any(a.external for a in r.agents)
    assert any(s.wildcard for s in r.subjects)
    assert any("errors" in s.flags for s in r.subjects)


def test_synthetic_snapshots_are_deterministic() -> None:
    assert synthetic_snapshots(20, 60, seed=5) == synthetic_snapshots(20, 60, seed=5)
    assert synthetic_snapshots(20, 60, seed=5) != synthetic_snapshots(20, 60, seed=6)


def test_report_json_round_trips_and_does_not_depend_on_input_order() -> None:
    snaps = synthetic_snapshots(agents=30, edges=100, seed=1, rounds=2)
    data = report_json(analyse(build_graph(snaps)))
    assert msgspec.json.encode(msgspec.json.decode(data, type=Report)) == data
    shuffled = list(snaps)
    random.Random(0).shuffle(shuffled)
    assert report_json(analyse(build_graph(shuffled))) == data
    kinds = {e["kind"] for e in msgspec.json.decode(data)["edges"]}
    assert kinds == {"publish", "deliver", "talk"}


def test_render_text_fits_100_columns(synthetic: tuple[Graph, Report]) -> None:
    text = render_text(synthetic[1], max_rows=15)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= 100
    for title in ("AGENT", "SUBJECT", "BOTTLENECKS", "CRITICAL PATH", "SINGLE POINTS", "SILENT"):
        assert any(line.startswith(title) for line in lines), title
    assert "more agents" in text


def test_render_stats(synthetic: tuple[Graph, Report]) -> None:
    rows = subject_rows(synthetic[0])
    assert [r.subject for r in rows] == [s.name for s in synthetic[0].subjects]
    text = render_stats(rows)
    assert len(text.splitlines()) == len(rows) + 1
    assert max(len(line) for line in text.splitlines()) <= 100
    requests = [r for r in rows if r.latency == "request"]
    assert requests
    assert all(r.p99_ns >= r.p50_ns > 0 for r in requests)


_QUOTED = r'"(?:[^"\\]|\\.)*"'
_DOT_NODE = re.compile(rf"^  {_QUOTED} \[.*\];$")
_DOT_EDGE = re.compile(rf"^  {_QUOTED} -> {_QUOTED} \[.*\];$")


def _without_strings(text: str) -> str:
    return re.sub(_QUOTED, '""', text)


def test_render_dot(synthetic: tuple[Graph, Report]) -> None:
    dot = render_dot(synthetic[1])
    bare = _without_strings(dot)
    assert bare.count("{") == bare.count("}") == 1
    body = dot.splitlines()[3:-1]
    assert body
    assert all(_DOT_NODE.match(line) or _DOT_EDGE.match(line) for line in body)


def test_render_dot_and_mermaid_escape_names() -> None:
    odd = 'a."quoted\\".x<y>#1'
    r = report(
        snap("pub-0", sent=[SentStats(subject=odd, msgs=1)]),
        snap("sub-0", received=[handled(odd, 1, MS, senders={"pub": 1})]),
    )
    dot = render_dot(r)
    assert '"subject:a.\\"quoted\\\\\\".x<y>#1"' in dot
    assert _without_strings(dot).count("{") == 1
    mermaid = render_mermaid(r)
    assert '"a.#quot;quoted\\#quot;.x#lt;y#gt;#35;1"' in mermaid


_MERMAID = [
    re.compile(r'^  [as]\d+\["[^"]*"\]$'),
    re.compile(r'^  s\d+\(\["[^"]*"\]\)$'),
    re.compile(r'^  [as]\d+ (-->|-\.->)\|"[^"]*"\| [as]\d+$'),
    re.compile(r"^  s\d+ -\.- s\d+$"),
    re.compile(r"^  classDef flagged [^ ]+$"),
    re.compile(r"^  class [as]\d+(,[as]\d+)* flagged$"),
]


def test_render_mermaid(synthetic: tuple[Graph, Report]) -> None:
    lines = render_mermaid(synthetic[1]).splitlines()
    assert lines[0] == "flowchart LR"
    assert all(any(p.match(line) for p in _MERMAID) for line in lines[1:]), [
        line for line in lines[1:] if not any(p.match(line) for p in _MERMAID)
    ]


def test_publications_are_edges_of_the_report(synthetic: tuple[Graph, Report]) -> None:
    graph, r = synthetic
    assert [e for e in r.edges if isinstance(e, Publication)] == list(graph.publications)
    assert len(r.edges) == len(graph.publications) + len(graph.deliveries) + len(graph.links)


def test_bench_runs_at_a_tiny_size() -> None:
    result = run_topology_bench(agents=10, edges=30, rounds=2, seed=1)
    assert result.snapshots > 0
    assert len(result.build_ms) == len(result.analyse_ms) == 2
    assert result.best_total_ms <= result.median_total_ms
    assert "total" in format_topology_bench(result)
