"""Foreign clients: connections to the server that are not part of the mesh.

The mesh only sees its own telemetry; nats-server's monitoring endpoint
(``GET /connz?subs=detail``) shows every connection and its subscriptions.
:func:`parse_connz` keeps the connections outside the mesh (mesh connections are named
``mesh:<agent>``) and their subscriptions to application subjects, so the analysis can
tell which subjects a foreign client listens to: a codec policy must never change the
bytes such a subscriber gets.
"""

from __future__ import annotations

from typing import Final

import msgspec

__all__ = ["ForeignClient", "ForeignSubscription", "is_internal_subject", "parse_connz"]

#: Subjects of request inboxes, server APIs and the mesh's own plane: never application data.
INTERNAL_PREFIXES: Final = ("_INBOX.", "$", "_MESH.")


class ForeignSubscription(msgspec.Struct, frozen=True, kw_only=True):
    """One subscription of a foreign connection."""

    subject: str
    queue: str = ""
    #: Messages the server delivered to it since it was made.
    msgs: int = 0


class ForeignClient(msgspec.Struct, frozen=True, kw_only=True):
    """A connection outside the mesh, as the server's monitoring reports it.

    Message and byte counts are the server's totals since the connection was made.
    """

    cid: int
    name: str = ""
    ip: str = ""
    port: int = 0
    lang: str = ""
    version: str = ""
    in_msgs: int = 0
    out_msgs: int = 0
    in_bytes: int = 0
    out_bytes: int = 0
    subscriptions: tuple[ForeignSubscription, ...] = ()

    @property
    def label(self) -> str:
        """How reports name it: its name (or address) and its connection id."""
        who = self.name or f"{self.ip}:{self.port}"
        return f"{who}#{self.cid}"


def is_internal_subject(subject: str) -> bool:
    """True for inbox, ``$``-prefixed and ``_MESH.`` subjects."""
    return subject.startswith(INTERNAL_PREFIXES)


# nats-server's JSON, only the fields used; unknown fields are ignored.


class _SubDetail(msgspec.Struct, kw_only=True):
    subject: str
    qgroup: str = ""
    msgs: int = 0


class _Connection(msgspec.Struct, kw_only=True):
    cid: int
    kind: str = "Client"
    name: str = ""
    ip: str = ""
    port: int = 0
    lang: str = ""
    version: str = ""
    in_msgs: int = 0
    out_msgs: int = 0
    in_bytes: int = 0
    out_bytes: int = 0
    subscriptions_list: list[str] | None = None
    subscriptions_list_detail: list[_SubDetail] | None = None


class _Connz(msgspec.Struct, kw_only=True):
    connections: list[_Connection] | None


_decoder: Final = msgspec.json.Decoder(_Connz)


def parse_connz(data: bytes | str, *, mesh_prefix: str = "mesh:") -> list[ForeignClient]:
    """The foreign clients in a nats-server ``/connz`` JSON document, by connection id.

    Accepts ``subs=detail`` (``subscriptions_list_detail``, with queue groups) and
    ``subs=1`` (``subscriptions_list``). A connection whose name starts with
    ``mesh_prefix`` is part of the mesh and left out; subscriptions to internal subjects
    (see :func:`is_internal_subject`) are left out. Raises ValueError if ``data`` is not
    such a document.
    """
    try:
        connz = _decoder.decode(data)
    except (msgspec.DecodeError, ValueError, RecursionError) as exc:
        raise ValueError(f"not a nats-server /connz document: {exc}") from exc
    clients = []
    for conn in connz.connections or ():
        if conn.kind != "Client" or conn.name.startswith(mesh_prefix):
            continue
        if conn.subscriptions_list_detail is not None:
            subs = [
                ForeignSubscription(subject=s.subject, queue=s.qgroup, msgs=s.msgs)
                for s in conn.subscriptions_list_detail
            ]
        else:
            subs = [ForeignSubscription(subject=s) for s in conn.subscriptions_list or ()]
        for sub in subs:
            if not sub.subject or " " in sub.subject:
                raise ValueError(
                    f"not a nats-server /connz document: connection {conn.cid} has an "
                    f"invalid subscription subject {sub.subject!r}"
                )
        clients.append(
            ForeignClient(
                cid=conn.cid,
                name=conn.name,
                ip=conn.ip,
                port=conn.port,
                lang=conn.lang,
                version=conn.version,
                in_msgs=conn.in_msgs,
                out_msgs=conn.out_msgs,
                in_bytes=conn.in_bytes,
                out_bytes=conn.out_bytes,
                subscriptions=tuple(
                    sorted(
                        (s for s in subs if not is_internal_subject(s.subject)),
                        key=lambda s: (s.subject, s.queue),
                    )
                ),
            )
        )
    clients.sort(key=lambda c: c.cid)
    return clients
