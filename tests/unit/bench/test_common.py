"""The benchmarks' percentile: by nearest rank, as its docstring says, over any order of samples;
the figures in BENCHMARKS.md and bench/results are made with it."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.common import percentile
from tests.unit.strategies import fast

ONE_TO_TEN = [float(v) for v in range(10, 0, -1)]  # unsorted on purpose
ONE_TO_HUNDRED = [float(v) for v in range(1, 101)]


def nearest_rank(values: list[float], q: int) -> float:
    """The textbook definition, in integers: the ceil(q/100 * n)-th smallest, the first for q=0."""
    n = len(values)
    rank = max(1, -(-q * n // 100))
    return sorted(values)[rank - 1]


def test_no_samples_is_zero() -> None:
    assert percentile([], 50) == 0.0


def test_one_sample_is_every_percentile() -> None:
    assert [percentile([4.2], q) for q in (0, 1, 50, 99, 100)] == [4.2] * 5


def test_the_ends_are_the_smallest_and_the_largest() -> None:
    assert percentile(ONE_TO_TEN, 0) == 1.0
    assert percentile(ONE_TO_TEN, 100) == 10.0


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        (ONE_TO_TEN, 25, 3.0),
        (ONE_TO_TEN, 99, 10.0),
        (ONE_TO_HUNDRED, 50, 50.0),
        (ONE_TO_HUNDRED, 90, 90.0),
        (ONE_TO_HUNDRED, 99.5, 100.0),
        ([float(v) for v in range(1, 1001)], 99, 990.0),
    ],
)
def test_nearest_rank_where_the_rank_is_not_an_odd_whole_number(
    values: list[float], q: float, expected: float
) -> None:
    assert percentile(values, q) == expected


@pytest.mark.parametrize(
    ("values", "q", "expected"),
    [
        ([1.0, 2.0], 50, 1.0),
        (ONE_TO_TEN, 50, 5.0),
        (ONE_TO_TEN, 90, 9.0),
        (ONE_TO_HUNDRED, 95, 95.0),
        (ONE_TO_HUNDRED, 99, 99.0),
    ],
    ids=["p50-of-2", "p50-of-10", "p90-of-10", "p95-of-100", "p99-of-100"],
)
def test_nearest_rank_where_the_rank_is_an_odd_whole_number(
    values: list[float], q: float, expected: float
) -> None:
    assert percentile(values, q) == expected


samples = st.lists(st.floats(-1e6, 1e6, allow_nan=False), min_size=1, max_size=60)


@fast(300)
@given(values=samples, q=st.integers(0, 100))
def test_a_percentile_is_a_sample_with_q_percent_at_or_below_it(values: list[float], q: int) -> None:
    got = percentile(values, q)
    assert got in values
    assert sum(v <= got for v in values) * 100 >= q * len(values)
    assert sum(v < got for v in values) * 100 <= q * len(values)
    # Never below the nearest rank, nor more than one rank above it (the bug above).
    ordered = sorted(values)
    rank = max(1, -(-q * len(values) // 100))
    assert nearest_rank(values, q) <= got <= ordered[min(len(values) - 1, rank)]


@fast(200)
@given(values=samples, q=st.integers(0, 100), r=st.integers(0, 100), seed=st.randoms())
def test_percentiles_do_not_depend_on_order_and_grow_with_q(
    values: list[float], q: int, r: int, seed: Any
) -> None:
    shuffled = list(values)
    seed.shuffle(shuffled)
    assert percentile(shuffled, q) == percentile(values, q)
    low, high = sorted((q, r))
    assert percentile(values, low) <= percentile(values, high)
