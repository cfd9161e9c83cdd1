"""Fixtures that start real nats-server processes for the tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh._auth import ENV_VARS as _CREDENTIAL_VARIABLES
from mesh._cluster import NatsCluster
from mesh._server import NatsServer


@pytest.fixture(autouse=True)
def _no_ambient_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests choose their credentials: a developer's NATS_* variables must not leak in."""
    for variable in _CREDENTIAL_VARIABLES:
        monkeypatch.delenv(variable, raising=False)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A running JetStream nats-server on a free loopback port, stopped after the test."""
    with NatsServer(store_dir=tmp_path / "nats-store") as server:
        yield server


@pytest.fixture
def nats_url(nats_server: NatsServer) -> str:
    """The client URL of the `nats_server` fixture."""
    return nats_server.url


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """A running three-server JetStream cluster on loopback, stopped after the test."""
    with NatsCluster(3, base_dir=tmp_path / "nats-cluster") as cluster:
        yield cluster
