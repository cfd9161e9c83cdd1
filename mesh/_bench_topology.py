"""How long the topology analysis takes on a large mesh: ``mesh bench topology``.

The snapshots come from :func:`topology.synthetic_snapshots` (built once, not timed;
``edges`` counts who-talks-to-whom pairs, each carried by publish and deliver edges);
each round times :func:`topology.build_graph` and :func:`topology.analyse` with
``time.perf_counter``. One untimed round goes first (it loads NumPy, once per process),
and each round's graph and report are freed before the next round starts its clock.
Rendering is not timed. The best round is the figure to compare (this machine is
shared, so the others carry other processes' noise); the median says how noisy the
run was.
"""

from __future__ import annotations

import statistics
import time

import msgspec

from topology import analyse, build_graph, synthetic_snapshots


class TopologyBenchResult(msgspec.Struct, frozen=True, kw_only=True):
    """Timings of ``rounds`` build + analyse runs over the same snapshots."""

    agents: int
    #: Agent-to-agent edges asked of the generator (who talks to whom).
    edges: int
    snapshots: int
    #: What the graph held: instances, subject nodes and its three kinds of edges.
    instances: int
    subjects: int
    publications: int
    deliveries: int
    links: int
    build_ms: tuple[float, ...]
    analyse_ms: tuple[float, ...]
    best_total_ms: float
    median_total_ms: float


def run_topology_bench(
    agents: int = 1000,
    edges: int = 5000,
    rounds: int = 5,
    seed: int = 0,
    *,
    snapshots_per_instance: int = 1,
) -> TopologyBenchResult:
    """Build the synthetic snapshots once, then time ``rounds`` graph builds and analyses."""
    if rounds < 1:
        raise ValueError("rounds must be at least 1")
    snapshots = synthetic_snapshots(agents, edges, seed, rounds=snapshots_per_instance)
    graph = build_graph(snapshots)  # the warm-up round: imports, allocator
    analyse(graph)
    sizes = {
        "instances": len(graph.instances),
        "subjects": len(graph.subjects),
        "publications": len(graph.publications),
        "deliveries": len(graph.deliveries),
        "links": len(graph.links),
    }
    del graph
    build_ms: list[float] = []
    analyse_ms: list[float] = []
    for _ in range(rounds):
        start = time.perf_counter()
        graph = build_graph(snapshots)
        built = time.perf_counter()
        report = analyse(graph)
        done = time.perf_counter()
        build_ms.append((built - start) * 1e3)
        analyse_ms.append((done - built) * 1e3)
        del graph, report
    totals = [b + a for b, a in zip(build_ms, analyse_ms, strict=True)]
    return TopologyBenchResult(
        agents=agents,
        edges=edges,
        snapshots=len(snapshots),
        **sizes,
        build_ms=tuple(build_ms),
        analyse_ms=tuple(analyse_ms),
        best_total_ms=min(totals),
        median_total_ms=statistics.median(totals),
    )


def format_topology_bench(result: TopologyBenchResult) -> str:
    """The result for people: sizes, then best and median milliseconds."""
    return "\n".join(
        [
            f"topology bench: {result.agents} agents, {result.edges} agent-to-agent edges asked, "
            f"{result.snapshots} snapshots ({result.instances} instances)",
            f"graph: {result.subjects} subjects, {result.publications} publish, "
            f"{result.deliveries} deliver, {result.links} agent-to-agent edges",
            f"build_graph  best {min(result.build_ms):7.1f} ms  "
            f"median {statistics.median(result.build_ms):7.1f} ms",
            f"analyse      best {min(result.analyse_ms):7.1f} ms  "
            f"median {statistics.median(result.analyse_ms):7.1f} ms",
            f"total        best {result.best_total_ms:7.1f} ms  "
            f"median {result.median_total_ms:7.1f} ms  ({len(result.build_ms)} rounds)",
        ]
    )
