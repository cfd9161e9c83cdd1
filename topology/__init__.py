"""Topology: pure analysis code, no I/O.

Everything here is deterministic and testable without a server: the sidecars feed it
telemetry snapshots and act on what it returns.
"""

from topology._histogram import HistogramCounts, LatencyHistogram

__all__ = [
    "HistogramCounts",
    "LatencyHistogram",
]
