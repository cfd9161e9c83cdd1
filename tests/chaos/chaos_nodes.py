"""The node the chaos scenarios run as separate processes, and how it records its work.

    mesh node run tests.chaos.chaos_nodes:worker --nats URL      # from the repository root

A payload is a message id, a space, and padding up to the size a scenario wants.
The worker handles requests on ``chaos.work`` (the reply is the id), events on
``chaos.events`` and reliable tasks on ``chaos.tasks`` (JetStream, acknowledged
after the handler returns, redelivered after :data:`TASK_TIMEOUT` plus the
acknowledgement margin), in the queue group ``chaos-worker``. `mesh node run` takes no
arguments for the node, so its settings come from the environment the harness
sets (a factory reads them when the process loads the node):

    CHAOS_RECORD_DIR     the directory of the records (required)
    CHAOS_CONSUMER       this process's name in them (default: its pid)
    CHAOS_WORK_SECONDS   how long each handler works before it records (default 0)
    CHAOS_CONCURRENCY    handlers running at once in the process (default: the node's)

Every message the worker processed is one line ``<id>\\n`` in
``<CHAOS_RECORD_DIR>/<consumer>.log``, written after the handler's work by one
``os.write`` on a file opened with ``O_APPEND``: the kernel holds the line once
the call returns, so it survives a kill -9 of the process, and a line written just
before such a kill counts as processed. The checker reads the records after the
processes are gone. A reliable handler (acknowledged after it returns) records
before its acknowledgement, so a kill between the two shows up as a redelivery.
A reliable task is also written to ``<consumer>.taken`` when its handler starts,
so the ids a killed process held unfinished are known.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Final

from nodes import Node

RECORD_DIR_ENV: Final = "CHAOS_RECORD_DIR"
CONSUMER_ENV: Final = "CHAOS_CONSUMER"
WORK_SECONDS_ENV: Final = "CHAOS_WORK_SECONDS"
CONCURRENCY_ENV: Final = "CHAOS_CONCURRENCY"
RECORD_SUFFIX: Final = ".log"
TAKEN_SUFFIX: Final = ".taken"

WORKER: Final = "chaos-worker"
WORK_SUBJECT: Final = "chaos.work"
EVENT_SUBJECT: Final = "chaos.events"
TASK_SUBJECT: Final = "chaos.tasks"
#: A reliable task's handler timeout: its acknowledgement wait is this plus 5 s.
TASK_TIMEOUT: Final = 3.0


class Recorder:
    """Appends the ids one consumer processed to its record file."""

    def __init__(self, directory: Path, consumer: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / f"{consumer}{RECORD_SUFFIX}"
        self.taken_path = directory / f"{consumer}{TAKEN_SUFFIX}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND
        self._fd = os.open(self.path, flags, 0o644)
        self._taken_fd = os.open(self.taken_path, flags, 0o644)

    @classmethod
    def from_env(cls) -> Recorder:
        directory = os.environ.get(RECORD_DIR_ENV)
        if not directory:
            raise RuntimeError(f"{RECORD_DIR_ENV} must name the directory of the records")
        return cls(Path(directory), os.environ.get(CONSUMER_ENV) or str(os.getpid()))

    def record(self, message_id: str) -> None:
        """Append one line; a short write of a few bytes to a local file does not happen."""
        os.write(self._fd, f"{message_id}\n".encode())

    def take(self, message_id: str) -> None:
        """Note that a handler started on ``message_id`` (the ``.taken`` file)."""
        os.write(self._taken_fd, f"{message_id}\n".encode())


def payload(message_id: str, size: int = 0) -> bytes:
    """The payload carrying ``message_id``, padded to ``size`` bytes."""
    head = f"{message_id} ".encode()
    return head + b"x" * max(0, size - len(head))


def message_id(data: bytes) -> str:
    """The id a payload carries."""
    return data.partition(b" ")[0].decode()


def worker() -> Node:
    """The chaos worker, configured from the environment (see the module docstring)."""
    recorder = Recorder.from_env()
    work = float(os.environ.get(WORK_SECONDS_ENV, "0"))
    concurrency = os.environ.get(CONCURRENCY_ENV)
    node = Node(
        WORKER,
        handler_timeout=10.0,
        drain_timeout=20.0,
        **({"max_concurrency": int(concurrency)} if concurrency else {}),
    )

    @node.handles(WORK_SUBJECT)
    async def handle_work(data: bytes) -> bytes:
        mid = message_id(data)
        if work:
            await asyncio.sleep(work)
        recorder.record(mid)
        return mid.encode()

    @node.handles(EVENT_SUBJECT)
    async def handle_event(data: bytes) -> None:
        if work:
            await asyncio.sleep(work)
        recorder.record(message_id(data))

    @node.handles(TASK_SUBJECT, reliable=True, timeout=TASK_TIMEOUT, backoff=(0.5, 1.0))
    async def handle_task(data: bytes) -> None:
        mid = message_id(data)
        recorder.take(mid)
        if work:
            await asyncio.sleep(work)
        recorder.record(mid)

    return node
