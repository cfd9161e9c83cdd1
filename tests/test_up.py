"""``mesh up`` as a real process tree, and the demo pipeline in process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import msgspec
import pytest
from _util import arun, wait_until

from mesh import MeshClient, RemoteError
from mesh._up import MAX_REPLICAS, load_mesh_file
from nodes import NodeRuntime
from nodes.examples.pipeline import (
    Finding,
    Report,
    ResearchQuery,
    Task,
    TaskDone,
    find,
    plan_questions,
    planner,
    researcher,
    writer,
)

REPO = Path(__file__).resolve().parents[1]
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _env(marker: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "OTEL_"))}
    env["NO_COLOR"] = "1"
    if marker:
        # Inherited by every process `mesh up` starts: how the test finds leftovers.
        env["MESH_TEST_MARKER"] = marker
    return env


def _mesh(*args: str, cwd: Path = REPO, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mesh", *args],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=cwd,
        timeout=timeout,
    )


def _with_marker(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment holds ``MESH_TEST_MARKER=marker``."""
    needle = f"MESH_TEST_MARKER={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone, or not ours to read
            continue
        if state != "Z":
            found.append(int(entry.name))
    return found


def _kill_marked(marker: str) -> None:
    for pid in _with_marker(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def marker() -> Iterator[str]:
    """A unique marker for the processes of one test; leftovers are killed afterwards."""
    value = uuid.uuid4().hex
    yield value
    if sys.platform.startswith("linux"):
        _kill_marked(value)


class Up:
    """A background ``mesh up`` process with its output in files."""

    def __init__(self, args: list[str], tmp_path: Path, marker: str) -> None:
        self.out_path = tmp_path / "up.out"
        self.err_path = tmp_path / "up.err"
        self._out: IO[bytes] = self.out_path.open("wb")
        self._err: IO[bytes] = self.err_path.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mesh", "up", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._err,
            env=_env(marker),
            cwd=REPO,
        )

    @property
    def out(self) -> str:
        return self.out_path.read_text()

    @property
    def err(self) -> str:
        return self.err_path.read_text()

    def wait_for_output(self, text: str, timeout: float = 60) -> None:
        wait_until(lambda: text in self.err or self.proc.poll() is not None, timeout)
        assert text in self.err, f"no {text!r} from mesh up:\n{self.err}"

    def stop(self, sig: int = signal.SIGINT, timeout: float = 60) -> int:
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()
            self._err.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()
        self._err.close()


def _nodes(url: str) -> list[dict[str, Any]]:
    result = _mesh("nodes", "--json", "--nats", url, timeout=30)
    assert result.returncode == 0, result.stderr
    found: list[dict[str, Any]] = json.loads(result.stdout)
    return found


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# ------------------------------------------------------------------- mesh up --demo


@linux_only
def test_demo_runs_traffic_and_leaves_no_process(marker: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mesh", "up", "--demo", "--duration", "6", "--rate", "20"],
        capture_output=True,
        text=True,
        env=_env(marker),
        cwd=REPO,
        timeout=100,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Traceback" not in output
    assert "OTEL_EXPORTER_OTLP_ENDPOINT=http://localhost:4317" in result.stderr
    assert "jaegertracing/all-in-one" in result.stderr
    assert "http://localhost:16686" in result.stderr
    tasks = re.search(r"(\d+) sent, (\d+) done, (\d+) errors", result.stdout)
    assert tasks is not None, output
    sent, done, errors = map(int, tasks.groups())
    assert done > 0
    assert errors == 0
    assert done == sent
    assert re.search(r"p50 [\d.]+ms\s+p90 [\d.]+ms\s+p99 [\d.]+ms", result.stdout), output
    assert "6 processes, 0 crashed, 0 restarts" in result.stdout
    # Every process of the tree (nodes, nats-server) is gone once `mesh up` has exited.
    assert wait_until(lambda: not _with_marker(marker), 10), _with_marker(marker)


# ------------------------------------------------------------------- mesh up FILE


@linux_only
def test_up_file_runs_the_nodes_until_sigint(nats_url: str, tmp_path: Path, marker: str) -> None:
    config = _write(
        tmp_path / "mesh.toml",
        f'nats = "{nats_url}"\n\n[[node]]\napp = "nodes.examples.echo:node"\nreplicas = 2\n',
    )
    up = Up([str(config)], tmp_path, marker)
    try:
        up.wait_for_output("all 2 nodes registered")
        echoes = [n for n in _nodes(nats_url) if n["name"] == "echo"]
        assert len(echoes) == 2
        reply = _mesh("request", "demo.echo", '{"x": 1}', "--nats", nats_url, timeout=30)
        assert reply.returncode == 0, reply.stderr
        assert json.loads(reply.stdout) == {"x": 1}
        code = up.stop(signal.SIGINT)
    finally:
        up.kill()
    assert code == 0, up.err
    assert "Traceback" not in up.out + up.err
    assert "2 processes, 0 crashed, 0 restarts" in up.out
    # Nodes deregister as they drain, so they are gone from the registry at once.
    assert not [n for n in _nodes(nats_url) if n["name"] == "echo"]
    assert wait_until(lambda: not _with_marker(marker), 10), _with_marker(marker)


@linux_only
def test_up_file_restarts_a_crashed_node(nats_url: str, tmp_path: Path, marker: str) -> None:
    config = _write(tmp_path / "mesh.toml", '[[node]]\napp = "nodes.examples.echo:node"\n')
    up = Up([str(config), "--nats", nats_url], tmp_path, marker)
    try:
        up.wait_for_output("all 1 node registered")
        (first,) = [n["pid"] for n in _nodes(nats_url) if n["name"] == "echo"]
        os.kill(first, signal.SIGKILL)
        up.wait_for_output("restart 1/")

        def replaced() -> bool:
            pids = [n["pid"] for n in _nodes(nats_url) if n["name"] == "echo"]
            return len(pids) == 1 and pids[0] != first

        assert wait_until(replaced, 60), up.err
        code = up.stop(signal.SIGTERM)
    finally:
        up.kill()
    assert code == 1, up.err  # a node crashed during the run
    assert "1 process, 1 crashed, 1 restarts" in up.out
    assert wait_until(lambda: not _with_marker(marker), 10), _with_marker(marker)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "no such file"),
        ("[[node]\napp = 1", "invalid TOML"),
        ('[[node]]\napp = "nodes.examples.echo:node"\nreplica = 2\n', "unknown field `replica`"),
        ('[[node]]\napp = "nodes.examples.echo"\n', "must look like MODULE:ATTR"),
        ('[[node]]\napp = "echo node:x"\n', "must look like MODULE:ATTR"),
        ('[[node]]\napp = "nodes.examples.echo:node"\nreplicas = 0\n', "replicas"),
        (f'[[node]]\napp = "a:b"\nreplicas = {MAX_REPLICAS + 1}\n', "replicas"),
        ('nats = "nats://127.0.0.1:4222"\n', "missing required field `node`"),
        ('title = "x"\n[[node]]\napp = "a:b"\n', "unknown field `title`"),
    ],
)
def test_bad_mesh_file_is_a_clean_usage_error(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "mesh.toml"
    if content is not None:
        _write(path, content)
    result = _mesh("up", str(path), timeout=30)
    assert result.returncode == 2, result
    assert result.stderr.startswith(f"error: {path}: "), result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_default_file_is_mesh_toml_in_the_working_directory(tmp_path: Path) -> None:
    result = _mesh("up", cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    assert result.stderr.startswith("error: mesh.toml: no such file"), result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--demo", "mesh.toml"], "either FILE or --demo"),
        (["--demo", "--rate", "0"], "--rate"),
        (["--demo", "--duration", "-1"], "--duration"),
    ],
)
def test_bad_options_are_clean_usage_errors(args: list[str], message: str) -> None:
    result = _mesh("up", *args, timeout=30)
    assert result.returncode == 2, result
    assert "error:" in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_node_that_cannot_start_is_reported_with_its_output(
    nats_url: str, tmp_path: Path
) -> None:
    config = _write(tmp_path / "mesh.toml", '[[node]]\napp = "nodes.examples.echo:missing"\n')
    result = _mesh("up", str(config), "--nats", nats_url, "--duration", "30", timeout=90)
    assert result.returncode == 1, result
    assert "exited with code 1 before it was ready" in result.stderr
    assert "has no attribute 'missing'" in result.stderr  # the node's own error
    assert "Traceback" not in result.stderr


def test_load_mesh_file(tmp_path: Path) -> None:
    path = _write(
        tmp_path / "mesh.toml",
        'nats = "nats://10.0.0.1:4222"\nembedded_server = true\n'
        '[[node]]\napp = "nodes.examples.echo:node"\nreplicas = 3\n'
        '[[node]]\napp = "nodes.examples.pipeline:writer"\n',
    )
    config = load_mesh_file(path)
    assert config.nats == "nats://10.0.0.1:4222"
    assert config.embedded_server
    assert [(n.app, n.replicas) for n in config.node] == [
        ("nodes.examples.echo:node", 3),
        ("nodes.examples.pipeline:writer", 1),
    ]


# ------------------------------------------------------------------- the pipeline


def test_pipeline_plans_researches_and_writes(nats_url: str) -> None:
    task = Task(id="t-1", topic="grid-scale storage", questions=4)

    async def main() -> tuple[Report, Report, TaskDone]:
        async with (
            await MeshClient.connect(nats_url, name="planner") as p,
            await MeshClient.connect(nats_url, name="researcher") as r1,
            await MeshClient.connect(nats_url, name="researcher") as r2,
            await MeshClient.connect(nats_url, name="writer") as w,
            NodeRuntime(planner, p, register=False),
            NodeRuntime(researcher, r1, register=False),
            NodeRuntime(researcher, r2, register=False),
            NodeRuntime(writer, w, register=False),
            await MeshClient.connect(nats_url, name="caller") as caller,
        ):
            done: list[TaskDone] = []
            got_event = asyncio.Event()

            async def on_done(msg: Any) -> None:
                done.append(msg.decode(TaskDone))
                got_event.set()

            await caller.subscribe("demo.events.done", on_done)
            await caller.nc.flush()
            first = await caller.request("demo.plan", task, type=Report, timeout=10)
            second = await caller.request("demo.plan", task, type=Report, timeout=10)
            await asyncio.wait_for(got_event.wait(), 10)
            with pytest.raises(RemoteError, match="MalformedMessage"):
                await caller.request(
                    "demo.plan", {"id": "t-2", "topic": "x", "questions": 99}, timeout=10
                )
            return first, second, done[0]

    first, second, event = arun(main(), timeout=60)
    assert first == second  # deterministic for the same task
    findings = [
        find(ResearchQuery(task_id=task.id, question=q, index=i))
        for i, q in enumerate(plan_questions(task))
    ]
    assert len(findings) == 4
    assert first.task_id == "t-1"
    assert [s.heading for s in first.sections[1:]] == [f.question.rstrip("?") for f in findings]
    expected_sources = {s.url for f in findings for s in f.sources}
    assert {s.url for s in first.sources} == expected_sources
    assert len(first.sources) == len(expected_sources)  # deduplicated
    for section, finding in zip(first.sections[1:], findings, strict=True):
        assert finding.summary in section.body
        assert [first.sources[i].url for i in section.citations] == [s.url for s in finding.sources]
    assert first.word_count == sum(
        len(s.heading.split()) + len(s.body.split()) for s in first.sections
    )
    assert 1 <= len(first.keywords) <= 5
    assert event == TaskDone(
        task_id="t-1",
        title=first.title,
        sections=len(first.sections),
        word_count=first.word_count,
        sources=len(first.sources),
    )


def test_research_is_deterministic_and_realistically_sized() -> None:
    for i in range(50):
        query = ResearchQuery(task_id="t", question=f"What limits design number {i}?", index=0)
        finding = find(query)
        assert finding == find(query)
        assert 2 <= len(finding.sources) <= 4
        assert all(s.url.startswith("https://example.org/") for s in finding.sources)
        assert 0.5 <= finding.confidence < 1.0
        size = len(msgspec.json.encode(finding))
        assert 500 <= size <= 2048, size
        assert isinstance(msgspec.json.decode(msgspec.json.encode(finding), type=Finding), Finding)
