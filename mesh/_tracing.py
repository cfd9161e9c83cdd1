"""OpenTelemetry glue: spans on every hop, joined by W3C context in the envelope.

Tracing is configured by the standard ``OTEL_*`` variables (read by
:func:`tracing_from_env`, called only by entry points). With no exporter
endpoint set, :func:`tracing_from_env` returns ``None`` and the message path
does no tracing work beyond passing the upstream context along.

Sampling is parent-based. The envelope's ``trace`` field is a ``traceparent``,
``"0"`` when the chain was not sampled, or empty. An unsampled chain carries
``"0"`` downstream, so no hop ever creates a span object for it: the cost of
tracing that is on but unsampled is a context-variable read and a comparison.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Mapping
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags

from mesh._wire import TRACE_NONE, TRACE_UNSAMPLED

log = logging.getLogger("mesh.tracing")

# The trace field to put on messages sent from the current task.
current_trace: contextvars.ContextVar[str] = contextvars.ContextVar(
    "mesh_trace", default=TRACE_NONE
)

_SYSTEM: Final = {"messaging.system": "nats"}


class Tracing:
    """Creates the mesh's spans for one process (one service name)."""

    def __init__(
        self, provider: TracerProvider, *, sample_ratio: float = 1.0, owns_provider: bool = True
    ) -> None:
        self.provider = provider
        self.sample_ratio = sample_ratio
        self._owns_provider = owns_provider
        self._tracer = provider.get_tracer("natsmesh")

    # -- outbound: publish and request ------------------------------------------------

    def start_outbound(self, name: str, kind: SpanKind, subject: str) -> tuple[Span | None, str]:
        """Start a PRODUCER or CLIENT span for a message about to leave.

        Returns the span (``None`` when not sampled) and the trace field to send.
        """
        field = current_trace.get()
        if field == TRACE_UNSAMPLED:
            return None, TRACE_UNSAMPLED
        parent = trace.get_current_span().get_span_context()
        if parent.is_valid:
            if not parent.trace_flags.sampled:
                return None, TRACE_UNSAMPLED
        elif self.sample_ratio <= 0.0:
            return None, TRACE_UNSAMPLED
        span = self._tracer.start_span(
            f"{name} {subject}",
            kind=kind,
            attributes={**_SYSTEM, "messaging.destination.name": subject},
        )
        if not span.is_recording():
            return None, TRACE_UNSAMPLED
        return span, traceparent(span.get_span_context())

    # -- inbound: a message arrived ----------------------------------------------------

    def start_inbound(
        self, name: str, kind: SpanKind, subject: str, field: str, attributes: dict[str, Any]
    ) -> Span | None:
        """Start a CONSUMER or SERVER span for a received message, or ``None``."""
        if field == TRACE_UNSAMPLED:
            return None
        parent_ctx = None
        if field:
            parent = parse_traceparent(field)
            if parent is None or not parent.trace_flags.sampled:
                return None
            parent_ctx = trace.set_span_in_context(NonRecordingSpan(parent))
        elif self.sample_ratio <= 0.0:
            return None
        attributes.update(_SYSTEM)
        attributes["messaging.destination.name"] = subject
        span = self._tracer.start_span(
            f"{name} {subject}", context=parent_ctx, kind=kind, attributes=attributes
        )
        if not span.is_recording():
            return None
        return span

    def shutdown(self, timeout: float = 5.0) -> None:
        """Flush pending spans and stop exporting (idempotent)."""
        if self._owns_provider:
            self.provider.force_flush(int(timeout * 1000))
            self.provider.shutdown()
            self._owns_provider = False


def activate(span: Span) -> tuple[object, contextvars.Token[str]]:
    """Make ``span`` current for the handler about to run; see :func:`deactivate`."""
    token = otel_context.attach(trace.set_span_in_context(span))
    return token, current_trace.set(traceparent(span.get_span_context()))


def deactivate(tokens: tuple[object, contextvars.Token[str]]) -> None:
    otel_token, trace_token = tokens
    current_trace.reset(trace_token)
    otel_context.detach(otel_token)  # type: ignore[arg-type]


def traceparent(ctx: SpanContext) -> str:
    """Format a W3C ``traceparent`` header value."""
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def parse_traceparent(value: str) -> SpanContext | None:
    """Parse a W3C ``traceparent``; ``None`` if it is not one."""
    parts = value.split("-")
    if len(parts) < 4 or len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if trace_id == 0 or span_id == 0:
        return None
    return SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))


# -- configuration from the environment ------------------------------------------------


def sampler_from_env(environ: Mapping[str, str]) -> tuple[Sampler, float]:
    """The parent-based sampler named by ``OTEL_TRACES_SAMPLER`` and its root ratio."""
    name = environ.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    if name in ("always_off", "parentbased_always_off"):
        ratio = 0.0
    elif name in ("traceidratio", "parentbased_traceidratio"):
        try:
            ratio = min(1.0, max(0.0, float(environ.get("OTEL_TRACES_SAMPLER_ARG", "1.0"))))
        except ValueError:
            log.warning("OTEL_TRACES_SAMPLER_ARG is not a number; sampling everything")
            ratio = 1.0
    else:
        if name not in ("always_on", "parentbased_always_on"):
            log.warning("unsupported OTEL_TRACES_SAMPLER=%r; sampling everything", name)
        ratio = 1.0
    root: Sampler = (
        ALWAYS_ON if ratio >= 1.0 else ALWAYS_OFF if ratio <= 0 else TraceIdRatioBased(ratio)
    )
    return ParentBased(root), ratio


def exporter_from_env(environ: Mapping[str, str]) -> SpanExporter | None:
    """The OTLP exporter the ``OTEL_*`` variables ask for, or ``None`` when unset."""
    exporters = environ.get("OTEL_TRACES_EXPORTER", "otlp").strip().lower()
    if exporters == "none":
        return None
    if exporters == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    if not (
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return None
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    raise ValueError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use grpc or http/protobuf"
    )


def tracing_from_env(service_name: str, environ: Mapping[str, str] | None = None) -> Tracing | None:
    """Build tracing for a process from ``OTEL_*`` variables; ``None`` if export is off."""
    env = os.environ if environ is None else environ
    exporter = exporter_from_env(env)
    if exporter is None:
        return None
    sampler, ratio = sampler_from_env(env)
    provider = TracerProvider(
        sampler=sampler, resource=Resource.create({"service.name": service_name})
    )
    provider.add_span_processor(BatchSpanProcessor(exporter, schedule_delay_millis=1000))
    return Tracing(provider, sample_ratio=ratio)
