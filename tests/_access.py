"""Helpers for tests that run nats-server with the configuration in ``deploy/nats``:
the files rendered onto free ports and a temporary store, the development credentials
of its users, and throwaway certificates made with ``openssl``.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from mesh import MeshClient
from mesh._server import NatsServer

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NATS_CONFIG = DEPLOY / "nats"
#: The users of deploy/nats/accounts.conf that run a demo agent.
NODE_USERS = ("echo", "planner", "researcher", "writer")
USERS = ("operator", "sidecar", "client", *NODE_USERS)


def password(user: str) -> str:
    """The development secret of a deploy/ user (accounts.conf holds its bcrypt hash)."""
    return f"{user}-dev-password"


def credentials(user: str) -> dict[str, str]:
    """``nats.connect`` options for a deploy/ user: every user but the operator is
    confined to its own inbox prefix."""
    options = {"user": user, "password": password(user)}
    if user != "operator":
        options["inbox_prefix"] = f"_INBOX_{user}"
    return options


def environment(user: str) -> dict[str, str]:
    """The ``NATS_*`` variables that make a process connect as ``user``."""
    options = credentials(user)
    env = {"NATS_USER": options["user"], "NATS_PASSWORD": options["password"]}
    if "inbox_prefix" in options:
        env["NATS_INBOX_PREFIX"] = options["inbox_prefix"]
    return env


async def connect_as(url: str, user: str, **options: Any) -> MeshClient:
    """A mesh client connected as a deploy/ user (named after it)."""
    return await MeshClient.connect(url, name=user, **credentials(user), **options)


def render_config(dest: Path, *, tls_dir: Path | None = None) -> Path:
    """Copy deploy/nats into ``dest`` with the JetStream store under ``dest`` and, given
    ``tls_dir``, TLS turned on with the certificates there; return nats-server.conf.

    Ports are left to the command line (``NatsServer`` passes free ones).
    """
    dest.mkdir(parents=True, exist_ok=True)
    for source in NATS_CONFIG.glob("*.conf"):
        text = source.read_text(encoding="utf-8")
        text = text.replace("/data/jetstream", str(dest / "store"))
        if tls_dir is not None:
            text = text.replace("/etc/nats/tls", str(tls_dir))
            text = text.replace("# include tls.conf", "include tls.conf")
        (dest / source.name).write_text(text, encoding="utf-8")
    return dest / "nats-server.conf"


def secured_server(tmp_path: Path, *, tls_dir: Path | None = None) -> NatsServer:
    """A nats-server (not started) running deploy/nats/nats-server.conf on free ports."""
    config = render_config(tmp_path / "nats", tls_dir=tls_dir)
    # JetStream and its store come from the file; monitoring on a free loopback port.
    return NatsServer(config_file=config, jetstream=False, monitor_port=0)


def make_certificates(dest: Path, *, server_name: str = "nats.test") -> Path:
    """A throwaway CA, a server certificate for ``server_name`` (its only name) and a client
    certificate, as deploy/nats/tls.conf and the NATS_CA/CERT/KEY variables name them."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed: cannot make test certificates")
    dest.mkdir(parents=True, exist_ok=True)
    key = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], cwd=dest, check=True, capture_output=True, timeout=30)

    run(
        "req", "-x509", *key, "-days", "2", "-subj", "/CN=mesh-test-ca",
        "-keyout", "ca-key.pem", "-out", "ca.pem",
    )  # fmt: skip
    (dest / "server.ext").write_text(
        f"subjectAltName=DNS:{server_name}\nextendedKeyUsage=serverAuth\n", encoding="utf-8"
    )
    (dest / "client.ext").write_text("extendedKeyUsage=clientAuth\n", encoding="utf-8")
    for name, subject in (("server", "/CN=nats"), ("client", "/CN=planner")):
        run("req", *key, "-subj", subject, "-keyout", f"{name}-key.pem", "-out", f"{name}.csr")
        run(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
            "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.pem",
        )  # fmt: skip
    return dest
