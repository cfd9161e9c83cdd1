"""Real OTLP trace receivers for the tests: gRPC and HTTP/protobuf, on loopback.

Each collects the decoded ``ExportTraceServiceRequest`` protobufs it is sent and
flattens them into :class:`SpanRecord` rows::

    with OtlpReceiver("grpc") as receiver:
        env["OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.endpoint
        ...
        spans = receiver.wait_for(lambda spans: len(spans) >= 3)
"""

from __future__ import annotations

import gzip
import http.server
import threading
import time
import zlib
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any, Final

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span

ExportRequest = trace_service_pb2.ExportTraceServiceRequest
ExportResponse = trace_service_pb2.ExportTraceServiceResponse

DEFAULT_WAIT: Final = 15.0
_POLL: Final = 0.05
_MAX_BODY: Final = 64 * 1024 * 1024


@dataclass(frozen=True)
class SpanRecord:
    """One exported span, flattened."""

    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    kind: str  # an opentelemetry.trace.SpanKind name: "CLIENT", "SERVER"…
    service: str  # the resource's service.name
    attributes: dict[str, Any] = field(default_factory=dict)
    scope: str = ""


def any_value(value: AnyValue) -> Any:
    """The Python value of an OTLP ``AnyValue``."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return {kv.key: any_value(kv.value) for kv in value.kvlist_value.values}
    return getattr(value, which)


def flatten(request: Any) -> list[SpanRecord]:
    """Every span of an ``ExportTraceServiceRequest``, with its service name."""
    records = []
    for resource_spans in request.resource_spans:
        resource = {a.key: any_value(a.value) for a in resource_spans.resource.attributes}
        service = str(resource.get("service.name", ""))
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                records.append(
                    SpanRecord(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
                        service=service,
                        attributes={a.key: any_value(a.value) for a in span.attributes},
                        scope=scope_spans.scope.name,
                    )
                )
    return records


class OtlpReceiver:
    """Collects what OTLP exporters send; thread-safe.

    As a context manager it serves ``protocol`` on a free loopback port (at
    :attr:`endpoint`, the value for ``OTEL_EXPORTER_OTLP_ENDPOINT``) until exit.
    """

    def __init__(self, protocol: str) -> None:
        if protocol not in ("grpc", "http/protobuf"):
            raise ValueError(f"unknown OTLP protocol {protocol!r}")
        self.protocol = protocol
        self.endpoint = ""
        self._lock = threading.Lock()
        self._requests: list[Any] = []
        self._rejected: list[str] = []
        self._stop: Callable[[], None] | None = None

    # -- collection (called from server threads) ----------------------------------------

    def add(self, request: Any) -> None:
        with self._lock:
            self._requests.append(request)

    def reject(self, reason: str) -> None:
        with self._lock:
            self._rejected.append(reason)

    # -- reading -------------------------------------------------------------------------

    @property
    def requests(self) -> list[Any]:
        with self._lock:
            return list(self._requests)

    @property
    def rejected(self) -> list[str]:
        """Why requests were turned away (wrong path, content type, undecodable body)."""
        with self._lock:
            return list(self._rejected)

    def spans(self) -> list[SpanRecord]:
        return [span for request in self.requests for span in flatten(request)]

    def wait_for(
        self, predicate: Callable[[list[SpanRecord]], bool], timeout: float = DEFAULT_WAIT
    ) -> list[SpanRecord]:
        """Poll until ``predicate(spans)`` holds and return the spans; raise TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            spans = self.spans()
            if predicate(spans):
                return spans
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"OTLP receiver: condition not met within {timeout:g}s; got"
                    f" {len(spans)} span(s): {[(s.service, s.name) for s in spans]};"
                    f" rejected: {self.rejected}"
                )
            time.sleep(_POLL)

    # -- servers -------------------------------------------------------------------------

    def __enter__(self) -> OtlpReceiver:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def start(self) -> None:
        if self._stop is not None:
            raise RuntimeError("the receiver is already running")
        if self.protocol == "grpc":
            self._serve_grpc()
        else:
            self._serve_http()

    def _serve_grpc(self) -> None:
        pool = futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="otlp-grpc")
        server = grpc.server(pool)
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_TraceService(self), server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        self.endpoint = f"http://127.0.0.1:{port}"

        def stop() -> None:
            server.stop(grace=None).wait(timeout=5)
            pool.shutdown(wait=False)

        self._stop = stop

    def _serve_http(self) -> None:
        sink = self

        class Handler(_HttpHandler):
            receiver = sink

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        thread.start()
        self.endpoint = f"http://127.0.0.1:{server.server_address[1]}"

        def stop() -> None:
            server.shutdown()
            server.server_close()
            thread.join(timeout=5)

        self._stop = stop

    def close(self) -> None:
        """Stop serving (idempotent); what was collected stays readable."""
        stop, self._stop = self._stop, None
        if stop is not None:
            stop()


class _TraceService(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: OtlpReceiver) -> None:
        self.sink = sink

    def Export(self, request: Any, context: Any) -> Any:
        self.sink.add(request)
        return ExportResponse()


class _HttpHandler(http.server.BaseHTTPRequestHandler):
    receiver: OtlpReceiver
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length > _MAX_BODY:
            self._answer(413, b"")
            self.close_connection = True
            return
        body = self.rfile.read(length)
        if self.path != "/v1/traces":
            self.receiver.reject(f"POST {self.path}")
            self._answer(404, b"")
            return
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip()
        if content_type != "application/x-protobuf":
            self.receiver.reject(f"Content-Type {content_type!r}")
            self._answer(415, b"")
            return
        encoding = self.headers.get("Content-Encoding", "").strip().lower()
        try:
            if encoding == "gzip":
                body = gzip.decompress(body)
            elif encoding == "deflate":
                body = zlib.decompress(body)
            elif encoding not in ("", "identity"):
                raise ValueError(f"unknown Content-Encoding {encoding!r}")
            request = ExportRequest.FromString(body)
        except Exception as exc:  # a bad body is the exporter's bug: report it, answer 400
            self.receiver.reject(f"undecodable body: {exc}")
            self._answer(400, b"")
            return
        self.receiver.add(request)
        self._answer(200, ExportResponse().SerializeToString())

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # keep pytest output clean
