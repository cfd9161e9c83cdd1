"""Helpers shared by the tests (pytest-asyncio is not used: tests run their own loop)."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")


def arun(coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
    """Run ``coro`` in a fresh event loop, failing it after ``timeout`` seconds."""
    return asyncio.run(asyncio.wait_for(coro, timeout))
