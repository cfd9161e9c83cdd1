"""parse_connz on documents captured from a real nats-server (2.x, ``/connz?subs=detail``
and ``/connz?subs=1``), malformed input, and foreign subscribers in the graph."""

from __future__ import annotations

import pytest

from topology import (
    ForeignClient,
    ForeignSubscription,
    ReceivedStats,
    SentStats,
    Snapshot,
    build_graph,
    parse_connz,
)

# Three connections: the mesh's echo node, an "audit-tap" with a wildcard subscription,
# a queue subscription and a request inbox, and an unnamed client.
CONNZ_DETAIL = r"""
{
  "server_id": "NAX57RHL3V4DEFJBGDGP23C5LN2GQDNDK3RHFBAXO3J556NPK2EM3FCG",
  "now": "2026-11-22T05:07:10.013389398Z",
  "num_connections": 3,
  "total": 3,
  "offset": 0,
  "limit": 1024,
  "connections": [
    {
      "cid": 5,
      "kind": "Client",
      "type": "nats",
      "ip": "127.0.0.1",
      "port": 58068,
      "start": "2026-11-22T05:07:10.004553954Z",
      "last_activity": "2026-11-22T05:07:10.011857544Z",
      "rtt": "951µs",
      "uptime": "0s",
      "idle": "0s",
      "pending_bytes": 0,
      "in_msgs": 3,
      "out_msgs": 3,
      "in_bytes": 6,
      "out_bytes": 6,
      "subscriptions": 2,
      "name": "mesh:echo",
      "lang": "python3",
      "version": "2.16.0",
      "subscriptions_list_detail": [
        {
          "subject": "demo.echo",
          "qgroup": "echo",
          "sid": "1",
          "msgs": 3,
          "cid": 5
        },
        {
          "subject": "_MESH.policy.echo",
          "sid": "2",
          "msgs": 0,
          "cid": 5
        }
      ]
    },
    {
      "cid": 6,
      "kind": "Client",
      "type": "nats",
      "ip": "127.0.0.1",
      "port": 58082,
      "start": "2026-11-22T05:07:10.007156035Z",
      "last_activity": "2026-11-22T05:07:10.011857544Z",
      "rtt": "721µs",
      "uptime": "0s",
      "idle": "0s",
      "pending_bytes": 0,
      "in_msgs": 3,
      "out_msgs": 6,
      "in_bytes": 6,
      "out_bytes": 12,
      "subscriptions": 3,
      "name": "audit-tap",
      "lang": "python3",
      "version": "2.16.0",
      "subscriptions_list_detail": [
        {
          "subject": "demo.\u003e",
          "sid": "1",
          "msgs": 3,
          "cid": 6
        },
        {
          "subject": "orders.*.created",
          "qgroup": "billing",
          "sid": "2",
          "msgs": 0,
          "cid": 6
        },
        {
          "subject": "_INBOX.bhI35MORlUeFRl3ZCj5awp.*",
          "sid": "3",
          "msgs": 3,
          "cid": 6
        }
      ]
    },
    {
      "cid": 7,
      "kind": "Client",
      "type": "nats",
      "ip": "127.0.0.1",
      "port": 58084,
      "start": "2026-11-22T05:07:10.009119035Z",
      "last_activity": "2026-11-22T05:07:10.010868257Z",
      "rtt": "660µs",
      "uptime": "0s",
      "idle": "0s",
      "pending_bytes": 0,
      "in_msgs": 0,
      "out_msgs": 0,
      "in_bytes": 0,
      "out_bytes": 0,
      "subscriptions": 1,
      "lang": "python3",
      "version": "2.16.0",
      "subscriptions_list_detail": [
        {
          "subject": "metrics.cpu",
          "sid": "1",
          "msgs": 0,
          "cid": 7
        }
      ]
    }
  ]
}
"""

CONNZ_SUBS = r"""
{
  "server_id": "NAX57RHL3V4DEFJBGDGP23C5LN2GQDNDK3RHFBAXO3J556NPK2EM3FCG",
  "now": "2026-11-22T05:07:10.014976554Z",
  "num_connections": 3,
  "total": 3,
  "offset": 0,
  "limit": 1024,
  "connections": [
    {
      "cid": 5,
      "kind": "Client",
      "type": "nats",
      "ip": "127.0.0.1",
      "port": 58068,
      "start": "2026-11-22T05:07:10.004553954Z",
      "last_activity": "2026-11-22T05:07:10.011857544Z",
      "rtt": "951µs",
      "uptime": "0s",
      "idle": "0s",
      "pending_bytes": 0,
      "in_msgs": 3,
      "out_msgs": 3,
      "in_bytes": 6,
      "out_bytes": 6,
      "subscriptions": 2,
      "name": "mesh:echo",
      "lang": "python3",
      "version": "2.16.0",
      "subscriptions_list": [
        "demo.echo",
        "_MESH.policy.echo"
      ]
    },
    {
      "cid": 6,
      "kind": "Client",
      "type": "nats",
      "ip": "127.0.0.1",
      "port": 58082,
      "start": "2026-11-22T05:07:10.007156035Z",
      "last_activity": "2026-11-22T05:07:10.011857544Z",
      "rtt": "721µs",
      "uptime": "0s",
      "idle": "0s",
      "pending_bytes": 0,
      "in_msgs": 3,
      "out_msgs": 6,
      "in_bytes": 6,
      "out_bytes": 12,
      "subscriptions": 3,
      "name": "audit-tap",
      "lang": "python3",
      "version": "2.16.0",
      "subscriptions_list": [
        "demo.\u003e",
        "orders.*.created",
        "_INBOX.bhI35MORlUeFRl3ZCj5awp.*"
      ]
    },
    {
      "cid": 7,
      "kind": "Client",
      "type": "nats",
      "ip": "127.0.0.1",
      "port": 58084,
      "start": "2026-11-22T05:07:10.009119035Z",
      "last_activity": "2026-11-22T05:07:10.010868257Z",
      "rtt": "660µs",
      "uptime": "0s",
      "idle": "0s",
      "pending_bytes": 0,
      "in_msgs": 0,
      "out_msgs": 0,
      "in_bytes": 0,
      "out_bytes": 0,
      "subscriptions": 1,
      "lang": "python3",
      "version": "2.16.0",
      "subscriptions_list": [
        "metrics.cpu"
      ]
    }
  ]
}
"""

TAP = ForeignClient(
    cid=6,
    name="audit-tap",
    ip="127.0.0.1",
    port=58082,
    lang="python3",
    version="2.16.0",
    in_msgs=3,
    out_msgs=6,
    in_bytes=6,
    out_bytes=12,
    subscriptions=(
        ForeignSubscription(subject="demo.>", msgs=3),
        ForeignSubscription(subject="orders.*.created", queue="billing"),
    ),
)


def test_parse_connz_detail_keeps_foreign_connections_and_application_subjects() -> None:
    clients = parse_connz(CONNZ_DETAIL.encode())
    assert [c.cid for c in clients] == [6, 7]  # cid 5 is mesh:echo
    assert clients[0] == TAP
    assert clients[0].label == "audit-tap#6"
    assert clients[1].label == "127.0.0.1:58084#7"
    assert clients[1].subscriptions == (ForeignSubscription(subject="metrics.cpu"),)


def test_parse_connz_subs_list() -> None:
    clients = parse_connz(CONNZ_SUBS)
    assert [[s.subject for s in c.subscriptions] for c in clients] == [
        ["demo.>", "orders.*.created"],
        ["metrics.cpu"],
    ]


def test_parse_connz_mesh_prefix() -> None:
    everyone = parse_connz(CONNZ_DETAIL, mesh_prefix="nobody:")
    assert [c.cid for c in everyone] == [5, 6, 7]
    assert everyone[0].subscriptions == (
        ForeignSubscription(subject="demo.echo", queue="echo", msgs=3),
    )


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"not json",
        b"[]",
        b'{"server_id": "x"}',  # no connections
        b'{"connections": [{"name": "a"}]}',  # no cid
        b'{"connections": [{"cid": "5"}]}',
        b'{"connections": [{"cid": 5, "subscriptions_list": [""]}]}',
    ],
)
def test_malformed_connz_is_a_value_error(data: bytes) -> None:
    with pytest.raises(ValueError, match="nats-server /connz"):
        parse_connz(data)


def test_no_connections_is_an_empty_list() -> None:
    assert parse_connz(b'{"connections": null}') == []
    assert parse_connz(b'{"connections": []}') == []


def test_foreign_subscribers_of_subjects_and_patterns() -> None:
    pub = Snapshot(
        instance="shop-0",
        agent="shop",
        seq=0,
        time=1,
        interval=1,
        sent=[
            SentStats(subject="orders.eu.created", msgs=1),
            SentStats(subject="demo.echo", msgs=1),
            SentStats(subject="orders.eu.paid", msgs=1),
        ],
    )
    audit = Snapshot(
        instance="audit-0",
        agent="audit",
        seq=0,
        time=1,
        interval=1,
        received=[ReceivedStats(subject="orders.>"), ReceivedStats(subject="metrics.mem")],
    )
    graph = build_graph([pub, audit], foreign=parse_connz(CONNZ_DETAIL))
    foreign = {s.name: s.foreign_subscribers for s in graph.subjects}
    assert foreign == {
        "demo.echo": ("audit-tap#6",),
        "metrics.mem": (),
        "orders.>": ("audit-tap#6",),  # overlaps orders.*.created
        "orders.eu.created": ("audit-tap#6",),
        "orders.eu.paid": (),
    }
    assert [c.cid for c in graph.foreign] == [6, 7]
