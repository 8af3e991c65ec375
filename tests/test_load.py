"""Tests for pvbess.site.load on the Iquitos mall (12,368,653 kWh/yr, 2,763 kW peak)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest
from numpy.testing import assert_allclose

from pvbess.config import ConfigError, LoadConfig
from pvbess.site import load

MALL: dict[str, Any] = {
    "annual_energy_kwh": 12_368_653.0,
    "peak_kw": 2763.0,
    "open_hour": 9,
    "close_hour": 22,
    "weekend_factor": 1.1,
    "seasonal_amplitude_frac": 0.08,
    "noise_frac": 0.05,
    "seed": 0,
}


def _index(hours: int) -> pd.DatetimeIndex:
    return pd.date_range("2024-01-01", periods=hours, freq="h", tz="America/Lima")


@pytest.fixture(scope="module")
def year() -> pd.Series:
    return load.generate_mall_load(_index(8760), **MALL)


def test_year_meets_energy_and_peak(year: pd.Series) -> None:
    assert year.name == "load_kw"
    assert year.index.equals(_index(8760))
    assert_allclose(year.sum(), 12_368_653.0, rtol=1e-9)  # 1-h steps: kW = kWh
    assert_allclose(year.max(), 2763.0, rtol=1e-9)
    assert year.min() >= 0.0
    assert not year.isna().any()


def test_week_energy_is_pro_rata() -> None:
    week = load.generate_mall_load(_index(168), **MALL)
    # 12,368,653 kWh x 168 h / 8760 h = 237,207.04 kWh.
    assert_allclose(week.sum(), 237_207.0438356, rtol=1e-9)
    assert_allclose(week.max(), 2763.0, rtol=1e-9)


def test_profile_shape(year: pd.Series) -> None:
    by_hour = year.groupby(year.index.hour).mean()
    # Open (09:00-22:00) well above the night base; afternoon hump above the morning.
    assert by_hour[15] > 1.5 * by_hour[3]
    assert by_hour[15] > by_hour[10] > by_hour[7] > by_hour[3]
    opening = year[(year.index.hour >= 9) & (year.index.hour < 22)]
    weekend = opening[opening.index.dayofweek >= 5].mean()
    weekday = opening[opening.index.dayofweek < 5].mean()
    assert weekend > 1.03 * weekday
    monthly = year.resample("MS").mean()
    assert monthly.iloc[10] > 1.1 * monthly.iloc[4]  # November peak, May trough


def test_shape_by_hand() -> None:
    hours = np.array([3.0, 8.0, 12.0, 22.5])
    # 03:00 night: 0; 08:00: half-way up the 2-h pre-opening ramp to 0.6 -> 0.3;
    # 12:00: 1 + 0.3 exp(-0.5 (3/2.5)^2) = 1.146026; 22:30: 0.5 (1 - 0.5/1.5) = 1/3.
    expected = [0.0, 0.3, 1.0 + 0.3 * np.exp(-0.72), 1.0 / 3.0]
    assert_allclose(load.mall_shape(hours, 9, 22), expected, rtol=1e-12)
    # Closing at midnight: the post-closing ramp wraps into 00:30 of the next day.
    assert_allclose(load.mall_shape(np.array([0.5]), 9, 24), [1.0 / 3.0], rtol=1e-12)


def test_rescale_by_hand() -> None:
    # raw mean 3, max 6; mean 2 and peak 5 need gain (5-2)/(6-3) = 1, offset 2-3 = -1.
    assert_allclose(
        load.rescale_to_mean_and_peak(np.array([1.0, 2.0, 3.0, 6.0]), 2.0, 5.0),
        [0.0, 1.0, 2.0, 5.0],
        atol=1e-12,
    )
    # Peak 5.1 would push the lowest hour below 0; the largest feasible is 2 x 5 / 2 = 5.
    with pytest.raises(ConfigError, match=r"site\.load\.peak_kw.*at most 5\.0 kW"):
        load.rescale_to_mean_and_peak(np.array([1.0, 2.0, 3.0, 6.0]), 2.0, 5.1)


@pytest.mark.parametrize("peak_kw", [1000.0, 1411.0, 8000.0])
def test_infeasible_peak_raises_naming_key(peak_kw: float) -> None:
    # Mean is 1,411.95 kW: a lower peak is impossible, a far higher one needs negative load.
    with pytest.raises(ConfigError, match=r"site\.load\.peak_kw"):
        load.generate_mall_load(_index(8760), **{**MALL, "peak_kw": peak_kw})


def test_bad_parameters_name_key() -> None:
    with pytest.raises(ConfigError, match=r"site\.load\.weekend_factor"):
        load.generate_mall_load(_index(24), **{**MALL, "weekend_factor": 0.0})
    with pytest.raises(ConfigError, match=r"site\.load\.open_hour"):
        load.generate_mall_load(_index(24), **{**MALL, "open_hour": 23})


def test_same_seed_same_output_other_seed_differs(year: pd.Series) -> None:
    pd.testing.assert_series_equal(load.generate_mall_load(_index(8760), **MALL), year)
    other = load.generate_mall_load(_index(8760), **{**MALL, "seed": 1})
    assert np.abs(other - year).max() > 10.0
    # Both still meet the targets.
    assert_allclose([other.sum(), other.max()], [12_368_653.0, 2763.0], rtol=1e-9)


def test_from_config_matches_generate(year: pd.Series) -> None:
    params = {k: v for k, v in MALL.items() if k != "seed"}
    site = SimpleNamespace(seed=0, load=LoadConfig(**params))
    pd.testing.assert_series_equal(load.from_config(_index(8760), site), year)
