"""A JetStream cluster of real nats-server processes on loopback (tests, chaos, demos)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import time
from pathlib import Path

import nats
import nats.errors

from mesh._errors import NatsServerStartError
from mesh._server import DEFAULT_STOP_TIMEOUT, Lifecycle, NatsServer

__all__ = ["NatsCluster"]

logger = logging.getLogger("mesh.server")

DEFAULT_CLUSTER_START_TIMEOUT = 30.0


class NatsCluster(Lifecycle):
    """``size`` JetStream servers on loopback, routed to each other as one cluster.

    Servers are named n1, n2, ...; their stores live under ``base_dir`` (default: a
    temporary directory per server, removed on stop). JetStream syncs every write to
    disk before acknowledging it (``sync_interval: always``), as replicated reliable
    streams should.
    """

    def __init__(
        self,
        size: int = 3,
        *,
        cluster_name: str = "natsmesh",
        base_dir: str | Path | None = None,
        binary: Path | None = None,
        echo_log: bool = False,
    ) -> None:
        if size < 1:
            raise ValueError(f"a cluster needs at least one server, not {size}")
        # Routes need every cluster port before any server starts, so nats-server cannot
        # pick them; a port freed here may in rare cases be taken by someone else first.
        cluster_ports = _free_ports(size)
        routes = [f"nats://127.0.0.1:{port}" for port in cluster_ports]
        self.servers: list[NatsServer] = [
            NatsServer(
                server_name=f"n{i + 1}",
                cluster_name=cluster_name,
                cluster_port=cluster_port,
                routes=[route for j, route in enumerate(routes) if j != i],
                store_dir=Path(base_dir) / f"n{i + 1}" if base_dir is not None else None,
                binary=binary,
                echo_log=echo_log,
                sync_always=True,
            )
            for i, cluster_port in enumerate(cluster_ports)
        ]

    @property
    def urls(self) -> list[str]:
        """Every server's client URL, for ``nats.connect(servers=...)``."""
        return [server.url for server in self.servers]

    @property
    def url(self) -> str:
        """The client URLs joined with commas."""
        return ",".join(self.urls)

    def start(self, timeout: float = DEFAULT_CLUSTER_START_TIMEOUT) -> None:
        """Start every server, then wait until each one answers JetStream API requests.

        Blocks; from async code use ``async with``. Raises `NatsServerStartError` (with the
        servers stopped) when a server fails or the JetStream meta leader is not elected in
        time.
        """
        deadline = time.monotonic() + timeout
        try:
            for server in self.servers:
                server.start(max(deadline - time.monotonic(), 0.1))
            if not asyncio.run(_wait_for_jetstream(self.urls, deadline)):
                tail = "\n".join(
                    f"[{server.server_name}] {line}"
                    for server in self.servers
                    for line in server.log_tail(10).splitlines()
                )
                raise NatsServerStartError(
                    f"the cluster's JetStream was not available within {timeout:g}s", tail
                )
        except BaseException:
            self.stop()
            raise

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop every server; safe to call again."""
        for server in self.servers:
            server.stop(timeout)


async def _wait_for_jetstream(urls: list[str], deadline: float) -> bool:
    """True once every server answers ``$JS.API.INFO`` without an error, before deadline."""
    results = await asyncio.gather(*(_jetstream_answers(url, deadline) for url in urls))
    return all(results)


async def _jetstream_answers(url: str, deadline: float) -> bool:
    async def quiet(error: Exception) -> None:
        logger.debug("while waiting for JetStream at %s: %r", url, error)

    while time.monotonic() < deadline:
        try:
            nc = await nats.connect(url, connect_timeout=1, allow_reconnect=False, error_cb=quiet)
        except (OSError, TimeoutError, nats.errors.Error):
            await asyncio.sleep(0.1)
            continue
        try:
            while time.monotonic() < deadline and nc.is_connected:
                try:
                    reply = await nc.request("$JS.API.INFO", b"", timeout=1)
                    if "error" not in json.loads(reply.data):
                        return True
                except (TimeoutError, nats.errors.Error):
                    logger.debug("no JetStream meta leader at %s yet", url)
                await asyncio.sleep(0.1)
        finally:
            await nc.close()
    return False


def _free_ports(n: int) -> list[int]:
    # Every socket stays bound until all are, so the n ports are distinct.
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(n)]
        for sock in socks:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in socks]
