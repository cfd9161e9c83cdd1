"""The ``mesh`` command line.

Every command that talks to NATS takes ``--nats URL`` (environment
``MESH_NATS_URL``). A user mistake ends with one line on stderr saying what was
wrong and what to do, and a non-zero exit code — never a traceback:

    1  a mesh error (bad name, no responders, timeout, remote failure…)
    2  a usage error (bad option or argument)
    3  the NATS server is unreachable
    130  interrupted
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

from mesh._client import (
    DEFAULT_REQUEST_TIMEOUT,
    DEFAULT_URL,
    DENIED_LOG_KEY,
    MAX_TIMEOUT,
    MeshClient,
)
from mesh._errors import ConnectionFailed, MeshError
from mesh._message import Message
from mesh._names import validate_subject
from mesh._tracing import Tracing, tracing_from_env

T = TypeVar("T")

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_INTERRUPTED = 130

app = typer.Typer(
    name="mesh",
    help="natsmesh: a message-bus mesh for AI agents over NATS.",
    epilog="Start here: `mesh up --demo` (embedded NATS, demo agents, live traffic).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
node_app = typer.Typer(help="Run agent node processes.", no_args_is_help=True)
app.add_typer(node_app, name="node")

NatsUrl = Annotated[
    str,
    typer.Option(
        "--nats",
        envvar="MESH_NATS_URL",
        help="NATS server URL(s), comma-separated.",
        show_default=True,
    ),
]
Verbose = Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")]


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    """Print ``error: message`` on stderr; return the Exit to raise."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    return typer.Exit(code)


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's coroutine, turning mesh errors into clean exits."""
    try:
        return asyncio.run(coro)
    except ConnectionFailed as exc:
        raise fail(str(exc), EXIT_UNREACHABLE) from None
    except MeshError as exc:
        raise fail(str(exc)) from None
    except KeyboardInterrupt:
        raise typer.Exit(EXIT_INTERRUPTED) from None


def _hide_denials(record: logging.LogRecord) -> bool:
    """One-shot commands raise a refused publish or subscription as their own `error:`
    line; the log line saying the same would make two."""
    return not getattr(record, DENIED_LOG_KEY, False)


logging.getLogger("mesh.client").addFilter(_hide_denials)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # A long-running process reports every refusal (a handler's publish has no caller
    # to raise it to).
    logging.getLogger("mesh.client").removeFilter(_hide_denials)


def cli_tracing(service_name: str) -> Tracing | None:
    """Tracing for a CLI process, from ``OTEL_*``; a bad setting is a usage error."""
    try:
        return tracing_from_env(service_name)
    except ValueError as exc:
        raise fail(str(exc), EXIT_USAGE) from None


def parse_payload(text: str | None) -> Any:
    """A payload argument: JSON, ``@file``, ``-`` (stdin), or plain text.

    Whatever parses as JSON is sent as JSON; anything else (text, binary files)
    is sent as raw bytes.
    """
    if text is None:
        return b""
    raw: bytes
    if text == "-":
        raw = sys.stdin.buffer.read()
    elif text.startswith("@"):
        path = Path(text[1:])
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise fail(f"cannot read payload file {path}: {exc.strerror}", EXIT_USAGE) from None
    else:
        raw = text.encode("utf-8", "surrogateescape")
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        return raw


def format_payload(value: Any) -> str:
    """A received payload for the terminal: JSON if it is JSON, else text or hex."""
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        try:
            text = raw.decode()
        except UnicodeDecodeError:
            return raw[:256].hex() + ("…" if len(raw) > 256 else "")
        try:
            return json.dumps(json.loads(text), ensure_ascii=False)
        except json.JSONDecodeError:
            return text
    return json.dumps(value, ensure_ascii=False, default=str)


def format_table(rows: Sequence[tuple[str, ...]], headers: tuple[str, ...]) -> str:
    """Rows under headers, columns padded to their widest cell."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    )


def mesh_command(func: Callable[..., None]) -> Callable[..., None]:
    """Validate names given on the command line before anything connects."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            func(*args, **kwargs)
        except MeshError as exc:
            raise fail(str(exc)) from None

    return wrapper


# ------------------------------------------------------------------- commands


def _print_version(value: bool) -> None:
    if value:
        from mesh import __version__

        typer.echo(f"natsmesh {__version__}")
        raise typer.Exit()


# One line per paragraph: the help renderer keeps line breaks.
_ROOT_HELP = (
    "natsmesh: a message-bus mesh for AI agents over NATS.\n\n"
    "Credentials: every command connects with the standard NATS variables, as the nats CLI "
    "does: NATS_USER and NATS_PASSWORD, NATS_TOKEN, NATS_NKEY or NATS_CREDS (one of them); "
    "NATS_CA, NATS_CERT and NATS_KEY for TLS (NATS_TLS_HOSTNAME when the server's "
    "certificate names another host); NATS_INBOX_PREFIX where the server confines the user "
    "to its own inbox.\n\n"
    "The options below, given before the command, set those variables for the command and "
    "for every node process it starts (`mesh up`), replacing any other way to authenticate "
    "set in the environment, e.g. `mesh --user planner --inbox-prefix _INBOX_planner node "
    "run nodes.examples.pipeline:planner`. A setting that cannot work is an error before "
    "anything connects."
)
_CREDENTIALS_PANEL = "Credentials"
# Ways to authenticate: one given on the command line replaces the environment's others.
_AUTH_METHODS = (("NATS_USER", "NATS_PASSWORD"), ("NATS_TOKEN",), ("NATS_NKEY",), ("NATS_CREDS",))
_FILE_VARIABLES = frozenset({"NATS_NKEY", "NATS_CREDS", "NATS_CA", "NATS_CERT", "NATS_KEY"})


def _credential(flag: str, variable: str, metavar: str, what: str) -> Any:
    return typer.Option(
        flag,
        metavar=metavar,
        help=f"{what} [{variable}]",
        rich_help_panel=_CREDENTIALS_PANEL,
        show_default=False,
    )


def _use_credentials(given: dict[str, str | None]) -> None:
    """Put the credentials given on the command line in the ``NATS_*`` variables, for
    this process and the node processes it starts, and check them before anything runs.
    """
    from mesh._auth import connect_options
    from mesh._errors import InvalidCredentials

    chosen = {variable: value for variable, value in given.items() if value is not None}
    if not chosen:
        return
    if any(chosen.keys() & set(method) for method in _AUTH_METHODS):
        for method in _AUTH_METHODS:
            if not chosen.keys() & set(method):
                for variable in method:
                    os.environ.pop(variable, None)
    for variable, value in chosen.items():
        if variable in _FILE_VARIABLES and value:
            # Absolute: a node process may run from another directory.
            value = os.path.abspath(os.path.expanduser(value))
        os.environ[variable] = value
    try:
        connect_options()
    except InvalidCredentials as exc:
        raise fail(str(exc), EXIT_USAGE) from None


@app.callback(help=_ROOT_HELP)
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", help="Print the version and exit.", is_eager=True, callback=_print_version
        ),
    ] = False,
    user: Annotated[
        str | None, _credential("--user", "NATS_USER", "USER", "User name, with --password.")
    ] = None,
    password: Annotated[
        str | None,
        _credential(
            "--password",
            "NATS_PASSWORD",
            "PASSWORD",
            "The user's password (other users can see it in the process list: prefer the "
            "variable).",
        ),
    ] = None,
    token: Annotated[
        str | None, _credential("--token", "NATS_TOKEN", "TOKEN", "Authentication token.")
    ] = None,
    nkey: Annotated[
        str | None, _credential("--nkey", "NATS_NKEY", "FILE", "File with the user's NKEY seed.")
    ] = None,
    creds: Annotated[
        str | None,
        _credential("--creds", "NATS_CREDS", "FILE", "Credentials file: user JWT and NKEY seed."),
    ] = None,
    tls_ca: Annotated[
        str | None,
        _credential("--tls-ca", "NATS_CA", "FILE", "CA certificates (PEM) to verify the server."),
    ] = None,
    tls_cert: Annotated[
        str | None,
        _credential("--tls-cert", "NATS_CERT", "FILE", "Client certificate (PEM) for mutual TLS."),
    ] = None,
    tls_key: Annotated[
        str | None,
        _credential("--tls-key", "NATS_KEY", "FILE", "Private key of --tls-cert (PEM)."),
    ] = None,
    inbox_prefix: Annotated[
        str | None,
        _credential(
            "--inbox-prefix",
            "NATS_INBOX_PREFIX",
            "PREFIX",
            "Prefix of reply inboxes, e.g. _INBOX_planner where the server confines the "
            "user to its own.",
        ),
    ] = None,
) -> None:
    """Global options: the version, and credentials for every command (see _ROOT_HELP)."""
    _use_credentials(
        {
            "NATS_USER": user,
            "NATS_PASSWORD": password,
            "NATS_TOKEN": token,
            "NATS_NKEY": nkey,
            "NATS_CREDS": creds,
            "NATS_CA": tls_ca,
            "NATS_CERT": tls_cert,
            "NATS_KEY": tls_key,
            "NATS_INBOX_PREFIX": inbox_prefix,
        }
    )


@app.command()
@mesh_command
def server(
    port: Annotated[int, typer.Option(help="Client port (0 picks a free one).")] = 4222,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    store_dir: Annotated[
        Path | None, typer.Option(help="JetStream store directory (default: a temporary one).")
    ] = None,
    monitor_port: Annotated[
        int, typer.Option(help="HTTP monitoring port on loopback (0 picks one, -1 disables).")
    ] = 8222,
    jetstream: Annotated[bool, typer.Option(help="Enable JetStream.")] = True,
) -> None:
    """Run an embedded nats-server in the foreground (JetStream on); Ctrl-C stops it."""
    from mesh._server import NatsServer

    srv = NatsServer(
        host=host,
        port=port,
        jetstream=jetstream,
        store_dir=store_dir,
        monitor_port=None if monitor_port < 0 else monitor_port,
        echo_log=True,
    )
    srv.start()
    typer.secho(
        f"nats-server ready at {srv.url}"
        + (f" (monitoring {srv.monitor_url})" if srv.monitor_url else "")
        + " — Ctrl-C to stop",
        err=True,
        fg=typer.colors.GREEN,
    )
    try:
        while srv.running:
            time.sleep(0.5)
    except KeyboardInterrupt:
        return
    finally:
        srv.stop()
    raise fail("nats-server exited unexpectedly; its last log lines:\n" + srv.log_tail())


@node_app.command("run")
@mesh_command
def node_run(
    app_spec: Annotated[
        str,
        typer.Argument(
            metavar="MODULE:ATTR", help="The Node to run, e.g. nodes.examples.echo:node"
        ),
    ],
    nats: NatsUrl = DEFAULT_URL,
    verbose: Verbose = False,
) -> None:
    """Run one agent node process until SIGTERM/Ctrl-C, then drain and exit.

    The node subscribes to its subjects (replicas share work through a queue group
    named after the agent), registers itself for `mesh nodes`, and answers the
    NATS micro discovery subjects. Traces are exported when OTEL_EXPORTER_OTLP_ENDPOINT is set.
    """
    from nodes._runner import load_node, run_process

    setup_logging(verbose)
    sys.path.insert(0, os.getcwd())
    node = load_node(app_spec)
    tracing = cli_tracing(node.name)
    if tracing is not None:
        from opentelemetry import trace

        trace.set_tracer_provider(tracing.provider)

    def ready(runtime: Any) -> None:
        subjects = ", ".join(h.subject for h in node.handlers)
        typer.secho(
            f"node {node.name} ({runtime.instance}) serving {subjects} on {nats}",
            err=True,
            fg=typer.colors.GREEN,
        )

    try:
        run_process(node, nats, tracing=tracing, on_ready=ready)
    except ConnectionFailed as exc:
        raise fail(str(exc), EXIT_UNREACHABLE) from None


@app.command()
@mesh_command
def request(
    subject: Annotated[str, typer.Argument(help="Subject to send the request to.")],
    payload: Annotated[
        str | None,
        typer.Argument(help="JSON payload, @FILE, or - for stdin (non-JSON is sent as text)."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(help="Seconds to wait for the reply.")
    ] = DEFAULT_REQUEST_TIMEOUT,
    nats: NatsUrl = DEFAULT_URL,
) -> None:
    """Send a request and print the reply as JSON."""
    validate_subject(subject)
    if not 0 < timeout <= MAX_TIMEOUT:  # also refuses nan
        raise fail(f"--timeout must be more than 0 and at most {MAX_TIMEOUT:g} seconds", EXIT_USAGE)
    body = parse_payload(payload)
    tracing = cli_tracing("mesh-cli")

    async def main() -> Any:
        async with await MeshClient.connect(nats, name="mesh-cli", tracing=tracing) as client:
            return await client.request(subject, body, timeout=timeout)

    try:
        reply = run(main())
    finally:
        if tracing is not None:
            tracing.shutdown()
    typer.echo(format_payload(reply))


@app.command()
@mesh_command
def publish(
    subject: Annotated[str, typer.Argument(help="Subject to publish to.")],
    payload: Annotated[
        str | None, typer.Argument(help="JSON payload, @FILE, or - for stdin.")
    ] = None,
    count: Annotated[int, typer.Option(min=1, help="How many copies to publish.")] = 1,
    reliable: Annotated[
        bool,
        typer.Option(
            "--reliable",
            help="Store each message in the subject's JetStream work queue and wait for "
            "its acknowledgement (a reliable handler takes them, even if it starts later).",
        ),
    ] = False,
    nats: NatsUrl = DEFAULT_URL,
) -> None:
    """Publish an event (fire-and-forget, or --reliable); shows progress for large counts."""
    validate_subject(subject)
    body = parse_payload(payload)
    tracing = cli_tracing("mesh-cli")

    async def main() -> float:
        async with await MeshClient.connect(nats, name="mesh-cli", tracing=tracing) as client:
            started = time.perf_counter()
            if count < 1000:
                for _ in range(count):
                    await client.publish(subject, body, reliable=reliable)
            else:
                from rich.progress import Progress

                with Progress(transient=True) as progress:
                    task = progress.add_task(f"publishing to {subject}", total=count)
                    step = max(1, count // 100)
                    for i in range(count):
                        await client.publish(subject, body, reliable=reliable)
                        if i % step == 0:
                            progress.update(task, completed=i)
            await client.flush(timeout=10)
            return time.perf_counter() - started

    try:
        elapsed = run(main())
    finally:
        if tracing is not None:
            tracing.shutdown()
    rate = f" ({count / elapsed:,.0f} msg/s)" if count >= 1000 and elapsed > 0 else ""
    stored = " (stored)" if reliable else ""
    typer.secho(f"published {count} message(s) to {subject}{stored}{rate}", err=True)


@app.command()
@mesh_command
def sub(
    pattern: Annotated[
        str, typer.Argument(help="Subject or pattern ('*' one token, '>' the rest).")
    ],
    count: Annotated[
        int, typer.Option(min=0, help="Exit after this many messages (0: run until Ctrl-C).")
    ] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    nats: NatsUrl = DEFAULT_URL,
) -> None:
    """Print messages as they pass: time, subject, sender and decoded payload."""
    validate_subject(pattern, wildcards=True)

    async def main() -> None:
        done = asyncio.Event()
        seen = 0

        async def show(msg: Message) -> None:
            nonlocal seen
            if count and seen >= count:
                return  # closing drains what is still queued: show no more than asked
            try:
                value: Any = msg.decode()
            except MeshError:
                value = msg.data
            env = msg.envelope
            if as_json:
                line = json.dumps(
                    {
                        "subject": msg.subject,
                        "sender": msg.sender,
                        "id": env.id if env else "",
                        "kind": env.kind.name.lower() if env else "plain",
                        "reply": msg.reply,
                        "payload": _json_value(value),
                    },
                    ensure_ascii=False,
                    allow_nan=False,
                )
            else:
                stamp = time.strftime("%H:%M:%S")
                sender = msg.sender or "-"
                line = f"{stamp} {msg.subject} [{sender}] {format_payload(value)}"
            typer.echo(line)
            seen += 1
            if count and seen >= count:
                done.set()

        async with await MeshClient.connect(nats, name="mesh-cli") as client:
            await client.subscribe(pattern, show)
            await client.flush()  # the server has the interest: nothing is missed
            typer.secho(f"listening on {pattern} — Ctrl-C to stop", err=True)
            await done.wait()

    run(main())


def _json_value(value: Any) -> Any:
    """A payload as a strict JSON value for ``--json`` output (else its text form)."""
    text = format_payload(value)
    try:
        parsed = json.loads(text)
        json.dumps(parsed, allow_nan=False)
    except ValueError:  # not JSON, or NaN/Infinity, which strict JSON has no words for
        return text
    return parsed


@app.command()
@mesh_command
def nodes(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    nats: NatsUrl = DEFAULT_URL,
) -> None:
    """List live node instances: name, instance id, subjects, host, uptime."""
    from nodes._registry import list_nodes

    async def main() -> list[Any]:
        async with await MeshClient.connect(nats, name="mesh-cli") as client:
            return await list_nodes(client)

    found = run(main())
    if as_json:
        import msgspec

        typer.echo(msgspec.json.encode(found).decode())
        return
    if not found:
        typer.secho("no live nodes (start one with `mesh node run MODULE:ATTR`)", err=True)
        return
    now = time.time()
    rows = [
        (n.name, n.instance, ",".join(n.subjects), f"{n.host}:{n.pid}", _uptime(now - n.started))
        for n in found
    ]
    typer.echo(format_table(rows, ("NAME", "INSTANCE", "SUBJECTS", "HOST:PID", "UPTIME")))


def _uptime(seconds: float) -> str:
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


# -- commands defined in their own modules register here ---------------------------
from mesh import _up  # noqa: E402

_up.register(app)
from mesh import _bench  # noqa: E402

_bench.register(app)
from mesh import _inspect  # noqa: E402

_inspect.register(app)
from mesh import _policy_cli  # noqa: E402

_policy_cli.register(app)
from mesh import _dlq_cli  # noqa: E402

_dlq_cli.register(app)


def main() -> None:
    """Entry point of the ``mesh`` console script."""
    app()
