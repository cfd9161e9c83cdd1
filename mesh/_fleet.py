"""The node processes that ``mesh up`` supervises, and its terminal and shutdown helpers.

Each replica is a ``python -m mesh node run SPEC`` child that dies with its parent;
a crashed replica is restarted with bounded exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections import deque
from typing import Any, Final, TextIO

import nats.errors

from mesh._client import MeshClient
from mesh._errors import MeshError

STOP_TIMEOUT: Final = 15.0  # SIGTERM to exit: a node drains, deregisters, closes
KILL_TIMEOUT: Final = 5.0
MAX_RESTARTS: Final = 5
BACKOFF_FIRST: Final = 0.5
BACKOFF_MAX: Final = 10.0
TAIL_LINES: Final = 20


class UpError(MeshError):
    """``mesh up`` could not bring the mesh up (a node failed to start)."""


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}es" if noun.endswith("s") else f"{n} {noun}s"


# ------------------------------------------------------------------- terminal


class Console:
    """stderr for people: messages, and one status line rewritten in place on a TTY."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.tty = stream.isatty()
        self._status = ""

    def say(self, text: str) -> None:
        if self.tty and self._status:
            self.stream.write("\r\x1b[K")
        self.stream.write(text + "\n")
        if self.tty and self._status:
            self.stream.write(self._status)
        self.stream.flush()

    def status(self, line: str) -> None:
        if self.tty:
            self._status = line
            self.stream.write("\r\x1b[K" + line)
            self.stream.flush()
        else:
            self.say(line)

    def clear(self) -> None:
        if self.tty and self._status:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
        self._status = ""


class ConsoleLog(logging.Handler):
    """Log records through the console, so they do not tear the status line."""

    def __init__(self, console: Console) -> None:
        super().__init__()
        self.console = console
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.console.say(self.format(record))
        except Exception:  # logging must never raise; report it the standard way
            self.handleError(record)


# ------------------------------------------------------------------- shutdown


class Shutdown:
    """Why ``mesh up`` stops. A second signal makes the stop urgent: no more waiting."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self.requested = asyncio.Event()
        self.urgent = asyncio.Event()
        self.reason = ""
        self.failed = False  # stopped by a failure rather than by the user or --duration

    def request(self, reason: str, *, failed: bool = False) -> None:
        if not self.requested.is_set():
            self.reason, self.failed = reason, failed
            self.requested.set()

    def on_signal(self, signum: int) -> None:
        if self.requested.is_set():
            self.console.say("second signal: stopping now, without waiting")
            self.urgent.set()
            return
        self.request(signal.Signals(signum).name)
        self.console.say("stopping… (press Ctrl-C again to stop at once)")

    async def wait(self, timeout: float | None) -> None:
        """Until a stop is requested, or ``timeout`` seconds pass."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.requested.wait(), timeout)

    async def settle(self, tasks: set[asyncio.Task[Any]], timeout: float) -> set[asyncio.Task[Any]]:
        """Wait up to ``timeout`` for ``tasks`` (less if the stop turns urgent); the rest."""
        pending = {t for t in tasks if not t.done()}
        deadline = time.monotonic() + timeout
        urgent = asyncio.ensure_future(self.urgent.wait())
        try:
            while pending and not self.urgent.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                done, _ = await asyncio.wait(
                    pending | {urgent}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED
                )
                pending -= done
        finally:
            urgent.cancel()
        return pending


# ------------------------------------------------------------------- node processes


class Replica:
    """One node process, and what it said last."""

    def __init__(self, spec: str, index: int) -> None:
        module, _, attr = spec.partition(":")
        self.spec = spec
        self.label = f"{module.rsplit('.', 1)[-1] if attr == 'node' else attr}#{index}"
        self.proc: asyncio.subprocess.Process | None = None
        self.reader: asyncio.Task[None] | None = None
        self.tail: deque[str] = deque(maxlen=TAIL_LINES)
        self.restarts = 0
        self.crashes = 0
        self.gave_up = False

    def last_output(self) -> str:
        return "\n".join(f"  {line}" for line in self.tail) or "  (no output)"


class NodeFleet:
    """The node processes of one ``mesh up``; an async context manager that stops them."""

    def __init__(
        self,
        nodes: list[tuple[str, int]],
        url: str,
        console: Console,
        *,
        verbose: bool,
    ) -> None:
        self.replicas = [Replica(spec, i + 1) for spec, n in nodes for i in range(n)]
        self.url = url
        self.console = console
        self.verbose = verbose
        self.ready = False
        self.startup_failure: Replica | None = None
        self._failure = asyncio.Event()
        self._stopping = asyncio.Event()
        self._group = asyncio.TaskGroup()
        self._watchers: set[asyncio.Task[Any]] = set()
        from mesh._server import _die_with_parent

        self._preexec = _die_with_parent()  # Linux: SIGTERM when `mesh up` dies
        self._host = socket.gethostname()

    async def __aenter__(self) -> NodeFleet:
        await self._group.__aenter__()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self.stop(STOP_TIMEOUT, None)
        finally:
            await self._group.__aexit__(None, None, None)

    @property
    def crashes(self) -> int:
        return sum(r.crashes for r in self.replicas)

    @property
    def restarts(self) -> int:
        return sum(r.restarts for r in self.replicas)

    async def start(self) -> None:
        """Start every replica; each is watched (and restarted) from now on."""
        for replica in self.replicas:
            await self._spawn(replica)
            self._watchers.add(self._group.create_task(self._watch(replica)))

    async def _spawn(self, replica: Replica) -> None:
        argv = [sys.executable, "-m", "mesh", "node", "run", replica.spec, "--nats", self.url]
        if self.verbose:
            argv.append("--verbose")
        try:
            replica.proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
                process_group=0,
                preexec_fn=self._preexec,
            )
        except OSError as exc:
            raise UpError(f"cannot start a node process for {replica.spec}: {exc}") from None
        assert replica.proc.stderr is not None
        replica.reader = self._group.create_task(self._read(replica, replica.proc.stderr))

    async def _read(self, replica: Replica, stream: asyncio.StreamReader) -> None:
        while True:
            try:
                raw = await stream.readline()
            except ValueError:  # a line over the stream limit was skipped
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            replica.tail.append(line)
            if self.verbose:
                self.console.say(f"[{replica.label}] {line}")

    async def _watch(self, replica: Replica) -> None:
        while True:
            assert replica.proc is not None
            code = await replica.proc.wait()
            if self._stopping.is_set():
                return
            if replica.reader is not None:  # let the reader catch the last words
                await asyncio.wait({replica.reader}, timeout=1.0)
            replica.crashes += 1
            if not self.ready:
                self.startup_failure = replica
                self._failure.set()
                return
            if replica.restarts >= MAX_RESTARTS:
                replica.gave_up = True
                self.console.say(
                    f"node {replica.label} ({replica.spec}) exited with code {code}; "
                    f"not restarting it (after {replica.restarts} restarts). Its last output:\n"
                    + replica.last_output()
                )
                return
            delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2**replica.restarts)
            self.console.say(
                f"node {replica.label} exited with code {code}; restart "
                f"{replica.restarts + 1}/{MAX_RESTARTS} in {delay:g}s"
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)
            if self._stopping.is_set():
                return
            replica.restarts += 1
            try:
                await self._spawn(replica)
            except UpError as exc:
                replica.gave_up = True
                self.console.say(str(exc))
                return

    async def registered(self, client: MeshClient) -> int:
        """How many of this fleet's processes are registered in the node registry."""
        from nodes._registry import list_nodes

        pids = {r.proc.pid for r in self.replicas if r.proc is not None}
        found = await list_nodes(client)
        return sum(1 for info in found if info.host == self._host and info.pid in pids)

    async def wait_ready(self, client: MeshClient, shutdown: Shutdown, timeout: float) -> bool:
        """Until every replica is registered (True) or a stop is requested (False).

        Raises UpError when a replica exits first or the time runs out.
        """
        deadline = time.monotonic() + timeout
        while not shutdown.requested.is_set():
            failed = self.startup_failure
            if failed is not None:
                assert failed.proc is not None
                raise UpError(
                    f"node {failed.label} ({failed.spec}) exited with code "
                    f"{failed.proc.returncode} before it was ready. Its last output:\n"
                    + failed.last_output()
                )
            try:
                up = await asyncio.wait_for(self.registered(client), 5.0)
            except (TimeoutError, MeshError, OSError, nats.errors.Error):
                up = 0  # the registry is not there yet: nodes create it as they start
            if up >= len(self.replicas):
                self.ready = True
                return True
            if time.monotonic() > deadline:
                raise UpError(
                    f"only {up} of {len(self.replicas)} node processes registered within "
                    f"{timeout:g}s (does the NATS server have JetStream enabled?)"
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._failure.wait(), 0.25)
        return False

    async def stop(self, grace: float, shutdown: Shutdown | None) -> None:
        """SIGTERM every process, wait up to ``grace`` s, SIGKILL the rest (idempotent)."""
        self._stopping.set()
        self._signal(signal.SIGTERM)
        pending = {t for t in self._watchers if not t.done()}
        if pending and shutdown is not None:
            pending = await shutdown.settle(pending, grace)
        elif pending:
            _, pending = await asyncio.wait(pending, timeout=grace)
        if pending:
            self.console.say(f"{_count(len(pending), 'node process')} did not stop: killing")
            self._signal(signal.SIGKILL)
            await asyncio.wait(pending, timeout=KILL_TIMEOUT)
        # A reader outlives its process only if a grandchild holds the pipe open.
        readers = {r.reader for r in self.replicas if r.reader is not None and not r.reader.done()}
        if readers:
            await asyncio.wait(readers, timeout=1.0)
            for reader in readers:
                reader.cancel()

    def _signal(self, sig: signal.Signals) -> None:
        for replica in self.replicas:
            proc = replica.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
