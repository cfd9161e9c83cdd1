"""Credentials and TLS for the NATS connection, from the variables the ``nats`` CLI reads.

:func:`connect_options` turns them into keyword arguments for ``nats.connect``::

    NATS_USER, NATS_PASSWORD   a user and its password
    NATS_TOKEN                 an authentication token
    NATS_NKEY                  a file holding a user NKEY seed (``SU...``)
    NATS_CREDS                 a ``.creds`` file: a user JWT and its NKEY seed
    NATS_CA                    the CA certificates (PEM) the server's certificate must chain to
    NATS_CERT, NATS_KEY        a client certificate and its private key (mutual TLS)
    NATS_TLS_HOSTNAME          the name to check the server's certificate against
    NATS_INBOX_PREFIX          the prefix of this client's reply inboxes (default ``_INBOX``)

Only one way to authenticate may be set. Everything is checked before connecting, so a
missing file, a certificate without its key or a user without a password is an
:class:`InvalidCredentials` saying what to fix, not a failure deep in a TLS handshake or a
connection that is simply refused. Credentials in a server URL (``nats://user:pass@host``)
win over NATS_USER, NATS_PASSWORD and NATS_TOKEN, as with the nats CLI.

A server that restricts a user to its own inbox (``_INBOX_<user>.>``, see
``deploy/nats/accounts.conf``) needs the client to use that prefix: NATS_INBOX_PREFIX.
"""

from __future__ import annotations

import importlib.util
import os
import re
import ssl
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit

import nats.errors

from mesh._errors import InvalidCredentials

__all__ = ["ENV_VARS", "connect_options", "refusal"]

ENV_USER: Final = "NATS_USER"
ENV_PASSWORD: Final = "NATS_PASSWORD"
ENV_TOKEN: Final = "NATS_TOKEN"
ENV_NKEY: Final = "NATS_NKEY"
ENV_CREDS: Final = "NATS_CREDS"
ENV_CA: Final = "NATS_CA"
ENV_CERT: Final = "NATS_CERT"
ENV_KEY: Final = "NATS_KEY"
ENV_TLS_HOSTNAME: Final = "NATS_TLS_HOSTNAME"
ENV_INBOX_PREFIX: Final = "NATS_INBOX_PREFIX"
#: Every variable :func:`connect_options` reads.
ENV_VARS: Final = (
    ENV_USER,
    ENV_PASSWORD,
    ENV_TOKEN,
    ENV_NKEY,
    ENV_CREDS,
    ENV_CA,
    ENV_CERT,
    ENV_KEY,
    ENV_TLS_HOSTNAME,
    ENV_INBOX_PREFIX,
)

#: Bytes read at most from an NKEY seed or creds file (real ones are under 2 KiB).
MAX_CREDENTIALS_FILE: Final = 64 * 1024
MAX_INBOX_PREFIX: Final = 128

_TOKEN: Final = re.compile(r"[!-~]+")
# What the server says when it refuses credentials (nats-py keeps the text, lowercased).
_REFUSALS: Final = ("authorization violation", "authentication expired", "authentication revoked")


def connect_options(
    environ: Mapping[str, str] | None = None, *, servers: Sequence[str] = ()
) -> dict[str, Any]:
    """``nats.connect`` keyword arguments for the credentials, TLS and inbox prefix that
    ``environ`` (default: the process environment) sets; ``{}`` when it sets none.

    ``servers`` are the URLs about to be dialled: when one carries a user (or token),
    NATS_USER, NATS_PASSWORD and NATS_TOKEN are left out. Raises
    :class:`InvalidCredentials` for settings that cannot work.
    """
    env = os.environ if environ is None else environ

    def get(name: str) -> str:
        return env.get(name, "").strip()

    options: dict[str, Any] = {}
    user, password, token = get(ENV_USER), get(ENV_PASSWORD), get(ENV_TOKEN)
    if any(_has_userinfo(url) for url in servers):
        user = password = token = ""
    nkey, creds = get(ENV_NKEY), get(ENV_CREDS)
    methods = [
        name
        for name, given in (
            (f"{ENV_USER}/{ENV_PASSWORD}", user or password),
            (ENV_TOKEN, token),
            (ENV_NKEY, nkey),
            (ENV_CREDS, creds),
        )
        if given
    ]
    if len(methods) > 1:
        raise InvalidCredentials(
            " and ".join(methods), "more than one way to authenticate is set; keep one"
        )
    if user or password:
        if not user:
            raise InvalidCredentials(ENV_PASSWORD, f"set without {ENV_USER}: give the user too")
        if not password:
            raise InvalidCredentials(
                ENV_USER,
                f"user {user!r} has no password: set {ENV_PASSWORD} "
                f"(a token without a user goes in {ENV_TOKEN})",
            )
        options.update(user=user, password=password)
    elif token:
        options["token"] = token
    elif nkey:
        seed = _read_credentials(ENV_NKEY, nkey)
        if not seed.strip().startswith(b"SU"):
            raise InvalidCredentials(
                f"{ENV_NKEY}={nkey}",
                "the file does not hold a user NKEY seed (one line starting with SU); "
                "give the seed file of the user (`nk -gen user` makes one)",
            )
        _need_nkeys(ENV_NKEY)
        options["nkeys_seed"] = str(Path(nkey).expanduser())
    elif creds:
        text = _read_credentials(ENV_CREDS, creds)
        if b"BEGIN NATS USER JWT" not in text or b"BEGIN USER NKEY SEED" not in text:
            raise InvalidCredentials(
                f"{ENV_CREDS}={creds}",
                "not a NATS credentials file (it needs a user JWT and a user NKEY seed "
                "block); give the .creds file made for the user (`nsc generate creds`)",
            )
        _need_nkeys(ENV_CREDS)
        options["user_credentials"] = str(Path(creds).expanduser())
    tls = _tls_context(get(ENV_CA), get(ENV_CERT), get(ENV_KEY))
    if tls is not None:
        options["tls"] = tls
    if hostname := get(ENV_TLS_HOSTNAME):
        options["tls_hostname"] = hostname
    if prefix := get(ENV_INBOX_PREFIX):
        options["inbox_prefix"] = _check_inbox_prefix(prefix)
    return options


def refusal(exc: BaseException, server_info: Mapping[str, Any]) -> str | None:
    """Why the server refused the credentials, when ``exc`` (from connecting) says it did;
    None for any other failure. ``server_info`` is the server's INFO, if one came.

    A server that refuses a password checked against a bcrypt hash answers only after the
    client's next command has arrived, and closing with that command unread resets the
    connection, which loses the refusal on the way: a reset from a server that asked
    for credentials counts as a refusal too.
    """
    if isinstance(exc, nats.errors.AuthorizationError):
        return "authorization violation"
    text = str(exc).lower()
    for reason in _REFUSALS:
        if reason in text:
            return reason
    if isinstance(exc, ConnectionResetError) and server_info.get("auth_required"):
        return "it requires credentials, and closed the connection when it got these"
    return None


def _has_userinfo(url: str) -> bool:
    parts = urlsplit(url if "://" in url else f"nats://{url}")
    return bool(parts.username)


def _read_credentials(setting: str, path: str) -> bytes:
    """The contents of an NKEY seed or creds file (bounded)."""
    data = _read(setting, path, MAX_CREDENTIALS_FILE + 1)
    if len(data) > MAX_CREDENTIALS_FILE:
        raise InvalidCredentials(
            f"{setting}={path}", f"over {MAX_CREDENTIALS_FILE} bytes: not a credentials file"
        )
    return data


def _need_nkeys(setting: str) -> None:
    """nats-py signs the server's challenge with the ``nkeys`` package, an optional extra."""
    if importlib.util.find_spec("nkeys") is None:
        raise InvalidCredentials(
            setting, "NKEY and JWT authentication need the nkeys package: pip install nkeys"
        )


def _read(setting: str, path: str, limit: int = -1) -> bytes:
    """Up to ``limit`` bytes of ``path``; :class:`InvalidCredentials` if it cannot be read."""
    where = f"{setting}={path}"
    try:
        with Path(path).expanduser().open("rb") as f:
            return f.read(limit)
    except FileNotFoundError:
        raise InvalidCredentials(where, "no such file; check the path") from None
    except IsADirectoryError:
        raise InvalidCredentials(where, "is a directory; give the file in it") from None
    except PermissionError:
        raise InvalidCredentials(
            where, "permission denied; make the file readable by this user"
        ) from None
    except OSError as exc:
        raise InvalidCredentials(where, f"cannot be read: {exc.strerror or exc}") from None


def _tls_context(ca: str, cert: str, key: str) -> ssl.SSLContext | None:
    """A client TLS context: ``ca`` to verify the server (else the system's CAs), and the
    client certificate ``cert`` with its ``key`` for mutual TLS; None if none is given."""
    if not (ca or cert or key):
        return None
    if cert and not key:
        raise InvalidCredentials(
            ENV_CERT, f"a client certificate needs its private key: set {ENV_KEY} too"
        )
    if key and not cert:
        raise InvalidCredentials(
            ENV_KEY, f"a private key needs its client certificate: set {ENV_CERT} too"
        )
    for setting, path in ((ENV_CA, ca), (ENV_CERT, cert), (ENV_KEY, key)):
        if path:
            _read(setting, path, 1)
    try:
        context = ssl.create_default_context(cafile=str(Path(ca).expanduser()) if ca else None)
    except ssl.SSLError as exc:
        raise InvalidCredentials(
            f"{ENV_CA}={ca}", f"no CA certificate in it ({_ssl_reason(exc)}); give a PEM file"
        ) from None
    if cert:

        def no_passphrase() -> str:
            raise InvalidCredentials(
                f"{ENV_KEY}={key}",
                "the key is encrypted with a passphrase; give an unencrypted copy "
                "(openssl pkey -in KEY -out KEY.plain)",
            )

        try:
            context.load_cert_chain(
                str(Path(cert).expanduser()), str(Path(key).expanduser()), password=no_passphrase
            )
        except ssl.SSLError as exc:
            raise InvalidCredentials(
                f"{ENV_CERT}={cert} with {ENV_KEY}={key}",
                f"cannot be used together ({_ssl_reason(exc)}); give a PEM certificate and "
                "the private key it was issued for",
            ) from None
    return context


def _ssl_reason(exc: ssl.SSLError) -> str:
    return str(exc.reason or exc.strerror or exc).replace("_", " ").lower()


def _check_inbox_prefix(prefix: str) -> str:
    tokens = prefix.split(".")
    if len(prefix) > MAX_INBOX_PREFIX or not all(
        _TOKEN.fullmatch(t) and "*" not in t and ">" not in t for t in tokens
    ):
        raise InvalidCredentials(
            f"{ENV_INBOX_PREFIX}={prefix}",
            "not a subject prefix: use dot-separated tokens without spaces or wildcards, "
            f"at most {MAX_INBOX_PREFIX} characters, e.g. _INBOX_planner",
        )
    return prefix
