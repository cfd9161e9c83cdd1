"""Fixtures of the chaos suite, and the table of every scenario's counts.

The three-server cluster is the ``nats_cluster`` fixture of the parent conftest
(``mesh._cluster.NatsCluster``, stores under the test's tmp_path, so a server
restarted with ``start`` comes back on the same ports with the same store).
Each scenario reports its `checker.Result` through the ``scenario`` fixture; at
the end of the session the results are printed as one table in pytest's terminal
summary, so it shows with a plain ``pytest -q tests/chaos``. A scenario that did
not get as far as reporting shows as a FAIL row.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from checker import Result, render_table
from harness import Processes, Scenario

from mesh._cluster import NatsCluster

_RESULTS = pytest.StashKey[list[Result]]()


@pytest.fixture
def scenario(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Scenario]:
    """The running scenario, named after its test (``test_slow_subscriber``:
    ``slow-subscriber``)."""
    results = request.config.stash.setdefault(_RESULTS, [])
    name = request.node.name.removeprefix("test_").replace("_", "-")
    run = Scenario(name, tmp_path, results)
    yield run
    if run.result is None:
        results.append(
            Result(
                name,
                None,
                ("did not finish (see the test's error)",),
                time.monotonic() - run.started,
            )
        )


@pytest.fixture
def processes(tmp_path: Path, nats_cluster: NatsCluster) -> Iterator[Processes]:
    """Child processes of the test, killed afterwards (before the cluster stops)."""
    procs = Processes(tmp_path / "processes")
    try:
        yield procs
    finally:
        procs.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    results = terminalreporter.config.stash.get(_RESULTS, [])
    if results:
        terminalreporter.write_sep("=", "chaos scenarios")
        terminalreporter.write_line(render_table(results))
