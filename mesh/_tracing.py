"""OpenTelemetry glue: spans on every hop, joined by W3C context in the envelope.

Tracing is configured by the standard ``OTEL_*`` variables (read by
:func:`tracing_from_env`, called only by entry points). With no exporter
endpoint set, :func:`tracing_from_env` returns ``None`` and the message path
does no tracing work beyond passing the upstream context along.

Sampling is parent-based. The envelope's ``trace`` field is a ``traceparent``,
``"0"`` when the chain was not sampled, or empty. An unsampled chain carries
``"0"`` downstream, so no hop ever creates a span object for it: the cost of
tracing that is on but unsampled is a context-variable read and a comparison.
Whether a new trace starts at all (``OTEL_TRACES_SAMPLER_ARG``) is drawn by
:class:`Tracing` before any span exists, since an SDK span that its sampler
then drops costs several microseconds.
"""

from __future__ import annotations

import contextvars
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    Decision,
    ParentBased,
    Sampler,
    SamplingResult,
    TraceIdRatioBased,
)
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    Span,
    SpanContext,
    SpanKind,
    TraceFlags,
    TraceState,
)
from opentelemetry.util.types import Attributes

from mesh._wire import TRACE_NONE, TRACE_UNSAMPLED

log = logging.getLogger("mesh.tracing")

# The trace field to put on messages sent from the current task.
current_trace: contextvars.ContextVar[str] = contextvars.ContextVar(
    "mesh_trace", default=TRACE_NONE
)

_SYSTEM: Final = {"messaging.system": "nats"}
#: Batch export delay when ``OTEL_BSP_SCHEDULE_DELAY`` is unset (the SDK's 5 s is long
#: for a CLI user waiting to see a trace).
DEFAULT_SCHEDULE_DELAY_MS: Final = 1000
_random = random.random


class Tracing:
    """Creates the mesh's spans for one process (one service name).

    ``sample_ratio`` is the fraction of new traces (messages with no upstream
    context) to sample; :class:`Tracing` draws it before creating a span. Give
    ``provider`` a sampler that keeps such roots: the SDK default, or the one
    :func:`sampler_from_env` returns.
    """

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

        The parent is the current OpenTelemetry span (the handler's span, or the
        application's own), else the trace field of the message being handled.
        Returns the span (``None`` when not sampled) and the trace field to send.
        """
        field = current_trace.get()
        if field == TRACE_UNSAMPLED:
            return None, TRACE_UNSAMPLED
        ctx = otel_context.get_current()
        parent = trace.get_current_span(ctx).get_span_context() if ctx else None
        if parent is None or not parent.is_valid:
            parent = parse_traceparent(field) if field else None
            if parent is None:
                # A new trace, drawn here: cheaper than an SDK span its sampler drops.
                ratio = self.sample_ratio
                if ratio < 1.0 and (ratio <= 0.0 or _random() >= ratio):
                    return None, TRACE_UNSAMPLED
                span = self._tracer.start_span(
                    f"{name} {subject}", kind=kind, attributes=_root_attributes(name, subject)
                )
                if not span.is_recording():
                    return None, TRACE_UNSAMPLED
                return span, traceparent(span.get_span_context())
            ctx = trace.set_span_in_context(NonRecordingSpan(parent))
        if not parent.trace_flags.sampled:
            return None, TRACE_UNSAMPLED
        span = self._tracer.start_span(
            f"{name} {subject}",
            context=ctx,
            kind=kind,
            attributes={
                **_SYSTEM,
                "messaging.operation.name": name,
                "messaging.destination.name": subject,
            },
        )
        if not span.is_recording():
            return None, TRACE_UNSAMPLED
        return span, traceparent(span.get_span_context())

    # -- inbound: a message arrived ----------------------------------------------------

    def start_inbound(
        self,
        name: str,
        kind: SpanKind,
        subject: str,
        field: str,
        attributes: Callable[[], dict[str, Any]],
    ) -> Span | None:
        """Start a CONSUMER or SERVER span for a received message, or ``None``.

        ``attributes`` is called only when a span is started: an unsampled message
        does not pay for building them.
        """
        if field == TRACE_UNSAMPLED:
            return None
        if field:
            # The last hex digit of a version-00 traceparent holds the sampled bit:
            # an unsampled context from a foreign producer is turned down unparsed.
            if len(field) == _TRACEPARENT_LEN and field[-1] not in _ODD_HEX:
                return None
            parent = parse_traceparent(field)
            if parent is None:
                return None
            extra = attributes()
            extra.update(_SYSTEM)
            extra["messaging.operation.name"] = name
            extra["messaging.destination.name"] = subject
            span = self._tracer.start_span(
                f"{name} {subject}",
                context=trace.set_span_in_context(NonRecordingSpan(parent)),
                kind=kind,
                attributes=extra,
            )
        else:
            ratio = self.sample_ratio
            if ratio < 1.0 and (ratio <= 0.0 or _random() >= ratio):
                return None
            root = _root_attributes(name, subject)
            root.update(attributes())
            span = self._tracer.start_span(f"{name} {subject}", kind=kind, attributes=root)
        if not span.is_recording():
            return None
        return span

    def shutdown(self, timeout: float = 5.0) -> None:
        """Flush pending spans and stop exporting, in at most ``timeout`` seconds
        (idempotent). An exporter still retrying an absent collector is abandoned:
        a process must not hang on its way out for the sake of its traces.
        """
        if not self._owns_provider:
            return
        self._owns_provider = False
        provider = self.provider
        closed = threading.Event()

        def close() -> None:
            provider.force_flush(int(timeout * 1000))
            provider.shutdown()
            closed.set()

        threading.Thread(target=close, name="mesh-trace-flush", daemon=True).start()
        if not closed.wait(timeout):
            log.warning("traces: could not flush within %gs; the rest are dropped", timeout)


_TRACEPARENT_LEN: Final = 55
_ODD_HEX: Final = frozenset("13579bdfBDF")


class _Drawn(dict[str, Any]):
    """The attributes of a root span :class:`Tracing` has already drawn for sampling.

    Its type tells :class:`_RootSampler` not to draw a second time.
    """

    __slots__ = ()


def _root_attributes(name: str, subject: str) -> _Drawn:
    root = _Drawn(_SYSTEM)
    root["messaging.operation.name"] = name
    root["messaging.destination.name"] = subject
    return root


class _RootSampler(Sampler):
    """Samples new traces: the mesh's as :class:`Tracing` drew them, others by trace id."""

    def __init__(self, ratio: float) -> None:
        self._by_id = TraceIdRatioBased(ratio)

    def should_sample(
        self,
        parent_context: otel_context.Context | None,
        trace_id: int,
        name: str,
        kind: SpanKind | None = None,
        attributes: Attributes = None,
        links: Sequence[Link] | None = None,
        trace_state: TraceState | None = None,
    ) -> SamplingResult:
        if type(attributes) is _Drawn:
            return SamplingResult(Decision.RECORD_AND_SAMPLE, attributes, trace_state)
        return self._by_id.should_sample(
            parent_context, trace_id, name, kind, attributes, links, trace_state
        )

    def get_description(self) -> str:
        return f"MeshRoot{{{self._by_id.rate}}}"


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
    if (
        len(parts) < 4
        or len(parts[0]) != 2
        or parts[0] in ("ff", "FF")  # forbidden version
        or (parts[0] == "00" and len(parts) != 4)  # version 00 has exactly four fields
        or len(parts[1]) != 32
        or len(parts[2]) != 16
        or len(parts[3]) != 2
    ):
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
    """The parent-based sampler named by ``OTEL_TRACES_SAMPLER`` and its root ratio.

    Supported: ``always_on``, ``always_off``, ``traceidratio`` (ratio from
    ``OTEL_TRACES_SAMPLER_ARG``) and their ``parentbased_`` forms; sampling is
    always parent-based, since a hop follows the decision made upstream.
    """
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
    root: Sampler = ALWAYS_ON if ratio >= 1.0 else ALWAYS_OFF if ratio <= 0 else _RootSampler(ratio)
    return ParentBased(root), ratio


def exporter_from_env(environ: Mapping[str, str]) -> SpanExporter | None:
    """The span exporter the ``OTEL_*`` variables ask for, or ``None`` when unset.

    ``OTEL_TRACES_EXPORTER`` is ``otlp`` (the default), ``console`` or ``none``;
    OTLP exports only when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or its ``TRACES_``
    form) is set, over ``OTEL_EXPORTER_OTLP_PROTOCOL`` ``grpc`` (the default) or
    ``http/protobuf``. Headers, timeout, compression and TLS files are read by
    the exporter from the process environment. Raises :class:`ValueError` for
    an unsupported exporter or protocol.
    """
    names = {n.strip().lower() for n in environ.get("OTEL_TRACES_EXPORTER", "otlp").split(",")} - {
        ""
    }
    unknown = names - {"otlp", "console", "none"}
    if unknown:
        raise ValueError(
            f"OTEL_TRACES_EXPORTER={environ['OTEL_TRACES_EXPORTER']!r} is not supported:"
            " use otlp, console or none"
        )
    if "otlp" not in names:
        if "console" in names:
            from opentelemetry.sdk.trace.export import ConsoleSpanExporter

            return ConsoleSpanExporter()
        return None
    traces_endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
    endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    if not (traces_endpoint or endpoint):
        return None
    protocol = (
        environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or environ.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "grpc"
    ).strip()
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=traces_endpoint or endpoint)
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        # The signal-specific endpoint is the full URL; the general one is a base.
        return HttpExporter(endpoint=traces_endpoint or f"{endpoint.rstrip('/')}/v1/traces")
    raise ValueError(
        f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use grpc or http/protobuf"
    )


def tracing_from_env(service_name: str, environ: Mapping[str, str] | None = None) -> Tracing | None:
    """Build tracing for a process from ``OTEL_*`` variables; ``None`` if export is off.

    ``service_name`` becomes the ``service.name`` resource attribute. Raises
    :class:`ValueError` when a variable asks for something unsupported.
    """
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return None
    exporter = exporter_from_env(env)
    if exporter is None:
        return None
    sampler, ratio = sampler_from_env(env)
    provider = TracerProvider(
        sampler=sampler,
        resource=Resource.create({"service.name": service_name}),
        shutdown_on_exit=False,  # Tracing.shutdown flushes, with a bound
    )
    _quiet_exporter_logs()
    provider.add_span_processor(
        BatchSpanProcessor(
            exporter,
            schedule_delay_millis=_positive_int(
                env, "OTEL_BSP_SCHEDULE_DELAY", DEFAULT_SCHEDULE_DELAY_MS
            ),
        )
    )
    return Tracing(provider, sample_ratio=ratio)


def _positive_int(environ: Mapping[str, str], name: str, default: int) -> int:
    text = environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        log.warning("%s=%r is not a positive integer; using %d", name, text, default)
        return default
    return value


class _EveryMinute(logging.Filter):
    """Lets one record a minute through: an absent collector is said once, not per batch."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._last = -interval

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        return True


def _quiet_exporter_logs() -> None:
    for name in (
        "opentelemetry.exporter.otlp.proto.grpc.exporter",
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry.sdk.trace.export",
        "opentelemetry.sdk._shared_internal",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _EveryMinute) for f in logger.filters):
            logger.addFilter(_EveryMinute())
