"""LatencyHistogram: unit tests and property tests against exact sorted-list quantiles."""

from __future__ import annotations

import math
import sys

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from topology import HistogramCounts, LatencyHistogram
from topology._histogram import (
    BUCKETS,
    HIGHEST_TRACKABLE_NS,
    RELATIVE_ERROR,
    bucket_bounds,
    bucket_index,
)

latencies = st.integers(min_value=0, max_value=HIGHEST_TRACKABLE_NS)
# Mostly realistic latencies (1 µs .. 100 s), sometimes anything in range.
realistic = st.one_of(st.integers(min_value=1_000, max_value=100_000_000_000), latencies)
quantiles = st.floats(min_value=0.0, max_value=1.0, allow_nan=False)


def exact_quantile(values: list[int], q: float) -> int:
    """The nearest-rank quantile, as LatencyHistogram.quantile defines it."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q * len(ordered)))
    return ordered[rank - 1]


def histogram(values: list[int]) -> LatencyHistogram:
    hist = LatencyHistogram()
    for value in values:
        hist.record(value)
    return hist


def merged(*parts: LatencyHistogram) -> LatencyHistogram:
    result = LatencyHistogram()
    for part in parts:
        result.merge(part)
    return result


# ---------------------------------------------------------------- unit tests


def test_empty_histogram_reports_zero() -> None:
    hist = LatencyHistogram()
    assert hist.count == 0
    assert (hist.min, hist.max, hist.mean, hist.quantile(0.5), hist.quantile(1.0)) == (
        0,
        0,
        0,
        0,
        0,
    )
    assert repr(hist) == "<LatencyHistogram empty>"


def test_single_value_is_exact() -> None:
    hist = histogram([1_234_567])
    assert hist.count == 1
    assert hist.min == hist.max == 1_234_567
    assert hist.mean == 1_234_567
    for q in (0.0, 0.5, 0.99, 1.0):
        assert hist.quantile(q) == 1_234_567


def test_small_values_are_exact() -> None:
    values = list(range(128))
    hist = histogram(values)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert hist.quantile(q) == exact_quantile(values, q)


def test_quantiles_of_a_uniform_range() -> None:
    values = [i * 1_000 for i in range(1, 10_001)]  # 1 µs .. 10 ms
    hist = histogram(values)
    assert hist.count == 10_000
    assert hist.min == 1_000
    assert hist.max == 10_000_000
    assert hist.mean == sum(values) / len(values)
    for q in (0.5, 0.9, 0.99, 0.999):
        exact = exact_quantile(values, q)
        assert abs(hist.quantile(q) - exact) <= exact * RELATIVE_ERROR


def test_bucket_layout_is_contiguous_and_bounded() -> None:
    assert BUCKETS == 2048
    previous_end = 0
    for index in range(BUCKETS):
        low, width = bucket_bounds(index)
        assert low == previous_end, index
        assert width == 1 or width <= low / 64
        assert bucket_index(low) == index
        assert bucket_index(low + width - 1) == index
        previous_end = low + width
    assert previous_end == HIGHEST_TRACKABLE_NS + 1


def test_values_above_the_range_are_counted_as_overflows() -> None:
    hist = histogram([1_000, HIGHEST_TRACKABLE_NS + 1, 10 * HIGHEST_TRACKABLE_NS])
    assert hist.overflows == 2
    assert hist.max == 10 * HIGHEST_TRACKABLE_NS
    assert hist.quantile(1.0) == hist.max
    assert hist.count == 3


def test_negative_values_are_rejected() -> None:
    hist = LatencyHistogram()
    with pytest.raises(ValueError, match="negative"):
        hist.record(-1)
    assert hist.count == 0


@pytest.mark.parametrize("q", [-0.1, 1.5, float("nan")])
def test_quantile_out_of_range_is_rejected(q: float) -> None:
    with pytest.raises(ValueError, match="between 0 and 1"):
        histogram([1]).quantile(q)


def test_reset_forgets_everything() -> None:
    hist = histogram([5, 50_000, HIGHEST_TRACKABLE_NS * 2])
    hist.reset()
    assert hist == LatencyHistogram()
    hist.record(7)
    assert hist.min == hist.max == 7


def test_memory_is_fixed() -> None:
    hist = LatencyHistogram()
    size = sys.getsizeof(hist._counts)
    buckets = len(hist._counts)
    for i in range(100_000):
        hist.record((i * 7_919) % 10**11)
    assert len(hist._counts) == buckets
    assert sys.getsizeof(hist._counts) == size


def test_counts_round_trip_through_msgspec() -> None:
    hist = histogram([0, 1, 999, 1_000_000, 25_000_000, 3 * HIGHEST_TRACKABLE_NS])
    data = hist.to_counts()
    assert len(data.counts) == 6  # sparse: only non-empty buckets
    for encoder, decoder in (
        (msgspec.json.encode, msgspec.json.Decoder(HistogramCounts)),
        (msgspec.msgpack.encode, msgspec.msgpack.Decoder(HistogramCounts)),
    ):
        decoded = decoder.decode(encoder(data))
        assert decoded == data
        assert LatencyHistogram.from_counts(decoded) == hist
    assert LatencyHistogram.from_counts(LatencyHistogram().to_counts()) == LatencyHistogram()


@pytest.mark.parametrize(
    ("counts", "match"),
    [
        (HistogramCounts(counts={BUCKETS: 1}, min=1, max=1, sum=1), "out of range"),
        (HistogramCounts(counts={3: -1}), "negative"),
        (HistogramCounts(counts={3: 1}, min=5, max=2, sum=3), "inconsistent"),
        (HistogramCounts(counts={3: 1}, min=3, max=3, sum=3, overflows=2), "inconsistent"),
        (HistogramCounts(counts={}, sub_bits=5), "layout"),
    ],
)
def test_from_counts_rejects_inconsistent_data(counts: HistogramCounts, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        LatencyHistogram.from_counts(counts)


def test_equality() -> None:
    assert histogram([1, 2, 3]) == histogram([3, 2, 1])
    assert histogram([1, 2, 3]) != histogram([1, 2, 4])
    assert histogram([1]) != "not a histogram"


# ---------------------------------------------------------------- properties


@settings(max_examples=200, deadline=None)
@given(st.lists(realistic, min_size=1, max_size=400), quantiles)
def test_quantile_is_within_the_relative_error(values: list[int], q: float) -> None:
    hist = histogram(values)
    exact = exact_quantile(values, q)
    assert abs(hist.quantile(q) - exact) <= exact * RELATIVE_ERROR
    assert hist.min <= hist.quantile(q) <= hist.max


@settings(max_examples=100, deadline=None)
@given(st.lists(latencies, max_size=200), st.lists(latencies, max_size=200))
def test_merge_equals_recording_both_streams(a: list[int], b: list[int]) -> None:
    hist = histogram(a)
    hist.merge(histogram(b))
    assert hist == histogram(a + b)
    assert hist.count == len(a) + len(b)
    if a or b:
        assert hist.min == min(a + b)
        assert hist.max == max(a + b)
        assert hist.sum == sum(a + b)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(realistic, max_size=100),
    st.lists(realistic, max_size=100),
    st.lists(realistic, max_size=100),
)
def test_merge_is_associative_and_commutative(a: list[int], b: list[int], c: list[int]) -> None:
    ha, hb, hc = histogram(a), histogram(b), histogram(c)
    left = merged(merged(ha, hb), hc)
    right = merged(ha, merged(hb, hc))
    assert left == right
    assert merged(ha, hb) == merged(hb, ha)


@settings(max_examples=100, deadline=None)
@given(st.lists(realistic, max_size=200))
def test_counts_round_trip(values: list[int]) -> None:
    hist = histogram(values)
    wire = msgspec.json.encode(hist.to_counts())
    assert LatencyHistogram.from_counts(msgspec.json.decode(wire, type=HistogramCounts)) == hist


@settings(max_examples=100, deadline=None)
@given(latencies)
def test_every_value_lands_in_its_bucket(value: int) -> None:
    low, width = bucket_bounds(bucket_index(value))
    assert low <= value < low + width
    assert width == 1 or (width / 2) / value <= RELATIVE_ERROR
