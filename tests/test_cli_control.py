"""`mesh policy`, `mesh topology` and `mesh stats` as a user runs them, against a real
server and a real node process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _util import wait_until
from test_cli import mesh

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def echo_node(nats_url: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mesh",
            "node",
            "run",
            "nodes.examples.echo:node",
            "--nats",
            nats_url,
        ],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_until(
            lambda: "echo" in mesh("nodes", "--json", "--nats", nats_url).out, timeout=30
        )
        yield proc
    finally:
        proc.terminate()
        proc.wait(15)


def test_policy_set_reaches_the_node_and_shows_in_ls_and_history(
    nats_url: str, echo_node: subprocess.Popen[bytes]
) -> None:
    done = mesh(
        "policy",
        "set",
        "demo.echo",
        "--codec",
        "zstd:3",
        "--reason",
        "large replies",
        "--monitor",
        "none",
        "--nats",
        nats_url,
    )
    assert done.code == 0, done.err
    assert "version 1" in done.out
    assert "applied by 1/1 node instances" in done.out
    listed = json.loads(mesh("policy", "ls", "--json", "--nats", nats_url).out)
    assert [(r["subject"], r["version"], r["reason"]) for r in listed] == [
        ("demo.echo", 1, "large replies")
    ]
    again = mesh(
        "policy",
        "set",
        "demo.echo",
        "--codec",
        "none",
        "--pin",
        "--monitor",
        "none",
        "--nats",
        nats_url,
    )
    assert again.code == 0, again.err
    history = json.loads(mesh("policy", "history", "demo.echo", "--json", "--nats", nats_url).out)
    assert [(h["version"], h["pinned"]) for h in history] == [(1, False), (2, True)]
    # The reply still comes back whole whatever the codec.
    reply = mesh("request", "demo.echo", '{"text": "hi"}', "--nats", nats_url)
    assert json.loads(reply.out) == {"text": "hi"}
    assert mesh("policy", "rm", "demo.echo", "--nats", nats_url).code == 0
    assert mesh("policy", "get", "demo.echo", "--nats", nats_url).code == 1


def test_policy_set_refuses_what_no_node_could_apply(nats_url: str) -> None:
    unknown = mesh(
        "policy",
        "set",
        "demo.echo",
        "--codec",
        "zstd:3",
        "--dict",
        "12345",
        "--monitor",
        "none",
        "--nats",
        nats_url,
    )
    assert unknown.code == 1
    assert "dictionary 12345" in unknown.err
    assert "Traceback" not in unknown.err
    level = mesh("policy", "set", "demo.echo", "--codec", "zstd:42", "--nats", nats_url)
    assert level.code == 2
    assert "1 to 19" in level.err
    nothing = mesh("policy", "set", "demo.echo", "--nats", nats_url)
    assert nothing.code == 2
    assert json.loads(mesh("policy", "ls", "--json", "--nats", nats_url).out) == []


def test_topology_and_stats_show_the_running_node(
    nats_url: str, echo_node: subprocess.Popen[bytes]
) -> None:
    for _ in range(5):
        assert mesh("request", "demo.echo", '{"n": 1}', "--nats", nats_url).code == 0
    shown = mesh("topology", "--format", "json", "--monitor", "none", "--nats", nats_url)
    assert shown.code == 0, shown.err
    report = json.loads(shown.out)
    assert "echo" in [a["name"] for a in report["agents"]]
    assert "demo.echo" in [s["name"] for s in report["subjects"]]
    dot = mesh("topology", "--format", "dot", "--monitor", "none", "--nats", nats_url)
    assert dot.out.strip().startswith("digraph")
    stats = mesh("stats", "--nats", nats_url)
    assert stats.code == 0
    assert "demo.echo" in stats.out


def test_topology_without_nodes_says_so(nats_url: str) -> None:
    empty = mesh("topology", "--listen", "1", "--nats", nats_url)
    assert empty.code == 1
    assert "no telemetry" in empty.err
