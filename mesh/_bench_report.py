"""`mesh bench` results: the records of each case, the summary with ratios and
targets, and the table printed for people."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Final

SIZES: Final = (128, 1024, 16 * 1024)
REQUEST_SIZE: Final = 256
INFLIGHT: Final = 64
IMPLS: Final = ("raw", "mesh")
#: The mesh with telemetry counting off: what `mesh bench telemetry` compares against.
UNTALLIED: Final = "mesh-untallied"
#: (id, what, comparison, limit) for the mesh/raw ratios, on the reference 2-core machine
#: with tracing on and unsampled.
TARGETS: Final = (
    ("pubsub_1024", "pub→sub 1 KiB msg/s", ">=", 0.6),
    ("reqrep_p50", "request/reply p50", "<=", 1.25),
    ("reqrep_p99", "request/reply p99", "<=", 1.5),
)
#: A subscriber receiving slower than this fraction of the publish rate fell behind:
#: it, not the publisher, set the pace.
LAGGING: Final = 0.95


# ------------------------------------------------------------------- results


@dataclass
class PubSub:
    """One pub→sub measurement of one side at one size."""

    impl: str
    size: int
    published: int
    pub_seconds: float
    pub_cpu_s: float
    received: int
    sub_seconds: float
    sub_cpu_s: float
    dropped: int
    disconnects: int
    spans: int

    @property
    def msgs_s(self) -> float:
        return (self.received - 1) / self.sub_seconds if self.sub_seconds > 0 else 0.0

    @property
    def pub_msgs_s(self) -> float:
        return self.published / self.pub_seconds if self.pub_seconds > 0 else 0.0

    @property
    def pub_cpu_us(self) -> float:
        return self.pub_cpu_s / self.published * 1e6 if self.published else 0.0

    @property
    def sub_cpu_us(self) -> float:
        return self.sub_cpu_s / self.received * 1e6 if self.received else 0.0

    @property
    def sub_busy(self) -> float:
        """The subscriber's CPU time over its receiving time (1.0: a whole core)."""
        return self.sub_cpu_s / self.sub_seconds if self.sub_seconds > 0 else 0.0

    @property
    def bound(self) -> str:
        """``sub`` when the subscriber fell behind the publisher (or dropped), else ``pub``."""
        return "sub" if self.dropped or self.msgs_s < LAGGING * self.pub_msgs_s else "pub"

    def record(self) -> dict[str, Any]:
        derived = ("msgs_s", "pub_msgs_s", "pub_cpu_us", "sub_cpu_us", "sub_busy", "bound")
        return {**asdict(self), **{name: getattr(self, name) for name in derived}}


@dataclass
class ReqRep:
    """One request/reply measurement of one side."""

    impl: str
    p50_us: float
    p90_us: float
    p99_us: float
    max_us: float
    sequential: int
    inflight64_req_s: float
    inflight_requests: int
    errors: int
    requester_cpu_us: float  # CPU per request over the whole case, each process
    responder_cpu_us: float

    def record(self) -> dict[str, Any]:
        return asdict(self)


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The nearest-rank percentile ``q`` (0..1) of a sorted, non-empty list."""
    index = min(len(sorted_values) - 1, max(0, round(q * len(sorted_values)) - 1))
    return float(sorted_values[index])


def summarize(
    pubsub: list[PubSub], reqrep: list[ReqRep], environment: dict[str, Any]
) -> dict[str, Any]:
    """The best round of each side, the ratios and the targets, as one JSON-able object."""
    out: dict[str, Any] = {"pubsub": {}, "reqrep": {}}
    for size in SIZES:
        row: dict[str, Any] = {}
        for impl in IMPLS:
            best = max((r for r in pubsub if r.impl == impl and r.size == size), key=_msgs_s)
            for key, value in best.record().items():
                if key not in ("impl", "size"):
                    row[f"{impl}_{key}"] = value
        row["ratio"] = ratio(row["mesh_msgs_s"], row["raw_msgs_s"])
        out["pubsub"][str(size)] = row
    for impl in IMPLS:
        mine = [r for r in reqrep if r.impl == impl]
        out["reqrep"][impl] = {
            "p50_us": min(r.p50_us for r in mine),
            "p90_us": min(r.p90_us for r in mine),
            "p99_us": min(r.p99_us for r in mine),
            "inflight64_req_s": max(r.inflight64_req_s for r in mine),
            "requester_cpu_us": min(r.requester_cpu_us for r in mine),
            "responder_cpu_us": min(r.responder_cpu_us for r in mine),
            "sequential_requests": mine[0].sequential,
            "errors": sum(r.errors for r in mine),
        }
    mesh_rr, raw_rr = out["reqrep"]["mesh"], out["reqrep"]["raw"]
    out["reqrep"]["ratios"] = {
        key: ratio(mesh_rr[key], raw_rr[key])
        for key in ("p50_us", "p90_us", "p99_us", "inflight64_req_s")
    }
    values = {
        "pubsub_1024": out["pubsub"]["1024"]["ratio"],
        "reqrep_p50": out["reqrep"]["ratios"]["p50_us"],
        "reqrep_p99": out["reqrep"]["ratios"]["p99_us"],
    }
    out["targets"] = [
        {
            "id": key,
            "case": f"{what} mesh/raw",
            "value": values[key],
            "target": f"{op} {limit:g}",
            "pass": values[key] >= limit if op == ">=" else values[key] <= limit,
        }
        for key, what, op, limit in TARGETS
    ]
    out["environment"] = environment
    out["rounds"] = {
        "pubsub": [r.record() for r in pubsub],
        "reqrep": [r.record() for r in reqrep],
    }
    return out


def _msgs_s(result: PubSub) -> float:
    return result.msgs_s


def ratio(mesh: float, raw: float) -> float:
    return mesh / raw if raw > 0 else 0.0


# ------------------------------------------------------------------ the table


def human_size(size: int) -> str:
    return f"{size // 1024} KiB" if size >= 1024 and size % 1024 == 0 else f"{size} B"


def render(report: dict[str, Any]) -> str:
    """The report as text: the comparison with targets, then the details behind it."""
    env, marks = report["environment"], {t["id"]: t for t in report["targets"]}
    rows: list[tuple[str, ...]] = []

    def add(case: str, raw: float, mesh: float, key: str = "", digits: int = 0) -> None:
        mark = marks.get(key)
        limit = mark["target"].replace(">=", "≥").replace("<=", "≤") + "×" if mark else ""
        verdict = ("pass" if mark["pass"] else "MISS") if mark else ""
        cells = (f"{raw:,.{digits}f}", f"{mesh:,.{digits}f}", f"{ratio(mesh, raw):.2f}×")
        rows.append((case, *cells, limit, verdict))

    for size in SIZES:
        row = report["pubsub"][str(size)]
        name = f"pub→sub {human_size(size)} msg/s"
        add(name, row["raw_msgs_s"], row["mesh_msgs_s"], f"pubsub_{size}")
    for size in SIZES:
        row = report["pubsub"][str(size)]
        name = f"pub→sub {human_size(size)} CPU µs/msg pub+sub"
        raw_cpu = row["raw_pub_cpu_us"] + row["raw_sub_cpu_us"]
        add(name, raw_cpu, row["mesh_pub_cpu_us"] + row["mesh_sub_cpu_us"], digits=1)
    raw_rr, mesh_rr = report["reqrep"]["raw"], report["reqrep"]["mesh"]
    rr = f"req/rep {human_size(REQUEST_SIZE)}"
    add(f"{rr} p50 µs", raw_rr["p50_us"], mesh_rr["p50_us"], "reqrep_p50")
    add(f"{rr} p90 µs", raw_rr["p90_us"], mesh_rr["p90_us"])
    add(f"{rr} p99 µs", raw_rr["p99_us"], mesh_rr["p99_us"], "reqrep_p99")
    add(f"{rr} {INFLIGHT} in flight req/s", raw_rr["inflight64_req_s"], mesh_rr["inflight64_req_s"])
    for side in ("requester", "responder"):
        key = f"{side}_cpu_us"
        add(f"{rr} {side} CPU µs/req", raw_rr[key], mesh_rr[key], digits=1)
    details = [
        (
            f"{impl} {human_size(size)}",
            f"{row[f'{impl}_published']:,}",
            f"{row[f'{impl}_pub_msgs_s']:,.0f}",
            f"{row[f'{impl}_received']:,}",
            f"{row[f'{impl}_dropped']:,}",
            f"{row[f'{impl}_pub_cpu_us']:.2f}",
            f"{row[f'{impl}_sub_cpu_us']:.2f}",
            f"{row[f'{impl}_sub_busy']:.0%}",
            row[f"{impl}_bound"],
        )
        for size in SIZES
        for impl in IMPLS
        for row in (report["pubsub"][str(size)],)
    ]
    headers = "pub→sub, best round|published|pub msg/s|received|dropped|pub CPU µs|sub CPU µs"
    headers += "|sub busy|bound"
    load = ", ".join(f"{x:.2f}" for x in env["load_average"])
    lines = [
        f"mesh bench: tracing {env['tracing']}; best of {env['rounds']} round(s) of"
        f" {env['seconds']:g} s per case; nats-server {env['nats_server']}, nats-py"
        f" {env['nats_py']}, Python {env['python']}, {env['cpu_count']} CPUs"
        f" (load average at start {load})",
        "",
        *table(("case", "raw", "mesh", "mesh/raw", "target", ""), rows, right=(1, 2, 3)),
        "",
        *table(tuple(headers.split("|")), details, right=(1, 2, 3, 4, 5, 6, 7)),
    ]
    errors = raw_rr["errors"] + mesh_rr["errors"]
    if errors:
        lines += ["", f"request/reply: {errors} request(s) timed out with {INFLIGHT} in flight"]
    return "\n".join(lines)


def table(
    headers: tuple[str, ...], rows: Sequence[tuple[str, ...]], right: tuple[int, ...]
) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(cells, widths, strict=True))
        ).rstrip()

    return [line(headers), *(line(r) for r in rows)]
