"""``mesh topology`` and ``mesh stats``: the live graph, from telemetry.

Both listen to ``_MESH.telemetry.>`` for a short window, feed the snapshots to
:mod:`topology` and render what it finds. The server's HTTP monitoring endpoint
(``/connz``) adds the clients outside the mesh; without it the view says so rather
than guessing. ``--watch`` keeps a sliding window and redraws once a second.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Final
from urllib.parse import urlsplit

import typer

from mesh._client import DEFAULT_URL, MeshClient
from mesh._message import Message
from topology import (
    ForeignClient,
    Window,
    analyse,
    build_graph,
    parse_connz,
    render_dot,
    render_mermaid,
    render_stats,
    render_text,
    report_json,
    subject_rows,
)
from topology._snapshot import TELEMETRY_SUBJECT, decode_snapshot

#: Seconds of telemetry gathered before a one-shot view (snapshots come every second).
DEFAULT_LISTEN: Final = 2.5
#: Seconds of history a --watch view covers.
WATCH_WINDOW: Final = 10.0
MONITOR_TIMEOUT: Final = 2.0
MAX_CONNZ_BYTES: Final = 32 * 1024 * 1024
_CLEAR: Final = "\x1b[H\x1b[2J"


class Format(enum.StrEnum):
    text = "text"
    dot = "dot"
    mermaid = "mermaid"
    json = "json"


NatsUrl = Annotated[
    str,
    typer.Option("--nats", envvar="MESH_NATS_URL", help="NATS server URL(s), comma-separated."),
]
Monitor = Annotated[
    str | None,
    typer.Option(
        "--monitor",
        envvar="MESH_NATS_MONITOR",
        help="The server's HTTP monitoring URL, for clients outside the mesh "
        "(default: port 8222 on the NATS host; `none` to skip).",
        show_default=False,
    ),
]
Listen = Annotated[
    float,
    typer.Option(
        "--listen", min=0.5, max=60, help="Seconds of telemetry to gather before showing."
    ),
]
Watch = Annotated[
    bool, typer.Option("--watch", "-w", help="Refresh in place every second until Ctrl-C.")
]


@dataclass
class Gathered:
    """What a view is drawn from: the window, and the clients outside the mesh."""

    window: Window
    foreign: list[ForeignClient] | None
    monitor_note: str
    malformed: int = 0


def monitor_url(nats: str, monitor: str | None) -> str | None:
    """The monitoring URL to ask: the one given, or port 8222 on the NATS host."""
    if monitor is not None:
        return None if monitor.lower() in ("", "none", "off") else monitor.rstrip("/")
    first = nats.split(",")[0].strip()
    host = urlsplit(first if "://" in first else f"nats://{first}").hostname or "127.0.0.1"
    return f"http://{host}:8222"


def fetch_connz(url: str, timeout: float = MONITOR_TIMEOUT) -> bytes:
    """GET ``/connz`` with subscription details (blocking; run it in a thread)."""
    with urllib.request.urlopen(  # the URL is the operator's monitoring endpoint
        f"{url}/connz?subs=detail&limit=100000", timeout=timeout
    ) as response:
        data: bytes = response.read(MAX_CONNZ_BYTES + 1)
    if len(data) > MAX_CONNZ_BYTES:
        raise ValueError(f"the /connz answer is over {MAX_CONNZ_BYTES} bytes")
    return data


async def foreign_clients(monitor: str | None) -> tuple[list[ForeignClient] | None, str]:
    """The connections outside the mesh, or None and why they are unknown."""
    if monitor is None:
        return None, "clients outside the mesh: not checked (--monitor none)"
    try:
        data = await asyncio.to_thread(fetch_connz, monitor)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        return None, (
            f"clients outside the mesh: unknown (no monitoring at {monitor}: {reason}; "
            "pass --monitor URL, or start nats-server with -m 8222)"
        )
    try:
        return parse_connz(data), ""
    except ValueError as exc:
        return (
            None,
            f"clients outside the mesh: unknown ({monitor} sent an unreadable /connz: {exc})",
        )


async def gather(
    client: MeshClient,
    window: Window,
    seconds: float,
    monitor: str | None,
    *,
    on_tick: Callable[[Gathered], None] | None = None,
    stop: asyncio.Event | None = None,
) -> Gathered:
    """Feed ``window`` with snapshots for ``seconds`` (or, with ``on_tick``, until ``stop``)."""
    state = Gathered(window=window, foreign=None, monitor_note="")

    async def on_snapshot(msg: Message) -> None:
        try:
            snapshot = decode_snapshot(msg.data)
        except ValueError:  # whatever the bytes: decode_snapshot raises nothing else
            state.malformed += 1
            return
        window.add(snapshot)

    sub = await client.subscribe(f"{TELEMETRY_SUBJECT}.>", on_snapshot, internal=True, traced=False)
    try:
        if on_tick is None:
            state.foreign, state.monitor_note = await foreign_clients(monitor)
            await asyncio.sleep(seconds)
            return state
        assert stop is not None
        while not stop.is_set():
            state.foreign, state.monitor_note = await foreign_clients(monitor)
            window.prune(time.time_ns())
            on_tick(state)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
        return state
    finally:
        await sub.unsubscribe()


def _no_telemetry(nats: str, seconds: float) -> str:
    return (
        f"no telemetry on {TELEMETRY_SUBJECT}.> within {seconds:g}s from {nats}: no mesh node "
        "is running there (start the demo with `mesh up --demo`, or a node with "
        "`mesh node run`, and point --nats / MESH_NATS_URL at its server)"
    )


def _render_topology(state: Gathered, fmt: Format) -> str:
    graph = build_graph(state.window, foreign=state.foreign or [])
    report = analyse(graph)
    if fmt is Format.dot:
        return render_dot(report)
    if fmt is Format.mermaid:
        return render_mermaid(report)
    if fmt is Format.json:
        return report_json(report).decode()
    text = render_text(report)
    notes = [n for n in (state.monitor_note,) if n]
    if state.malformed:
        notes.append(f"{state.malformed} telemetry snapshots did not decode and were skipped")
    return text + ("\n" + "\n".join(notes) if notes else "")


def _render_stats(state: Gathered) -> str:
    return render_stats(subject_rows(build_graph(state.window, foreign=state.foreign or [])))


def _show(
    nats: str,
    monitor: str | None,
    listen: float,
    watch: bool,
    render: Callable[[Gathered], str],
) -> None:
    from mesh._cli import fail, run

    mon = monitor_url(nats, monitor)
    tty = sys.stdout.isatty()

    async def once() -> str | None:
        async with await MeshClient.connect(nats, name="mesh-cli") as client:
            state = await gather(client, Window(seconds=max(listen, WATCH_WINDOW)), listen, mon)
        if len(state.window) == 0:
            return None
        return render(state)

    async def watching() -> None:
        stop = asyncio.Event()

        def tick(state: Gathered) -> None:
            if len(state.window) == 0:
                body = _no_telemetry(nats, WATCH_WINDOW) + "\n(waiting…)"
            else:
                body = render(state)
            stamp = time.strftime("%H:%M:%S")
            header = f"{stamp}  last {WATCH_WINDOW:g}s of telemetry from {nats}  (Ctrl-C to stop)"
            sys.stdout.write((_CLEAR if tty else "\n") + header + "\n\n" + body + "\n")
            sys.stdout.flush()

        async with await MeshClient.connect(nats, name="mesh-cli") as client:
            try:
                await gather(client, Window(seconds=WATCH_WINDOW), 0, mon, on_tick=tick, stop=stop)
            except asyncio.CancelledError:
                stop.set()

    if watch:
        try:
            run(watching())
        except typer.Exit as exc:
            if exc.exit_code != 130:  # Ctrl-C is how a watch ends
                raise
        return
    output = run(once())
    if output is None:
        raise fail(_no_telemetry(nats, listen))
    typer.echo(output)


def topology_command(
    fmt: Annotated[
        Format, typer.Option("--format", "-f", help="Output: a terminal view or a graph language.")
    ] = Format.text,
    svg: Annotated[
        Path | None,
        typer.Option(
            help="Also render the graph to this SVG file (needs Graphviz `dot`).",
            show_default=False,
        ),
    ] = None,
    watch: Watch = False,
    listen: Listen = DEFAULT_LISTEN,
    monitor: Monitor = None,
    nats: NatsUrl = DEFAULT_URL,
) -> None:
    """Show the live graph: agents, subjects, who talks to whom, how much, how fast.

    Gathers telemetry for --listen seconds, then prints agents (instances, CPU,
    utilisation), subjects (msg/s, bytes/s raw and on the wire, p50/p99 latency,
    errors) and what is wrong: bottlenecks, the critical path of request chains,
    single points of failure, silent subjects, hot senders, clients outside the
    mesh and frames receivers could not decode.
    """
    from mesh._cli import EXIT_USAGE, fail

    if svg is not None:
        if watch:
            raise fail("--svg writes one picture; it cannot be combined with --watch", EXIT_USAGE)
        dot = shutil.which("dot")
        if dot is None:
            raise fail(
                "--svg needs Graphviz's `dot` (apt-get install graphviz); "
                "or pipe `mesh topology --format dot` to a renderer",
                EXIT_USAGE,
            )
        _write_svg(dot, svg, nats, monitor, listen)
        if fmt is Format.text:
            typer.echo(f"wrote {svg}")
            return
    _show(nats, monitor, listen, watch, lambda state: _render_topology(state, fmt))


def _write_svg(dot: str, svg: Path, nats: str, monitor: str | None, listen: float) -> None:
    from mesh._cli import fail, run

    async def graph_dot() -> str | None:
        async with await MeshClient.connect(nats, name="mesh-cli") as client:
            state = await gather(
                client, Window(seconds=WATCH_WINDOW), listen, monitor_url(nats, monitor)
            )
        return _render_topology(state, Format.dot) if len(state.window) else None

    source = run(graph_dot())
    if source is None:
        raise fail(_no_telemetry(nats, listen))
    done = subprocess.run(  # a fixed argv: Graphviz's dot found on PATH
        [dot, "-Tsvg", "-o", str(svg)],
        input=source.encode(),
        capture_output=True,
        check=False,
        timeout=60,
    )
    if done.returncode != 0:
        raise fail(f"dot could not render {svg}: {done.stderr.decode(errors='replace').strip()}")


def stats_command(
    watch: Watch = False,
    listen: Listen = DEFAULT_LISTEN,
    nats: NatsUrl = DEFAULT_URL,
) -> None:
    """One row per subject: msg/s, bytes/s raw and on the wire, compression, latency, errors."""
    _show(nats, "none", listen, watch, _render_stats)


def register(app: typer.Typer) -> None:
    app.command("topology")(topology_command)
    app.command("stats")(stats_command)
