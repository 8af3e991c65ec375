"""Series checks (hard errors) and PV plausibility warnings."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pvbess.config import CsvSourceConfig
from pvbess.errors import DataError
from pvbess.site.timeseries_io import read_series
from pvbess.site.validation import PlausibilityWarning, check_pv_plausibility, check_series

PV_FILE = (
    Path(__file__).resolve().parents[2] / "shared" / "oe2" / "pv_generation_hourly_citylearn_v2.csv"
)
TZ = "America/Lima"


def _index(periods: int = 6, start: str = "2024-01-01 00:00") -> pd.DatetimeIndex:
    return pd.date_range(start, periods=periods, freq="h", tz=TZ)


def _series(values: list[float], index: pd.DatetimeIndex | None = None) -> pd.Series:
    return pd.Series(values, index=_index(len(values)) if index is None else index)


def _error(values: pd.Series, **kwargs: object) -> str:
    kwargs.setdefault("expected_index", _index())
    with pytest.raises(DataError) as err:
        check_series(values, source="load.csv", column="load_kwh", **kwargs)
    message = str(err.value)
    assert message.startswith("load.csv, column 'load_kwh'")
    return message


# --- check_series ---------------------------------------------------------------------


def test_clean_series_passes() -> None:
    values = _series([0.0, 1.0, 2.0, 3.0, 4.0, 5.0])
    check_series(values, source="load.csv", column="load_kwh", expected_index=_index())
    check_series(values, source="load.csv", column="load_kwh")


@pytest.mark.parametrize(
    ("bad", "problem"),
    [(np.nan, "missing value (NaN)"), (np.inf, "infinite value"), (-1.0, "negative value")],
)
def test_bad_values_name_row_and_time(bad: float, problem: str) -> None:
    values = _series([1.0, 1.0, 1.0, bad, 1.0, bad])
    message = _error(values)
    assert problem in message
    assert "row 4 of 6 (time 2024-01-01 03:00:00-05:00)" in message
    assert "2 such row(s)" in message


def test_negative_values_can_be_allowed() -> None:
    values = _series([1.0, -2.0, 3.0, 1.0, 1.0, 1.0])
    check_series(values, source="grid", column="net_kwh", allow_negative=True)
    assert "negative value" in _error(values)


def test_wrong_length() -> None:
    message = _error(_series([1.0] * 5))
    assert "5 values, expected 6" in message


def test_duplicated_index() -> None:
    index = _index().delete(2).insert(2, _index()[1])
    message = _error(_series([1.0] * 6, pd.DatetimeIndex(index)))
    assert "duplicate timestamp" in message and "row 3 of 6" in message


def test_non_monotonic_index() -> None:
    index = _index()[[0, 1, 3, 2, 4, 5]]
    message = _error(_series([1.0] * 6, index))
    assert "not increasing" in message
    assert "row 4 of 6 (time 2024-01-01 02:00:00-05:00)" in message


@pytest.mark.parametrize("expected", [True, False])
def test_gap(expected: bool) -> None:
    index = _index(7).delete(3)  # 03:00 missing
    values = _series([1.0] * 6, index)
    message = _error(values, expected_index=_index() if expected else None)
    assert "gap or irregular spacing" in message
    assert "row 3 of 6 (time 2024-01-01 02:00:00-05:00)" in message
    assert "2024-01-01 04:00:00-05:00" in message


def test_index_differs_from_expected() -> None:
    values = _series([1.0] * 6, _index(start="2024-01-01 01:00"))
    message = _error(values)
    assert "row 1 of 6" in message and "differs from the expected 2024-01-01 00:00:00-05:00" in (
        message
    )


def test_index_must_hold_timestamps() -> None:
    assert "not timestamps" in _error(pd.Series([1.0] * 6), expected_index=None)


# --- check_pv_plausibility ------------------------------------------------------------


def test_user_pv_file_raises_both_warnings() -> None:
    if not PV_FILE.is_file():
        pytest.skip(f"user data not available: {PV_FILE}")
    index = pd.date_range("2024-01-01", periods=8760, freq="h", tz=TZ)
    pv_kwh = read_series(
        CsvSourceConfig(path=str(PV_FILE), value_column="pv_kwh"), index, name="pv"
    )
    with pytest.warns(PlausibilityWarning) as record:
        messages = check_pv_plausibility(pv_kwh, dc_kwp=4050.0, ac_kw=1670.0, source="pv file")
    assert [str(w.message) for w in record] == messages
    assert len(messages) == 2
    yield_msg, ac_msg = messages
    assert "specific yield 2,047.5 kWh/kWp/yr" in yield_msg
    assert "AC rating of 1,670 kW" in ac_msg
    assert "first at 2024-01-01 09:00:00-05:00" in ac_msg
    assert "peak 2,886.7 kW at 2024-01-01 10:00:00-05:00" in ac_msg


def _day_profile_kwh(peak_kw: float, days: int = 365) -> pd.Series:
    """Half-sine from 06:00 to 18:00 each day [kWh per hour]."""
    hours = np.arange(24)
    day = np.clip(np.sin((hours - 6 + 0.5) / 12 * np.pi), 0, None) * (hours >= 6) * (hours < 18)
    values = np.tile(day * peak_kw, days)
    return pd.Series(values, index=pd.date_range("2024-01-01", periods=len(values), freq="h"))


def test_plausible_pv_is_silent() -> None:
    pv_kwh = _day_profile_kwh(peak_kw=1500.0)  # about 4,200 MWh/yr: ~1,040 kWh/kWp/yr
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_pv_plausibility(pv_kwh, dc_kwp=4050.0, ac_kw=1670.0, source="s") == []


def test_high_yield_alone() -> None:
    pv_kwh = _day_profile_kwh(peak_kw=1600.0)  # below the AC rating
    with pytest.warns(PlausibilityWarning, match="specific yield") as record:
        check_pv_plausibility(pv_kwh, dc_kwp=2000.0, ac_kw=1670.0, source="s")
    assert len(record) == 1


def test_ac_excess_alone_and_step_hours() -> None:
    pv_kwh = _day_profile_kwh(peak_kw=1000.0, days=2)
    pv_kwh.iloc[30] = 1700.0
    with pytest.warns(PlausibilityWarning, match="first at 2024-01-02 06:00") as record:
        check_pv_plausibility(pv_kwh, dc_kwp=4050.0, ac_kw=1670.0, source="s")
    assert len(record) == 1
    # The same energy per half hour is twice the power.
    quarter = pv_kwh.clip(upper=1000.0)
    with pytest.warns(PlausibilityWarning, match="AC rating"):
        check_pv_plausibility(quarter, dc_kwp=1e6, ac_kw=1670.0, step_hours=0.5, source="s")
