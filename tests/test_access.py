"""Access control with the shipped configuration (deploy/nats) on a real nats-server:
each demo agent works under its own user, nobody connects without credentials, only
the sidecar and the operator write policy and dictionaries, and credentials reach
every client through NATS_* variables or the `mesh` options.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.errors
import nkeys
import pytest
from _access import (
    NODE_USERS,
    connect_as,
    credentials,
    environment,
    make_certificates,
    password,
    secured_server,
)
from _util import arun, eventually

from mesh import ConnectionFailed, MeshClient
from mesh._auth import connect_options
from mesh._dictionaries import DictionaryStore, train
from mesh._enforcer import APPLIED_SUBJECT, PolicyApplied, decode_applied
from mesh._errors import CredentialsRefused, InvalidCredentials
from mesh._message import Message
from mesh._policy import CodecPolicy, PolicyRecord, encode_record, policy_key
from mesh._policy_store import PolicyStore
from mesh._server import NatsServer
from mesh._wire import Codec, decode_frame
from nodes import NodeRuntime
from nodes._registry import list_nodes
from nodes.examples import echo, pipeline
from topology._snapshot import TELEMETRY_SUBJECT, Snapshot, decode_snapshot

DEMO_NODES = {
    "echo": echo.node,
    "planner": pipeline.planner,
    "researcher": pipeline.researcher,
    "writer": pipeline.writer,
}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    """nats-server with deploy/nats/nats-server.conf, on free ports."""
    with secured_server(tmp_path) as srv:
        yield srv


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No NATS_* settings from the environment the tests run in (MeshClient reads them)."""
    for name in list(os.environ):
        if name.startswith("NATS_"):
            monkeypatch.delenv(name)
    return monkeypatch


def documents(n: int) -> list[bytes]:
    """Research-like JSON bodies to train a dictionary on."""
    return [
        msgspec.json.encode(
            {
                "task_id": f"t{i}",
                "question": f"What is the current state of topic {i % 13}?",
                "summary": "Recent work suggests that the evidence on latency and cost "
                f"improves with scale in {i % 7} of the reviewed studies.",
            }
        )
        for i in range(n)
    ]


class Collected:
    """Messages a subscription received, decoded."""

    def __init__(self) -> None:
        self.acks: list[PolicyApplied] = []
        self.snapshots: list[Snapshot] = []
        self.frames: list[bytes] = []

    async def on_ack(self, msg: Message) -> None:
        self.acks.append(decode_applied(msg.data))

    async def on_snapshot(self, msg: Message) -> None:
        self.snapshots.append(decode_snapshot(msg.data))


def permission_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "permissions violation" in r.getMessage()]


# -- the agents under their own users -------------------------------------------------


def test_demo_agents_work_under_their_own_users(
    server: NatsServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The main proof the permissions are right: every demo agent starts, registers,
    answers discovery, serves, reports telemetry and applies the sidecar's codec policy
    with a dictionary, and not one permission is violated on the way."""

    async def main() -> None:
        caplog.set_level(logging.WARNING)
        seen = Collected()
        sidecar = await connect_as(server.url, "sidecar")
        operator = await connect_as(server.url, "operator")
        client = await connect_as(server.url, "client")
        node_clients = {user: await connect_as(server.url, user) for user in NODE_USERS}
        runtimes: list[NodeRuntime] = []
        try:
            # Agents may read the policy bucket but not create it: the sidecar does.
            store = await PolicyStore.open(sidecar)
            dictionary = await (await DictionaryStore.open(sidecar)).put(
                train(documents(400), size=8 * 1024), subject="demo.research"
            )
            await sidecar.subscribe(f"{APPLIED_SUBJECT}.>", seen.on_ack, internal=True)
            await sidecar.subscribe(f"{TELEMETRY_SUBJECT}.>", seen.on_snapshot, internal=True)
            await sidecar.flush()
            for user, nc in node_clients.items():
                runtime = NodeRuntime(DEMO_NODES[user], nc, telemetry_interval=0.2)
                await runtime.start()
                runtimes.append(runtime)

            task = {"id": "t1", "topic": "grid-scale storage"}
            report = await client.request("demo.plan", task, timeout=10)
            assert report["task_id"] == "t1"
            assert len(report["sources"]) > 0
            assert await client.request("demo.echo", {"text": "hi"}) == {"text": "hi"}

            # Registration (the first agent created the registry) and NATS micro discovery.
            found = await list_nodes(operator)
            assert sorted(n.name for n in found) == sorted(NODE_USERS)
            ping = await operator.nc.request("$SRV.PING.planner", b"", timeout=5)
            assert json.loads(ping.data)["name"] == "planner"

            # The sidecar's policy, with a dictionary each agent must fetch to apply it.
            await operator.nc.subscribe("demo.research", cb=_keep(seen.frames))
            await operator.flush()
            codec = CodecPolicy(algorithm="zstd", level=3, dictionary=dictionary, min_size=16)
            record = await store.set("demo.research", codec, author="sidecar", reason="test")
            key = policy_key("demo.research", "codec")
            instances = {r.instance for r in runtimes}
            await eventually(
                lambda: (
                    {a.instance for a in seen.acks if a.key == key and a.version == 1} == instances
                ),
                message="every agent acknowledges the policy",
            )
            assert record.version == 1
            planner = node_clients["planner"]
            assert planner.policy is not None
            assert planner.policy.codec_for("demo.research") == codec
            assert planner.codec.stats.dictionary_fetches == 1
            report = await client.request("demo.plan", {"id": "t2", "topic": "x"}, timeout=10)
            assert report["task_id"] == "t2"
            await eventually(lambda: len(seen.frames) >= 3)
            envelopes = [decode_frame(f)[0] for f in seen.frames]
            assert {e.codec for e in envelopes} == {Codec.ZSTD}
            assert {e.dictionary for e in envelopes} == {dictionary}

            await eventually(
                lambda: instances <= {s.instance for s in seen.snapshots},
                message="every agent's telemetry reaches the sidecar",
            )
        finally:
            for runtime in runtimes:
                await runtime.aclose()
            for nc in (*node_clients.values(), client, operator, sidecar):
                await nc.aclose()
        assert permission_warnings(caplog) == []

    arun(main(), timeout=60)


def _keep(into: list[bytes]) -> Any:
    async def keep(msg: Any) -> None:
        into.append(msg.data)

    return keep


# -- what agents may not do -----------------------------------------------------------


def test_agent_credentials_cannot_write_policy_or_dictionaries(server: NatsServer) -> None:
    async def main() -> None:
        async with await connect_as(server.url, "operator") as operator:
            store = await PolicyStore.open(operator)
            await store.set("demo.plan", CodecPolicy(), author="operator:test", reason="base")
            await DictionaryStore.open(operator)
            errors: list[Exception] = []

            async def on_error(exc: Exception) -> None:
                errors.append(exc)

            nc = await nats.connect(server.url, error_cb=on_error, **credentials("planner"))
            try:
                js = nc.jetstream(timeout=1)
                kv = await js.key_value("mesh_policy")  # reading the bucket's info is allowed
                forged = PolicyRecord(
                    subject="demo.plan",
                    version=2,
                    author="planner",
                    reason="forged",
                    time=1,
                    value=CodecPolicy(algorithm="zstd", level=1),
                )
                with pytest.raises(nats.errors.TimeoutError):
                    await kv.put(policy_key("demo.plan", "codec"), encode_record(forged))
                objects = await js.object_store("mesh_dicts")
                with pytest.raises(nats.errors.TimeoutError):
                    await objects.put("dict-1", b"not a dictionary")
                with pytest.raises(nats.errors.TimeoutError):
                    await js.delete_stream("KV_mesh_policy")
            finally:
                await nc.close()
            refused = " ".join(str(e) for e in errors)
            assert 'publish to "$kv.mesh_policy.codec.demo.plan"' in refused
            assert 'publish to "$o.mesh_dicts.' in refused
            assert 'publish to "$js.api.stream.delete.kv_mesh_policy"' in refused
            current = await store.get("demo.plan")
            assert current is not None
            assert (current.version, current.author) == (1, "operator:test")

    arun(main())


def test_mesh_policy_set_with_agent_credentials_fails_cleanly(server: NatsServer) -> None:
    as_planner = ["--user", "planner", "--password", password("planner")]
    result = mesh(
        *as_planner, "--inbox-prefix", "_INBOX_planner",
        "policy", "set", "demo.plan", "--codec", "zstd:3", "--nats", server.url,
    )  # fmt: skip
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    # One line: what was refused, and what to do.
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: the NATS server does not let this user publish to '$")
    assert "permissions violation" in line
    # The sidecar may: the same command as the sidecar writes version 1.
    result = mesh(
        "--user", "sidecar", "--password", password("sidecar"),
        "--inbox-prefix", "_INBOX_sidecar",
        "policy", "set", "demo.plan", "--codec", "zstd:3", "--nats", server.url,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "version 1" in result.stdout


def test_a_refused_publish_or_request_is_one_clean_error(server: NatsServer) -> None:
    """The server refuses asynchronously; the command still fails, with one line."""
    as_planner = ["--user", "planner", "--password", password("planner")]
    inbox = ["--inbox-prefix", "_INBOX_planner"]
    result = mesh(*as_planner, *inbox, "publish", "demo.secret", "{}", "--nats", server.url)
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line == (
        "error: the NATS server does not let this user publish to 'demo.secret' (permissions "
        "violation): connect with credentials allowed to (--user/--creds, NATS_*), or ask the "
        "operator to grant it"
    )
    result = mesh(
        *as_planner, *inbox, "request", "demo.secret", "{}", "--timeout", "2", "--nats", server.url
    )
    assert result.returncode == 1, result.stderr
    [line] = result.stderr.strip().splitlines()
    assert line.startswith("error: the NATS server does not let this user publish to 'demo.secret'")


def test_a_forged_or_stale_policy_value_is_rejected_and_counted(server: NatsServer) -> None:
    """Values written with operator credentials but malformed, copied from another key
    or older than the one held are refused by an agent and counted in its telemetry."""

    async def main() -> None:
        seen = Collected()
        async with (
            await connect_as(server.url, "operator") as operator,
            await connect_as(server.url, "sidecar") as sidecar,
            await connect_as(server.url, "researcher") as nc,
        ):
            store = await PolicyStore.open(operator)
            await store.set("demo.research", CodecPolicy(algorithm="zstd", level=5), **_by_op())
            good = CodecPolicy(algorithm="zstd", level=6)
            await store.set("demo.research", good, **_by_op())
            await sidecar.subscribe(f"{TELEMETRY_SUBJECT}.>", seen.on_snapshot, internal=True)
            await sidecar.flush()
            runtime = NodeRuntime(pipeline.researcher, nc, telemetry_interval=0.2)
            await runtime.start()
            try:
                assert nc.policy is not None
                assert nc.policy.codec_for("demo.research") == good
                key = policy_key("demo.research", "codec")
                stale = PolicyRecord(
                    subject="demo.research",
                    version=1,
                    author="operator:old",
                    reason="replayed",
                    time=1,
                    value=CodecPolicy(algorithm="none"),
                )
                copied = msgspec.structs.replace(stale, subject="demo.write", version=9)
                await store.kv.put(key, encode_record(stale))
                await store.kv.put(key, encode_record(copied))
                await store.kv.put(key, b'{"subject": "demo.research", "version": 99')
                stats = runtime._enforcer.watcher.stats
                await eventually(
                    lambda: stats().rejected_stale >= 1 and stats().rejected_malformed >= 2,
                    message="the watcher refuses all three",
                )
                await eventually(
                    lambda: (
                        sum(
                            s.policy_rejected
                            for s in seen.snapshots
                            if s.instance == runtime.instance
                        )
                        >= 3
                    ),
                    message="the refusals are counted in telemetry",
                )
                assert nc.policy.codec_for("demo.research") == good  # the last good value
            finally:
                await runtime.aclose()

    arun(main())


def _by_op() -> dict[str, Any]:
    return {"author": "operator:test", "reason": "test", "operator": True}


# -- nobody without credentials ---------------------------------------------------------


def test_an_anonymous_client_is_refused(server: NatsServer) -> None:
    async def main() -> None:
        with pytest.raises(CredentialsRefused) as anonymous:
            await MeshClient.connect(server.url, connect_timeout=1.0)
        assert isinstance(anonymous.value, ConnectionFailed)
        # The refusal itself, or the reset that follows it, whichever arrives first.
        assert "refused the connection" in str(anonymous.value)
        assert "NATS_USER" in str(anonymous.value)
        with pytest.raises(CredentialsRefused):
            await MeshClient.connect(
                server.url, user="planner", password="wrong", connect_timeout=1.0
            )

    arun(main())
    result = mesh("nodes", "--nats", server.url)
    assert result.returncode == 3
    assert one_line(result.stderr).startswith(f"error: NATS at {server.url} refused")


# -- credentials from the environment and from `mesh` options --------------------------


def test_credentials_from_the_environment(
    server: NatsServer, clean_env: pytest.MonkeyPatch
) -> None:
    for name, value in environment("echo").items():
        clean_env.setenv(name, value)

    async def main() -> None:
        async with await connect_as(server.url, "operator") as operator:
            await PolicyStore.open(operator)  # agents may read it, not create it
        async with await MeshClient.connect(server.url, name="echo") as nc:
            assert bytes(nc.nc._inbox_prefix) == b"_INBOX_echo"
            async with (
                NodeRuntime(echo.node, nc, register=False),
                await connect_as(server.url, "client") as client,
            ):
                assert await client.request("demo.echo", {"n": 1}) == {"n": 1}
        # A user in the URL wins over NATS_USER and NATS_PASSWORD.
        clean_env.setenv("NATS_PASSWORD", "wrong")
        host = server.url.removeprefix("nats://")
        url = f"nats://operator:{password('operator')}@{host}"
        async with await MeshClient.connect(url) as nc:
            assert await list_nodes(nc) == []

    arun(main())


def test_a_token_from_the_environment(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    with NatsServer(store_dir=tmp_path / "store", extra_args=["--auth", "s3cret-token"]) as srv:

        async def main() -> None:
            with pytest.raises(CredentialsRefused):
                await MeshClient.connect(srv.url, connect_timeout=1.0)
            clean_env.setenv("NATS_TOKEN", "s3cret-token")
            async with await MeshClient.connect(srv.url) as nc:
                await nc.flush()

        arun(main())


def test_an_nkey_from_the_environment(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    (tmp_path / "user.nk").write_bytes(seed + b"\n")
    config = tmp_path / "nkey.conf"
    config.write_text(f'authorization {{ users: [ {{ nkey: "{public}" }} ] }}\n')
    with NatsServer(store_dir=tmp_path / "store", config_file=config, monitor_port=None) as srv:

        async def main() -> None:
            with pytest.raises(CredentialsRefused):
                await MeshClient.connect(srv.url, connect_timeout=1.0)
            clean_env.setenv("NATS_NKEY", str(tmp_path / "user.nk"))
            async with await MeshClient.connect(srv.url) as nc:
                await nc.flush()

        arun(main())


def test_mutual_tls_from_the_environment(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    certs = make_certificates(tmp_path / "tls", server_name="nats.test")
    with secured_server(tmp_path, tls_dir=certs) as srv:
        url = srv.url.replace("nats://", "tls://")
        for name, value in environment("operator").items():
            clean_env.setenv(name, value)
        clean_env.setenv("NATS_CA", str(certs / "ca.pem"))
        clean_env.setenv("NATS_TLS_HOSTNAME", "nats.test")  # the only name in its certificate

        async def main() -> None:
            # verify: true — a client without a certificate is turned away.
            with pytest.raises(ConnectionFailed):
                await MeshClient.connect(url, connect_timeout=1.0)
            clean_env.setenv("NATS_CERT", str(certs / "client.pem"))
            clean_env.setenv("NATS_KEY", str(certs / "client-key.pem"))
            async with await MeshClient.connect(url) as nc:
                assert await list_nodes(nc) == []
            # The server's certificate does not name 127.0.0.1.
            clean_env.delenv("NATS_TLS_HOSTNAME")
            with pytest.raises(ConnectionFailed):
                await MeshClient.connect(url, connect_timeout=1.0)

        arun(main())


def test_mesh_options_set_the_credentials_of_the_command(server: NatsServer) -> None:
    as_operator = ["--user", "operator", "--password", password("operator")]
    result = mesh(*as_operator, "nodes", "--nats", server.url)
    assert result.returncode == 0, result.stderr
    assert "no live nodes" in result.stderr
    # The same through the variables; and an option replaces the environment's token.
    result = mesh(*as_operator, "nodes", "--nats", server.url, env={"NATS_TOKEN": "stale"})
    assert result.returncode == 0, result.stderr
    result = mesh("nodes", "--nats", server.url, env=environment("operator"))
    assert result.returncode == 0, result.stderr


def test_a_node_process_gets_the_credentials_of_mesh_options(server: NatsServer) -> None:
    async def setup() -> None:
        # As a deployment's init step does: agents may read the policy bucket, not create it.
        async with await connect_as(server.url, "operator") as operator:
            await PolicyStore.open(operator)

    arun(setup())
    node = subprocess.Popen(
        [
            sys.executable, "-m", "mesh",
            "--user", "echo", "--password", password("echo"), "--inbox-prefix", "_INBOX_echo",
            "node", "run", "nodes.examples.echo:node", "--nats", server.url,
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip

    async def main() -> None:
        async with await connect_as(server.url, "client") as client:
            await eventually(lambda: _answers(client), timeout=20, interval=0.2)
            assert await client.request("demo.echo", {"n": 2}) == {"n": 2}

    try:
        arun(main())
    finally:
        node.send_signal(signal.SIGTERM)
        _, stderr = node.communicate(timeout=30)
    assert node.returncode == 0, stderr
    assert "permissions violation" not in stderr


async def _answers(client: MeshClient) -> bool:
    try:
        await client.request("demo.echo", {}, timeout=0.5)
    except Exception:
        return False
    return True


@pytest.mark.parametrize(
    ("args", "env", "code", "expected"),
    [
        (["--creds", "/no/such.creds"], {}, 2, "error: NATS_CREDS=/no/such.creds: no such file"),
        (["--nkey", "/no/such.nk"], {}, 2, "error: NATS_NKEY=/no/such.nk: no such file"),
        (["--tls-cert", "cert.pem"], {}, 2, "error: NATS_CERT: a client certificate needs its"),
        (["--tls-ca", "/no/ca.pem"], {}, 2, "error: NATS_CA=/no/ca.pem: no such file"),
        (["--inbox-prefix", "_INBOX.>"], {}, 2, "error: NATS_INBOX_PREFIX=_INBOX.>: not a"),
        ([], {"NATS_USER": "planner"}, 1, "error: NATS_USER: user 'planner' has no password"),
        ([], {"NATS_CREDS": "/no/such.creds"}, 1, "error: NATS_CREDS=/no/such.creds: no such"),
        (
            ["--token", "t"],
            {"NATS_USER": "u", "NATS_PASSWORD": "p"},
            0,
            "",  # the option replaces the environment's user: no conflict, and no server
        ),
    ],
)
def test_bad_credentials_are_one_clean_line(
    tmp_path: Path,
    args: list[str],
    env: dict[str, str],
    code: int,
    expected: str,
) -> None:
    (tmp_path / "cert.pem").write_text("not used: it has no key\n")
    # `mesh nodes` against a port nothing listens on: only a credentials error is quick.
    result = mesh(*args, "nodes", "--nats", "nats://127.0.0.1:1", env=env, cwd=tmp_path)
    assert "Traceback" not in result.stderr
    if code:
        assert result.returncode == code
        assert one_line(result.stderr).startswith(expected)
    else:
        assert result.returncode == 3  # got as far as connecting
        assert one_line(result.stderr).startswith("error: cannot reach NATS")


# -- connect_options: checked before anything connects ---------------------------------


def test_connect_options_from_variables() -> None:
    assert connect_options({}) == {}
    env = {"NATS_USER": " planner ", "NATS_PASSWORD": "pw", "NATS_INBOX_PREFIX": "_INBOX_planner"}
    assert connect_options(env) == {
        "user": "planner",
        "password": "pw",
        "inbox_prefix": "_INBOX_planner",
    }
    assert connect_options({"NATS_TOKEN": "t"}) == {"token": "t"}
    # A user in a URL wins, as with the nats CLI: the variables' user is left out.
    assert connect_options(env, servers=["nats://a:b@host:4222"]) == {
        "inbox_prefix": "_INBOX_planner"
    }
    assert connect_options({"NATS_TOKEN": "t"}, servers=["tok@host"]) == {}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NATS_USER": "u"}, "NATS_USER: user 'u' has no password: set NATS_PASSWORD"),
        ({"NATS_PASSWORD": "p"}, "NATS_PASSWORD: set without NATS_USER"),
        (
            {"NATS_USER": "u", "NATS_PASSWORD": "p", "NATS_CREDS": "x"},
            "NATS_USER/NATS_PASSWORD and NATS_CREDS: more than one way to authenticate",
        ),
        ({"NATS_TOKEN": "t", "NATS_NKEY": "x"}, "NATS_TOKEN and NATS_NKEY: more than one"),
        ({"NATS_KEY": "k.pem"}, "NATS_KEY: a private key needs its client certificate"),
        ({"NATS_INBOX_PREFIX": "a.*"}, "NATS_INBOX_PREFIX=a.*: not a subject prefix"),
        ({"NATS_INBOX_PREFIX": "a..b"}, "NATS_INBOX_PREFIX=a..b: not a subject prefix"),
        ({"NATS_INBOX_PREFIX": "my inbox"}, "NATS_INBOX_PREFIX=my inbox: not a subject"),
    ],
)
def test_connect_options_refuse_settings_that_cannot_work(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(InvalidCredentials) as refused:
        connect_options(env)
    assert str(refused.value).startswith(message)
    assert isinstance(refused.value, ValueError)


def test_nkey_and_creds_files_are_checked(tmp_path: Path) -> None:
    seed = tmp_path / "user.nk"
    seed.write_text("SUAIBDPBAUTWCWBKIO6XHQNINK5FWJW4OHLXC3HQ2KFE4PEJUA44CNHTC4\n")
    creds = tmp_path / "user.creds"
    creds.write_text(
        "-----BEGIN NATS USER JWT-----\neyJ0eXAiOiJKV1QifQ.e30.sig\n------END NATS USER JWT------\n"
        "-----BEGIN USER NKEY SEED-----\nSUAIBDPBAUTWCWBKIO6XHQ\n------END USER NKEY SEED------\n"
    )
    wrong = tmp_path / "account.nk"
    wrong.write_text("SAAIBDPBAUTWCWBKIO6XHQ\n")
    with pytest.raises(InvalidCredentials, match="no such file"):
        connect_options({"NATS_CREDS": str(tmp_path / "missing.creds")})
    with pytest.raises(InvalidCredentials, match="is a directory"):
        connect_options({"NATS_NKEY": str(tmp_path)})
    with pytest.raises(InvalidCredentials, match="does not hold a user NKEY seed"):
        connect_options({"NATS_NKEY": str(wrong)})
    with pytest.raises(InvalidCredentials, match="not a NATS credentials file"):
        connect_options({"NATS_CREDS": str(seed)})
    # Well-formed files: nats-py signs with the nkeys package, or it is named as missing.
    for name, path, option in (
        ("NATS_NKEY", seed, "nkeys_seed"),
        ("NATS_CREDS", creds, "user_credentials"),
    ):
        if importlib.util.find_spec("nkeys") is None:
            with pytest.raises(InvalidCredentials, match="pip install nkeys"):
                connect_options({name: str(path)})
        else:
            assert connect_options({name: str(path)}) == {option: str(path)}


def test_tls_settings_are_checked_and_make_a_context(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "tls")
    env = {
        "NATS_CA": str(certs / "ca.pem"),
        "NATS_CERT": str(certs / "client.pem"),
        "NATS_KEY": str(certs / "client-key.pem"),
        "NATS_TLS_HOSTNAME": "nats.test",
    }
    options = connect_options(env)
    assert isinstance(options["tls"], ssl.SSLContext)
    assert options["tls"].verify_mode == ssl.CERT_REQUIRED
    assert options["tls_hostname"] == "nats.test"
    with pytest.raises(InvalidCredentials, match=r"NATS_CA=.*no CA certificate in it"):
        connect_options({**env, "NATS_CA": str(certs / "server.ext")})
    with pytest.raises(InvalidCredentials, match="cannot be used together"):
        connect_options({**env, "NATS_KEY": str(certs / "server-key.pem")})
    with pytest.raises(InvalidCredentials, match="NATS_CERT: a client certificate needs"):
        connect_options({"NATS_CERT": env["NATS_CERT"]})
    # An encrypted key is refused, never prompted for.
    encrypted = certs / "encrypted-key.pem"
    subprocess.run(
        [
            "openssl", "pkey", "-in", env["NATS_KEY"], "-out", str(encrypted),
            "-aes256", "-passout", "pass:secret",
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    with pytest.raises(InvalidCredentials, match="encrypted with a passphrase"):
        connect_options({**env, "NATS_KEY": str(encrypted)})


# -- helpers ---------------------------------------------------------------------------


def mesh(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run the `mesh` command with the test's environment plus ``env``."""
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args],
        cwd=cwd or ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def one_line(stderr: str) -> str:
    """The only line of ``stderr``; fails when there are more."""
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    return lines[0]
