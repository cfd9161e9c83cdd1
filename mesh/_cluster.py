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
# Cluster ports are picked before any server starts (see __init__), so another process can
# take one in between; the start is then tried again on fresh ports, this many times in all.
START_ATTEMPTS = 3
_PORT_TAKEN = ("Error listening on router port", "address already in use")


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
        self.servers: list[NatsServer] = [
            NatsServer(
                server_name=f"n{i + 1}",
                cluster_name=cluster_name,
                store_dir=Path(base_dir) / f"n{i + 1}" if base_dir is not None else None,
                binary=binary,
                echo_log=echo_log,
                sync_always=True,
            )
            for i in range(size)
        ]
        self._assign_cluster_ports()
        #: The servers the last start attempt started (or tried to).
        self._started: list[NatsServer] = []

    def _assign_cluster_ports(self) -> None:
        # Routes need every cluster port before any server starts, so nats-server cannot
        # pick them; a port freed here may be taken by someone else first (start retries).
        cluster_ports = _free_ports(len(self.servers))
        routes = [f"nats://127.0.0.1:{port}" for port in cluster_ports]
        for i, (server, cluster_port) in enumerate(zip(self.servers, cluster_ports, strict=True)):
            server.cluster_port = cluster_port
            server.routes = tuple(route for j, route in enumerate(routes) if j != i)

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
        attempt = 1
        while True:
            try:
                self._start_once(timeout, deadline)
                return
            except NatsServerStartError:
                taken = self._port_taken()
                self.stop()
                if taken is None or attempt == START_ATTEMPTS or time.monotonic() >= deadline:
                    raise
                logger.info("cluster port %d was taken; starting again on fresh ports", taken)
                attempt += 1
                for server in self.servers:
                    server.forget_ports()
                self._assign_cluster_ports()
            except BaseException:
                self.stop()
                raise

    def _start_once(self, timeout: float, deadline: float) -> None:
        self._started = []
        for server in self.servers:
            self._started.append(server)
            server.start(max(deadline - time.monotonic(), 0.1))
        exited = asyncio.run(_wait_for_jetstream(self.servers, deadline))
        if exited is None:
            return
        tail = "\n".join(
            f"[{server.server_name}] {line}"
            for server in self.servers
            for line in server.log_tail(10).splitlines()
        )
        if exited:
            names = ", ".join(server.server_name or "?" for server in exited)
            reason = f"{names} exited before the cluster's JetStream was available"
        else:
            reason = f"the cluster's JetStream was not available within {timeout:g}s"
        raise NatsServerStartError(reason, tail)

    def _port_taken(self) -> int | None:
        """The cluster port a server started by the last attempt could not listen on, if
        that is why it exited."""
        for server in self._started:
            if server.running or server.cluster_port is None:
                continue
            if any(
                all(part in line for part in _PORT_TAKEN)
                for line in server.log_tail(20).splitlines()
            ):
                return server.cluster_port
        return None

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop every server; safe to call again."""
        for server in self.servers:
            server.stop(timeout)


async def _wait_for_jetstream(
    servers: list[NatsServer], deadline: float
) -> list[NatsServer] | None:
    """None once every server answers ``$JS.API.INFO`` without an error, before deadline;
    otherwise the servers that exited meanwhile (empty when the deadline passed). The
    wait ends as soon as one exits: the others may never elect a leader without it."""
    answered = await asyncio.gather(
        *(_jetstream_answers(server, servers, deadline) for server in servers)
    )
    if all(answered):
        return None
    return [server for server in servers if not server.running]


async def _jetstream_answers(
    server: NatsServer, servers: list[NatsServer], deadline: float
) -> bool:
    url = server.url

    def waiting() -> bool:
        return time.monotonic() < deadline and all(s.running for s in servers)

    async def quiet(error: Exception) -> None:
        logger.debug("while waiting for JetStream at %s: %r", url, error)

    while waiting():
        try:
            # nats.connect retries a refused server every 2 s for 60 attempts even without
            # reconnects, so the deadline bounds it from outside.
            nc = await asyncio.wait_for(
                nats.connect(url, connect_timeout=1, allow_reconnect=False, error_cb=quiet),
                max(min(deadline - time.monotonic(), 2.0), 0.01),
            )
        except (OSError, TimeoutError, nats.errors.Error):
            await asyncio.sleep(0.1)
            continue
        try:
            while waiting() and nc.is_connected:
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
