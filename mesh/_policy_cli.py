"""``mesh policy``: read and write the per-subject policy.

``set`` writes as the operator (``operator:<user>``), which may change pinned
sections, then waits until every live node instance acknowledges the new version
and says how long that took. ``--dict auto`` samples the subject's live traffic,
trains a zstd dictionary on it, stores it and points the policy at it.
"""

from __future__ import annotations

import asyncio
import getpass
import time
from typing import Annotated, Final

import msgspec
import typer

from mesh._client import DEFAULT_URL, MeshClient
from mesh._codec import CodecEngine
from mesh._dictionaries import DictionaryStore, sample_subject, train
from mesh._enforcer import APPLIED_SUBJECT, AppliedTracker
from mesh._errors import InvalidName
from mesh._names import validate_subject
from mesh._policy import (
    MAX_ZSTD_LEVEL,
    MIN_ZSTD_LEVEL,
    CodecPolicy,
    PolicyRecord,
    policy_key,
)
from mesh._policy_store import PolicyStore
from topology._foreign import ForeignClient
from topology._match import matches

policy_app = typer.Typer(
    help="Read and write the per-subject policy (what nodes enforce, who decided, why).",
    no_args_is_help=True,
)

DEFAULT_WAIT: Final = 3.0
DEFAULT_SAMPLE_SECONDS: Final = 10.0
DEFAULT_SAMPLE_MESSAGES: Final = 2000

NatsUrl = Annotated[
    str,
    typer.Option("--nats", envvar="MESH_NATS_URL", help="NATS server URL(s), comma-separated."),
]
AsJson = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
Subject = Annotated[
    str, typer.Argument(help="The subject (wildcards allowed: the policy covers them all).")
]

_json = msgspec.json.Encoder()


def describe(record: PolicyRecord) -> str:
    """A section's value in a few words: ``zstd:3 dict 123 ≥256B``."""
    value = record.value
    if value.algorithm == "none":
        return "none"
    text = f"zstd:{value.level}"
    if value.dictionary:
        text += f" dict {value.dictionary}"
    return text + f" ≥{value.min_size}B"


def parse_codec(text: str) -> tuple[str, int]:
    """``none``, ``zstd`` or ``zstd:LEVEL`` → (algorithm, level)."""
    from mesh._cli import EXIT_USAGE, fail

    name, _, level_text = text.strip().lower().partition(":")
    if name == "none" and not level_text:
        return "none", 3
    if name != "zstd":
        raise fail(f"--codec {text!r}: use none, zstd or zstd:LEVEL", EXIT_USAGE)
    if not level_text:
        return "zstd", 3
    try:
        level = int(level_text)
    except ValueError:
        raise fail(f"--codec {text!r}: the level must be a whole number", EXIT_USAGE) from None
    if not MIN_ZSTD_LEVEL <= level <= MAX_ZSTD_LEVEL:
        raise fail(
            f"--codec {text!r}: zstd levels go from {MIN_ZSTD_LEVEL} to {MAX_ZSTD_LEVEL}",
            EXIT_USAGE,
        )
    return "zstd", level


def _check_subject(subject: str) -> None:
    from mesh._cli import EXIT_USAGE, fail

    try:
        validate_subject(subject, wildcards=True)
    except InvalidName as exc:
        raise fail(str(exc), EXIT_USAGE) from None


def _when(ns: int) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ns / 1e9))


def _rows(records: list[PolicyRecord]) -> str:
    rows = [
        (
            r.subject,
            r.section,
            describe(r),
            str(r.version),
            r.author,
            "pinned" if r.pinned else "",
            _when(r.time),
            r.reason,
        )
        for r in records
    ]
    headers = ("SUBJECT", "SECTION", "VALUE", "VERSION", "AUTHOR", "PIN", "UPDATED", "REASON")
    from mesh._cli import format_table

    return format_table(rows, headers)


async def _store(client: MeshClient, *, create: bool) -> PolicyStore:
    return await PolicyStore.open(client, create=create)


@policy_app.command("ls")
def ls(as_json: AsJson = False, nats: NatsUrl = DEFAULT_URL) -> None:
    """Every subject's policy: section, value, version, author, pin, reason."""
    from mesh._cli import run

    async def main() -> tuple[list[PolicyRecord], int]:
        async with await MeshClient.connect(nats, name="mesh-cli") as client:
            store = await _store(client, create=True)
            return await store.list(), store.malformed

    records, malformed = run(main())
    if as_json:
        typer.echo(_json.encode(records).decode())
    elif not records:
        typer.secho(
            "no policy set: every subject uses the defaults "
            "(set one with `mesh policy set SUBJECT --codec zstd:3`)",
            err=True,
        )
    else:
        typer.echo(_rows(records))
    if malformed:
        typer.secho(f"{malformed} stored values did not decode and were skipped", err=True)


@policy_app.command("get")
def get(subject: Subject, as_json: AsJson = False, nats: NatsUrl = DEFAULT_URL) -> None:
    """One subject's policy, every section."""
    from mesh._cli import fail, run

    _check_subject(subject)

    async def main() -> list[PolicyRecord]:
        async with await MeshClient.connect(nats, name="mesh-cli") as client:
            store = await _store(client, create=True)
            found = [await store.get(subject, "codec")]
            return [r for r in found if r is not None]

    records = run(main())
    if as_json:
        typer.echo(_json.encode(records).decode())
    elif not records:
        raise fail(f"no policy for {subject!r}: it uses the defaults (codec none)")
    else:
        typer.echo(_rows(records))


@policy_app.command("history")
def history(
    subject: Subject,
    as_json: AsJson = False,
    nats: NatsUrl = DEFAULT_URL,
) -> None:
    """Every stored version of a subject's policy, oldest first (up to 64)."""
    from mesh._cli import fail, run

    _check_subject(subject)

    async def main() -> list[PolicyRecord | None]:
        async with await MeshClient.connect(nats, name="mesh-cli") as client:
            store = await _store(client, create=True)
            return await store.history(subject, "codec")

    entries = run(main())
    if as_json:
        typer.echo(_json.encode(entries).decode())
        return
    if not entries:
        raise fail(f"no policy was ever set for {subject!r}")
    rows = []
    for entry in entries:
        if entry is None:
            rows.append(("", "codec", "(removed)", "", "", "", "", ""))
        else:
            rows.append(
                (
                    entry.subject,
                    entry.section,
                    describe(entry),
                    str(entry.version),
                    entry.author,
                    "pinned" if entry.pinned else "",
                    _when(entry.time),
                    entry.reason,
                )
            )
    headers = ("SUBJECT", "SECTION", "VALUE", "VERSION", "AUTHOR", "PIN", "UPDATED", "REASON")
    from mesh._cli import format_table

    typer.echo(format_table(rows, headers))


@policy_app.command("set")
def set_(
    subject: Subject,
    codec: Annotated[
        str | None,
        typer.Option(help="none, zstd or zstd:LEVEL (1-19).", show_default=False),
    ] = None,
    dictionary: Annotated[
        str | None,
        typer.Option(
            "--dict",
            help="auto (train one on the subject's live traffic), an id, or none.",
            show_default=False,
        ),
    ] = None,
    min_size: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Bodies smaller than this go uncompressed (default 256).",
            show_default=False,
        ),
    ] = None,
    pin: Annotated[
        bool | None,
        typer.Option(
            "--pin/--unpin",
            help="Pin the section so sidecars leave it alone, or release it.",
            show_default=False,
        ),
    ] = None,
    reason: Annotated[
        str, typer.Option(help="One line saying why (shown in `mesh policy ls`).")
    ] = "set by hand",
    force: Annotated[
        bool,
        typer.Option(help="Compress even where a client outside the mesh subscribes."),
    ] = False,
    sample_seconds: Annotated[
        float, typer.Option(min=1, max=300, help="--dict auto: seconds of traffic to sample.")
    ] = DEFAULT_SAMPLE_SECONDS,
    wait: Annotated[
        float,
        typer.Option(min=0, max=60, help="Seconds to wait for every live node to apply it."),
    ] = DEFAULT_WAIT,
    monitor: Annotated[
        str | None,
        typer.Option(
            "--monitor",
            envvar="MESH_NATS_MONITOR",
            help="The server's monitoring URL, to find subscribers outside the mesh.",
            show_default=False,
        ),
    ] = None,
    nats: NatsUrl = DEFAULT_URL,
) -> None:
    """Set a subject's codec; every node applies it within a second.

    Examples: `mesh policy set demo.research --codec zstd:3 --dict auto`,
    `mesh policy set 'demo.>' --codec none --pin --reason "debugging"`.
    """
    from mesh._cli import EXIT_USAGE, fail, run
    from mesh._inspect import foreign_clients, monitor_url

    _check_subject(subject)
    if codec is None and dictionary is None and min_size is None and pin is None:
        raise fail("nothing to set: give --codec, --dict, --min-size or --pin/--unpin", EXIT_USAGE)
    if len(reason) > 200 or "\n" in reason:
        raise fail("--reason must be one line of at most 200 characters", EXIT_USAGE)
    algorithm, level = parse_codec(codec) if codec is not None else (None, None)
    dict_mode = (dictionary or "").strip().lower()
    dict_id: int | None = None
    if dict_mode not in ("", "auto", "none"):
        try:
            dict_id = int(dict_mode)
        except ValueError:
            raise fail(
                f"--dict {dictionary!r}: use auto, none or a dictionary id", EXIT_USAGE
            ) from None
        if dict_id <= 0:
            raise fail("--dict: a dictionary id is a positive number", EXIT_USAGE)
    if dict_mode == "auto" and any(c in subject.split(".") for c in ("*", ">")):
        raise fail(
            "--dict auto samples one subject's traffic; name a subject without wildcards",
            EXIT_USAGE,
        )
    author = f"operator:{_user()}"

    async def main() -> int:
        async with await MeshClient.connect(nats, name="mesh-cli") as client:
            store = await _store(client, create=True)
            current = await store.get(subject, "codec")
            base = current.value if current is not None else CodecPolicy()
            new_algorithm = algorithm or base.algorithm
            if dict_mode and algorithm is None and base.algorithm == "none":
                new_algorithm = "zstd"  # a dictionary only makes sense with zstd
            new_level = level if level is not None else base.level
            new_dict = base.dictionary
            dicts = DictionaryStore(client.nc.jetstream(timeout=5), None)
            if dict_mode == "none" or new_algorithm == "none":
                new_dict = 0
            elif dict_id is not None:
                await dicts.get(dict_id)  # DictionaryNotFound: a clear error, nothing written
                new_dict = dict_id
            elif dict_mode == "auto":
                new_dict = await _train(client, subject, new_level, sample_seconds)
            value = CodecPolicy(
                algorithm=new_algorithm,  # type: ignore[arg-type]
                level=new_level,
                dictionary=new_dict,
                min_size=min_size if min_size is not None else base.min_size,
            )
            if value.algorithm != "none" and not force:
                foreign, note = await foreign_clients(monitor_url(nats, monitor))
                _refuse_foreign(subject, foreign or [])
                if note:
                    _say(f"note: {note}")
            before = await _live_instances(client)
            acks = AppliedTracker()
            await client.subscribe(f"{APPLIED_SUBJECT}.>", acks.on_ack, internal=True)
            await client.flush()
            started = time.monotonic()
            record = await store.set(
                subject, value, author=author, reason=reason, pin=pin, operator=True
            )
            key = policy_key(subject, "codec")
            typer.echo(
                f"{subject}: codec {describe(record)} (version {record.version}"
                + (", pinned" if record.pinned else "")
                + ")"
            )
            if not before:
                _say("no live nodes to apply it now; nodes load it when they start")
                return 0
            done = await acks.wait(key, record.version, len(before), wait, among=before)
            elapsed = (time.monotonic() - started) * 1000
            if len(done) == len(before):
                typer.echo(
                    f"applied by {len(done)}/{len(before)} node instances in {elapsed:.0f} ms"
                )
                return 0
            missing = sorted(before.keys() - done)
            names = ", ".join(f"{before[i]}/{i[:8]}" for i in missing[:5])
            _say(
                f"applied by {len(done)}/{len(before)} node instances within {wait:g}s; "
                f"not yet: {names}{' …' if len(missing) > 5 else ''} "
                "(they keep their last good policy until they catch up)"
            )
            return 1

    code = run(main())
    if code:
        raise typer.Exit(code)


@policy_app.command("rm")
def rm(
    subject: Subject,
    reason: Annotated[str, typer.Option(help="One line saying why.")] = "removed by hand",
    nats: NatsUrl = DEFAULT_URL,
) -> None:
    """Remove a subject's codec policy: nodes go back to the defaults."""
    from mesh._cli import run

    _check_subject(subject)

    async def main() -> None:
        async with await MeshClient.connect(nats, name="mesh-cli") as client:
            store = await _store(client, create=True)
            await store.delete(
                subject, "codec", author=f"operator:{_user()}", reason=reason, operator=True
            )

    run(main())
    typer.echo(f"{subject}: codec policy removed (nodes use the defaults)")


# ------------------------------------------------------------------- helpers


def _user() -> str:
    try:
        return getpass.getuser()[:40] or "unknown"
    except (KeyError, OSError):  # no passwd entry (containers)
        return "unknown"


def _say(text: str) -> None:
    typer.secho(text, err=True)


def _refuse_foreign(subject: str, foreign: list[ForeignClient]) -> None:
    from mesh._cli import fail

    for client in foreign:
        for sub in client.subscriptions:
            if matches(sub.subject, subject) or matches(subject, sub.subject):
                raise fail(
                    f"{client.label} subscribes to {sub.subject!r}, outside the mesh: "
                    f"compressing {subject!r} would change the bytes it receives. "
                    "Use --force to compress anyway"
                )


async def _live_instances(client: MeshClient) -> dict[str, str]:
    """Live node instances (id → agent name) from the registry."""
    from nodes._registry import list_nodes

    return {n.instance: n.name for n in await list_nodes(client)}


async def _train(client: MeshClient, subject: str, level: int, seconds: float) -> int:
    """Sample ``subject``, train a dictionary, store it; return its id."""
    _say(f"sampling {subject} for up to {seconds:g}s (at most {DEFAULT_SAMPLE_MESSAGES} messages)…")
    store = DictionaryStore(client.nc.jetstream(timeout=5), None)
    engine = CodecEngine(store)
    samples = await sample_subject(
        client, subject, max_messages=DEFAULT_SAMPLE_MESSAGES, seconds=seconds, codec=engine
    )
    total = sum(len(s) for s in samples)
    _say(f"sampled {len(samples)} messages ({total / 1024:.0f} KiB); training…")
    data = await asyncio.to_thread(train, samples, subject=subject, level=level)
    plain, with_dict = _ratios(samples, data, level)
    store = await DictionaryStore.open(client)
    dictionary = await store.put(data, subject=subject, level=level, samples=len(samples))
    _say(
        f"dictionary {dictionary}: {len(data) / 1024:.0f} KiB; on the sample zstd:{level} "
        f"compresses {plain:.2f}:1 without it, {with_dict:.2f}:1 with it"
    )
    return dictionary


def _ratios(samples: list[bytes], data: bytes, level: int) -> tuple[float, float]:
    """Compression ratios (raw/compressed) of the samples without and with the dictionary."""
    import zstandard

    plain = zstandard.ZstdCompressor(level=level)
    with_dict = zstandard.ZstdCompressor(level=level, dict_data=zstandard.ZstdCompressionDict(data))
    raw = sum(len(s) for s in samples) or 1
    return (
        raw / max(1, sum(len(plain.compress(s)) for s in samples)),
        raw / max(1, sum(len(with_dict.compress(s)) for s in samples)),
    )


def register(app: typer.Typer) -> None:
    app.add_typer(policy_app, name="policy")
