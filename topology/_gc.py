"""Pausing the cyclic garbage collector around the analysis."""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building a graph or a report.

    Both allocate a few containers per edge, none in a reference cycle; on a large
    mesh the collector would walk the young objects a hundred times and often the
    whole heap, for nothing: 10-20 % of the time of ``mesh bench topology``.
    Reference counting frees everything as usual.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
