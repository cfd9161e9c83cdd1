"""``mesh dlq``: the dead letters of reliable subjects — list, inspect, replay.

A dead letter is the original frame, stored on ``_MESH.dlq.<subject>`` in the
``MESH_DLQ`` stream with headers saying which subject, agent and how many attempts,
and why the last one failed. ``replay`` publishes it again, reliably, to its
subject (under a new ``Nats-Msg-Id``, so the stream does not drop it as a
duplicate) and then deletes the dead letter.
"""

from __future__ import annotations

import datetime
from typing import Annotated, Any, Final

import msgspec
import nats.errors
import nats.js.errors
import typer

from mesh._client import DEFAULT_URL, MeshClient
from mesh._errors import JetStreamUnavailable, MalformedMessage, MeshError
from mesh._names import validate_subject
from mesh._reliable import (
    DLQ_PREFIX,
    DLQ_STREAM,
    H_AGENT,
    H_ATTEMPTS,
    H_MSG_ID,
    H_REASON,
    H_STREAM_SEQ,
    H_SUBJECT,
    ReliableStreams,
    store,
)
from mesh._wire import ContentType, decode_frame, decode_payload

dlq_app = typer.Typer(
    help="Dead letters: reliable messages whose handler kept failing (list, show, replay).",
    no_args_is_help=True,
)

DEFAULT_LIMIT: Final = 50
#: Payload bytes `show` prints at most.
SHOW_BYTES: Final = 4096

NatsUrl = Annotated[
    str,
    typer.Option("--nats", envvar="MESH_NATS_URL", help="NATS server URL(s), comma-separated."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

_json = msgspec.json.Encoder()


class DeadLetter(msgspec.Struct, frozen=True, kw_only=True):
    """One dead letter, as `mesh dlq ls --json` prints it."""

    seq: int
    time: str
    subject: str
    msg_id: str
    agent: str
    attempts: int
    reason: str
    source: str  # stream:sequence it was taken from
    size: int


def _entry(raw: Any) -> DeadLetter:
    headers = raw.headers or {}
    subject = headers.get(H_SUBJECT) or (raw.subject or "").removeprefix(DLQ_PREFIX)
    try:
        attempts = int(headers.get(H_ATTEMPTS, "0"))
    except ValueError:
        attempts = 0
    when = raw.time.astimezone(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S") if raw.time else ""
    return DeadLetter(
        seq=raw.seq or 0,
        time=when,
        subject=subject,
        msg_id=headers.get(H_MSG_ID, ""),
        agent=headers.get(H_AGENT, ""),
        attempts=attempts,
        reason=headers.get(H_REASON, ""),
        source=headers.get(H_STREAM_SEQ, ""),
        size=len(raw.data or b""),
    )


async def _read(client: MeshClient, subject: str, limit: int, start: int = 1) -> list[Any]:
    """Up to ``limit`` dead letters of ``subject`` (wildcards allowed), oldest first."""
    jsm = client.nc.jsm(timeout=5)
    found: list[Any] = []
    seq = start
    while len(found) < limit:
        try:
            raw = await jsm.get_msg(
                DLQ_STREAM, seq=seq, subject=f"{DLQ_PREFIX}{subject}", next=True
            )
        except nats.js.errors.NotFoundError:
            break
        except nats.errors.NoRespondersError:
            raise JetStreamUnavailable("the dead letters", "no JetStream") from None
        found.append(raw)
        seq = (raw.seq or seq) + 1
    return found


async def _get(client: MeshClient, seq: int) -> Any | None:
    try:
        return await client.nc.jsm(timeout=5).get_msg(DLQ_STREAM, seq=seq)
    except nats.js.errors.NotFoundError:
        return None
    except nats.errors.NoRespondersError:
        raise JetStreamUnavailable("the dead letters", "no JetStream") from None


def _check_subject(subject: str) -> None:
    from mesh._cli import EXIT_USAGE, fail

    try:
        validate_subject(subject, wildcards=True)
    except MeshError as exc:
        raise fail(str(exc), EXIT_USAGE) from None


@dlq_app.command("ls")
def ls(
    subject: Annotated[
        str, typer.Argument(help="Only this subject's (wildcards allowed; default: all).")
    ] = ">",
    limit: Annotated[int, typer.Option(min=1, max=100_000, help="At most this many.")] = (
        DEFAULT_LIMIT
    ),
    as_json: AsJson = False,
    nats: NatsUrl = DEFAULT_URL,
) -> None:
    """Dead letters, oldest first: sequence, time, subject, agent, attempts, reason."""
    from mesh._cli import format_table, run

    _check_subject(subject)

    async def main() -> list[DeadLetter]:
        async with await MeshClient.connect(nats, name="mesh-cli") as client:
            await ReliableStreams(client.nc).ensure_dlq()
            return [_entry(raw) for raw in await _read(client, subject, limit)]

    entries = run(main())
    if as_json:
        typer.echo(_json.encode(entries).decode())
        return
    if not entries:
        typer.secho("no dead letters", err=True)
        return
    rows = [
        (
            str(e.seq),
            e.time,
            e.subject,
            e.agent,
            str(e.attempts),
            e.msg_id,
            e.reason if len(e.reason) <= 60 else e.reason[:59] + "…",
        )
        for e in entries
    ]
    typer.echo(
        format_table(rows, ("SEQ", "TIME (UTC)", "SUBJECT", "AGENT", "TRIES", "MSG ID", "REASON"))
    )
    if len(entries) == limit:
        typer.secho(f"(first {limit}; --limit shows more)", err=True)


@dlq_app.command("show")
def show(
    seq: Annotated[int, typer.Argument(min=1, help="The dead letter's sequence (from `ls`).")],
    as_json: AsJson = False,
    nats: NatsUrl = DEFAULT_URL,
) -> None:
    """One dead letter in full: where it came from, why it failed, its envelope and payload."""
    from mesh._cli import fail, run

    async def main() -> Any | None:
        async with await MeshClient.connect(nats, name="mesh-cli") as client:
            await ReliableStreams(client.nc).ensure_dlq()
            return await _get(client, seq)

    raw = run(main())
    if raw is None:
        raise fail(f"no dead letter #{seq} (`mesh dlq ls` lists them)")
    entry = _entry(raw)
    data: bytes = raw.data or b""
    details: dict[str, Any] = {"dead_letter": msgspec.to_builtins(entry)}
    try:
        envelope, body = decode_frame(data, entry.subject)
    except MalformedMessage as exc:
        details["frame"] = f"does not decode: {exc}"
        details["bytes"] = data[:SHOW_BYTES].hex()
    else:
        details["envelope"] = msgspec.to_builtins(envelope)
        details["payload"] = _payload(body, envelope.content_type, envelope.codec != 0)
    if as_json:
        typer.echo(_json.encode(details).decode())
        return
    for key, value in details["dead_letter"].items():
        typer.echo(f"{key + ':':<10} {value}")
    if "envelope" in details:
        typer.echo("envelope:  " + _json.encode(details["envelope"]).decode())
        typer.echo("payload:   " + str(details["payload"]))
    else:
        typer.echo("frame:     " + details["frame"])


def _payload(body: memoryview, content_type: ContentType, compressed: bool) -> Any:
    if compressed:
        return f"({len(body)} compressed bytes; replay to let a node decode them)"
    if content_type is ContentType.BYTES:
        return bytes(body[:SHOW_BYTES]).decode("utf-8", "replace")
    try:
        return decode_payload(body, content_type)
    except MalformedMessage as exc:
        return f"(does not decode: {exc})"


@dlq_app.command("replay")
def replay(
    seqs: Annotated[
        list[int] | None, typer.Argument(help="Dead letters to replay, by sequence.")
    ] = None,
    subject: Annotated[
        str, typer.Option("--subject", help="Replay every dead letter of this subject.")
    ] = "",
    replay_all: Annotated[bool, typer.Option("--all", help="Replay every dead letter.")] = False,
    keep: Annotated[
        bool, typer.Option("--keep", help="Keep the dead letters after replaying them.")
    ] = False,
    nats: NatsUrl = DEFAULT_URL,
) -> None:
    """Publish dead letters again, reliably, to their subjects; then delete them.

    Name them by sequence, or take all of one subject (--subject) or all (--all).
    A dead letter that cannot be published stays where it is.
    """
    from mesh._cli import EXIT_USAGE, fail, run

    chosen = sum([bool(seqs), bool(subject), replay_all])
    if chosen != 1:
        raise fail(
            "name dead letters by sequence, or give --subject or --all (one of them)", EXIT_USAGE
        )
    if subject:
        _check_subject(subject)

    async def main() -> tuple[int, list[str]]:
        async with await MeshClient.connect(nats, name="mesh-cli") as client:
            streams = ReliableStreams(client.nc)
            await streams.ensure_dlq()
            raws: list[Any]
            if seqs:
                found = [await _get(client, seq) for seq in seqs]
                missing = [str(s) for s, raw in zip(seqs, found, strict=True) if raw is None]
                if missing:
                    raise fail(f"no dead letter #{', #'.join(missing)}", EXIT_USAGE)
                raws = [raw for raw in found if raw is not None]
            else:
                raws = await _read(client, subject or ">", 1_000_000)
            done, problems = 0, []
            for raw in raws:
                entry = _entry(raw)
                try:
                    validate_subject(entry.subject)
                    await streams.ensure(entry.subject)
                    await store(
                        client.nc,
                        entry.subject,
                        raw.data or b"",
                        f"{entry.msg_id or 'dlq'}:replay:{entry.seq}",
                    )
                except MeshError as exc:
                    problems.append(f"#{entry.seq} ({entry.subject}): {exc}")
                    continue
                done += 1
                if not keep:
                    await client.nc.jsm(timeout=5).delete_msg(DLQ_STREAM, entry.seq)
            return done, problems

    done, problems = run(main())
    for problem in problems:
        typer.secho(f"not replayed: {problem}", err=True)
    typer.echo(f"replayed {done} dead letter{'s' if done != 1 else ''}")
    if problems:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(dlq_app, name="dlq")
