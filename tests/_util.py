"""Helpers shared by the tests (pytest-asyncio is not used: tests run their own loop).

Every wait here is bounded: it polls a condition until it holds or its timeout
passes. That is how tests wait for a distributed system to settle; they never
assert on how long something took.
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def arun(coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    """Run ``coro`` in a fresh event loop, failing it after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))


def wait_until(
    condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.05
) -> bool:
    """Poll ``condition`` until it holds (True) or ``timeout`` seconds pass (its last value)."""
    give_up = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > give_up:
            return condition()
        time.sleep(interval)
    return True


async def within(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    interval: float = 0.05,
) -> bool:
    """Poll ``condition`` (sync or async) until it holds (True) or ``timeout`` seconds
    pass (False)."""
    give_up = time.monotonic() + timeout
    while True:
        held = condition()
        if inspect.isawaitable(held):
            held = await held
        if held:
            return True
        if time.monotonic() > give_up:
            return False
        await asyncio.sleep(interval)


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    timeout: float = 10.0,
    interval: float = 0.05,
    message: str = "",
) -> None:
    """Poll ``condition`` (sync or async) until it holds; AssertionError after ``timeout``."""
    if not await within(condition, timeout, interval):
        raise AssertionError(message or f"condition not met within {timeout}s")


async def retrying(
    call: Callable[[], Awaitable[T]],
    errors: tuple[type[BaseException], ...],
    timeout: float,
    interval: float = 0.1,
) -> T:
    """``await call()`` again while it raises one of ``errors``, for up to ``timeout`` s."""
    give_up = time.monotonic() + timeout
    while True:
        try:
            return await call()
        except errors:
            if time.monotonic() > give_up:
                raise
            await asyncio.sleep(interval)


def free_port() -> int:
    """A loopback TCP port that nothing listens on (at the moment of asking)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
