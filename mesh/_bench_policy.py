"""``mesh bench policy``: how long a policy change takes to reach every node.

Starts ``--nodes`` real node processes (``mesh node run``) against one server,
waits until all have registered and loaded the policy, then, ``--rounds`` times,
writes a new codec value for a subject and waits for every instance's
acknowledgement on ``_MESH.policy.applied.<instance>``. An instance's latency is
the time from just before the write to the moment it applied the value (both
clocks are this machine's). A round's propagation time is its slowest instance.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Final

import msgspec
import typer

from mesh._bench_report import percentile
from mesh._client import MeshClient
from mesh._enforcer import APPLIED_SUBJECT, AppliedTracker
from mesh._policy import CodecPolicy, policy_key
from mesh._policy_store import PolicyStore
from nodes import Node

SUBJECT: Final = "bench.policy.target"
AGENT: Final = "policy-bench"
GOAL_P99_MS: Final = 500.0
START_TIMEOUT: Final = 180.0
ROUND_TIMEOUT: Final = 10.0

#: The node every process runs: it handles one subject and obeys the policy plane.
node = Node(AGENT, description="mesh bench policy: a node that only applies policy")


@node.handles("bench.policy.ping")
async def ping(message: dict) -> dict:  # type: ignore[type-arg]
    return message


class PolicyBenchResult(msgspec.Struct, frozen=True, kw_only=True):
    nodes: int
    rounds: int
    #: Per round: ms until the slowest instance applied the value.
    propagation_ms: list[float]
    #: Every instance's apply latency in every round (ms).
    apply_ms: list[float]
    #: Acknowledgements missing when a round timed out.
    missing: int
    goal_p99_ms: float = GOAL_P99_MS


def _pct(values: list[float], q: float) -> float:
    return percentile(sorted(values), q) if values else float("nan")


def format_result(result: PolicyBenchResult) -> str:
    prop = result.propagation_ms
    each = result.apply_ms
    lines = [
        f"policy propagation: {result.nodes} node processes, {result.rounds} rounds",
        f"  every node applied (per round)  p50 {_pct(prop, 0.5):7.1f} ms   "
        f"p99 {_pct(prop, 0.99):7.1f} ms   max {max(prop, default=float('nan')):7.1f} ms",
        f"  one node applied (all samples)  p50 {_pct(each, 0.5):7.1f} ms   "
        f"p99 {_pct(each, 0.99):7.1f} ms   ({len(each)} samples)",
    ]
    p99 = _pct(prop, 0.99)
    verdict = "met" if p99 < result.goal_p99_ms else "MISSED"
    lines.append(f"  goal: every node within {result.goal_p99_ms:g} ms at p99 — {verdict}")
    if result.missing:
        lines.append(f"  {result.missing} acknowledgements never arrived (rounds timed out)")
    return "\n".join(lines)


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def _spawn(url: str, count: int) -> list[subprocess.Popen[bytes]]:
    env = {**os.environ, "MESH_NATS_URL": url}
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env.pop("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", None)
    return [
        subprocess.Popen(
            [sys.executable, "-m", "mesh", "node", "run", "mesh._bench_policy:node"],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            cwd=Path.cwd(),
            start_new_session=True,
        )
        for _ in range(count)
    ]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
    give_up = time.monotonic() + 15
    for proc in procs:
        try:
            proc.wait(max(0.1, give_up - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def measure(url: str, nodes: int, rounds: int) -> PolicyBenchResult:
    procs: list[subprocess.Popen[bytes]] = []
    try:
        async with await MeshClient.connect(url, name="policy-bench") as client:
            store = await PolicyStore.open(client)
            acks = AppliedTracker()
            key = policy_key(SUBJECT, "codec")
            await client.subscribe(f"{APPLIED_SUBJECT}.>", acks.on_ack, internal=True)
            await client.flush()
            # A value every node will load at start: its acknowledgement says "ready".
            first = await store.set(
                SUBJECT, CodecPolicy(), author="bench", reason="baseline", operator=True
            )
            _progress(f"starting {nodes} node processes…")
            procs = _spawn(url, nodes)
            give_up = time.monotonic() + START_TIMEOUT
            while len(acks.applied(key, first.version)) < nodes:
                dead = [p for p in procs if p.poll() is not None]
                if dead:
                    raise RuntimeError(f"{len(dead)} node processes exited during start-up")
                if time.monotonic() > give_up:
                    raise RuntimeError(
                        f"only {len(acks.applied(key, first.version))}/{nodes} nodes ready after "
                        f"{START_TIMEOUT:g}s"
                    )
                await asyncio.sleep(0.2)
            _progress(f"{nodes} nodes ready; {rounds} policy changes…")
            await asyncio.sleep(1.0)  # let start-up work (registration, telemetry) settle
            propagation: list[float] = []
            each: list[float] = []
            missing = 0
            for r in range(rounds):
                value = CodecPolicy(algorithm="zstd", level=1 + r % 9)
                started = time.time_ns()
                record = await store.set(
                    SUBJECT, value, author="bench", reason=f"round {r}", operator=True
                )
                got = await acks.wait(key, record.version, nodes, ROUND_TIMEOUT)
                missing += nodes - len(got)
                latencies = [(t - started) / 1e6 for t in got.values()]
                each.extend(latencies)
                propagation.append(max(latencies, default=ROUND_TIMEOUT * 1000))
                await asyncio.sleep(0.2)
            return PolicyBenchResult(
                nodes=nodes,
                rounds=rounds,
                propagation_ms=propagation,
                apply_ms=each,
                missing=missing,
            )
    finally:
        _stop(procs)


def bench_policy(
    nodes: Annotated[int, typer.Option(min=1, max=500, help="Node processes to start.")] = 50,
    rounds: Annotated[int, typer.Option(min=1, max=1000, help="Policy changes to time.")] = 30,
    nats: Annotated[
        str,
        typer.Option(
            "--nats", help="Use this NATS server (default: an embedded one, JetStream on)."
        ),
    ] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Time from `policy set` until every node applies it (p50/p99), with N node processes."""
    from mesh._cli import fail, run
    from mesh._errors import MeshError
    from mesh._server import NatsServer

    server: NatsServer | None = None
    url = nats
    try:
        if not url:
            server = NatsServer(port=0, monitor_port=None)
            server.start()
            url = server.url
            _progress(f"embedded nats-server (pid {server.pid}) at {url}")
        result = run(measure(url, nodes, rounds))
    except RuntimeError as exc:
        raise fail(str(exc)) from None
    except MeshError as exc:
        raise fail(str(exc)) from None
    finally:
        if server is not None:
            server.stop()
    if as_json:
        typer.echo(msgspec.json.encode(result).decode())
    else:
        typer.echo(format_result(result))
