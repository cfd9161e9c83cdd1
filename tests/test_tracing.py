"""Tracing: one trace per task across processes, exported over real OTLP receivers.

The end-to-end tests run ``mesh request`` and two ``mesh node run`` processes
(tests/trace_nodes.py) against a real nats-server, with the standard ``OTEL_*``
variables pointing at an OTLP receiver started in the test (tests/_otlp.py).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import grpc
import pytest
from _otlp import OtlpReceiver, SpanRecord
from _util import arun, free_port, wait_until
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
    OTLPSpanExporter as GrpcExporter,
)
from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
    OTLPSpanExporter as HttpExporter,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import ConsoleSpanExporter, SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import SpanContext, SpanKind, TraceFlags

from mesh import MeshClient
from mesh import _tracing as tracing_module
from mesh._tracing import (
    Tracing,
    _EveryMinute,
    activate,
    current_trace,
    deactivate,
    exporter_from_env,
    parse_traceparent,
    sampler_from_env,
    traceparent,
    tracing_from_env,
)
from mesh._wire import TRACE_UNSAMPLED
from nodes import list_nodes

REPO = Path(__file__).resolve().parents[1]
NODES = {"planner": "tests.trace_nodes:planner", "worker": "tests.trace_nodes:worker"}
PROTOCOLS = ["grpc", "http/protobuf"]
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0
CLI_TIMEOUT = 60.0
_PROXIES = {"http_proxy", "https_proxy", "all_proxy", "grpc_proxy", "no_proxy"}

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


# -- processes -----------------------------------------------------------------------


def _env(**otel: str) -> dict[str, str]:
    """This process's environment without OTEL_* or proxies, plus ``otel``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("OTEL_") and k.lower() not in _PROXIES
    }
    env["PYTHONUNBUFFERED"] = "1"
    env.update(otel)
    return env


def _export_env(receiver: OtlpReceiver, **extra: str) -> dict[str, str]:
    otel = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": receiver.protocol,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    return _env(**{**otel, **extra})


def _mesh(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def _request(url: str, env: dict[str, str]) -> Any:
    done = _mesh("request", "trace.plan", '{"n": 1}', "--nats", url, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def _live(url: str) -> set[str]:
    async with await MeshClient.connect(url, name="trace-test") as client:
        return {info.name for info in await list_nodes(client)}


class NodeProcesses:
    """The planner and worker node processes, each logging to a file."""

    def __init__(self, url: str, env: dict[str, str], logs: Path) -> None:
        self.url = url
        self.env = env
        self.logs = logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self) -> None:
        for name, spec in NODES.items():
            with (self.logs / f"{name}.log").open("wb") as log:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "mesh", "node", "run", spec, "--nats", self.url],
                    cwd=REPO,
                    env=self.env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )

        def registered() -> bool:
            exited = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
            assert not exited, f"node exited early {exited}:\n{self.output()}"
            return arun(_live(self.url), timeout=10) == set(NODES)

        assert wait_until(registered, START_TIMEOUT, 0.1), f"nodes not registered:\n{self.output()}"

    def stop(self) -> dict[str, int]:
        """SIGTERM every node (a clean shutdown) and return their exit codes."""
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        codes = {}
        for name, proc in self.procs.items():
            try:
                codes[name] = proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
                codes[name] = -9
        return codes

    def output(self) -> str:
        return "\n".join(
            f"--- {name}:\n{(self.logs / f'{name}.log').read_text(errors='replace')[-4000:]}"
            for name in self.procs
        )


@contextmanager
def _nodes(url: str, env: dict[str, str], logs: Path) -> Iterator[NodeProcesses]:
    nodes = NodeProcesses(url, env, logs)
    try:
        nodes.start()
        yield nodes
    finally:
        nodes.stop()


def _one(spans: list[SpanRecord], service: str, kind: str, name: str) -> SpanRecord:
    found = [s for s in spans if (s.service, s.kind, s.name) == (service, kind, name)]
    assert len(found) == 1, f"{service} {kind} {name!r}: {found}"
    return found[0]


# -- end to end ----------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_one_task_is_one_trace_across_three_processes(
    protocol: str, nats_url: str, tmp_path: Path
) -> None:
    with OtlpReceiver(protocol) as receiver:
        env = _export_env(receiver)
        with _nodes(nats_url, env, tmp_path) as nodes:
            assert _request(nats_url, env) == {"planned": 1, "result": {"doubled": 2}}
            assert nodes.stop() == {"planner": 0, "worker": 0}, nodes.output()
        spans = receiver.wait_for(lambda spans: len(spans) >= 6)

    assert len(spans) == 6, spans
    cli = _one(spans, "mesh-cli", "CLIENT", "request trace.plan")
    plan = _one(spans, "planner", "SERVER", "process trace.plan")
    call = _one(spans, "planner", "CLIENT", "request trace.work")
    work = _one(spans, "worker", "SERVER", "process trace.work")
    announce = _one(spans, "planner", "PRODUCER", "publish trace.done")
    consume = _one(spans, "worker", "CONSUMER", "process trace.done")

    assert {s.trace_id for s in spans} == {cli.trace_id}
    assert len({s.span_id for s in spans}) == 6
    assert cli.parent_span_id == ""
    assert plan.parent_span_id == cli.span_id
    assert call.parent_span_id == plan.span_id
    assert work.parent_span_id == call.span_id
    assert announce.parent_span_id == plan.span_id
    assert consume.parent_span_id == announce.span_id
    for span in spans:
        subject = span.name.split(" ", 1)[1]
        assert span.attributes["messaging.system"] == "nats", span
        assert span.attributes["messaging.destination.name"] == subject, span
        assert span.scope == "natsmesh"
    assert plan.attributes["messaging.consumer.group.name"] == "planner"
    assert work.attributes["messaging.consumer.group.name"] == "worker"
    for handled in (plan, work):
        assert handled.attributes["messaging.message.id"]  # the envelope id of the request
        assert handled.attributes["messaging.message.body.size"] > 0


@pytest.mark.slow
def test_spans_are_flushed_on_clean_shutdown(nats_url: str, tmp_path: Path) -> None:
    with OtlpReceiver("grpc") as receiver:
        # Nothing is exported on the timer during the test: only the shutdown flush sends.
        env = _export_env(receiver, OTEL_BSP_SCHEDULE_DELAY="600000")
        with _nodes(nats_url, env, tmp_path) as nodes:
            _request(nats_url, env)
            # The CLI has exited, so its span is in; the nodes still hold theirs.
            assert {s.service for s in receiver.spans()} == {"mesh-cli"}
            assert nodes.stop() == {"planner": 0, "worker": 0}, nodes.output()
        # Shutdown exports synchronously: no waiting needed.
        spans = receiver.spans()
    assert sorted(s.service for s in spans) == [
        "mesh-cli",
        "planner",
        "planner",
        "planner",
        "worker",
        "worker",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_nothing_is_exported_without_an_endpoint(
    protocol: str, nats_url: str, tmp_path: Path
) -> None:
    with OtlpReceiver(protocol) as receiver:
        env = _env(OTEL_EXPORTER_OTLP_PROTOCOL=protocol, OTEL_BSP_SCHEDULE_DELAY="100")
        with _nodes(nats_url, env, tmp_path) as nodes:
            assert _request(nats_url, env) == {"planned": 1, "result": {"doubled": 2}}
            assert nodes.stop() == {"planner": 0, "worker": 0}, nodes.output()
        assert receiver.requests == []
        assert receiver.rejected == []


@pytest.mark.slow
@pytest.mark.parametrize("where", ["everywhere", "cli-only"])
def test_unsampled_chain_exports_no_spans(where: str, nats_url: str, tmp_path: Path) -> None:
    # With only the CLI off, the nodes would sample a trace of their own if the
    # CLI's "0" (not sampled) marker did not reach them.
    with OtlpReceiver("grpc") as receiver:
        off = _export_env(receiver, OTEL_TRACES_SAMPLER="always_off")
        node_env = off if where == "everywhere" else _export_env(receiver)
        with _nodes(nats_url, node_env, tmp_path) as nodes:
            assert _request(nats_url, off) == {"planned": 1, "result": {"doubled": 2}}
            assert nodes.stop() == {"planner": 0, "worker": 0}, nodes.output()
        assert receiver.spans() == []
        assert receiver.rejected == []


@pytest.mark.parametrize("command", [["request", "trace.plan"], ["node", "run", NODES["worker"]]])
def test_bad_protocol_is_a_usage_error(command: list[str]) -> None:
    env = _env(
        OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:4317", OTEL_EXPORTER_OTLP_PROTOCOL="bogus"
    )
    # The setting is refused before connecting; a port nothing listens on makes
    # getting past it fail fast (exit 3) instead of serving.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    done = _mesh(*command, "--nats", f"nats://127.0.0.1:{closed_port}", env=env)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: ")
    assert "bogus" in lines[0]
    assert "http/protobuf" in lines[0]


# -- the receiver itself ------------------------------------------------------------


def _sdk_exporter(receiver: OtlpReceiver, gzip: bool) -> Any:
    if receiver.protocol == "grpc":
        compression = grpc.Compression.Gzip if gzip else grpc.Compression.NoCompression
        return GrpcExporter(endpoint=receiver.endpoint, compression=compression)
    return HttpExporter(
        endpoint=f"{receiver.endpoint}/v1/traces",
        compression=Compression.Gzip if gzip else Compression.NoCompression,
    )


@pytest.mark.parametrize("gzip", [False, True], ids=["plain", "gzip"])
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_receiver_decodes_what_the_sdk_sends(protocol: str, gzip: bool) -> None:
    with OtlpReceiver(protocol) as receiver:
        exporter = _sdk_exporter(receiver, gzip)
        provider = TracerProvider(resource=Resource.create({"service.name": "svc"}))
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("scope")
        with tracer.start_as_current_span("outer", kind=SpanKind.CLIENT) as sent:
            tracer.start_span("inner", attributes={"n": 3, "s": "x", "l": ["a"]}).end()
        provider.shutdown()
        spans = {s.name: s for s in receiver.wait_for(lambda spans: len(spans) == 2)}
    outer, inner = spans["outer"], spans["inner"]
    assert (outer.kind, outer.service, outer.scope) == ("CLIENT", "svc", "scope")
    assert outer.trace_id == f"{sent.get_span_context().trace_id:032x}"
    assert outer.span_id == f"{sent.get_span_context().span_id:016x}"
    assert outer.parent_span_id == ""
    assert inner.kind == "INTERNAL"
    assert inner.attributes == {"n": 3, "s": "x", "l": ["a"]}
    assert (inner.trace_id, inner.parent_span_id) == (outer.trace_id, outer.span_id)
    assert receiver.rejected == []


def test_http_receiver_turns_away_what_is_not_otlp() -> None:
    with OtlpReceiver("http/protobuf") as receiver:
        for path, content_type, status in [
            ("/v1/traces", "application/json", 415),
            ("/v1/metrics", "application/x-protobuf", 404),
            ("/v1/traces", "application/x-protobuf", 400),
        ]:
            post = urllib.request.Request(
                receiver.endpoint + path, data=b"\xff\xff not protobuf", method="POST"
            )
            post.add_header("Content-Type", content_type)
            with pytest.raises(urllib.error.HTTPError) as caught:
                urllib.request.urlopen(post, timeout=5)
            assert caught.value.code == status
            caught.value.close()
        assert len(receiver.rejected) == 3
        assert receiver.spans() == []
        with pytest.raises(TimeoutError, match="0 span"):
            receiver.wait_for(bool, timeout=0.1)


# -- traceparent ---------------------------------------------------------------------


def test_traceparent_round_trip() -> None:
    ctx = parse_traceparent(TP)
    assert ctx is not None
    assert ctx.trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert ctx.span_id == 0xB7AD6B7169203331
    assert ctx.trace_flags.sampled
    assert ctx.is_remote
    assert traceparent(ctx) == TP
    unsampled = SpanContext(1, 2, is_remote=False, trace_flags=TraceFlags(0))
    assert traceparent(unsampled) == f"00-{1:032x}-{2:016x}-00"
    parsed = parse_traceparent(traceparent(unsampled))
    assert parsed is not None
    assert not parsed.trace_flags.sampled
    assert (parsed.trace_id, parsed.span_id) == (1, 2)
    # A later version may append fields; its first four still read as version 00's.
    assert parse_traceparent("01" + TP[2:] + "-future") == ctx


@pytest.mark.parametrize(
    "value",
    [
        "",
        "0",
        "garbage",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",  # no flags
        "00-0af7651916cd43dd8448eb211c80319-b7ad6b7169203331-01",  # short trace id
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",  # short span id
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",  # short flags
        "00-zzf7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # not hex
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b71692033zz-01",
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-zz",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # zero trace id
        "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # zero span id
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # forbidden version
        "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",  # 00 has four fields
        "0-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # short version
    ],
)
def test_parse_traceparent_rejects(value: str) -> None:
    assert parse_traceparent(value) is None


# -- configuration from the environment --------------------------------------------


@pytest.mark.parametrize(
    ("environ", "ratio", "description"),
    [
        ({}, 1.0, "AlwaysOnSampler"),
        ({"OTEL_TRACES_SAMPLER": "always_on"}, 1.0, "AlwaysOnSampler"),
        ({"OTEL_TRACES_SAMPLER": "parentbased_always_on"}, 1.0, "AlwaysOnSampler"),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, 0.0, "AlwaysOffSampler"),
        ({"OTEL_TRACES_SAMPLER": "PARENTBASED_ALWAYS_OFF"}, 0.0, "AlwaysOffSampler"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"},
            0.25,
            "MeshRoot{0.25}",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.5"},
            0.5,
            "MeshRoot{0.5}",
        ),
        ({"OTEL_TRACES_SAMPLER": "traceidratio"}, 1.0, "AlwaysOnSampler"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "7"},
            1.0,
            "AlwaysOnSampler",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "-1"},
            0.0,
            "AlwaysOffSampler",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
            1.0,
            "AlwaysOnSampler",
        ),
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, 1.0, "AlwaysOnSampler"),
    ],
)
def test_sampler_from_env(environ: dict[str, str], ratio: float, description: str) -> None:
    sampler, got = sampler_from_env(environ)
    assert got == ratio
    # Always parent-based: a hop follows the upstream decision.
    assert sampler.get_description().startswith(f"ParentBased{{root:{description},")


def test_exporter_from_env_is_none_unless_asked() -> None:
    assert exporter_from_env({}) is None
    assert exporter_from_env({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}) is None
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317"}
    assert exporter_from_env({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) is None
    assert tracing_from_env("x", {}) is None
    assert tracing_from_env("x", {**endpoint, "OTEL_SDK_DISABLED": "true"}) is None


def test_exporter_from_env_grpc_by_default() -> None:
    for environ in (
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:14317"},
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:14317"},
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:14317", "OTEL_TRACES_EXPORTER": "otlp"},
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:14317",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "grpc",
        },
    ):
        exporter = exporter_from_env(environ)
        try:
            assert isinstance(exporter, GrpcExporter), environ
            # The endpoint comes from the mapping given, not from os.environ.
            assert exporter._endpoint == "127.0.0.1:14317"
        finally:
            assert exporter is not None
            exporter.shutdown()


@pytest.mark.parametrize(
    ("environ", "url"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318"}, "http://h:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318/"}, "http://h:4318/v1/traces"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:4318/custom"}, "http://h:4318/custom"),
    ],
)
def test_exporter_from_env_http_protobuf(environ: dict[str, str], url: str) -> None:
    exporter = exporter_from_env({**environ, "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"})
    try:
        assert isinstance(exporter, HttpExporter)
        assert exporter._endpoint == url
    finally:
        assert exporter is not None
        exporter.shutdown()


def test_exporter_from_env_console() -> None:
    assert isinstance(exporter_from_env({"OTEL_TRACES_EXPORTER": "console"}), ConsoleSpanExporter)


@pytest.mark.parametrize(
    "environ",
    [
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "bogus"},
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
        },
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317", "OTEL_TRACES_EXPORTER": "zipkin"},
    ],
)
def test_exporter_from_env_rejects_what_it_cannot_do(environ: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="is not supported"):
        exporter_from_env(environ)
    with pytest.raises(ValueError, match="is not supported"):
        tracing_from_env("x", environ)


def test_tracing_from_env_names_the_service() -> None:
    tracing = tracing_from_env(
        "planner",
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:14317", "OTEL_SERVICE_NAME": "other"},
    )
    assert tracing is not None
    try:
        assert tracing.provider.resource.attributes["service.name"] == "planner"
        assert tracing.sample_ratio == 1.0
    finally:
        tracing.shutdown()
        tracing.shutdown()  # idempotent


# -- spans, in process -----------------------------------------------------------------


def _tracing(ratio: float = 1.0) -> tuple[Tracing, InMemorySpanExporter]:
    exported = InMemorySpanExporter()
    environ = {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": str(ratio)}
    provider = TracerProvider(sampler=sampler_from_env(environ)[0])
    provider.add_span_processor(SimpleSpanProcessor(exported))
    return Tracing(provider, sample_ratio=ratio), exported


def test_outbound_starts_a_trace_and_inbound_continues_it() -> None:
    tracing, exported = _tracing()
    span, field = tracing.start_outbound("request", SpanKind.CLIENT, "a.b")
    assert span is not None
    assert field == traceparent(span.get_span_context())
    span.end()
    attributes: dict[str, Any] = {"messaging.client.id": "x"}
    server = tracing.start_inbound("process", SpanKind.SERVER, "a.b", field, lambda: attributes)
    assert server is not None
    tokens = activate(server)
    try:
        assert current_trace.get() == traceparent(server.get_span_context())
        child, child_field = tracing.start_outbound("publish", SpanKind.PRODUCER, "c.d")
        assert child is not None
        child.end()
    finally:
        deactivate(tokens)
        server.end()
    assert current_trace.get() == ""
    assert [s.name for s in exported.get_finished_spans()] == [
        "request a.b",
        "publish c.d",
        "process a.b",
    ]
    spans = {s.name: s for s in exported.get_finished_spans()}
    assert spans["request a.b"].parent is None
    assert spans["process a.b"].parent is not None
    assert spans["process a.b"].parent.span_id == span.get_span_context().span_id
    assert spans["publish c.d"].parent is not None
    assert spans["publish c.d"].parent.span_id == server.get_span_context().span_id
    assert dict(spans["process a.b"].attributes or {}) == {
        "messaging.client.id": "x",
        "messaging.system": "nats",
        "messaging.operation.name": "process",
        "messaging.destination.name": "a.b",
    }
    assert spans["publish c.d"].kind is SpanKind.PRODUCER
    assert child_field == traceparent(child.get_span_context())


def test_outbound_follows_the_trace_field_without_a_current_span() -> None:
    tracing, exported = _tracing()
    token = current_trace.set(TP)
    try:
        span, field = tracing.start_outbound("publish", SpanKind.PRODUCER, "a.b")
    finally:
        current_trace.reset(token)
    assert span is not None
    span.end()
    (finished,) = exported.get_finished_spans()
    assert finished.parent is not None
    assert traceparent(finished.parent) == TP
    assert field.split("-")[1] == TP.split("-")[1]


@pytest.mark.parametrize(
    "field", [TRACE_UNSAMPLED, "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"]
)
def test_an_unsampled_chain_makes_no_spans(field: str) -> None:
    tracing, exported = _tracing()
    assert tracing.start_inbound("process", SpanKind.SERVER, "a.b", field, dict) is None
    token = current_trace.set(field)
    try:
        assert tracing.start_outbound("publish", SpanKind.PRODUCER, "a.b") == (
            None,
            TRACE_UNSAMPLED,
        )
    finally:
        current_trace.reset(token)
    assert exported.get_finished_spans() == ()


def test_ratio_zero_starts_no_trace() -> None:
    tracing, exported = _tracing(0.0)
    assert tracing.start_outbound("publish", SpanKind.PRODUCER, "a.b") == (None, TRACE_UNSAMPLED)
    assert tracing.start_inbound("process", SpanKind.CONSUMER, "a.b", "", dict) is None
    # A sampled upstream context is still followed.
    span = tracing.start_inbound("process", SpanKind.CONSUMER, "a.b", TP, dict)
    assert span is not None
    span.end()
    assert len(exported.get_finished_spans()) == 1


def test_new_traces_are_drawn_once(monkeypatch: pytest.MonkeyPatch) -> None:
    tracing, exported = _tracing(0.5)
    monkeypatch.setattr(tracing_module, "_random", lambda: 0.75)
    assert tracing.start_outbound("publish", SpanKind.PRODUCER, "a.b") == (None, TRACE_UNSAMPLED)
    assert tracing.start_inbound("process", SpanKind.CONSUMER, "a.b", "", dict) is None
    # Drawn in: kept whatever the trace id (the provider's sampler does not draw again).
    monkeypatch.setattr(tracing_module, "_random", lambda: 0.25)
    for _ in range(100):
        span, _ = tracing.start_outbound("publish", SpanKind.PRODUCER, "a.b")
        assert span is not None
        span.end()
        inbound = tracing.start_inbound("process", SpanKind.CONSUMER, "a.b", "", dict)
        assert inbound is not None
        inbound.end()
    assert len(exported.get_finished_spans()) == 200


def test_application_root_spans_keep_the_trace_id_ratio() -> None:
    tracing, _ = _tracing(0.5)
    tracer = tracing.provider.get_tracer("app")
    bound = TraceIdRatioBased(0.5).bound
    decisions = set()
    for _ in range(100):
        span = tracer.start_span("app work")
        trace_id = span.get_span_context().trace_id
        assert span.is_recording() == (trace_id & TraceIdRatioBased.TRACE_ID_LIMIT < bound)
        decisions.add(span.is_recording())
        span.end()
    assert decisions == {True, False}


def test_shutdown_gives_up_on_an_absent_collector() -> None:
    """An exporter retrying a dead endpoint must not keep a process from exiting."""
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{free_port()}"}
    tracing = tracing_from_env("lonely", env)
    assert tracing is not None
    span, _ = tracing.start_outbound("publish", SpanKind.PRODUCER, "a.b")
    assert span is not None
    span.end()
    closer = threading.Thread(target=tracing.shutdown, kwargs={"timeout": 0.5}, daemon=True)
    closer.start()
    closer.join(15)
    assert not closer.is_alive(), "shutdown hung on an unreachable collector"


def test_exporter_complaints_are_rate_limited() -> None:
    limit = _EveryMinute()
    record = logging.LogRecord("x", logging.WARNING, __file__, 1, "collector down", None, None)
    assert limit.filter(record)
    assert not limit.filter(record)
    assert not limit.filter(record)
