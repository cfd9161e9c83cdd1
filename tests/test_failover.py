"""Nodes on a three-server cluster: killing the server a node is connected to only
interrupts it until the client reconnects to another member."""

from __future__ import annotations

from typing import Any

import pytest
from _util import arun, eventually, retrying

from mesh import MeshClient, NoResponders, RequestTimeout
from mesh._cluster import NatsCluster
from nodes import Node, NodeRuntime


async def answered(client: MeshClient, subject: str, timeout: float) -> Any:
    """The first successful reply, retrying through the failover; fails after ``timeout``."""
    return await retrying(
        lambda: client.request(subject, {"n": 1}, timeout=1),
        (NoResponders, RequestTimeout),
        timeout,
    )


@pytest.mark.cluster
def test_node_survives_losing_its_server(nats_cluster: NatsCluster) -> None:
    node = Node("survivor")

    @node.handles("failover.echo")
    async def echo(message: Any) -> Any:
        return message

    async def main() -> None:
        async with (
            await MeshClient.connect(nats_cluster.urls, name="survivor") as server_side,
            await MeshClient.connect(nats_cluster.urls, name="caller") as client,
            NodeRuntime(node, server_side, register=False),
        ):
            assert await answered(client, "failover.echo", 10) == {"n": 1}
            url = server_side.nc.connected_url
            assert url is not None
            victim = next(s for s in nats_cluster.servers if s.port == url.port)
            victim.kill()  # SIGKILL: no goodbye to the clients
            assert await answered(client, "failover.echo", 20) == {"n": 1}
            assert server_side.connected
            assert server_side.nc.connected_url.port != victim.port
            assert server_side.stats().reconnects >= 1

    arun(main(), timeout=60)


@pytest.mark.cluster
def test_a_client_leaves_a_server_that_stops_answering(nats_cluster: NatsCluster) -> None:
    """A hung server (SIGSTOP: the TCP connection stays open, nothing answers) is
    found by the client's pings and left for another member, in seconds rather than
    nats-py's default of minutes."""

    async def main() -> None:
        async with await MeshClient.connect(nats_cluster.urls[0], name="pinger") as client:
            await client.flush()
            hung = nats_cluster.servers[0]
            hung.pause()
            try:
                await eventually(
                    lambda: client.stats().reconnects >= 1, 30, message="still on the hung server"
                )
                url = client.nc.connected_url
                assert url is not None
                assert url.port != hung.port
                await client.flush(timeout=5)  # and the new server answers
            finally:
                hung.resume()

    arun(main(), timeout=60)
