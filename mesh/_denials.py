"""Permission violations the server reported, remembered briefly.

NATS answers a publish or subscription the user may not make with an asynchronous
``-ERR 'Permissions Violation ...'``, not on the call itself: a request then simply
times out and a publish seems to succeed. Every mesh client records those reports
here (process-wide, the last :data:`KEPT`), so the call that was waiting can say
"permission denied" instead of "timed out", and ``flush`` can say a publish was
refused.
"""

from __future__ import annotations

import collections
import re
from typing import Final

from mesh._errors import PermissionDenied

KEPT: Final = 64
_VIOLATION: Final = re.compile(
    r"permissions violation for (publish|subscription) to \"?([^\"\s]+)\"?", re.IGNORECASE
)
_recent: collections.deque[tuple[int, int, str, str]] = collections.deque(maxlen=KEPT)
_count = 0


def record(text: str, owner: int = 0) -> PermissionDenied | None:
    """Remember the violation ``text`` reports to connection ``owner`` (None if it
    reports none)."""
    global _count
    found = _VIOLATION.search(text)
    if found is None:
        return None
    _count += 1
    operation = "publish to" if found.group(1).lower() == "publish" else "subscribe to"
    _recent.append((_count, owner, operation, found.group(2)))
    return PermissionDenied(operation, found.group(2))


def mark() -> int:
    """A point in time: :func:`since` reports what came after it."""
    return _count


def since(
    start: int, *, owner: int = 0, subject: str | None = None, prefix: str = ""
) -> PermissionDenied | None:
    """The first violation after ``start`` (reported to ``owner``, on ``subject``, or on a
    subject starting with ``prefix``, when given), as an error."""
    # nats-py lower-cases the server's error text: compare without case.
    wanted = subject.lower() if subject is not None else None
    prefix = prefix.lower()
    for number, reported_to, operation, denied in _recent:
        if number <= start or (owner and reported_to != owner):
            continue
        if wanted is not None and denied.lower() != wanted:
            continue
        if prefix and not denied.lower().startswith(prefix):
            continue
        return PermissionDenied(operation, subject if subject is not None else denied)
    return None
