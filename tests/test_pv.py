"""Tests for pvbess.site.pv on the Iquitos design (4,050 kWp DC on 1,670 kW AC)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pvlib
import pytest
from numpy.testing import assert_allclose

from pvbess.config import ConfigError, PvConfig
from pvbess.site import pv

IQUITOS: dict[str, Any] = {
    "latitude_deg": -3.7469,
    "longitude_deg": -73.2528,
    "altitude_m": 104.0,
    "tilt_deg": 10.0,
    "azimuth_deg": 0.0,
    "dc_kwp": 4050.0,
    "ac_kw": 1670.0,
    "system_losses_frac": 0.14,
    "ghi_target_kwh_m2_day": 4.75,
    "seed": 0,
}


def _index(hours: int) -> pd.DatetimeIndex:
    return pd.date_range("2024-01-01", periods=hours, freq="h", tz="America/Lima")


@pytest.fixture(scope="module")
def year() -> pd.DataFrame:
    return pv.generate_pv(_index(8760), **IQUITOS)


@pytest.fixture(scope="module")
def week() -> pd.DataFrame:
    return pv.generate_pv(_index(168), **IQUITOS)


def _mean_daily_ghi_kwh_m2(df: pd.DataFrame) -> float:
    return float(df["ghi_w_m2"].sum()) / 1000.0 / (len(df) / 24.0)


def test_columns_index_no_nan(year: pd.DataFrame) -> None:
    assert list(year.columns) == list(pv.COLUMNS)
    assert year.index.equals(_index(8760))
    assert not year.isna().to_numpy().any()
    assert (year.drop(columns="temp_air_c").to_numpy() >= 0).all()


@pytest.mark.parametrize("fixture", ["year", "week"])
def test_ghi_target_met(fixture: str, request: pytest.FixtureRequest) -> None:
    df = request.getfixturevalue(fixture)
    assert_allclose(_mean_daily_ghi_kwh_m2(df), 4.75, rtol=1e-6)


def test_unreachable_ghi_target_names_key() -> None:
    # Clear sky here gives ~6.5 kWh/m²/day: 11 cannot be reached.
    with pytest.raises(ConfigError, match=r"site\.pv\.ghi_target_kwh_m2_day"):
        pv.generate_pv(_index(168), **{**IQUITOS, "ghi_target_kwh_m2_day": 11.0})


def test_ac_clips_at_rating(year: pd.DataFrame) -> None:
    ac = year["ac_power_kw"].to_numpy()
    dc = year["dc_power_kw"].to_numpy()
    assert ac.max() <= 1670.0
    assert_allclose(ac.max(), 1670.0, rtol=1e-12)
    clipped = ac >= 1670.0 * (1 - 1e-12)
    # DC/AC = 2.4: hundreds of clipped hours in a year, each above the inverter's DC limit.
    assert clipped.sum() > 300
    assert (dc[clipped] >= pv.inverter_dc_limit_kw(1670.0)).all()
    assert dc.max() > 1.5 * 1670.0


def test_inverter_dc_limit_by_hand() -> None:
    # 1670 kW / 0.96 nominal efficiency = 1739.58333 kW of DC input.
    assert_allclose(pv.inverter_dc_limit_kw(1670.0), 1739.5833333333, rtol=1e-10)
    limit = pv.inverter_dc_limit_kw(1670.0)
    assert_allclose(pvlib.inverter.pvwatts(limit, pdc0=limit), 1670.0, rtol=1e-12)


def test_night_is_exactly_zero(year: pd.DataFrame) -> None:
    night = year[np.isin(year.index.hour, [0, 1, 2, 3, 4, 19, 20, 21, 22, 23])]
    cols = ["ghi_w_m2", "dni_w_m2", "dhi_w_m2", "dc_power_kw", "ac_power_kw"]
    assert len(night) == 10 * 365
    assert (night[cols].to_numpy() == 0.0).all()
    # ... and the day is not: every day produces.
    assert (year["ac_power_kw"].resample("D").sum() > 0).all()


def test_closure_holds_at_interval_midpoint(year: pd.DataFrame) -> None:
    # GHI = DNI cos(zenith) + DHI with the sun at index + 30 min (left-labelled hours).
    index = year.index
    mid = pvlib.solarposition.get_solarposition(
        index + pd.Timedelta(minutes=30), IQUITOS["latitude_deg"], IQUITOS["longitude_deg"]
    )
    cos_z = np.cos(np.radians(mid["zenith"].to_numpy()))
    rebuilt = year["dni_w_m2"].to_numpy() * cos_z + year["dhi_w_m2"].to_numpy()
    assert_allclose(rebuilt, year["ghi_w_m2"].to_numpy(), atol=1e-6)
    # The left edge is a different geometry: closure there fails by tens of W/m².
    left = pvlib.solarposition.get_solarposition(
        index, IQUITOS["latitude_deg"], IQUITOS["longitude_deg"]
    )
    cos_left = np.clip(np.cos(np.radians(left["zenith"].to_numpy())), 0, None)
    rebuilt_left = year["dni_w_m2"].to_numpy() * cos_left + year["dhi_w_m2"].to_numpy()
    assert np.abs(rebuilt_left - year["ghi_w_m2"].to_numpy()).max() > 20.0


def test_same_seed_same_output_other_seed_differs(week: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(pv.generate_pv(_index(168), **IQUITOS), week)
    other = pv.generate_pv(_index(168), **{**IQUITOS, "seed": 1})
    assert np.abs(other["ac_power_kw"] - week["ac_power_kw"]).max() > 100.0
    assert np.abs(other["temp_air_c"] - week["temp_air_c"]).max() > 0.1


def test_zero_kwp_gives_zero_power_same_weather(week: pd.DataFrame) -> None:
    df = pv.generate_pv(_index(168), **{**IQUITOS, "dc_kwp": 0.0})
    assert (df[["dc_power_kw", "ac_power_kw"]].to_numpy() == 0.0).all()
    # The weather does not depend on the plant.
    pd.testing.assert_frame_equal(df[["ghi_w_m2", "temp_air_c"]], week[["ghi_w_m2", "temp_air_c"]])


def test_losses_scale_dc_linearly(week: pd.DataFrame) -> None:
    lossless = pv.generate_pv(_index(168), **{**IQUITOS, "system_losses_frac": 0.0})
    # 14 % losses: DC is 0.86 of the lossless DC in every hour.
    assert_allclose(week["dc_power_kw"], 0.86 * lossless["dc_power_kw"], rtol=1e-12)
    assert (lossless["ac_power_kw"] >= week["ac_power_kw"]).all()


def test_air_temperature_is_tropical(year: pd.DataFrame) -> None:
    temp = year["temp_air_c"]
    by_hour = temp.groupby(temp.index.hour).mean()
    assert 20.0 < temp.min() and temp.max() < 36.0
    assert 22.0 < by_hour[5] < 24.5  # coolest just before sunrise
    assert 29.5 < by_hour[14] < 32.5  # hottest mid-afternoon


def test_specific_yield_plausible(year: pd.DataFrame) -> None:
    # 1,734 kWh/m²/yr GHI, 14 % losses and heavy clipping: well below 1,734 kWh/kWp.
    sy = pv.specific_yield_kwh_per_kwp(year["ac_power_kw"], 4050.0)
    assert 1000.0 < sy < 1400.0


def test_specific_yield_by_hand() -> None:
    # 100 kW for 24 h = 2,400 kWh/day; x 365 days / 50 kWp = 17,520 kWh/kWp/yr.
    day = pd.Series(np.full(24, 100.0))
    assert_allclose(pv.specific_yield_kwh_per_kwp(day, 50.0), 17_520.0, rtol=1e-12)
    # Same day at 15-min steps.
    quarter = pd.Series(np.full(96, 100.0))
    assert_allclose(pv.specific_yield_kwh_per_kwp(quarter, 50.0, 0.25), 17_520.0, rtol=1e-12)
    # A full year at 1 kW on 1 kWp = 8,760 kWh/kWp.
    assert_allclose(pv.specific_yield_kwh_per_kwp(pd.Series(np.ones(8760)), 1.0), 8760.0)
    with pytest.raises(ValueError):
        pv.specific_yield_kwh_per_kwp(day, 0.0)


def test_naive_index_rejected() -> None:
    with pytest.raises(ValueError, match="time-zone aware"):
        pv.generate_pv(pd.date_range("2024-01-01", periods=24, freq="h"), **IQUITOS)


def test_from_config_matches_generate_pv(week: pd.DataFrame) -> None:
    site = SimpleNamespace(
        latitude_deg=-3.7469,
        longitude_deg=-73.2528,
        altitude_m=104.0,
        seed=0,
        pv=PvConfig(
            dc_kwp=4050.0,
            ac_kw=1670.0,
            tilt_deg=10.0,
            azimuth_deg=0.0,
            system_losses_frac=0.14,
            ghi_target_kwh_m2_day=4.75,
        ),
    )
    pd.testing.assert_frame_equal(pv.from_config(_index(168), site), week)
