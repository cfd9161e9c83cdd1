"""Topology: pure analysis code, no I/O.

Everything here is deterministic and testable without a server: the sidecars feed it
telemetry snapshots and act on what it returns::

    window = Window(seconds=10.0)
    window.add(snapshot)                       # for each snapshot received
    graph = build_graph(window, foreign=parse_connz(connz_json))
    report = analyse(graph, Thresholds())
    print(render_text(report))
"""

from topology._analysis import SubjectRow, analyse, subject_rows
from topology._build import build_graph
from topology._foreign import ForeignClient, ForeignSubscription, parse_connz
from topology._graph import (
    AgentNode,
    Delivery,
    Graph,
    InstanceNode,
    Link,
    Publication,
    SubjectNode,
    Subscriber,
)
from topology._histogram import HistogramCounts, LatencyHistogram
from topology._render import render_dot, render_mermaid, render_stats, render_text
from topology._report import (
    AgentReport,
    Bottleneck,
    CriticalPath,
    DecodeFailure,
    Edge,
    Hop,
    HotSender,
    Report,
    SilentSubject,
    SinglePoint,
    SubjectReport,
    Thresholds,
    report_json,
)
from topology._snapshot import ReceivedStats, ReliableStats, SentStats, Snapshot, decode_snapshot
from topology._sparse import Latency
from topology._synthetic import synthetic_snapshots
from topology._window import Window, WindowStats

# The public API, by what it is for.
__all__ = [  # telemetry in
    "ForeignClient",
    "ForeignSubscription",
    "HistogramCounts",
    "LatencyHistogram",
    "ReceivedStats",
    "ReliableStats",
    "SentStats",
    "Snapshot",
    "Window",
    "WindowStats",
    "decode_snapshot",
    "parse_connz",
]
__all__ += [  # the graph
    "AgentNode",
    "Delivery",
    "Graph",
    "InstanceNode",
    "Link",
    "Publication",
    "SubjectNode",
    "Subscriber",
    "build_graph",
]
__all__ += [  # analysis
    "AgentReport",
    "Bottleneck",
    "CriticalPath",
    "DecodeFailure",
    "Edge",
    "Hop",
    "HotSender",
    "Latency",
    "Report",
    "SilentSubject",
    "SinglePoint",
    "SubjectReport",
    "SubjectRow",
    "Thresholds",
    "analyse",
    "subject_rows",
]
__all__ += [  # output
    "render_dot",
    "render_mermaid",
    "render_stats",
    "render_text",
    "report_json",
]
__all__ += [  # tests and benchmarks
    "synthetic_snapshots",
]
