"""The files in deploy/: nats-server accepts every NATS configuration, the compose file
and the Kubernetes manifests have the structure the demo needs, and the credentials they
hand out are the ones the server configuration accepts.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import nats
import yaml
from _access import (
    DEPLOY,
    NATS_CONFIG,
    NODE_USERS,
    USERS,
    make_certificates,
    render_config,
    secured_server,
)
from _util import arun

from mesh._server import find_nats_server
from mesh._up import DEMO_NODES
from nodes._runner import load_node

K8S = DEPLOY / "k8s"
#: What the compose file runs for each agent: the `mesh up --demo` list.
DEMO = {load_node(spec).name: (spec, replicas) for spec, replicas in DEMO_NODES}


def nats_test(config: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``nats-server -t -c config``: parse and check the file, start nothing."""
    return subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(config)],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=30,
    )


# -- a reader for the NATS configuration format (the part deploy/nats uses) ------------


class _ConfReader:
    """Maps, arrays, quoted and bare values, ``#`` comments and ``include``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.text = path.read_text(encoding="utf-8")
        self.i = 0

    def read(self) -> dict[str, Any]:
        return self._map(end="")

    def _skip(self) -> None:
        while self.i < len(self.text):
            c = self.text[self.i]
            if c in " \t\r\n,;":
                self.i += 1
            elif c == "#" or self.text.startswith("//", self.i):
                newline = self.text.find("\n", self.i)
                self.i = len(self.text) if newline < 0 else newline
            else:
                return

    def _map(self, end: str) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while True:
            self._skip()
            if self.i >= len(self.text) or self.text[self.i] == end:
                self.i += 1
                return out
            key = self._quoted() if self.text[self.i] == '"' else self._word(":= \t\n")
            if key == "include":
                self._skip()
                out.update(read_conf(self.path.parent / self._scalar()))
                continue
            while self.text[self.i] in " \t:=":
                self.i += 1
            out[key] = self._value()

    def _value(self) -> Any:
        self._skip()
        c = self.text[self.i]
        if c == "{":
            self.i += 1
            return self._map(end="}")
        if c == "[":
            self.i += 1
            items = []
            while True:
                self._skip()
                if self.text[self.i] == "]":
                    self.i += 1
                    return items
                items.append(self._value())
        return self._scalar()

    def _scalar(self) -> Any:
        if self.text[self.i] == '"':
            return self._quoted()
        word = self._word("\n,}]#").strip()
        if word in ("true", "false"):
            return word == "true"
        return int(word) if word.isdigit() else word

    def _quoted(self) -> str:
        end = self.text.index('"', self.i + 1)
        value = self.text[self.i + 1 : end]
        self.i = end + 1
        return value

    def _word(self, stops: str) -> str:
        start = self.i
        while self.i < len(self.text) and self.text[self.i] not in stops:
            self.i += 1
        return self.text[start : self.i]


def read_conf(path: Path) -> dict[str, Any]:
    return _ConfReader(path).read()


def users_of(accounts: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every user of every account, by name."""
    return {u["user"]: u for account in accounts.values() for u in account.get("users", [])}


# -- nats-server -t --------------------------------------------------------------------


def test_nats_server_accepts_the_single_server_config() -> None:
    result = nats_test(NATS_CONFIG / "nats-server.conf")
    assert result.returncode == 0, result.stderr
    assert "is valid" in result.stderr + result.stdout


def test_nats_server_accepts_the_cluster_config_with_a_server_name() -> None:
    result = nats_test(NATS_CONFIG / "cluster.conf", env={"SERVER_NAME": "nats-1"})
    assert result.returncode == 0, result.stderr
    without = {k: v for k, v in os.environ.items() if k != "SERVER_NAME"}
    missing = subprocess.run(
        [str(find_nats_server()), "-t", "-c", str(NATS_CONFIG / "cluster.conf")],
        env=without,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert missing.returncode != 0
    assert "SERVER_NAME" in missing.stderr


def test_nats_server_accepts_the_tls_config_with_real_certificates(tmp_path: Path) -> None:
    config = render_config(tmp_path / "nats", tls_dir=make_certificates(tmp_path / "tls"))
    assert "\ninclude tls.conf" in config.read_text()
    result = nats_test(config)
    assert result.returncode == 0, result.stderr
    # The check reads the files: without certificates the same config is refused.
    missing = render_config(tmp_path / "nats-missing", tls_dir=tmp_path / "no-such-dir")
    refused = nats_test(missing)
    assert refused.returncode != 0
    assert "server.pem" in refused.stderr


def test_nats_server_refuses_a_broken_permission(tmp_path: Path) -> None:
    """Control: -t really checks the accounts, so the tests above can fail."""
    config = render_config(tmp_path / "nats")
    accounts = config.parent / "accounts.conf"
    accounts.write_text(accounts.read_text().replace("allow_responses", "allow_response"))
    result = nats_test(config)
    assert result.returncode != 0
    assert "allow_response" in result.stderr


def test_the_configs_keep_monitoring_on_loopback_and_anonymous_clients_out() -> None:
    for name in ("nats-server.conf", "cluster.conf"):
        conf = read_conf(NATS_CONFIG / name)
        assert conf["http"].startswith("127.0.0.1:"), name
        assert "no_auth_user" not in conf, name
        assert conf["jetstream"]["store_dir"] == "/data/jetstream", name
        assert conf["accounts"]["MESH"]["jetstream"] == "enabled", name
    tls = read_conf(NATS_CONFIG / "tls.conf")["tls"]
    assert tls["verify"] is True
    assert {"cert_file", "key_file", "ca_file"} <= tls.keys()


def test_agents_may_read_but_not_write_the_policy_and_dictionaries() -> None:
    users = users_of(read_conf(NATS_CONFIG / "accounts.conf")["accounts"])
    assert set(users) == {*USERS, "sys"}
    for user in NODE_USERS:
        permissions = users[user]["permissions"]
        allowed = permissions["publish"]["allow"]
        assert not [s for s in allowed if s.startswith(("$KV.mesh_policy", "$O.mesh_dicts"))]
        writes = re.compile(
            r"(STREAM\.(CREATE|UPDATE|DELETE|PURGE)|CONSUMER\.DELETE)\.(KV_mesh_policy|OBJ_mesh_dicts)"
        )
        assert not [s for s in allowed if writes.search(s)]
        assert set(permissions["publish"]["deny"]) == {"$KV.mesh_policy.>", "$O.mesh_dicts.>"}
        assert f"_INBOX_{user}.>" in permissions["subscribe"]["allow"]
        assert permissions["allow_responses"]["max"] == 1
    for user in ("sidecar", "operator"):
        allowed = users[user].get("permissions", {}).get("publish", {}).get("allow", [">"])
        assert {"$KV.mesh_policy.>", "$O.mesh_dicts.>"} <= set(allowed) or allowed == [">"]


# -- docker-compose.yml ----------------------------------------------------------------


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    return data


def test_compose_runs_a_three_server_cluster_with_routes() -> None:
    services = compose()["services"]
    servers = {name: s for name, s in services.items() if name.startswith("nats-")}
    assert set(servers) == {"nats-1", "nats-2", "nats-3"}
    for name, service in servers.items():
        assert service["image"].startswith("nats:")
        assert service["command"] == ["-c", "/etc/nats/cluster.conf"]
        assert "./nats:/etc/nats:ro" in service["volumes"]
        assert service["environment"]["SERVER_NAME"] == name
        assert "healthcheck" in service
    routes = read_conf(NATS_CONFIG / "cluster.conf")["cluster"]["routes"]
    assert sorted(routes) == [f"nats-route://{name}:6222" for name in sorted(servers)]


def test_compose_runs_jaeger_with_otlp() -> None:
    jaeger = compose()["services"]["jaeger"]
    assert jaeger["image"].startswith("jaegertracing/all-in-one")
    assert jaeger["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    published = {int(str(p).rsplit(":", 1)[-1]) for p in jaeger["ports"]}
    assert {4317, 16686} <= published


def test_compose_runs_each_demo_agent_as_its_own_user() -> None:
    services = compose()["services"]
    assert (DEPLOY / "Dockerfile").is_file()
    for name, (spec, replicas) in DEMO.items():
        service = services[name]
        assert service["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
        assert service["command"] == ["node", "run", spec]
        assert service.get("deploy", {}).get("replicas", 1) == replicas
        env = service["environment"]
        assert env["NATS_USER"] == name
        assert env["NATS_INBOX_PREFIX"] == f"_INBOX_{name}"
        assert env["OTEL_EXPORTER_OTLP_ENDPOINT"] == "http://jaeger:4317"
        assert env["MESH_NATS_URL"].split(",") == [f"nats://nats-{i}:4222" for i in (1, 2, 3)]
        assert service["depends_on"]["mesh-init"]["condition"] == "service_completed_successfully"
    init = services["mesh-init"]
    assert init["environment"]["NATS_USER"] == "operator"
    assert "mesh policy ls" in init["command"][0]
    traffic = services["demo-traffic"]
    assert traffic["environment"]["NATS_USER"] == "client"
    assert "mesh request demo.plan" in traffic["command"][0]


def test_the_dockerfile_copies_what_the_package_needs() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    copied = re.findall(r"^COPY (\S+(?: \S+)*) \S+$", text, flags=re.M)
    for sources in copied:
        for source in sources.split():
            assert (DEPLOY.parent / source).exists(), source
    assert 'ENTRYPOINT ["mesh"]' in text


def test_the_demo_traffic_loop_is_valid_shell(tmp_path: Path) -> None:
    """The loop runs under sh as compose hands it over ($$ is compose's escaped $)."""
    script = compose()["services"]["demo-traffic"]["command"][0].replace("$$", "$")
    fake = tmp_path / "mesh"
    fake.write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls"\nexit 0\n')
    fake.chmod(0o755)
    loop = script.replace("sleep 1", '[ "$i" -ge 3 ] && exit 0')
    result = subprocess.run(
        ["sh", "-c", loop],
        env={"PATH": f"{tmp_path}:{os.environ['PATH']}"},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    calls = (tmp_path / "calls").read_text().splitlines()
    assert len(calls) == 3
    assert calls[0].startswith("request demo.plan ")
    task = json.loads(calls[0].removeprefix("request demo.plan ").rsplit(" --timeout", 1)[0])
    assert task == {"id": "compose-1", "topic": "grid-scale storage"}


# -- Kubernetes --------------------------------------------------------------------------


def manifests() -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(K8S.glob("*.yaml")):
        if path.name != "nats-values.yaml":
            docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def helm_values() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((K8S / "nats-values.yaml").read_text())
    return data


def test_the_helm_values_make_a_jetstream_cluster_of_three() -> None:
    config = helm_values()["config"]
    assert config["cluster"] == {"enabled": True, "replicas": 3}
    assert config["jetstream"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["enabled"] is True
    assert config["jetstream"]["fileStore"]["pvc"]["enabled"] is True
    assert config["jetstream"]["memoryStore"]["enabled"] is True  # mesh_nodes is in memory


def test_the_helm_accounts_are_those_of_accounts_conf() -> None:
    merge = helm_values()["config"]["merge"]
    conf = read_conf(NATS_CONFIG / "accounts.conf")
    assert merge["system_account"] == conf["system_account"]
    assert users_of(merge["accounts"]) == users_of(conf["accounts"])
    assert merge["accounts"]["MESH"]["jetstream"] == "enabled"


def test_nats_server_accepts_the_helm_accounts(tmp_path: Path) -> None:
    merge = helm_values()["config"]["merge"]
    config = tmp_path / "helm.conf"
    config.write_text(json.dumps({"jetstream": {"store_dir": str(tmp_path / "js")}, **merge}))
    result = nats_test(config)
    assert result.returncode == 0, result.stderr


def test_the_k8s_agents_are_deployments_with_credentials_and_otlp() -> None:
    docs = manifests()
    by_kind: dict[tuple[str, str], dict[str, Any]] = {
        (d["kind"], d["metadata"]["name"]): d for d in docs
    }
    secret = by_kind[("Secret", "mesh-credentials")]["stringData"]
    config = by_kind[("ConfigMap", "mesh-config")]["data"]
    assert config["MESH_NATS_URL"] == "nats://nats:4222"
    assert config["OTEL_EXPORTER_OTLP_ENDPOINT"].startswith("http")
    for name, (spec, replicas) in DEMO.items():
        deployment = by_kind[("Deployment", name)]
        assert deployment["spec"]["replicas"] == replicas
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["args"] == ["node", "run", spec]
        assert container["envFrom"] == [{"configMapRef": {"name": "mesh-config"}}]
        env = {e["name"]: e for e in container["env"]}
        assert env["NATS_USER"]["value"] == name
        assert env["NATS_INBOX_PREFIX"]["value"] == f"_INBOX_{name}"
        ref = env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"]
        assert ref["name"] == "mesh-credentials"
        assert ref["key"] in secret
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels["app.kubernetes.io/part-of"] == "natsmesh"  # the network policy admits it
    job = by_kind[("Job", "mesh-init")]["spec"]["template"]["spec"]["containers"][0]
    assert job["args"] == ["policy", "ls"]


# -- the credentials handed out are the ones the server accepts --------------------------


def handed_out() -> dict[str, str]:
    """Every user and password the compose file and the Kubernetes Secret give clients."""
    found: dict[str, str] = {}
    for service in compose()["services"].values():
        env = service.get("environment", {})
        if "NATS_USER" in env:
            found[env["NATS_USER"]] = env["NATS_PASSWORD"]
    secret = next(d for d in manifests() if d["kind"] == "Secret")["stringData"]
    for key, value in secret.items():
        user = key.removesuffix("-password")
        assert found.setdefault(user, value) == value, user
    return found


def test_the_credentials_handed_out_are_accepted(tmp_path: Path) -> None:
    passwords = handed_out()
    assert set(passwords) == set(USERS)

    async def main(url: str) -> None:
        for user, secret in passwords.items():
            nc = await nats.connect(url, user=user, password=secret, allow_reconnect=False)
            await nc.flush()
            await nc.close()

    with secured_server(tmp_path) as srv:
        arun(main(srv.url))


def test_every_file_in_deploy_is_covered_here() -> None:
    """A new file in deploy/ needs a test here (and a NATS config a `nats-server -t`)."""
    names = {str(p.relative_to(DEPLOY)) for p in DEPLOY.rglob("*") if p.is_file()}
    assert names == {
        "Dockerfile",
        "Dockerfile.dockerignore",
        "docker-compose.yml",
        "nats/nats-server.conf",
        "nats/cluster.conf",
        "nats/accounts.conf",
        "nats/tls.conf",
        "k8s/nats-values.yaml",
        "k8s/mesh-config.yaml",
        "k8s/mesh-nodes.yaml",
        "k8s/nats-networkpolicy.yaml",
    }
