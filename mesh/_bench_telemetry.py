"""`mesh bench telemetry`: what telemetry counting costs, in one run.

Two measurements, each comparing the mesh with the same mesh whose telemetry
counting is off (:data:`UNTALLIED`):

- **pub→sub**, as in `mesh bench` (publisher here, subscriber in its own process),
  for raw nats-py, the mesh and the untallied mesh, rounds rotating which goes
  first. Each round gives a paired ratio mesh / untallied; the median ratio over the
  rounds estimates the throughput cost (the goal: at most 5%), but rates on a shared
  2-core machine swing by ±10% from round to round, more than the cost itself.
- **hot paths**, in this process: CPU nanoseconds per message of ``publish`` (to a
  subject nobody subscribes to) and of the receive path (the subscription's own
  callback handed mesh frames), in many short alternating blocks; what counting adds
  is the median of the paired blocks' differences. No other process is involved, so
  this resolves differences of a few tens of nanoseconds.

The verdict is the extra CPU as a share of the mesh's CPU per message at the busier
end of pub→sub (:attr:`SizeResult.cpu_cost`); the paired rates are shown beside it.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import msgspec

from mesh._bench_report import UNTALLIED, PubSub, human_size

if TYPE_CHECKING:
    from mesh._client import MeshClient

GOAL: Final = 0.05  # telemetry may cost at most 5% of pub→sub throughput
SIDES: Final = ("raw", "mesh", UNTALLIED)
DEFAULT_SIZES: Final = (128, 1024)
HOT_BLOCKS: Final = 200  # per side and path
HOT_BLOCK_MSGS: Final = 1000


class SideResult(msgspec.Struct, frozen=True):
    impl: str
    best_msgs_s: float
    median_msgs_s: float
    pub_cpu_us: float  # medians over rounds
    sub_cpu_us: float
    dropped: int


class HotPath(msgspec.Struct, frozen=True):
    """CPU ns per message of one path with and without counting (medians over
    blocks), and what counting adds: the median of the blocks' paired differences."""

    path: str  # "publish" or "receive"
    mesh_ns: float
    untallied_ns: float
    extra_ns: float

    @property
    def cost(self) -> float:
        return self.extra_ns / self.untallied_ns if self.untallied_ns else 0.0


class SizeResult(msgspec.Struct, frozen=True):
    size: int
    sides: list[SideResult]
    #: mesh / untallied msg/s in each round (paired: run back to back).
    ratios: list[float]
    hot: list[HotPath]

    @property
    def throughput_cost(self) -> float:
        """1 - the median paired ratio: the share of throughput counting costs (noisy)."""
        return 1 - statistics.median(self.ratios)

    @property
    def cpu_cost(self) -> float:
        """The CPU counting adds to the busier end of pub→sub, as a share of that end's
        CPU per message in the pub→sub rounds: the throughput it costs when that end
        sets the pace (as it does when CPU-bound), resolved far finer than the rates."""
        mesh = next(side for side in self.sides if side.impl == "mesh")
        extra = {path.path: max(0.0, path.extra_ns) for path in self.hot}
        return max(
            extra["publish"] / (mesh.pub_cpu_us * 1e3) if mesh.pub_cpu_us else 0.0,
            extra["receive"] / (mesh.sub_cpu_us * 1e3) if mesh.sub_cpu_us else 0.0,
        )

    @property
    def met(self) -> bool:
        return self.cpu_cost <= GOAL


class TelemetryBench(msgspec.Struct, frozen=True):
    seconds: float
    rounds: int
    results: list[SizeResult]
    goal: float = GOAL


def summarize(
    cases: Sequence[tuple[int, PubSub]], hot: dict[int, list[HotPath]], seconds: float, rounds: int
) -> TelemetryBench:
    """``cases`` as (round, case); ``hot`` by size."""
    results = []
    for size in sorted({case.size for _, case in cases}):
        here = [(index, case) for index, case in cases if case.size == size]
        sides = []
        for impl in SIDES:
            mine = [case for _, case in here if case.impl == impl]
            rates = [case.msgs_s for case in mine]
            sides.append(
                SideResult(
                    impl=impl,
                    best_msgs_s=max(rates),
                    median_msgs_s=statistics.median(rates),
                    pub_cpu_us=statistics.median(case.pub_cpu_us for case in mine),
                    sub_cpu_us=statistics.median(case.sub_cpu_us for case in mine),
                    dropped=sum(case.dropped for case in mine),
                )
            )
        by_round: dict[int, dict[str, float]] = {}
        for index, case in here:
            by_round.setdefault(index, {})[case.impl] = case.msgs_s
        ratios = [
            rates["mesh"] / rates[UNTALLIED] for rates in by_round.values() if rates[UNTALLIED] > 0
        ]
        results.append(SizeResult(size=size, sides=sides, ratios=ratios, hot=hot[size]))
    return TelemetryBench(seconds=seconds, rounds=rounds, results=results)


async def hot_paths(
    clients: dict[str, MeshClient], size: int, run_id: str, *, blocks: int = HOT_BLOCKS
) -> list[HotPath]:
    """Median CPU ns per message of publish and receive for each client, in alternating
    blocks of :data:`HOT_BLOCK_MSGS`."""
    from nats.aio.msg import Msg

    from mesh._wire import Envelope, encode_frame

    payload = os.urandom(size)
    samples: dict[tuple[str, str], list[float]] = {}
    receivers = {}

    async def nothing(msg: Any) -> None:
        return None

    for impl, client in clients.items():
        # A subject nobody publishes to: its callback is driven from here.
        sub = await client.subscribe(f"bench.{run_id}.hot.{impl}.{size}.in", nothing)
        assert sub._sub is not None
        frame = encode_frame(
            Envelope(id=client.new_id(), sender="bench-peer", created=time.time_ns()), payload
        )
        message = Msg(client.nc, subject=sub.subject, data=frame, _sid=sub._sub._id)
        callback = sub._sub._cb
        assert callback is not None
        receivers[impl] = (callback, message, sub)
    clock = time.process_time_ns
    try:
        for block in range(blocks):
            order = list(clients) if block % 2 == 0 else list(clients)[::-1]
            for impl in order:
                publish = clients[impl].publish
                subject = f"bench.{run_id}.hot.{impl}.{size}.out"  # nobody subscribes
                started = clock()
                for _ in range(HOT_BLOCK_MSGS):
                    await publish(subject, payload)
                samples.setdefault((impl, "publish"), []).append(
                    (clock() - started) / HOT_BLOCK_MSGS
                )
                callback, message, _ = receivers[impl]
                started = clock()
                for _ in range(HOT_BLOCK_MSGS):
                    await callback(message)
                samples.setdefault((impl, "receive"), []).append(
                    (clock() - started) / HOT_BLOCK_MSGS
                )
    finally:
        for _, _, sub in receivers.values():
            await sub.unsubscribe()
    return [
        HotPath(
            path=path,
            mesh_ns=statistics.median(samples["mesh", path]),
            untallied_ns=statistics.median(samples[UNTALLIED, path]),
            extra_ns=statistics.median(
                [
                    with_ - without
                    for with_, without in zip(
                        samples["mesh", path], samples[UNTALLIED, path], strict=True
                    )
                ]
            ),
        )
        for path in ("publish", "receive")
    ]


async def run_telemetry_bench(
    url: str, *, seconds: float, rounds: int, sizes: Sequence[int] = DEFAULT_SIZES
) -> TelemetryBench:
    """Run the three sides ``rounds`` times at each size against the server at ``url``,
    then the hot paths."""
    import asyncio

    import nats
    import nats.errors

    from mesh._bench import Settings, Sides, progress, pubsub_case
    from mesh._bench_worker import RAW_OPTIONS
    from mesh._client import MeshClient
    from mesh._errors import ConnectionFailed

    settings = Settings(
        seconds=seconds,
        rounds=rounds,
        requests=0,
        warmup=0,
        tracing="unsampled",
        run_id=os.urandom(6).hex(),
    )
    mesh = await MeshClient.connect(url, name="bench-mesh")
    untallied = await MeshClient.connect(url, name="bench-mesh-untallied", telemetry=False)
    try:
        raw = await nats.connect(url.split(","), name="bench-raw", **RAW_OPTIONS)
    except (OSError, TimeoutError, nats.errors.Error) as exc:
        await mesh.aclose()
        await untallied.aclose()
        raise ConnectionFailed(url, str(exc) or type(exc).__name__) from None
    sides = Sides(url, raw, mesh, asyncio.Event(), untallied)
    cases: list[tuple[int, PubSub]] = []
    hot: dict[int, list[HotPath]] = {}
    try:
        for index in range(rounds):
            shift = index % len(SIDES)
            order = SIDES[shift:] + SIDES[:shift]
            for size in sizes:
                for impl in order:
                    progress(f"round {index + 1}/{rounds}  pub→sub {human_size(size):>6}  {impl} …")
                    case = await pubsub_case(sides, impl, size, settings)
                    cases.append((index, case))
                    progress(
                        f"    {case.msgs_s:,.0f} msg/s; CPU µs/msg pub {case.pub_cpu_us:.2f}"
                        f" sub {case.sub_cpu_us:.2f}; {case.bound}-bound"
                    )
        for size in sizes:
            progress(f"hot paths {human_size(size):>6}: publish and receive, in process …")
            hot[size] = await hot_paths({"mesh": mesh, UNTALLIED: untallied}, size, settings.run_id)
    finally:
        await raw.close()
        await mesh.aclose()
        await untallied.aclose()
    return summarize(cases, hot, seconds, rounds)


def format_telemetry_bench(result: TelemetryBench) -> str:
    from mesh._cli import format_table

    rows = []
    for size in result.results:
        for side in size.sides:
            rows.append(
                (
                    human_size(size.size),
                    side.impl,
                    f"{side.best_msgs_s:,.0f}",
                    f"{side.median_msgs_s:,.0f}",
                    f"{side.pub_cpu_us:.2f}",
                    f"{side.sub_cpu_us:.2f}",
                    f"{side.dropped:,}",
                )
            )
    headers = ("size", "side", "best msg/s", "median msg/s", "pub CPU µs", "sub CPU µs", "dropped")
    lines = [
        f"pub→sub with and without telemetry counting ({result.rounds} rounds of"
        f" {result.seconds:g} s per side)",
        "",
        format_table(rows, headers),
        "",
    ]
    for size in result.results:
        verdict = "met" if size.met else "MISSED"
        spread = f"{min(size.ratios):.2f}–{max(size.ratios):.2f}"
        lines.append(
            f"{human_size(size.size):>6}: telemetry costs {size.cpu_cost:.1%} of the busier"
            f" end's CPU per message (goal ≤ {result.goal:.0%}: {verdict})"
        )
        for path in size.hot:
            lines.append(
                f"        {path.path:<8} {path.untallied_ns:,.0f} → {path.mesh_ns:,.0f} ns CPU"
                f" per message in process; counting adds {path.extra_ns:+,.0f} ns"
                f" ({path.cost:+.1%})"
            )
        lines.append(
            f"        rates    mesh/untallied median {statistics.median(size.ratios):.3f}"
            f" over {len(size.ratios)} paired rounds (spread {spread}; noise, not the verdict)"
        )
    return "\n".join(lines)


def to_json(result: TelemetryBench) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(result)
    for entry, size in zip(out["results"], result.results, strict=True):
        entry["throughput_cost"] = size.throughput_cost
        entry["cpu_cost"] = size.cpu_cost
        entry["met"] = size.met
        for path_entry, path in zip(entry["hot"], size.hot, strict=True):
            path_entry["cost"] = path.cost
    return out
