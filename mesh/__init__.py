"""natsmesh: a message-bus mesh for AI agents over NATS.

The library: the wire format, the client (publish / request / subscribe),
tracing glue, and the embedded nats-server launcher. Node processes live in
:mod:`nodes`; pure topology analysis in :mod:`topology`.
"""

from mesh._client import DEFAULT_REQUEST_TIMEOUT, DEFAULT_URL, MeshClient
from mesh._errors import (
    ClientClosed,
    ConnectionFailed,
    CredentialsRefused,
    FlushTimeout,
    InvalidCredentials,
    InvalidName,
    JetStreamUnavailable,
    MalformedMessage,
    MeshError,
    NatsServerError,
    NatsServerNotFound,
    NatsServerStartError,
    NoResponders,
    PayloadError,
    PayloadTooLarge,
    PermissionDenied,
    PublishBufferFull,
    PublishNotConfirmed,
    PublishRefused,
    ReliableError,
    ReliableSetupError,
    RemoteError,
    RequestError,
    RequestTimeout,
)
from mesh._message import ClientStats, Message, Subscription
from mesh._names import validate_agent_name, validate_subject
from mesh._tracing import Tracing, tracing_from_env
from mesh._wire import ContentType, Envelope, Kind

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_REQUEST_TIMEOUT",
    "DEFAULT_URL",
    "ClientClosed",
    "ClientStats",
    "ConnectionFailed",
    "ContentType",
    "CredentialsRefused",
    "Envelope",
    "FlushTimeout",
    "InvalidCredentials",
    "InvalidName",
    "JetStreamUnavailable",
    "Kind",
    "MalformedMessage",
    "MeshClient",
    "MeshError",
    "Message",
    "NatsServerError",
    "NatsServerNotFound",
    "NatsServerStartError",
    "NoResponders",
    "PayloadError",
    "PayloadTooLarge",
    "PermissionDenied",
    "PublishBufferFull",
    "PublishNotConfirmed",
    "PublishRefused",
    "ReliableError",
    "ReliableSetupError",
    "RemoteError",
    "RequestError",
    "RequestTimeout",
    "Subscription",
    "Tracing",
    "tracing_from_env",
    "validate_agent_name",
    "validate_subject",
]
