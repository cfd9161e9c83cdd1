"""`mesh bench`, run as a user runs it: the report's shape and its cleanup, never its speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SIZES = ("128", "1024", "16384")


def _mesh(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MESH_NATS_URL"}
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=REPO,
        check=False,
    )


def _processes_mentioning(text: str) -> list[int]:
    """Pids of live processes whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:  # it ended meanwhile, or is not ours to read
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


def _positive(record: dict[str, Any], *keys: str) -> None:
    for key in keys:
        value = record[key]
        assert isinstance(value, int | float), (key, value)
        assert value > 0, (key, value)


def test_quick_bench_reports_every_number_and_leaves_nothing_running() -> None:
    done = _mesh("bench", "--quick", "--json", "--seconds", "0.5", "--rounds", "1", timeout=90)

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert "round 1/1" in done.stderr  # progress goes to stderr, stdout is only the JSON
    for size in SIZES:
        row = report["pubsub"][size]
        _positive(row, "mesh_msgs_s", "raw_msgs_s", "mesh_pub_msgs_s", "raw_pub_msgs_s", "ratio")
        for impl in ("mesh", "raw"):
            assert row[f"{impl}_dropped"] >= 0
            assert row[f"{impl}_received"] + row[f"{impl}_dropped"] <= row[f"{impl}_published"]
            assert row[f"{impl}_bound"] in ("pub", "sub")
    for impl in ("mesh", "raw"):
        side = report["reqrep"][impl]
        _positive(side, "p50_us", "p90_us", "p99_us", "inflight64_req_s")
        assert side["p50_us"] <= side["p90_us"] <= side["p99_us"]
        assert side["sequential_requests"] == 500
    _positive(report["reqrep"]["ratios"], "p50_us", "p99_us", "inflight64_req_s")
    assert {t["id"] for t in report["targets"]} == {"pubsub_1024", "reqrep_p50", "reqrep_p99"}
    assert all(isinstance(t["pass"], bool) for t in report["targets"])
    env = report["environment"]
    assert env["tracing"] == "unsampled"
    assert env["rounds"] == 1
    assert env["nats_server"]
    assert env["nats_py"]
    assert env["cpu_count"] >= 1

    # Every worker's command line carries the run id; the embedded server has its pid.
    assert _processes_mentioning(f"bench.{env['run_id']}.") == []
    assert env["embedded_server_pid"] not in _processes_mentioning("nats-server")


def test_bench_says_when_the_server_is_unreachable() -> None:
    done = _mesh("bench", "--quick", "--nats", "nats://127.0.0.1:1", timeout=30)

    assert done.returncode == 3
    assert done.stderr.startswith("error: cannot reach NATS at nats://127.0.0.1:1")
    assert done.stdout == ""


def test_telemetry_bench_reports_both_measurements_for_each_size() -> None:
    done = _mesh("bench", "telemetry", "--json", "--seconds", "0.2", "--rounds", "1", timeout=180)

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["rounds"] == 1
    assert report["goal"] == 0.05
    assert [r["size"] for r in report["results"]] == [128, 1024]
    for result in report["results"]:
        assert [s["impl"] for s in result["sides"]] == ["raw", "mesh", "mesh-untallied"]
        for side in result["sides"]:
            _positive(side, "best_msgs_s", "median_msgs_s", "pub_cpu_us", "sub_cpu_us")
        assert len(result["ratios"]) == 1
        assert [h["path"] for h in result["hot"]] == ["publish", "receive"]
        for hot in result["hot"]:
            _positive(hot, "mesh_ns", "untallied_ns")
            assert isinstance(hot["extra_ns"], float)
        assert result["cpu_cost"] >= 0
        assert result["met"] == (result["cpu_cost"] <= 0.05)
    assert "Traceback" not in done.stderr


def test_reliable_bench_reports_publish_and_consume_for_both_sides() -> None:
    done = _mesh("bench", "reliable", "--json", "--messages", "300", "--rounds", "1", timeout=180)

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["messages"] == 300
    assert {(r["side"], r["what"]) for r in report["rates"]} == {
        (side, what) for side in ("raw", "mesh") for what in ("publish", "consume")
    }
    for rate in report["rates"]:
        _positive(rate, "seconds", "messages")
    _positive(report["ratios"], "publish", "consume")
    assert "Traceback" not in done.stderr
