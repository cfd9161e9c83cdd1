"""Answers the NATS micro discovery subjects, so standard NATS tooling
(``nats micro ls``, ``nats micro info``, ``nats micro stats``) sees every node.

Subjects: ``$SRV.{PING,INFO,STATS}``, ``….<name>`` and ``….<name>.<id>``; the
responses follow the ``io.nats.micro.v1`` JSON schemas.

A discovery request's body is never read, so nothing in it can fail to decode; what a
flood of them could do is fill memory, so each subscription holds at most
:data:`PENDING_MSGS` requests (NATS drops the rest: discovery is best effort).
"""

from __future__ import annotations

import datetime
import logging
from typing import TYPE_CHECKING, Any, Final

import msgspec
import nats.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mesh import MeshClient
from mesh._names import validate_agent_name, validate_instance

if TYPE_CHECKING:
    from nodes._node import Node

log = logging.getLogger("mesh.node")

_VERBS: Final = ("PING", "INFO", "STATS")
#: Discovery requests one subscription holds while they wait to be answered.
PENDING_MSGS: Final = 256
PENDING_BYTES: Final = 1024 * 1024
_encode = msgspec.json.Encoder().encode


class MicroResponder:
    """The discovery subscriptions of one node instance."""

    def __init__(self, node: Node, instance: str, client: MeshClient, started: float) -> None:
        self.node = node
        self.instance = instance
        self.client = client
        self.started = (
            datetime.datetime.fromtimestamp(started, datetime.UTC)
            .isoformat()
            .replace("+00:00", "Z")
        )
        self._subs: list[Subscription] = []

    async def start(self) -> None:
        nc = self.client.nc
        # The subjects are built from these: each must be one token.
        name = validate_agent_name(self.node.name)
        instance = validate_instance(self.instance)
        for verb in _VERBS:
            handler = self._handler(verb)
            for subject in (
                f"$SRV.{verb}",
                f"$SRV.{verb}.{name}",
                f"$SRV.{verb}.{name}.{instance}",
            ):
                self._subs.append(
                    await nc.subscribe(
                        subject,
                        cb=handler,
                        pending_msgs_limit=PENDING_MSGS,
                        pending_bytes_limit=PENDING_BYTES,
                    )
                )

    async def aclose(self) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # connection may already be gone at shutdown
                log.debug("unsubscribe %s: %s", sub.subject, exc)

    def _handler(self, verb: str) -> Any:
        build = {"PING": self.ping, "INFO": self.info, "STATS": self.stats}[verb]

        async def respond(msg: Msg) -> None:
            if not msg.reply:
                return
            try:
                await self.client.nc.publish(msg.reply, _encode(build()))
            except nats.errors.Error as exc:  # closing, or the reconnect buffer is full
                log.debug("discovery reply to %s not sent: %s", msg.reply, exc)

        return respond

    def _base(self, kind: str) -> dict[str, Any]:
        return {
            "type": f"io.nats.micro.v1.{kind}",
            "name": self.node.name,
            "id": self.instance,
            "version": self.node.version,
            "metadata": self.node.metadata,
        }

    def ping(self) -> dict[str, Any]:
        return self._base("ping_response")

    def info(self) -> dict[str, Any]:
        return {
            **self._base("info_response"),
            "description": self.node.description,
            "endpoints": [
                {
                    "name": h.name,
                    "subject": h.subject,
                    "queue_group": h.queue,
                    "metadata": None,
                }
                for h in self.node.handlers
            ],
        }

    def stats(self) -> dict[str, Any]:
        endpoints = []
        for h in self.node.handlers:
            s = h.stats
            endpoints.append(
                {
                    "name": h.name,
                    "subject": h.subject,
                    "queue_group": h.queue,
                    "num_requests": s.requests,
                    "num_errors": s.errors,
                    "last_error": s.last_error,
                    "processing_time": s.processing_ns,
                    "average_processing_time": s.processing_ns // s.requests if s.requests else 0,
                    "data": {"timeouts": s.timeouts},
                }
            )
        return {**self._base("stats_response"), "started": self.started, "endpoints": endpoints}
