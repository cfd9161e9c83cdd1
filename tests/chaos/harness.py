"""What the chaos scenarios run on: child processes, their delivery records, a paced
publisher, and a little reading of the servers' and processes' state.

Every node under test is a real OS process started by `Processes`, so a scenario can
kill -9, SIGSTOP or SIGTERM it; what it processed is read back from its record file
(see `chaos_nodes`) by a `DeliveryLog`, even after it died. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Final

from _util import eventually, within
from chaos_nodes import (
    CONCURRENCY_ENV,
    CONSUMER_ENV,
    RECORD_DIR_ENV,
    RECORD_SUFFIX,
    TASK_SUBJECT,
    WORK_SECONDS_ENV,
    payload,
)
from checker import Criterion, History, Outcome, Result, check, judge

from mesh import (
    ClientClosed,
    MeshClient,
    PublishBufferFull,
    PublishNotConfirmed,
    PublishRefused,
)
from mesh._server import NatsServer, _die_with_parent

REPO: Final = Path(__file__).resolve().parents[2]
WORKER_APP: Final = "tests.chaos.chaos_nodes:worker"
READY_TIMEOUT: Final = 30.0
EXIT_TIMEOUT: Final = 30.0
_KIB: Final = 1024


def _env(extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "OTEL_", "CHAOS_"))}
    env["NO_COLOR"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Scenario:
    """One chaos scenario: where its records go, and its verdict for the table."""

    def __init__(self, name: str, directory: Path, results: list[Result]) -> None:
        self.name = name
        self.records = directory / "records"
        self.started = time.monotonic()
        self.result: Result | None = None
        self._results = results

    def report(self, history: History, criteria: Iterable[Criterion]) -> Result:
        """Check ``history`` against ``criteria`` and add the row to the table."""
        self.result = judge(self.name, check(history), criteria, time.monotonic() - self.started)
        self._results.append(self.result)
        return self.result


class Proc:
    """A child process of the test, its stdout and stderr in one file."""

    def __init__(self, label: str, argv: list[str], env: dict[str, str], directory: Path) -> None:
        self.label = label
        self.output_path = directory / f"{label}.out"
        with self.output_path.open("wb") as out:
            self.popen = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=REPO,
                preexec_fn=_die_with_parent(),  # no orphan when the test process dies
            )

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit code (negative: the signal that killed it), None while it runs."""
        return self.popen.poll()

    def output(self, lines: int = 40) -> str:
        """The last ``lines`` lines it printed."""
        text = self.output_path.read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    async def ready(self, text: str, timeout: float = READY_TIMEOUT) -> None:
        """Wait until it printed ``text``; AssertionError (with its output) if it exited
        first or ``timeout`` passed."""

        def printed() -> bool:
            if text in self.output_path.read_text(errors="replace"):
                return True
            if self.returncode is not None:
                raise AssertionError(
                    f"{self.label} exited with {self.returncode} before it was ready:\n"
                    + self.output()
                )
            return False

        await eventually(printed, timeout, message=f"{self.label} not ready:\n{self.output()}")

    def signal(self, sig: int) -> None:
        self.popen.send_signal(sig)

    async def exited(self, timeout: float = EXIT_TIMEOUT) -> int:
        """Its exit code once it exited; AssertionError (with its output) after ``timeout``."""
        await eventually(
            lambda: self.returncode is not None,
            timeout,
            message=f"{self.label} still running after {timeout:g}s:\n{self.output()}",
        )
        code = self.returncode
        assert code is not None
        return code

    def kill(self) -> None:
        """SIGKILL (a stopped process dies too) and reap it."""
        if self.returncode is None:
            self.popen.kill()
        self.popen.wait()

    def memory_kib(self) -> tuple[int, int]:
        """Its resident set size now and at its peak, in KiB (Linux: /proc)."""
        fields = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            fields[name] = value
        return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


class Processes:
    """The child processes of one test; whatever still runs at `close` is killed."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._procs: list[Proc] = []

    def spawn(self, label: str, argv: list[str], env: dict[str, str] | None = None) -> Proc:
        proc = Proc(label, argv, _env(env or {}), self.directory)
        self._procs.append(proc)
        return proc

    async def node(
        self,
        label: str,
        url: str,
        records: Path,
        *,
        app: str = WORKER_APP,
        work: float = 0.0,
        concurrency: int | None = None,
    ) -> Proc:
        """``mesh node run APP`` as consumer ``label``, connected to ``url``; returns once
        it serves.

        One seed URL puts the node on that server: the client learns the other cluster
        members from it and fails over to them (a list would be shuffled).
        """
        env = {RECORD_DIR_ENV: str(records), CONSUMER_ENV: label, WORK_SECONDS_ENV: str(work)}
        if concurrency is not None:
            env[CONCURRENCY_ENV] = str(concurrency)
        proc = self.spawn(
            label,
            [sys.executable, "-m", "mesh", "node", "run", app, "--nats", url, "--verbose"],
            env,
        )
        await proc.ready(" serving ")
        return proc

    def close(self) -> None:
        for proc in self._procs:
            proc.kill()


class DeliveryLog:
    """Reads the record files in a directory as they grow into a History's deliveries.

    A consumer is named after its file (``<consumer>.log``). A line without its end
    yet is kept until the rest arrives.
    """

    def __init__(self, directory: Path, history: History) -> None:
        self.directory = directory
        self.history = history
        self._offsets: dict[Path, int] = {}
        self._partial: dict[Path, bytes] = {}
        directory.mkdir(parents=True, exist_ok=True)

    def poll(self) -> int:
        """Feed the lines appended since the last poll to the history; how many."""
        read = 0
        for path in sorted(self.directory.glob(f"*{RECORD_SUFFIX}")):
            consumer = path.name.removesuffix(RECORD_SUFFIX)
            with path.open("rb") as file:
                file.seek(self._offsets.get(path, 0))
                chunk = file.read()
            self._offsets[path] = self._offsets.get(path, 0) + len(chunk)
            *lines, rest = (self._partial.pop(path, b"") + chunk).split(b"\n")
            if rest:
                self._partial[path] = rest
            for line in lines:
                self.history.deliver(line.decode(), consumer)
            read += len(lines)
        return read

    async def until(self, condition: Callable[[], bool], timeout: float) -> bool:
        """Poll the records until ``condition`` holds or ``timeout`` passes; its last value.

        No error: what did not arrive in time shows in the checker's counts.
        """

        def polled() -> bool:
            self.poll()
            return condition()

        return await within(polled, timeout, interval=0.1)


Send = Callable[[str, bytes], Awaitable[Outcome]]


class Publisher:
    """Publishes ids ``<prefix>0``, ``<prefix>1``, … at a steady rate, recording each
    attempt's outcome in a History.

    ``send`` publishes one message and says what came of it: a fire-and-forget publish
    is UNKNOWN until `confirm` upgrades it; a reliable one can be OK at once.
    """

    def __init__(
        self,
        history: History,
        send: Send,
        *,
        rate: float,
        batch: int = 20,
        size: int = 0,
        prefix: str = "m",
    ) -> None:
        self.history = history
        self.seq = 0
        self._send = send
        self._interval = batch / rate
        self._batch = batch
        self._size = size
        self._prefix = prefix

    def id(self, seq: int) -> str:
        return f"{self._prefix}{seq}"

    def seq_of(self, message_id: str) -> int:
        return int(message_id.removeprefix(self._prefix))

    async def run(self, stop: asyncio.Event) -> None:
        """Publish ``batch`` messages per tick until ``stop`` is set."""
        history = self.history
        tick = time.monotonic()
        while not stop.is_set():
            for _ in range(self._batch):
                mid = self.id(self.seq)
                self.seq += 1
                history.publish(mid, await self._send(mid, payload(mid, self._size)))
            tick += self._interval
            delay = tick - time.monotonic()
            if delay < -1.0:  # far behind (a stall): do not burst to catch up
                tick = time.monotonic()
            await asyncio.sleep(max(delay, 0.0))

    async def confirm(self, since: int, flush: Callable[[], Awaitable[None]]) -> int:
        """After ``flush`` returns, upgrade to OK every UNKNOWN id from ``since`` up to
        the last one published before it was called; how many were upgraded."""
        upto = self.seq
        await flush()
        upgraded = 0
        for seq in range(since, upto):
            mid = self.id(seq)
            if self.history.outcome(mid) is Outcome.UNKNOWN:
                self.history.confirm(mid)
                upgraded += 1
        return upgraded


class ReliablePublisher:
    """Publishes ids ``<prefix>0`` … ``<prefix><total - 1>`` reliably, ``parallel`` at a
    time (at most ``rate`` per second when given), recording every attempt in a History.

    An acknowledged publish is OK; PublishNotConfirmed (no acknowledgement within
    ``ack_timeout``: it may be stored) and ClientClosed (cut off in flight) are
    UNKNOWN; PublishRefused and a full buffer are FAILED. A publish that was not
    OK is tried again with the same id (the stream stores an id once) until
    ``give_up`` seconds after its first try.
    ``acked_at`` holds when each acknowledgement came (``time.monotonic``), to find
    the longest stall.
    """

    def __init__(
        self,
        history: History,
        client: MeshClient,
        *,
        total: int,
        parallel: int,
        subject: str = TASK_SUBJECT,
        size: int = 0,
        prefix: str = "t",
        ack_timeout: float = 5.0,
        give_up: float = 60.0,
        rate: float | None = None,
    ) -> None:
        self.history = history
        self.ok = 0
        self.acked_at: list[float] = []
        self._client = client
        self._total = total
        self._parallel = parallel
        self._subject = subject
        self._size = size
        self._prefix = prefix
        self._ack_timeout = ack_timeout
        self._give_up = give_up
        self._rate = rate
        self._next = 0
        self._started = 0.0
        #: Cleared, the senders wait before their next publish (set again: they go on).
        self.gate = asyncio.Event()
        self.gate.set()

    @property
    def issued(self) -> int:
        """Ids handed to senders so far."""
        return self._next

    async def run(self) -> None:
        self._started = time.monotonic()
        await asyncio.gather(*(self._sender() for _ in range(self._parallel)))

    async def _sender(self) -> None:
        while self._next < self._total:
            seq = self._next
            self._next += 1
            if self._rate is not None:  # id n goes out n / rate seconds after the start
                await asyncio.sleep(max(0.0, self._started + seq / self._rate - time.monotonic()))
            await self.gate.wait()
            await self._publish(f"{self._prefix}{seq}")

    async def _publish(self, mid: str) -> None:
        history = self.history
        data = payload(mid, self._size)
        give_up = time.monotonic() + self._give_up
        while True:
            try:
                await self._client.publish(
                    self._subject, data, reliable=True, msg_id=mid, ack_timeout=self._ack_timeout
                )
            except (PublishNotConfirmed, ClientClosed) as exc:  # it may have been stored
                history.publish(mid, Outcome.UNKNOWN)
                history.count("not_confirmed" if isinstance(exc, PublishNotConfirmed) else "closed")
            except (PublishRefused, PublishBufferFull) as exc:
                history.publish(mid, Outcome.FAILED)
                history.count(type(exc).__name__)
                await asyncio.sleep(0.2)
            else:
                history.publish(mid, Outcome.OK)
                self.ok += 1
                self.acked_at.append(time.monotonic())
                return
            if time.monotonic() > give_up:
                return
            history.count("retries")

    def longest_stall(self) -> float:
        """The longest time between two acknowledgements, in seconds."""
        times = sorted(self.acked_at)
        return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def connection_names(server: NatsServer) -> list[str]:
    """The names of the client connections on ``server`` (from its monitoring port)."""
    assert server.monitor_url is not None, "the server runs without monitoring"
    with urllib.request.urlopen(f"{server.monitor_url}/connz?limit=4096", timeout=5) as reply:
        connz = json.load(reply)
    return [conn.get("name", "") for conn in connz.get("connections") or []]


def kib(n: int) -> int:
    """Bytes in whole KiB, rounded up."""
    return -(-n // _KIB)
