"""Synthetic shopping-mall electricity demand.

A seeded hourly profile (night base, ramps around opening hours, an afternoon
cooling hump, busier weekends, a seasonal swing, multiplicative noise) is
rescaled affinely so that its energy and its peak equal the site's targets.

Time convention: ``index`` is left-labelled; the value at 10:00 is the mean
power over 10:00-11:00. The profile is evaluated at the interval midpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from pvbess.config import ConfigError
from pvbess.units import HOURS_PER_YEAR, step_hours

# Shape of the raw profile, in units of the weekday opening-hours level above
# the base. Chillers, refrigeration and security lighting run all night in a
# tropical mall, so the base is a large share of the daytime demand.
BASE_LEVEL = 0.5
# Before opening, staff arrive and HVAC pre-cools: a linear ramp over this many
# hours reaching this share of the opening-hours level.
PRE_OPEN_RAMP_H = 2.0
PRE_OPEN_LEVEL = 0.6
# After closing, cleaning and restocking keep part of the load for a while.
POST_CLOSE_RAMP_H = 1.5
POST_CLOSE_LEVEL = 0.5
# Afternoon hump while open: the hottest hours drive cooling and shoppers
# come in after lunch.
HUMP_LEVEL = 0.3
HUMP_CENTER_H = 15.0
HUMP_WIDTH_H = 2.5
# Seasonal maximum in late November: the hottest, driest months in Loreto
# (Sep-Nov) run into the pre-Christmas shopping season.
SEASON_PEAK_DAY_OF_YEAR = 330.0

# Separate random stream from the PV weather (the site seed is shared).
_STREAM_LOAD = 0x4C4F4144


def _step_hours(index: pd.DatetimeIndex) -> float:
    """The uniform step of ``index`` [h] (``pvbess.units.step_hours``)."""
    return step_hours(index)


def _activity(local_hour: np.ndarray, open_hour: float, close_hour: float) -> np.ndarray:
    """Opening-hours activity in [0, 1] at one local hour of day [h]."""
    pre = np.clip((local_hour - (open_hour - PRE_OPEN_RAMP_H)) / PRE_OPEN_RAMP_H, 0.0, 1.0)
    post = np.clip(1.0 - (local_hour - close_hour) / POST_CLOSE_RAMP_H, 0.0, 1.0)
    return np.select(
        [local_hour < open_hour, local_hour < close_hour],
        [PRE_OPEN_LEVEL * pre, 1.0],
        POST_CLOSE_LEVEL * post,
    )


def mall_shape(local_hour: np.ndarray, open_hour: float, close_hour: float) -> np.ndarray:
    """Weekday activity above the base at local hour ``local_hour`` [h], unitless.

    Ramps that cross midnight (opening at 01:00, closing at 24:00) wrap into the
    neighbouring day.
    """
    activity = np.maximum.reduce(
        [_activity(local_hour + shift, open_hour, close_hour) for shift in (-24.0, 0.0, 24.0)]
    )
    is_open = (local_hour >= open_hour) & (local_hour < close_hour)
    hump = HUMP_LEVEL * np.exp(-0.5 * ((local_hour - HUMP_CENTER_H) / HUMP_WIDTH_H) ** 2)
    return activity + np.where(is_open, hump, 0.0)


def rescale_to_mean_and_peak(raw: np.ndarray, mean_kw: float, peak_kw: float) -> np.ndarray:
    """Affine map ``a + b * raw`` with mean ``mean_kw`` and maximum ``peak_kw`` [kW].

    Raises ConfigError (naming ``site.load.peak_kw``) when no non-negative load
    meets both targets.
    """
    raw = np.asarray(raw, dtype=float)
    raw_mean, raw_max, raw_min = float(raw.mean()), float(raw.max()), float(raw.min())
    if not peak_kw > mean_kw or raw_max <= raw_mean:
        raise ConfigError(
            f"site.load.peak_kw: {peak_kw} kW must exceed the mean load {mean_kw:.1f} kW"
        )
    gain = (peak_kw - mean_kw) / (raw_max - raw_mean)
    offset = mean_kw - gain * raw_mean
    if offset + gain * raw_min < -1e-9 * peak_kw:
        # The peak that puts the lowest hour exactly at 0 kW.
        max_peak_kw = mean_kw * (raw_max - raw_min) / (raw_mean - raw_min)
        raise ConfigError(
            f"site.load.peak_kw: {peak_kw} kW with a mean of {mean_kw:.1f} kW would need a "
            f"negative load in some hours; at most {max_peak_kw:.1f} kW fits this profile"
        )
    # Only rounding can go below 0 here; clipping it changes nothing measurable.
    return np.maximum(offset + gain * raw, 0.0)


def _check_params(
    annual_energy_kwh: float,
    open_hour: float,
    close_hour: float,
    weekend_factor: float,
    seasonal_amplitude_frac: float,
    noise_frac: float,
) -> None:
    checks = [
        (annual_energy_kwh > 0, "site.load.annual_energy_kwh", "must be > 0"),
        (
            0 <= open_hour < close_hour <= 24,
            "site.load.open_hour/close_hour",
            "need 0 <= open_hour < close_hour <= 24",
        ),
        (weekend_factor > 0, "site.load.weekend_factor", "must be > 0"),
        (
            0 <= seasonal_amplitude_frac < 1,
            "site.load.seasonal_amplitude_frac",
            "must be in [0, 1)",
        ),
        (0 <= noise_frac < 1, "site.load.noise_frac", "must be in [0, 1)"),
    ]
    for ok, key, message in checks:
        if not ok:
            raise ConfigError(f"{key}: {message}")


def generate_mall_load(
    index: pd.DatetimeIndex,
    *,
    annual_energy_kwh: float,
    peak_kw: float,
    open_hour: float,
    close_hour: float,
    weekend_factor: float,
    seasonal_amplitude_frac: float,
    noise_frac: float,
    seed: int,
) -> pd.Series:
    """Seeded mall demand on ``index``, as mean power per step [kW].

    Parameters
    ----------
    index : uniform, left-labelled time index (local time, tz-aware or naive)
    annual_energy_kwh : energy of a full year; the index gets
        ``annual_energy_kwh * covered_hours / 8760`` [kWh]
    peak_kw : maximum over the index [kW]
    open_hour, close_hour : opening hours, local time [h]
    weekend_factor : Saturday/Sunday activity relative to weekdays [-]
    seasonal_amplitude_frac : amplitude of the yearly sinusoid [-]
    noise_frac : standard deviation of the multiplicative hourly noise [-]
    seed : random seed

    Returns a Series named ``load_kw`` on ``index``.
    """
    _check_params(
        annual_energy_kwh,
        open_hour,
        close_hour,
        weekend_factor,
        seasonal_amplitude_frac,
        noise_frac,
    )
    step_h = _step_hours(index)
    mid = index + pd.Timedelta(hours=step_h / 2.0)
    local_hour = (mid.hour + mid.minute / 60.0).to_numpy(dtype=float)
    # Shoppers, not chillers, make a weekend busier: scale the part above the base.
    is_weekend = np.asarray(mid.dayofweek >= 5)
    activity = mall_shape(local_hour, open_hour, close_hour)
    raw = BASE_LEVEL + np.where(is_weekend, weekend_factor, 1.0) * activity
    day_of_year = mid.dayofyear.to_numpy(dtype=float) + local_hour / 24.0
    raw = raw * (
        1.0
        + seasonal_amplitude_frac
        * np.cos(2.0 * np.pi * (day_of_year - SEASON_PEAK_DAY_OF_YEAR) / 365.25)
    )
    rng = np.random.default_rng([_STREAM_LOAD, seed])
    raw = raw * np.maximum(1.0 + noise_frac * rng.standard_normal(len(index)), 0.0)

    # A year of 8760 h carries annual_energy_kwh, so the mean power is fixed.
    mean_kw = annual_energy_kwh / HOURS_PER_YEAR
    load_kw = rescale_to_mean_and_peak(raw, mean_kw, peak_kw)
    return pd.Series(load_kw, index=index, name="load_kw")


def from_config(index: pd.DatetimeIndex, site: Any) -> pd.Series:
    """``generate_mall_load`` with the parameters of a ``SiteConfig``-like object."""
    load = site.load
    return generate_mall_load(
        index,
        annual_energy_kwh=load.annual_energy_kwh,
        peak_kw=load.peak_kw,
        open_hour=load.open_hour,
        close_hour=load.close_hour,
        weekend_factor=load.weekend_factor,
        seasonal_amplitude_frac=load.seasonal_amplitude_frac,
        noise_frac=load.noise_frac,
        seed=site.seed,
    )
