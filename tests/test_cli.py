"""The ``mesh`` command line, run as a subprocess against a real nats-server."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer
from _util import arun, free_port, wait_until

from mesh import MeshClient, Message
from mesh._cli import app
from mesh._server import NatsServer
from nodes import Node, NodeRuntime

REPO = Path(__file__).resolve().parents[1]

echo = Node("echo")


@echo.handles("demo.echo")
async def _echo(message: Any) -> Any:
    return message


@echo.handles("demo.fail")
async def _fail(message: Any) -> None:
    raise ValueError("the input was wrong")


@dataclass
class Result:
    code: int
    out: str
    err: str

    def clean_failure(self, code: int) -> None:
        """A user mistake: the exit code, one `error:` line, and no traceback."""
        assert self.code == code, self
        assert "error:" in self.err, self
        assert "Traceback" not in self.out + self.err, self


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "OTEL_"))}
    env["NO_COLOR"] = "1"
    env.update(extra or {})
    return env


def _argv(args: tuple[str, ...]) -> list[str]:
    return [sys.executable, "-m", "mesh", *args]


@contextlib.asynccontextmanager
async def running(*args: str) -> AsyncIterator[asyncio.subprocess.Process]:
    """``mesh ARGS`` in the background, its output piped; killed on the way out."""
    proc = await asyncio.create_subprocess_exec(
        *_argv(args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(),
        cwd=REPO,
    )
    try:
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def finish(
    proc: asyncio.subprocess.Process, sig: int | None = None, timeout: float = 30
) -> tuple[str, str]:
    """Signal ``proc`` (if ``sig``), wait for it to exit, and return its stdout and stderr."""
    if sig is not None:
        proc.send_signal(sig)
    out, err = await asyncio.wait_for(proc.communicate(), timeout)
    return out.decode(), err.decode()


async def amesh(
    *args: str,
    env: dict[str, str] | None = None,
    stdin: bytes | None = None,
    timeout: float = 30,
    cwd: Path = REPO,
) -> Result:
    """Run ``mesh ARGS`` to completion (bounded by ``timeout``)."""
    proc = await asyncio.create_subprocess_exec(
        *_argv(args),
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=_env(env),
        cwd=cwd,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


def mesh(*args: str, env: dict[str, str] | None = None, timeout: float = 30) -> Result:
    return arun(amesh(*args, env=env, timeout=timeout), timeout + 5)


async def read_until(stream: asyncio.StreamReader, marker: str, timeout: float = 15) -> str:
    """Read lines until one contains ``marker``; return everything read."""
    seen = ""
    async with asyncio.timeout(timeout):
        while marker not in seen:
            line = await stream.readline()
            if not line:
                raise AssertionError(f"stream ended before {marker!r}; got:\n{seen}")
            seen += line.decode()
    return seen


@pytest.fixture
def dead_url() -> str:
    return f"nats://127.0.0.1:{free_port()}"


# ------------------------------------------------------------------ request


def test_request_prints_the_json_reply(nats_url: str) -> None:
    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="echo") as client,
            NodeRuntime(echo, client, register=False),
        ):
            result = await amesh("request", "demo.echo", '{"text":"hi"}', "--nats", nats_url)
            assert result.code == 0, result
            assert json.loads(result.out) == {"text": "hi"}
            assert "Traceback" not in result.err

            # MESH_NATS_URL instead of --nats; plain text instead of JSON.
            result = await amesh("request", "demo.echo", "hello", env={"MESH_NATS_URL": nats_url})
            assert result.code == 0, result
            assert result.out.strip() == "hello"

            # The payload from stdin and from a file.
            result = await amesh("request", "demo.echo", "-", "--nats", nats_url, stdin=b"[1,2]")
            assert json.loads(result.out) == [1, 2]

            # A handler's exception is a clean exit 1 naming it.
            result = await amesh("request", "demo.fail", "{}", "--nats", nats_url)
            result.clean_failure(1)
            assert "ValueError" in result.err
            assert "the input was wrong" in result.err

    arun(main(), timeout=60)


def test_request_payload_from_a_file(nats_url: str, tmp_path: Path) -> None:
    payload = tmp_path / "task.json"
    payload.write_text('{"from": "file"}')

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="echo") as client,
            NodeRuntime(echo, client, register=False),
        ):
            ok, missing = await asyncio.gather(
                amesh("request", "demo.echo", f"@{payload}", "--nats", nats_url),
                amesh("request", "demo.echo", f"@{tmp_path / 'nope.json'}", "--nats", nats_url),
            )
            assert json.loads(ok.out) == {"from": "file"}
            missing.clean_failure(2)
            assert "cannot read payload file" in missing.err

    arun(main(), timeout=60)


def test_no_responders(nats_url: str) -> None:
    result = mesh("request", "nobody.home", "{}", "--nats", nats_url)
    result.clean_failure(1)
    assert "no responders" in result.err


def test_request_timeout(nats_url: str) -> None:
    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="silent") as client:

            async def ignore(msg: Any) -> None:
                pass

            await client.subscribe("silent.x", ignore)
            await client.flush()
            result = await amesh(
                "request", "silent.x", "{}", "--timeout", "0.3", "--nats", nats_url
            )
            result.clean_failure(1)
            assert "no reply" in result.err

    arun(main(), timeout=60)


# ------------------------------------------------------------------ publish and sub


def test_publish_while_sub_receives(nats_url: str) -> None:
    async def main() -> None:
        async with running("sub", "tasks.>", "--count", "5", "--json", "--nats", nats_url) as sub:
            assert sub.stderr is not None
            await read_until(sub.stderr, "listening")
            pub = await amesh(
                "publish", "tasks.x", '{"a":1}', "--count", "5000", "--nats", nats_url, timeout=60
            )
            assert pub.code == 0, pub
            assert "published 5000 message(s) to tasks.x" in pub.err
            out, err = await finish(sub)
        assert sub.returncode == 0, err
        lines = out.splitlines()
        assert len(lines) == 5, lines[:10]
        for line in lines:
            record = json.loads(line)
            assert record["subject"] == "tasks.x"
            assert record["sender"] == "mesh-cli"
            assert record["kind"] == "event"
            assert record["payload"] == {"a": 1}
            assert record["id"]
        assert "Traceback" not in err

    arun(main(), timeout=90)


def test_sub_shows_plain_messages(nats_url: str) -> None:
    async def main() -> None:
        async with running("sub", "plain.*", "--count", "2", "--nats", nats_url) as sub:
            assert sub.stderr is not None
            await read_until(sub.stderr, "listening")
            async with await MeshClient.connect(nats_url, name="teller") as client:
                await client.publish("plain.a", {"k": "v"})
                await client.nc.publish("plain.b", b"raw text")
            out, _ = await finish(sub)
        first, second = out.splitlines()
        assert 'plain.a [teller] {"k": "v"}' in first
        assert "plain.b [-] raw text" in second

    arun(main(), timeout=60)


# ------------------------------------------------------------------ nodes


def test_nodes_table_and_json(nats_url: str) -> None:
    async def main() -> None:
        empty = await amesh("nodes", "--nats", nats_url)
        assert empty.code == 0, empty
        assert empty.out == ""
        assert "no live nodes" in empty.err
        assert (await amesh("nodes", "--json", "--nats", nats_url)).out.strip() == "[]"
        async with (
            await MeshClient.connect(nats_url, name="echo") as client,
            NodeRuntime(echo, client) as runtime,
        ):
            table, as_json = await asyncio.gather(
                amesh("nodes", "--nats", nats_url), amesh("nodes", "--json", "--nats", nats_url)
            )
        assert table.code == 0, table
        header, row = table.out.splitlines()
        assert header.split() == ["NAME", "INSTANCE", "SUBJECTS", "HOST:PID", "UPTIME"]
        cells = row.split()
        assert cells[:3] == ["echo", runtime.instance, "demo.echo,demo.fail"]
        assert cells[3] == f"{socket.gethostname()}:{os.getpid()}"
        assert cells[4].endswith("s")
        assert as_json.code == 0, as_json
        (info,) = json.loads(as_json.out)
        assert info["name"] == "echo"
        assert info["instance"] == runtime.instance
        assert info["subjects"] == ["demo.echo", "demo.fail"]
        assert info["pid"] == os.getpid()
        assert info["host"] == socket.gethostname()

    arun(main(), timeout=60)


def test_nodes_without_jetstream() -> None:
    with NatsServer(jetstream=False, monitor_port=None) as server:
        result = mesh("nodes", "--nats", server.url)
    result.clean_failure(1)
    assert "JetStream" in result.err


BAD_SPECS = {
    "nodes.examples.echo": "MODULE:ATTRIBUTE",
    "no_such_module_xyz:node": "no module named",
    "nodes.examples.echo:missing": "no attribute",
    "nodes.examples.echo:Node": "not a nodes.Node",
    "json:dumps": "not a nodes.Node",
    "nodes.examples.echo:__doc__": "not a nodes.Node",
}


def test_node_run_with_a_bad_spec(dead_url: str) -> None:
    async def main() -> list[Result]:
        return await asyncio.gather(
            *(amesh("node", "run", spec, "--nats", dead_url) for spec in BAD_SPECS)
        )

    for (spec, reason), result in zip(BAD_SPECS.items(), arun(main(), 60), strict=True):
        result.clean_failure(1)
        assert reason in result.err, (spec, result)
        assert spec in result.err, (spec, result)


def test_node_run_serves_until_sigterm(nats_url: str) -> None:
    async def main() -> None:
        async with running("node", "run", "nodes.examples.echo:node", "--nats", nats_url) as proc:
            assert proc.stderr is not None
            banner = await read_until(proc.stderr, "serving")
            assert "node echo" in banner
            assert "demo.echo" in banner
            result = await amesh("request", "demo.echo", '{"n": 1}', "--nats", nats_url)
            assert json.loads(result.out) == {"n": 1}
            _, err = await finish(proc, signal.SIGTERM)
        assert proc.returncode == 0, err
        assert "Traceback" not in err

    arun(main(), timeout=60)


# ------------------------------------------------------------------ user mistakes


def test_invalid_subjects(nats_url: str) -> None:
    async def main() -> list[Result]:
        return await asyncio.gather(
            amesh("request", "a b", "{}", "--nats", nats_url),
            amesh("publish", "tasks.>", "{}", "--nats", nats_url),
            amesh("sub", "a.>.b", "--nats", nats_url),
            amesh("request", "$SRV.PING", "--nats", nats_url),
        )

    spaces, wildcard, misplaced, reserved = arun(main(), timeout=60)
    for result in (spaces, wildcard, misplaced, reserved):
        result.clean_failure(1)
        assert "invalid subject" in result.err
    assert "without spaces" in spaces.err
    assert "only allowed when subscribing" in wildcard.err
    assert "last token" in misplaced.err
    assert "reserved" in reserved.err


def test_unreachable_server(dead_url: str) -> None:
    async def main() -> list[Result]:
        return await asyncio.gather(
            amesh("request", "demo.echo", "{}", "--nats", dead_url),
            amesh("publish", "demo.echo", "{}", "--nats", dead_url),
            amesh("sub", "demo.>", "--nats", dead_url),
            amesh("nodes", "--nats", dead_url),
            amesh("node", "run", "nodes.examples.echo:node", "--nats", dead_url),
            amesh("request", "demo.echo", "{}", env={"MESH_NATS_URL": dead_url}),
        )

    for result in arun(main(), timeout=60):
        result.clean_failure(3)
        assert dead_url in result.err
        assert "mesh server" in result.err


def _command_paths() -> Iterator[tuple[str, ...]]:
    def walk(command: Any, path: tuple[str, ...]) -> Iterator[tuple[str, ...]]:
        yield path
        for name, sub in getattr(command, "commands", {}).items():  # a group's subcommands
            if not getattr(sub, "hidden", False):
                yield from walk(sub, (*path, name))

    yield from walk(typer.main.get_command(app), ())


def test_help_for_every_command() -> None:
    paths = list(_command_paths())
    assert {("request",), ("publish",), ("sub",), ("nodes",), ("server",), ("node", "run")} <= set(
        paths
    )

    async def main() -> list[Result]:
        sem = asyncio.Semaphore(8)

        async def help_for(path: tuple[str, ...]) -> Result:
            async with sem:
                return await amesh(*path, "--help")

        return await asyncio.gather(*(help_for(path) for path in paths))

    for path, result in zip(paths, arun(main(), timeout=90), strict=True):
        assert result.code == 0, (path, result)
        assert "Usage" in result.out, (path, result)
        assert len(result.out) > 100, (path, result)
        assert "Traceback" not in result.out + result.err
    bare = mesh()  # no arguments: the help, as a usage error
    assert "Usage" in bare.out + bare.err
    assert "Traceback" not in bare.out + bare.err


def test_unknown_command_and_bad_option() -> None:
    async def main() -> list[Result]:
        return await asyncio.gather(
            amesh("frobnicate"), amesh("publish", "x.y", "--count", "0", "--nats", "x")
        )

    for result in arun(main(), timeout=60):
        assert result.code == 2, result
        assert "Traceback" not in result.out + result.err


# ------------------------------------------------------------------ server


def test_server_starts_and_stops_on_sigint(tmp_path: Path) -> None:
    port = 0

    async def main() -> None:
        nonlocal port
        store = str(tmp_path / "store")
        server = ("server", "--port", "0", "--monitor-port", "0", "--store-dir", store)
        async with running(*server) as proc:
            assert proc.stderr is not None
            ready = await read_until(proc.stderr, "nats-server ready at")
            found = re.search(r"nats-server ready at nats://127\.0\.0\.1:(\d+)", ready)
            assert found, ready
            port = int(found.group(1))
            url = f"nats://127.0.0.1:{port}"
            async with await MeshClient.connect(url, name="visitor") as client:
                assert client.connected

                async def answer(msg: Any) -> None:
                    await client.respond(msg, "pong")

                await client.subscribe("ping.x", answer)
                assert await client.request("ping.x", {}) == "pong"
            _, err = await finish(proc, signal.SIGINT)
        assert proc.returncode == 0, err
        assert "Traceback" not in err

    arun(main(), timeout=60)

    # The server is really gone: its port is free again.
    def port_closed() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) != 0

    assert wait_until(port_closed, 10), "nats-server still listening after SIGINT"


def test_server_on_a_busy_port(nats_server: NatsServer) -> None:
    result = mesh("server", "--port", str(nats_server.port), "--monitor-port", "-1")
    result.clean_failure(1)
    assert "nats-server did not start" in result.err
    assert "address already in use" in result.err


def test_version() -> None:
    from mesh import __version__

    result = mesh("--version")
    assert result.code == 0
    assert result.out.strip() == f"natsmesh {__version__}"


def test_bad_timeouts_are_usage_errors(nats_url: str) -> None:
    async def main() -> list[Result]:
        return await asyncio.gather(
            *(
                amesh("request", "demo.echo", "{}", "--timeout", value, "--nats", nats_url)
                for value in ("0", "-1", "nan", "inf", "1e12")
            )
        )

    for result in arun(main(), timeout=60):
        result.clean_failure(2)
        assert "--timeout" in result.err


def test_binary_and_stdin_payloads_are_sent_as_bytes(nats_url: str, tmp_path: Path) -> None:
    blob = tmp_path / "blob.bin"
    blob.write_bytes(b"\xff\x00\xfe binary")

    async def main() -> tuple[Result, Result, list[bytes]]:
        got: list[bytes] = []
        done = asyncio.Event()

        async def keep(msg: Message) -> None:
            got.append(msg.data)
            if len(got) == 2:
                done.set()

        async with await MeshClient.connect(nats_url, name="keeper") as client:
            await client.subscribe("bin.x", keep)
            await client.flush()
            from_file = await amesh("publish", "bin.x", f"@{blob}", "--nats", nats_url)
            from_stdin = await amesh("publish", "bin.x", "-", "--nats", nats_url, stdin=b"\xff")
            await asyncio.wait_for(done.wait(), 10)
        return from_file, from_stdin, got

    from_file, from_stdin, got = arun(main(), timeout=60)
    assert from_file.code == 0, from_file
    assert from_stdin.code == 0, from_stdin
    assert sorted(got) == sorted([b"\xff\x00\xfe binary", b"\xff"])


def test_node_module_that_fails_to_import(tmp_path: Path, dead_url: str) -> None:
    (tmp_path / "broken_agent.py").write_text("raise RuntimeError('no API key configured')\n")
    result = arun(
        amesh("node", "run", "broken_agent:node", "--nats", dead_url, cwd=tmp_path), timeout=40
    )
    result.clean_failure(1)
    assert "importing 'broken_agent' failed: RuntimeError: no API key configured" in result.err
