"""Reports for people and for drawing tools: a terminal view, Graphviz, Mermaid.

All output is deterministic (the report is sorted) and in human units: msg/s, B/s with
binary prefixes, latencies in µs/ms/s. Terminal lines stay within :data:`WIDTH` columns.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Final

from topology._analysis import SubjectRow
from topology._graph import Delivery, Publication, Subscriber
from topology._report import AgentReport, Edge, Report, SubjectReport
from topology._sparse import Latency

__all__ = ["WIDTH", "render_dot", "render_mermaid", "render_stats", "render_text"]

#: Terminal columns the text views fit in.
WIDTH: Final = 100
#: Rows of the agents and subjects tables in :func:`render_text`, busiest first.
MAX_ROWS: Final = 40
_NAME: Final = 28
_PLAIN_NATS: Final = "(plain nats)"
#: Subject flags that colour a node red in the drawings.
_ALARMS: Final = frozenset({"spof", "silent", "errors", "decode", "dead"})


# ------------------------------------------------------------------- units


def rate(per_s: float) -> str:
    """A message rate: ``0``, ``0.25``, ``12.3``, ``4.5k``, ``1.2M``."""
    if per_s == 0:
        return "0"
    if per_s < 1:
        return f"{per_s:.2f}"
    if per_s < 1_000:
        return f"{per_s:.1f}"
    if per_s < 1_000_000:
        return f"{per_s / 1_000:.1f}k"
    return f"{per_s / 1_000_000:.1f}M"


def size(n: float, suffix: str = "") -> str:
    """Bytes with binary prefixes: ``512 B``, ``1.5 KiB``, ``3.0 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            text = f"{n:.0f}" if unit == "B" else f"{n:.1f}"
            return f"{text} {unit}{suffix}"
        n /= 1024
    raise AssertionError("unreachable")  # the loop returns at GiB


def duration(ns: float) -> str:
    """A latency: ``850 µs``, ``12.3 ms``, ``1.25 s``; ``-`` when unknown (0)."""
    if ns <= 0:
        return "-"
    if ns < 1_000_000:
        return f"{ns / 1_000:.0f} µs"
    if ns < 1_000_000_000:
        return f"{ns / 1_000_000:.1f} ms"
    return f"{ns / 1_000_000_000:.2f} s"


def _name(name: str, width: int = _NAME) -> str:
    text = name if name else _PLAIN_NATS
    return text if len(text) <= width else text[: width - 1] + "…"


def _p(latency: Latency | None, which: str) -> str:
    if latency is None:
        return "-"
    return duration(latency.p50_ns if which == "p50" else latency.p99_ns)


def _ratio(ratio: float | None) -> str:
    return f"{ratio:.2f}" if ratio is not None else "-"


def _table(
    header: Sequence[str],
    widths: Sequence[int],
    rows: Iterable[Sequence[str]],
    *,
    text_last: bool = False,
) -> list[str]:
    """Left-align the first column (and the last if ``text_last``), right-align the rest."""
    last = len(widths) - 1

    def line(cells: Sequence[str]) -> str:
        out = [cells[0].ljust(widths[0])]
        for i in range(1, len(widths)):
            out.append(
                cells[i].ljust(widths[i]) if text_last and i == last else cells[i].rjust(widths[i])
            )
        return " ".join(out).rstrip()[:WIDTH]

    return [line(header), *(line(row) for row in rows)]


# ------------------------------------------------------------------- text


def render_text(report: Report, *, max_rows: int = MAX_ROWS) -> str:
    """A compact terminal view: agents and subjects (busiest first), then the findings:
    bottlenecks, critical path, single points of failure, silent subjects, hot senders,
    foreign clients, decode failures. Tables and lists show ``max_rows`` rows at most."""
    out = [
        f"mesh topology: {report.window_seconds:g} s window, {report.snapshots} snapshots, "
        f"{report.lost} lost, {len(report.agents)} agents, {len(report.subjects)} subjects",
        "",
    ]
    agents = sorted(report.agents, key=lambda a: (-a.utilisation, -a.arrival_per_s, a.name))
    out += _table(
        ("AGENT", "inst", "cpu", "rss", "in msg/s", "svc p50", "svc p99", "util", "wait", ""),
        (_NAME, 4, 5, 9, 8, 8, 8, 5, 6, 6),
        (_agent_row(a) for a in agents[:max_rows]),
        text_last=True,
    )
    if len(agents) > max_rows:
        out.append(f"… {len(agents) - max_rows} more agents")
    out.append("")
    subjects = sorted(
        report.subjects, key=lambda s: (-max(s.msgs_in_per_s, s.msgs_out_per_s), s.name)
    )
    out += _table(
        ("SUBJECT", "in/s", "out/s", "wire/s", "ratio", "rtt p99", "hdl p99", "err/s", "flags"),
        (_NAME, 6, 6, 11, 5, 8, 8, 6, 14),
        (_subject_row(s) for s in subjects[:max_rows]),
        text_last=True,
    )
    if len(subjects) > max_rows:
        out.append(f"… {len(subjects) - max_rows} more subjects")
    out += _findings(report, max_rows)
    return "\n".join(line.rstrip() for line in out).rstrip() + "\n"


def _agent_row(a: AgentReport) -> list[str]:
    if a.external:
        return [_name(a.name), "-", "-", "-", "-", "-", "-", "-", "-", "ext"]
    return [
        _name(a.name),
        str(a.instances),
        f"{a.cpu:.2f}",
        size(a.rss),
        rate(a.arrival_per_s),
        _p(a.service, "p50"),
        _p(a.service, "p99"),
        f"{a.utilisation:.2f}",
        str(a.pending + a.backlog) + ("↑" if a.pending_growing or a.backlog_growing else ""),
        "BOTTLE" if a.bottleneck else "",
    ]


def _subject_row(s: SubjectReport) -> list[str]:
    wire = s.wire_in_per_s or s.wire_out_per_s
    return [
        _name(s.name),
        rate(s.msgs_in_per_s),
        rate(s.msgs_out_per_s),
        size(wire, "/s"),
        _ratio(s.ratio),
        _p(s.request, "p99"),
        _p(s.handler, "p99"),
        rate(s.errors_per_s),
        ",".join(s.flags)[:14],
    ]


def _subscribers(subject: str, subs: Iterable[Subscriber]) -> str:
    """``agent×instances``, then ``[queue]`` for a queue group and ``via pattern`` for a
    subscription made with another (wildcard) pattern."""
    return ", ".join(
        f"{s.agent}×{s.instances}"
        + (f" [{s.queue}]" if s.queue else "")
        + (f" via {s.subject}" if s.subject != subject else "")
        for s in subs
    )


def _findings(report: Report, max_rows: int) -> list[str]:
    out: list[str] = []

    def section(title: str, lines: list[str]) -> None:
        if lines:
            out.extend(["", title, *(f"  {line}"[:WIDTH] for line in lines[:max_rows])])
            if len(lines) > max_rows:
                out.append(f"  … {len(lines) - max_rows} more")

    section(
        "BOTTLENECKS",
        [f"{_name(b.agent)}  {b.reason}" for b in report.bottlenecks],
    )
    path = report.critical_path
    if path is not None:
        head = f"CRITICAL PATH from {path.root}: p99 {duration(path.round_trip_p99_ns)}"
        if path.external:
            head += " (external caller: handler p99)"
        lines = [
            f"{_name(h.subject)} → {_name(h.agent or '(no mesh handler)', 24)}  "
            f"rtt p99 {duration(h.round_trip_p99_ns)}, handler p99 {duration(h.handler_p99_ns)}"
            for h in path.hops
        ]
        if path.cycle:
            lines.append(f"cycle: {path.cycle} leads back to an agent on the path")
        section(head, lines)
    section(
        "SINGLE POINTS OF FAILURE",
        [
            f"{_name(p.subject)}  {_subscribers(p.subject, p.subscribers)}"
            for p in report.single_points
        ],
    )
    section(
        "SILENT SUBJECTS (published, nobody subscribed)",
        [
            f"{_name(s.subject)}  {rate(s.msgs_per_s)} msg/s from "
            + ", ".join(_name(p, 20) for p in s.publishers)
            for s in report.silent
        ],
    )
    section(
        "HOT SENDERS",
        [
            f"{_name(h.agent)}  {size(h.wire_bytes_per_s, '/s')}  {h.share:.0%} of all"
            for h in report.hot_senders
        ],
    )
    section(
        "FOREIGN CLIENTS",
        [
            f"{_name(c.label)}  {c.ip}:{c.port} {c.lang} {c.version}  subscribes: "
            + (
                ", ".join(s.subject + (f" [{s.queue}]" if s.queue else "") for s in c.subscriptions)
                or "-"
            )
            for c in report.foreign
        ],
    )
    section(
        "DECODE FAILURES (sender → receiver on subscription)",
        [
            f"{_name(f.sender, 20)} → {_name(f.agent, 20)} on {_name(f.subject, 30)}: {f.count}"
            for f in report.decode_failures
        ],
    )
    if report.policy_rejected:
        section("POLICY", [f"{report.policy_rejected} policy values rejected by instances"])
    return out


# ------------------------------------------------------------------- stats


def render_stats(rows: Iterable[SubjectRow]) -> str:
    """``mesh stats``: one line per subject, bytes per second; p50/p99 are request round
    trips on subjects marked ``r``, handler times on those marked ``h``."""
    widths = (_NAME - 3, 6, 6, 9, 9, 7, 5, 1, 8, 8, 6)
    header = ["SUBJECT", "in/s", "out/s", "raw/s", "wire/s", "avg", "ratio", "", "p50", "p99"]
    header.append("err/s")
    lines = []
    for row in rows:
        lines.append(
            (
                _name(row.subject, _NAME - 3),
                rate(row.msgs_in_per_s),
                rate(row.msgs_out_per_s),
                size(row.raw_bytes_per_s),
                size(row.wire_bytes_per_s),
                size(row.avg_size),
                _ratio(row.ratio),
                row.latency[:1],
                duration(row.p50_ns),
                duration(row.p99_ns),
                rate(row.errors_per_s),
            )
        )
    return "\n".join(_table(header, widths, lines)) + "\n"


# ------------------------------------------------------------------- graphviz


def _dot_string(text: str) -> str:
    """``text`` as a double-quoted DOT string."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def _edge_label(edge: Edge) -> str:
    label = f"{rate(edge.msgs_per_s)}/s"
    if edge.latency is not None:
        label += f" p99 {duration(edge.latency.p99_ns)}"
    errors = edge.errors if isinstance(edge, Delivery) else edge.failed
    if errors:
        label += f" err {errors}"
    return label


def render_dot(report: Report) -> str:
    """A Graphviz digraph: agents as boxes (dashed when external), subjects as ellipses,
    publish/deliver edges solid, agent-to-agent edges dashed grey, wildcard matches
    dotted; flagged nodes filled red (bottlenecks, single points of failure, silent
    subjects, errors) or orange (hot senders, foreign subscribers)."""
    hot = {h.agent for h in report.hot_senders}
    lines = ["digraph mesh {", "  rankdir=LR;", '  node [fontname="Helvetica", fontsize=10];']
    for a in report.agents:
        attrs = ["shape=box"]
        if a.bottleneck:
            attrs.append('style=filled, fillcolor="#f4cccc"')
        elif a.name in hot:
            attrs.append('style=filled, fillcolor="#fce5cd"')
        elif a.external:
            attrs.append("style=dashed")
        label = f"{a.name or _PLAIN_NATS}\n×{a.instances}" if a.instances else a.name or _PLAIN_NATS
        lines.append(
            f"  {_dot_string('agent:' + a.name)} [label={_dot_string(label)}, {', '.join(attrs)}];"
        )
    for s in report.subjects:
        attrs = ["shape=ellipse"]
        if _ALARMS.intersection(s.flags):
            attrs.append('style=filled, fillcolor="#f4cccc"')
        elif "foreign" in s.flags:
            attrs.append('style=filled, fillcolor="#fce5cd"')
        node = _dot_string("subject:" + s.name)
        lines.append(f"  {node} [label={_dot_string(s.name)}, {', '.join(attrs)}];")
    for s in report.subjects:
        if not s.wildcard:
            for pattern in s.matched:
                lines.append(
                    f"  {_dot_string('subject:' + s.name)} -> {_dot_string('subject:' + pattern)}"
                    " [style=dotted, arrowhead=none];"
                )
    for e in report.edges:
        source, target = _endpoints(e)
        style = "" if isinstance(e, Publication | Delivery) else ", style=dashed, color=gray50"
        lines.append(
            f"  {_dot_string(source)} -> {_dot_string(target)}"
            f" [label={_dot_string(_edge_label(e))}{style}];"
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _endpoints(edge: Edge) -> tuple[str, str]:
    if isinstance(edge, Publication):
        return f"agent:{edge.agent}", f"subject:{edge.subject}"
    if isinstance(edge, Delivery):
        return f"subject:{edge.subject}", f"agent:{edge.agent}"
    return f"agent:{edge.source}", f"agent:{edge.target}"


# ------------------------------------------------------------------- mermaid


def _mermaid_text(text: str) -> str:
    """Text inside a quoted Mermaid label: quotes and markup as entity codes."""
    for char, code in (("#", "#35;"), ('"', "#quot;"), ("<", "#lt;"), (">", "#gt;")):
        text = text.replace(char, code)
    return text


def render_mermaid(report: Report) -> str:
    """A Mermaid ``flowchart LR``: agents ``a<n>`` as rectangles, subjects ``s<n>`` as
    stadiums (ids are indexes, so any name is safe), labels quoted and escaped; flagged
    nodes in the ``flagged`` class."""
    ids: dict[str, str] = {}
    flagged = []
    lines = ["flowchart LR"]
    for n, a in enumerate(report.agents):
        node = ids[f"agent:{a.name}"] = f"a{n}"
        lines.append(f'  {node}["{_mermaid_text(a.name or _PLAIN_NATS)}"]')
        if a.bottleneck:
            flagged.append(node)
    for n, s in enumerate(report.subjects):
        node = ids[f"subject:{s.name}"] = f"s{n}"
        lines.append(f'  {node}(["{_mermaid_text(s.name)}"])')
        if _ALARMS.intersection(s.flags):
            flagged.append(node)
    for s in report.subjects:
        if not s.wildcard:
            for pattern in s.matched:
                lines.append(f"  {ids['subject:' + s.name]} -.- {ids['subject:' + pattern]}")
    for e in report.edges:
        source, target = _endpoints(e)
        arrow = "-->" if isinstance(e, Publication | Delivery) else "-.->"
        lines.append(f'  {ids[source]} {arrow}|"{_mermaid_text(_edge_label(e))}"| {ids[target]}')
    lines.append("  classDef flagged fill:#f4cccc,stroke:#cc0000")
    if flagged:
        lines.append(f"  class {','.join(flagged)} flagged")
    return "\n".join(lines) + "\n"
