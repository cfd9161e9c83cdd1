"""Node runtime against a real nats-server: dispatch, bounds, drain, registration, discovery."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import pytest
from _util import arun, eventually, retrying

from mesh import MeshClient, NoResponders, RemoteError, RequestTimeout
from mesh._errors import AppNotFound, InvalidName
from mesh._wire import Envelope, Kind, encode_frame
from nodes import Context, Node, NodeRuntime, list_nodes, load_node
from nodes._registry import HEARTBEAT, TTL

REPO = Path(__file__).resolve().parents[1]


class Task(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    n: int = 0


class Summary(msgspec.Struct, frozen=True, kw_only=True):
    text: str
    words: int


async def wait_for_responder(client: MeshClient, subject: str, timeout: float = 15.0) -> None:
    await retrying(
        lambda: client.request(subject, {"ping": True}, timeout=1),
        (NoResponders, RequestTimeout),
        timeout,
        interval=0.05,
    )


def spawn_node(url: str, spec: str, cwd: Path = REPO) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "mesh", "node", "run", spec, "--nats", url],
        cwd=cwd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stderr is not None:
        proc.stderr.close()


# ------------------------------------------------------------------ declaring nodes


def test_node_declaration_rules() -> None:
    node = Node("decl")
    with pytest.raises(InvalidName):
        Node("bad name")
    with pytest.raises(InvalidName):
        node.handles("a b")
    with pytest.raises(InvalidName):
        node.handles("a.b", queue="bad queue")
    with pytest.raises(ValueError, match="max_concurrency"):
        Node("x", max_concurrency=0)
    with pytest.raises(ValueError, match="positive"):
        node.handles("a.b", timeout=0)

    with pytest.raises(TypeError, match="async"):

        @node.handles("sync.handler")
        def sync(message: dict[str, Any]) -> None: ...

    with pytest.raises(TypeError, match="payload"):

        @node.handles("no.args")
        async def no_args() -> None: ...

    @node.handles("a.b")
    async def first(message: Task, ctx: Context) -> None: ...

    with pytest.raises(ValueError, match="already handles"):
        node.handles("a.b")
    node.handles("a.b", broadcast=True)  # a different (no) queue group is allowed
    (handler,) = node.handlers
    assert handler.input_type is Task
    assert handler.wants_context
    assert handler.queue == "decl"
    assert handler.name == "first"
    assert "a.b" in repr(node)


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ("nodes.examples.echo", "MODULE:ATTRIBUTE"),
        (":node", "MODULE:ATTRIBUTE"),
        ("nodes.examples.echo:", "MODULE:ATTRIBUTE"),
        ("no_such_module_xyz:node", "no module named"),
        ("nodes.examples.no_such:node", "no module named"),
        ("nodes.examples.echo:nope", "no attribute"),
        ("nodes.examples.echo:node.nope", "no attribute"),
        ("nodes.examples.echo:annotations", "not a nodes.Node"),
        ("nodes.examples.echo:Node", "not a nodes.Node"),
        ("json:dumps", "not a nodes.Node"),
    ],
)
def test_load_node_errors(spec: str, reason: str) -> None:
    with pytest.raises(AppNotFound) as info:
        load_node(spec)
    assert reason in str(info.value)
    assert info.value.spec == spec


def test_load_node() -> None:
    node = load_node("nodes.examples.echo:node")
    assert node.name == "echo"
    assert [h.subject for h in node.handlers] == ["demo.echo"]


# ------------------------------------------------------------------ handlers in process


def test_handler_input_types_and_context(nats_url: str) -> None:
    node = Node("typed")

    @node.handles("typed.struct")
    async def summarize(task: Task) -> Summary:
        return Summary(text=task.text.upper(), words=len(task.text.split()))

    @node.handles("typed.dict")
    async def keys(message: dict[str, Any]) -> list[str]:
        return sorted(message)

    @node.handles("typed.bytes")
    async def length(data: bytes) -> dict[str, Any]:
        return {"len": len(data), "type": type(data).__name__}

    @node.handles("typed.any")
    async def describe(value):  # type: ignore[no-untyped-def]
        return {"type": type(value).__name__}

    @node.handles("typed.context")
    async def whoami(message: dict[str, Any], ctx: Context) -> dict[str, Any]:
        return {
            "subject": ctx.subject,
            "sender": ctx.sender,
            "message_id": ctx.message_id,
            "node": ctx.node,
            "has_deadline": ctx.deadline_ns > time.time_ns(),
        }

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="typed") as server,
            NodeRuntime(node, server),
            await MeshClient.connect(nats_url, name="caller") as client,
        ):
            reply = await client.request("typed.struct", Task(text="hello big world"), type=Summary)
            assert reply == Summary(text="HELLO BIG WORLD", words=3)
            assert await client.request("typed.struct", {"text": "a b"}) == {
                "text": "A B",
                "words": 2,
            }
            assert await client.request("typed.dict", {"b": 1, "a": 2}) == ["a", "b"]
            assert await client.request("typed.bytes", b"\x00\x01\x02") == {
                "len": 3,
                "type": "bytes",
            }
            assert await client.request("typed.bytes", {"a": 1}) == {"len": 7, "type": "bytes"}
            assert await client.request("typed.any", {"a": 1}) == {"type": "dict"}
            assert await client.request("typed.any", [1]) == {"type": "list"}
            assert await client.request("typed.any", b"\xff") == {"type": "bytes"}
            ctx = await client.request("typed.context", {})
            assert ctx["subject"] == "typed.context"
            assert ctx["sender"] == "caller"
            assert len(ctx["message_id"]) == 22
            assert ctx["node"] == "typed"
            assert ctx["has_deadline"] is True

    arun(main())


def test_events_are_handled_without_reply(nats_url: str) -> None:
    node = Node("sink")
    got: list[dict[str, Any]] = []

    @node.handles("sink.events.>")
    async def collect(message: dict[str, Any], ctx: Context) -> None:
        got.append({"subject": ctx.subject, **message})

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="sink") as server,
            NodeRuntime(node, server, register=False),
        ):
            await server.publish("sink.events.a", {"i": 1})
            await server.publish("sink.events.b.c", {"i": 2})
            await eventually(lambda: len(got) == 2)
            assert sorted(g["subject"] for g in got) == ["sink.events.a", "sink.events.b.c"]

    arun(main())


def test_handler_exception_becomes_remote_error(nats_url: str) -> None:
    node = Node("faulty")

    @node.handles("faulty.div")
    async def divide(message: dict[str, Any]) -> float:
        return float(message["a"] / message["b"])

    @node.handles("faulty.timeout")
    async def own_timeout(message: Any) -> None:
        raise TimeoutError("the upstream API timed out")

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="faulty") as server,
            NodeRuntime(node, server, register=False),
        ):
            assert await server.request("faulty.div", {"a": 1, "b": 2}) == 0.5
            with pytest.raises(RemoteError) as info:
                await server.request("faulty.div", {"a": 1, "b": 0})
            assert info.value.error_type == "ZeroDivisionError"
            assert "division by zero" in info.value.error_message
            assert info.value.node == "faulty"
            with pytest.raises(RemoteError) as info:
                await server.request("faulty.div", {"a": 1})
            assert info.value.error_type == "KeyError"
            # A TimeoutError the handler raises itself is not a handler timeout.
            with pytest.raises(RemoteError) as info:
                await server.request("faulty.timeout", {})
            assert info.value.error_type == "TimeoutError"
            stats = node.handlers[0].stats
            assert (stats.requests, stats.errors) == (3, 2)
            assert stats.last_error.startswith("KeyError")
            # Still serving.
            assert await server.request("faulty.div", {"a": 3, "b": 1}) == 3.0

    arun(main())


def test_malformed_payload_for_a_struct_handler(nats_url: str) -> None:
    node = Node("strict")

    @node.handles("strict.task")
    async def handle(task: Task) -> str:
        return task.text

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="strict") as server,
            NodeRuntime(node, server, register=False),
        ):
            for bad in ({"txt": "missing field"}, {"text": 5}, [1, 2], b"\x00binary"):
                with pytest.raises(RemoteError) as info:
                    await server.request("strict.task", bad)
                assert info.value.error_type == "MalformedMessage"
                assert "Task" in info.value.error_message
            assert await server.request("strict.task", {"text": "fine"}) == "fine"
            assert node.handlers[0].stats.errors == 4

    arun(main())


def test_handler_timeout_is_a_remote_error(nats_url: str) -> None:
    node = Node("sleepy", handler_timeout=5)

    @node.handles("sleepy.task", timeout=0.2)
    async def sleep_forever(message: Any) -> None:
        await asyncio.sleep(30)

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="sleepy") as server,
            NodeRuntime(node, server, register=False),
        ):
            with pytest.raises(RemoteError) as info:
                await server.request("sleepy.task", {}, timeout=10)
            err = info.value
            assert not isinstance(err, RequestTimeout)
            assert not isinstance(err, TimeoutError)
            assert err.error_type == "HandlerTimeout"
            assert "sleep_forever" in err.error_message
            stats = node.handlers[0].stats
            assert stats.timeouts == 1
            assert stats.errors == 1

    arun(main())


def test_deadline_already_passed(nats_url: str) -> None:
    node = Node("punctual")
    calls: list[Any] = []

    @node.handles("punctual.task")
    async def handle(message: Any) -> str:
        calls.append(message)
        return "done"

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="punctual") as server,
            NodeRuntime(node, server, register=False),
        ):
            now = time.time_ns()
            envelope = Envelope(
                id=server.new_id(),
                sender="late",
                kind=Kind.REQUEST,
                created=now - 2_000_000_000,
                deadline=now - 1_000_000_000,
            )
            raw = await server.nc.request(
                "punctual.task", encode_frame(envelope, b'{"x": 1}'), timeout=5
            )
            with pytest.raises(RemoteError) as info:
                await server._read_reply("punctual.task", raw, Any)
            assert info.value.error_type == "DeadlineExceeded"
            assert calls == []
            stats = node.handlers[0].stats
            assert stats.timeouts == 1
            assert stats.errors == 1
            assert await server.request("punctual.task", {}) == "done"

    arun(main())


def test_replicas_share_a_queue_group(nats_url: str) -> None:
    node = Node("worker")
    handled: Counter[int] = Counter()
    by_replica: Counter[str] = Counter()

    @node.handles("work.do")
    async def work(message: dict[str, int], ctx: Context) -> str:
        handled[message["i"]] += 1
        by_replica[ctx.client.name] += 1
        return ctx.client.name

    events: list[str] = []

    @node.handles("work.config", broadcast=True)
    async def config(message: dict[str, Any], ctx: Context) -> None:
        events.append(ctx.client.name)

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="replica-a") as a,
            await MeshClient.connect(nats_url, name="replica-b") as b,
            NodeRuntime(node, a, register=False),
            NodeRuntime(node, b, register=False),
            await MeshClient.connect(nats_url, name="boss") as boss,
        ):
            replies = await asyncio.gather(
                *(boss.request("work.do", {"i": i}, timeout=10) for i in range(100))
            )
            assert set(replies) == {"replica-a", "replica-b"}
            assert sorted(handled) == list(range(100))
            assert set(handled.values()) == {1}
            assert by_replica["replica-a"] + by_replica["replica-b"] == 100
            assert by_replica["replica-a"] > 0
            assert by_replica["replica-b"] > 0

            await boss.publish("work.config", {"level": "debug"})
            await eventually(lambda: len(events) == 2)
            assert sorted(events) == ["replica-a", "replica-b"]

    arun(main())


def test_concurrency_is_bounded(nats_url: str) -> None:
    node = Node("bounded", max_concurrency=2)
    running = 0
    peak = 0

    @node.handles("bounded.task")
    async def work(message: dict[str, int]) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        try:
            await asyncio.sleep(0.03)
        finally:
            running -= 1
        return message["i"]

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="bounded") as server,
            NodeRuntime(node, server, register=False) as runtime,
            await MeshClient.connect(nats_url, name="caller") as client,
        ):
            results = await asyncio.gather(
                *(client.request("bounded.task", {"i": i}, timeout=10) for i in range(20))
            )
            assert sorted(results) == list(range(20))
            assert peak == 2
            assert runtime.inflight == 0

    arun(main())


def test_drain_answers_every_inflight_request(nats_url: str) -> None:
    node = Node("drainer")

    @node.handles("drain.slow")
    async def slow(message: dict[str, int]) -> int:
        await asyncio.sleep(0.3)
        return message["i"]

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="drainer") as server,
            await MeshClient.connect(nats_url, name="caller") as client,
        ):
            runtime = NodeRuntime(node, server)
            await runtime.start()
            requests = [
                asyncio.ensure_future(client.request("drain.slow", {"i": i}, timeout=10))
                for i in range(10)
            ]
            await eventually(lambda: runtime.inflight == 10)
            await runtime.aclose()
            assert runtime.inflight == 0
            results = await asyncio.gather(*requests)
            assert sorted(results) == list(range(10))
            await runtime.aclose()  # idempotent
            with pytest.raises(NoResponders):
                await client.request("drain.slow", {"i": 99}, timeout=5)

    arun(main())


def test_drain_timeout_bounds_shutdown(nats_url: str) -> None:
    """Past drain_timeout, running handlers are cancelled and queued requests refused:
    every requester hears back at once instead of waiting out the handler timeouts."""
    node = Node("stuck", max_concurrency=1, handler_timeout=20, drain_timeout=0.5)
    started = asyncio.Event()

    @node.handles("stuck.task")
    async def stuck(message: Any) -> None:
        started.set()
        await asyncio.sleep(20)

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="stuck") as server,
            await MeshClient.connect(nats_url, name="caller") as client,
        ):
            runtime = NodeRuntime(node, server, register=False)
            await runtime.start()
            requests = [
                asyncio.ensure_future(client.request("stuck.task", {"i": i}, timeout=8))
                for i in range(3)
            ]
            await asyncio.wait_for(started.wait(), 5)
            await server.flush()
            await runtime.aclose()
            results = await asyncio.gather(*requests, return_exceptions=True)
            for result in results:
                assert isinstance(result, RemoteError), result
                assert result.error_type == "Cancelled"

    arun(main(), timeout=12)


def test_a_request_arriving_at_shutdown_is_finished_not_cancelled(nats_url: str) -> None:
    """A message received while intake stops still runs to completion."""
    node = Node("late", drain_timeout=5)

    @node.handles("late.task")
    async def late(message: dict[str, int]) -> int:
        await asyncio.sleep(0.3)
        return message["n"]

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="late") as server,
            await MeshClient.connect(nats_url, name="caller") as client,
        ):
            runtime = NodeRuntime(node, server, register=False)
            await runtime.start()
            request = asyncio.ensure_future(client.request("late.task", {"n": 7}, timeout=5))
            await client.flush()  # sent, and very likely not handled yet
            await runtime.aclose()
            assert await request == 7

    arun(main())


def test_a_foreign_cancellation_is_a_handler_error_and_the_node_survives(
    nats_url: str,
) -> None:
    node = Node("fragile", max_concurrency=2)

    @node.handles("fragile.task")
    async def fragile(message: dict[str, bool]) -> str:
        if message["boom"]:
            future = asyncio.get_running_loop().create_future()
            future.cancel()
            await future  # CancelledError that nobody sent to this task
        return "ok"

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="fragile") as server,
            await MeshClient.connect(nats_url, name="caller") as client,
            NodeRuntime(node, server, register=False),
        ):
            for _ in range(4):  # more than max_concurrency: no slot may be lost
                with pytest.raises(RemoteError) as info:
                    await client.request("fragile.task", {"boom": True}, timeout=5)
                assert info.value.error_type == "CancelledError"
            assert await client.request("fragile.task", {"boom": False}, timeout=5) == "ok"

    arun(main())


def test_context_variables_do_not_leak_between_messages(nats_url: str) -> None:
    import contextvars

    user: contextvars.ContextVar[str] = contextvars.ContextVar("user", default="")
    node = Node("tenant", max_concurrency=1)

    @node.handles("tenant.task")
    async def handle(message: dict[str, str]) -> str:
        before = user.get()
        user.set(message["user"])
        return before

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="tenant") as server,
            await MeshClient.connect(nats_url, name="caller") as client,
            NodeRuntime(node, server, register=False),
        ):
            assert await client.request("tenant.task", {"user": "alice"}) == ""
            assert await client.request("tenant.task", {"user": "bob"}) == ""

    arun(main())


def test_shutdown_is_not_swallowed_by_a_timed_out_handler(nats_url: str) -> None:
    """A handler past its timeout, still cleaning up when the node shuts down, is
    cancelled by the shutdown too: nothing keeps running after aclose()."""
    node = Node("slowclean", handler_timeout=0.1, drain_timeout=0.3)
    cleaning = asyncio.Event()

    @node.handles("slowclean.task")
    async def handle(message: Any) -> None:
        try:
            await asyncio.sleep(10)
        finally:
            cleaning.set()
            await asyncio.sleep(10)  # cleanup that outlives the timeout

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="slowclean") as server,
            await MeshClient.connect(nats_url, name="caller") as client,
        ):
            runtime = NodeRuntime(node, server, register=False)
            await runtime.start()
            request = asyncio.ensure_future(client.request("slowclean.task", {}, timeout=5))
            await asyncio.wait_for(cleaning.wait(), 5)
            await runtime.aclose()
            assert runtime.inflight == 0
            with pytest.raises(RemoteError) as info:
                await request
            assert info.value.error_type in ("Cancelled", "HandlerTimeout")

    arun(main(), timeout=20)


# ------------------------------------------------------------------ registration and discovery


def test_registration_lists_and_removes_the_instance(nats_url: str) -> None:
    node = Node("registered", version="1.2.3")

    @node.handles("reg.a")
    async def a(message: Any) -> None: ...

    @node.handles("reg.b.>")
    async def b(message: Any) -> None: ...

    async def main() -> None:
        async with await MeshClient.connect(nats_url, name="observer") as observer:
            assert await list_nodes(observer) == []
            async with await MeshClient.connect(nats_url, name="registered") as client:
                started = time.time()
                runtime = NodeRuntime(node, client)
                async with runtime:
                    (info,) = await list_nodes(observer)
                    assert info.name == "registered"
                    assert info.instance == runtime.instance
                    assert info.version == "1.2.3"
                    assert info.subjects == ["reg.a", "reg.b.>"]
                    assert info.host == socket.gethostname()
                    assert info.pid == os.getpid()
                    assert abs(info.started - started) < 60
                    assert info.heartbeat >= info.started
                assert await list_nodes(observer) == []

    arun(main())


def test_killed_node_disappears_within_the_ttl(nats_url: str) -> None:
    proc = spawn_node(nats_url, "nodes.examples.echo:node")
    try:

        async def main() -> None:
            async with await MeshClient.connect(nats_url, name="observer") as client:
                await wait_for_responder(client, "demo.echo")
                found: list[Any] = []

                async def registered() -> bool:  # registers after subscribing
                    found[:] = await list_nodes(client)
                    return bool(found)

                await eventually(registered, 10, message="the node never registered")
                (info,) = found
                assert info.name == "echo"
                assert info.pid == proc.pid
                assert info.subjects == ["demo.echo"]
                proc.send_signal(signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 10)

                async def unlisted() -> bool:
                    return not await list_nodes(client)

                await eventually(
                    unlisted, TTL + HEARTBEAT + 5, 0.25, "a killed node is still listed"
                )

        arun(main(), timeout=40)
    finally:
        stop_process(proc)


def test_nats_micro_discovery(nats_url: str) -> None:
    node = Node("discoverable", version="2.0.1", description="for discovery tests")

    @node.handles("disc.ok")
    async def ok(message: Any) -> str:
        return "ok"

    @node.handles("disc.fail")
    async def fail(message: Any) -> None:
        raise RuntimeError("nope")

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_url, name="discoverable") as server,
            NodeRuntime(node, server, register=False) as runtime,
            await MeshClient.connect(nats_url, name="tool") as tool,
        ):
            for _ in range(3):
                assert await tool.request("disc.ok", {}) == "ok"
            with pytest.raises(RemoteError):
                await tool.request("disc.fail", {})

            async def ask(subject: str) -> dict[str, Any]:
                msg = await tool.nc.request(subject, b"", timeout=5)
                value: dict[str, Any] = json.loads(msg.data)
                return value

            iid = runtime.instance
            for subject in ("$SRV.PING", "$SRV.PING.discoverable", f"$SRV.PING.discoverable.{iid}"):
                ping = await ask(subject)
                assert ping["type"] == "io.nats.micro.v1.ping_response"
                assert ping["name"] == "discoverable"
                assert ping["id"] == iid
                assert ping["version"] == "2.0.1"

            info = await ask("$SRV.INFO.discoverable")
            assert info["type"] == "io.nats.micro.v1.info_response"
            assert info["description"] == "for discovery tests"
            assert info["id"] == iid
            assert [(e["name"], e["subject"], e["queue_group"]) for e in info["endpoints"]] == [
                ("ok", "disc.ok", "discoverable"),
                ("fail", "disc.fail", "discoverable"),
            ]

            stats = await ask(f"$SRV.STATS.discoverable.{iid}")
            assert stats["type"] == "io.nats.micro.v1.stats_response"
            assert stats["name"] == "discoverable"
            assert stats["id"] == iid
            assert stats["started"].endswith("Z")
            ok_stats, fail_stats = stats["endpoints"]
            assert ok_stats["name"] == "ok"
            assert ok_stats["subject"] == "disc.ok"
            assert (ok_stats["num_requests"], ok_stats["num_errors"]) == (3, 0)
            assert ok_stats["last_error"] == ""
            assert ok_stats["processing_time"] > 0
            assert ok_stats["average_processing_time"] == ok_stats["processing_time"] // 3
            assert (fail_stats["num_requests"], fail_stats["num_errors"]) == (1, 1)
            assert "nope" in fail_stats["last_error"]
            assert ok_stats["data"] == {"timeouts": 0}

            # Another service's name gets no answer from this node.
            with pytest.raises(nats.errors.NoRespondersError):
                await tool.nc.request("$SRV.PING.someone-else", b"", timeout=0.5)

    arun(main())


# ------------------------------------------------------------------ a node process under SIGTERM

_SLOW_AGENT = textwrap.dedent(
    """
    import asyncio
    from typing import Any

    from nodes import Node

    node = Node("slowagent", max_concurrency=8)


    @node.handles("slow.work")
    async def work(message: Any) -> Any:
        await asyncio.sleep(0.05)
        return message
    """
)


def test_sigterm_under_load_loses_nothing(nats_url: str, tmp_path: Path) -> None:
    (tmp_path / "slow_agent.py").write_text(_SLOW_AGENT)
    proc = spawn_node(nats_url, "slow_agent:node", cwd=tmp_path)
    outcomes: Counter[str] = Counter()
    try:

        async def main() -> None:
            async with await MeshClient.connect(nats_url, name="loader") as client:
                await wait_for_responder(client, "slow.work")
                stop = asyncio.Event()

                async def load(worker: int) -> None:
                    i = 0
                    while not stop.is_set():
                        i += 1
                        try:
                            reply = await client.request("slow.work", {"w": worker, "i": i})
                        except NoResponders:
                            outcomes["no_responders"] += 1
                            await asyncio.sleep(0.01)
                        except RequestTimeout:
                            outcomes["lost"] += 1
                        except RemoteError as exc:
                            outcomes[f"remote:{exc.error_type}"] += 1
                        else:
                            assert reply == {"w": worker, "i": i}
                            outcomes["ok"] += 1

                workers = [asyncio.ensure_future(load(w)) for w in range(16)]
                await eventually(lambda: outcomes["ok"] >= 50, 15)
                proc.send_signal(signal.SIGTERM)
                code = await asyncio.to_thread(proc.wait, 20)
                stop.set()
                await asyncio.gather(*workers)
                assert code == 0

        arun(main(), timeout=45)
    finally:
        stop_process(proc)
    assert outcomes["ok"] >= 50
    assert outcomes["lost"] == 0, outcomes
    assert set(outcomes) <= {"ok", "no_responders"}, outcomes
