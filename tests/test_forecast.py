"""``pvbess.site.forecast.Learned``: the day-ahead regression the MPC's ``forecast=learned``
plans on. Hand-built series: it learns the calendar where persistence cannot, and what it
says for a step never depends on values it could not have seen."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pvbess.site import forecast


def _weekend_series(start: str, weeks: int) -> tuple[np.ndarray, pd.DatetimeIndex]:
    """1 kWh every weekday hour, 3 kWh every weekend hour [kWh per step]."""
    index = pd.date_range(start, periods=weeks * 7 * 24, freq="h")
    return np.where(index.dayofweek >= 5, 3.0, 1.0), index


def test_learns_the_weekend_that_persistence_misses() -> None:
    years = [_weekend_series(f"{y}-01-01", 20) for y in (2021, 2022, 2023)]
    values, index = _weekend_series("2024-01-01", 10)
    learned = forecast.Learned(years).predictions(values, index)[0]
    persistence = forecast.table(values, [24], "persistence")[:, 0]
    # Made a day ahead: the value 24 h before the target step.
    target = np.roll(values, -24)[: values.size - 24]
    day_after = slice(0, values.size - 24)
    saturday_or_monday = np.isin(index.dayofweek[24:], [0, 5])
    # Persistence misses every Saturday and Monday by 2 kWh (1 -> 3, 3 -> 1) ...
    np.testing.assert_allclose(
        np.abs(persistence[day_after] - target)[saturday_or_monday[: target.size]], 2.0
    )
    # ... the learned forecast knows the weekday (read at the target step).
    assert np.abs(learned[24:] - values[24:]).max() < 0.05


def test_a_step_forecast_reads_only_what_was_observed_days_back_before_it() -> None:
    rng = np.random.default_rng(0)
    index = pd.date_range("2023-01-01", periods=60 * 24, freq="h")
    years = [(100 + 10 * rng.standard_normal(index.size), index) for _ in range(2)]
    model = forecast.Learned(years, max_days_back=2)
    values = 100 + 10 * rng.standard_normal(index.size)
    before = model.predictions(values, index)
    s = 40 * 24 + 7
    for days_back in (1, 2):
        # Change everything from the first step not yet seen a day (two days) ahead.
        changed = values.copy()
        changed[s - 24 * days_back + 1 :] += 1000.0
        after = model.predictions(changed, index)
        assert after[days_back - 1, s] == before[days_back - 1, s]
        # ... while the step 24 h later does move, so the check can fail.
        assert after[days_back - 1, s + 24] != before[days_back - 1, s + 24]


def test_predictions_are_reproducible_and_non_negative() -> None:
    rng = np.random.default_rng(1)
    index = pd.date_range("2023-01-01", periods=30 * 24, freq="h")
    years = [(np.maximum(rng.standard_normal(index.size), 0.0), index) for _ in range(2)]
    a = forecast.Learned(years).predictions(years[0][0], index)
    b = forecast.Learned(years).predictions(years[0][0], index)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (1, index.size) and a.min() >= 0.0


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="at least one year"):
        forecast.Learned([])
    with pytest.raises(ValueError, match="max_days_back must be >= 1"):
        forecast.Learned([_weekend_series("2023-01-01", 2)], max_days_back=0)


def test_average_takes_the_same_hour_on_the_last_seven_days_observed() -> None:
    # At step 200 (day 8, 08:00), lead 1 (09:00): 09:00 on days 7, 6, ..., 1.
    src = forecast.average_source(200, np.array([1, 24]), 1000)
    np.testing.assert_array_equal(src[0], [177 - 24 * k for k in range(7)])
    # Lead 24 (08:00 tomorrow): today's 08:00 is persistence's day.
    np.testing.assert_array_equal(src[1], [200 - 24 * k for k in range(7)])
    # Early in the year, days before the first are the first day's.
    np.testing.assert_array_equal(forecast.average_source(30, np.array([1]), 1000)[0], [7] * 7)


def test_a_learner_observes_the_same_average_as_the_mpc_plans_on() -> None:
    values = np.arange(24 * 10, dtype=float)
    table = forecast.table(values, [1, 24], "average")
    # At step 200, lead 1: the mean of 177, 153, ..., 33 (the value is the step).
    assert table[200, 0] == np.mean([177 - 24 * k for k in range(7)])
    assert table[200, 1] == np.mean([200 - 24 * k for k in range(7)])
    assert table.shape == (240, 2)
