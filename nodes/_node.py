"""`Node`: an agent's declaration — its name and the subjects it handles.

A handler is an ``async def`` taking the decoded payload (a msgspec Struct,
``dict``, ``bytes``… as annotated) and, optionally, a :class:`Context`; what it
returns is the reply when the message was a request::

    node = Node("echo")

    @node.handles("demo.echo")
    async def echo(message: dict) -> dict:
        return message

Running the node (subscribing, dispatching, draining) is
:class:`nodes._runtime.NodeRuntime`'s job.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import msgspec

from mesh import MeshClient
from mesh._message import Message
from mesh._names import validate_agent_name, validate_queue_group, validate_subject
from mesh._reliable import BACKOFF, MAX_DELIVER

DEFAULT_MAX_CONCURRENCY: Final = 64
DEFAULT_HANDLER_TIMEOUT: Final = 30.0
DEFAULT_DRAIN_TIMEOUT: Final = 30.0
_SEMVER_DEFAULT: Final = "0.1.0"
MAX_DELIVER_LIMIT: Final = 100
MAX_BACKOFF: Final = 3600.0

HandlerFunc = Callable[..., Awaitable[Any]]


class Context:
    """What a handler knows about the message it is handling.

    ``publish`` and ``request`` carry the trace and the caller's deadline on to
    the next hop.
    """

    __slots__ = ("client", "message", "node")

    def __init__(self, node: str, message: Message, client: MeshClient) -> None:
        self.node = node
        self.message = message
        self.client = client

    @property
    def subject(self) -> str:
        return self.message.subject

    @property
    def message_id(self) -> str:
        env = self.message.envelope
        return env.id if env is not None else ""

    @property
    def sender(self) -> str:
        return self.message.sender

    @property
    def deadline_ns(self) -> int:
        """The requester's deadline as Unix nanoseconds, or 0 when it set none."""
        env = self.message.envelope
        return env.deadline if env is not None else 0

    async def publish(self, subject: str, payload: Any = b"", **kwargs: Any) -> None:
        await self.client.publish(subject, payload, **kwargs)

    async def request(self, subject: str, payload: Any = b"", **kwargs: Any) -> Any:
        return await self.client.request(subject, payload, **kwargs)


@dataclass
class HandlerStats:
    """Counters for one handler, as NATS micro `$SRV.STATS` reports them."""

    requests: int = 0
    errors: int = 0
    timeouts: int = 0
    processing_ns: int = 0
    last_error: str = ""


@dataclass
class Handler:
    """One subject an agent handles."""

    subject: str
    func: HandlerFunc
    queue: str
    timeout: float | None
    input_type: Any
    wants_context: bool
    name: str
    #: Fed from the subject's JetStream work-queue stream instead of a subscription.
    reliable: bool = False
    #: Reliable only: deliveries before the dead-letter stream, and the delays
    #: before each redelivery after a failure (the last one repeats).
    max_deliver: int = MAX_DELIVER
    backoff: tuple[float, ...] = BACKOFF
    stats: HandlerStats = field(default_factory=HandlerStats)


class Node:
    """An agent: a name, a version, and the handlers it runs.

    ``max_concurrency`` bounds the handlers running at once in one process;
    ``handler_timeout`` is the default limit for one handler call;
    ``drain_timeout`` bounds how long shutdown waits for in-flight work.
    """

    def __init__(
        self,
        name: str,
        *,
        version: str = _SEMVER_DEFAULT,
        description: str = "",
        max_concurrency: int = DEFAULT_MAX_CONCURRENCY,
        handler_timeout: float = DEFAULT_HANDLER_TIMEOUT,
        drain_timeout: float = DEFAULT_DRAIN_TIMEOUT,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.name = validate_agent_name(name)
        if max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if handler_timeout <= 0 or drain_timeout <= 0:
            raise ValueError("handler_timeout and drain_timeout must be positive")
        self.version = version
        self.description = description
        self.max_concurrency = max_concurrency
        self.handler_timeout = handler_timeout
        self.drain_timeout = drain_timeout
        self.metadata = dict(metadata or {})
        self.handlers: list[Handler] = []

    def __repr__(self) -> str:
        subjects = ", ".join(h.subject for h in self.handlers)
        return f"<Node {self.name} [{subjects}]>"

    def handles(
        self,
        subject: str,
        *,
        queue: str | None = None,
        broadcast: bool = False,
        timeout: float | None = None,
        reliable: bool = False,
        max_deliver: int = MAX_DELIVER,
        backoff: Sequence[float] = BACKOFF,
    ) -> Callable[[HandlerFunc], HandlerFunc]:
        """Register an async handler for ``subject`` (wildcards allowed).

        Replicas share the work through a queue group named after the agent
        (or ``queue``); with ``broadcast=True`` every instance gets every message.
        ``timeout`` overrides the node's ``handler_timeout`` for this handler.

        With ``reliable=True`` (a concrete subject, not broadcast) messages come from
        the subject's JetStream work-queue stream: each is acknowledged once the
        handler returns, redelivered with backoff when it raises or times out, and
        moved to ``_MESH.dlq.<subject>`` after ``max_deliver`` attempts; ``backoff``
        gives the delays (seconds) before the 2nd, 3rd... attempt, its last value
        repeating. What the handler returns is not sent anywhere (nobody waits for
        a reply).
        """
        validate_subject(subject, wildcards=True)
        if reliable and (broadcast or any(t in ("*", ">") for t in subject.split("."))):
            raise ValueError(
                f"reliable handlers take a concrete subject and a queue group, not {subject!r}"
                + (" with broadcast=True" if broadcast else "")
            )
        group = "" if broadcast else validate_queue_group(queue or self.name)
        if timeout is not None and timeout <= 0:
            raise ValueError("timeout must be positive")
        delays = tuple(float(d) for d in backoff)
        if not 1 <= max_deliver <= MAX_DELIVER_LIMIT:
            raise ValueError(f"max_deliver must be between 1 and {MAX_DELIVER_LIMIT}")
        if not delays or not all(0 <= d <= MAX_BACKOFF for d in delays):
            raise ValueError(f"backoff needs 1 or more delays between 0 and {MAX_BACKOFF:g}s")
        if any(h.subject == subject and h.queue == group for h in self.handlers):
            raise ValueError(f"{self.name} already handles {subject!r}")

        def register(func: HandlerFunc) -> HandlerFunc:
            if not inspect.iscoroutinefunction(func):
                raise TypeError(f"handler {func.__qualname__} must be an async function")
            input_type, wants_context = _signature(func)
            self.handlers.append(
                Handler(
                    subject=subject,
                    func=func,
                    queue=group,
                    timeout=timeout,
                    input_type=input_type,
                    wants_context=wants_context,
                    name=func.__name__,
                    reliable=reliable,
                    max_deliver=max_deliver,
                    backoff=delays,
                )
            )
            return func

        return register


def _signature(func: HandlerFunc) -> tuple[Any, bool]:
    """The payload type a handler takes and whether it also takes a Context."""
    params = list(inspect.signature(func).parameters.values())
    if not params or len(params) > 2:
        raise TypeError(
            f"handler {func.__qualname__} must take (payload) or (payload, ctx: Context)"
        )
    try:
        hints = typing.get_type_hints(func)
    except Exception:  # unresolvable annotations: fall back to plain JSON
        hints = {}
    input_type = hints.get(params[0].name, Any)
    if input_type is inspect.Parameter.empty:
        input_type = Any
    try:
        # Payloads are decoded into it (JSON or msgpack): a type msgspec cannot decode
        # is refused here, at declaration, not on every message as it arrives.
        msgspec.json.Decoder(input_type)
        msgspec.msgpack.Decoder(input_type)
    except TypeError as exc:
        raise TypeError(
            f"handler {func.__qualname__} takes a payload msgspec cannot decode: {exc}. "
            "Annotate it with a msgspec Struct, dict, list, bytes or another JSON type"
        ) from None
    return input_type, len(params) == 2
