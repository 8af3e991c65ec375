"""Synthetic rooftop PV generation: seeded weather plus pvlib physics.

Every step of the chain that pvlib models is done by pvlib: solar position,
Ineichen clear sky with the Linke turbidity climatology shipped in the pvlib
wheel (no download), Erbs decomposition, Hay-Davies transposition, Faiman cell
temperature, PVWatts DC and the PVWatts inverter. What pvlib does not provide
is the weather itself; here it is a seeded stochastic clear-sky index and a
synthetic air temperature, calibrated to a target mean daily irradiation.

Time convention: ``index`` is left-labelled; the value at 10:00 is the mean
power over 10:00-11:00. Geometry is evaluated at the interval midpoint.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import pvlib
from scipy import optimize, signal, stats

from pvbess.config import ConfigError
from pvbess.units import HOURS_PER_YEAR, step_hours

COLUMNS = ("ghi_w_m2", "dni_w_m2", "dhi_w_m2", "temp_air_c", "dc_power_kw", "ac_power_kw")

# PVWatts DC temperature coefficient of power for crystalline silicon [1/°C].
GAMMA_PDC_PER_C = -0.004
# PVWatts nominal inverter efficiency [-]; the inverter's DC limit is ac_kw / this,
# so that pvlib.inverter.pvwatts clips at exactly ac_kw.
ETA_INV_NOM = 0.96
# Iquitos is sheltered and humid: light winds (~1 m/s at module height) [m/s].
WIND_SPEED_M_S = 1.0
GROUND_ALBEDO = 0.2

# Cloudiness model. The daily clear-sky index follows a Beta distribution whose
# mean is calibrated; successive days are correlated through a Gaussian copula
# with a lag-1 autocorrelation, in the spirit of Graham & Hollands (1990, Solar
# Energy 44:333) who model daily clearness as AR(1) and hourly deviations as a
# second AR(1) process whose spread depends on the daily value.
BETA_CONCENTRATION = 8.0  # a + b of the daily Beta: std ~0.15 at a mean of 0.72
DAY_LAG1_CORR = 0.3  # [-]
HOUR_LAG1_CORR = 0.7  # per hour [-]
HOUR_SPREAD = 0.15  # hourly std of the index on a half-cloudy day [-]
# Hourly clear-sky index range: heavy tropical rain still lets ~5 % through,
# and broken clouds can lift an hourly mean up to ~10 % above clear sky.
CLEAR_SKY_INDEX_MIN = 0.05
CLEAR_SKY_INDEX_MAX = 1.10

# Synthetic Iquitos air temperature: minimum near sunrise (06:00), maximum
# mid-afternoon (15:00); clearer days are hotter in the afternoon.
TEMP_MIN_C = 23.0
TEMP_MAX_C = 31.0
TEMP_MAX_PER_CLEAR_SKY_INDEX_C = 4.0
TYPICAL_DAILY_CLEAR_SKY_INDEX = 0.7  # at which the daily maximum is TEMP_MAX_C
TEMP_HOUR_MIN = 6.0
TEMP_HOUR_MAX = 15.0

# Separate random streams for the PV weather, so that a site seed shared with
# the load model does not produce correlated draws.
_STREAM_PV = 0x5056


def _step_hours(index: pd.DatetimeIndex) -> float:
    """The uniform step of ``index`` [h] (``pvbess.units.step_hours``)."""
    if index.tz is None:
        raise ValueError("index must be time-zone aware (e.g. tz='America/Lima')")
    return step_hours(index)


def clear_sky_ghi_w_m2(
    times: pd.DatetimeIndex, latitude_deg: float, longitude_deg: float, altitude_m: float
) -> pd.DataFrame:
    """Solar position and Ineichen clear-sky GHI at ``times`` (instants).

    Returns columns ``zenith_deg``, ``apparent_zenith_deg``, ``azimuth_deg``,
    ``dni_extra_w_m2``, ``airmass_relative`` and ``ghi_clear_w_m2`` [W/m²];
    the GHI is exactly 0 with the sun below the horizon.
    """
    solpos = pvlib.solarposition.get_solarposition(
        times, latitude_deg, longitude_deg, altitude=altitude_m
    )
    airmass_relative = pvlib.atmosphere.get_relative_airmass(solpos["apparent_zenith"])
    pressure_pa = pvlib.atmosphere.alt2pres(altitude_m)
    airmass_absolute = pvlib.atmosphere.get_absolute_airmass(airmass_relative, pressure_pa)
    linke = pvlib.clearsky.lookup_linke_turbidity(times, latitude_deg, longitude_deg)
    dni_extra_w_m2 = pvlib.irradiance.get_extra_radiation(times)
    clear = pvlib.clearsky.ineichen(
        solpos["apparent_zenith"], airmass_absolute, linke, altitude_m, dni_extra_w_m2
    )
    # Ineichen maps night airmass NaNs to 0, but be explicit: night is exactly 0.
    sun_up = (solpos["zenith"] < 90.0).to_numpy()
    ghi_clear = np.where(sun_up, np.nan_to_num(clear["ghi"].to_numpy()), 0.0)
    return pd.DataFrame(
        {
            "zenith_deg": solpos["zenith"].to_numpy(),
            "apparent_zenith_deg": solpos["apparent_zenith"].to_numpy(),
            "azimuth_deg": solpos["azimuth"].to_numpy(),
            "dni_extra_w_m2": np.asarray(dni_extra_w_m2, dtype=float),
            "airmass_relative": airmass_relative.to_numpy(),
            "ghi_clear_w_m2": np.maximum(ghi_clear, 0.0),
        },
        index=times,
    )


def _ar1(innovations: np.ndarray, start: float, lag1_corr: float) -> np.ndarray:
    """Stationary unit-variance AR(1) series driven by N(0, 1) innovations."""
    b = [np.sqrt(1.0 - lag1_corr**2)]
    a = [1.0, -lag1_corr]
    # zi = corr * start makes the first value unit-variance too (stationary start).
    out, _ = signal.lfilter(b, a, innovations, zi=[lag1_corr * start])
    return np.asarray(out, dtype=float)


def clear_sky_index(
    mean_frac: float, day_quantile: np.ndarray, hour_noise: np.ndarray, day_of_step: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Hourly clear-sky index from the seeded draws, for a daily Beta mean.

    Parameters
    ----------
    mean_frac : mean of the daily Beta distribution [-], in (0, 1)
    day_quantile : one uniform quantile per day [-]
    hour_noise : unit-variance AR(1) series, one value per step [-]
    day_of_step : day number of each step (index into ``day_quantile``)

    Returns the daily index per day and the clipped hourly index per step [-].
    """
    k_day = stats.beta.ppf(
        day_quantile, mean_frac * BETA_CONCENTRATION, (1.0 - mean_frac) * BETA_CONCENTRATION
    )
    k_day_step = k_day[day_of_step]
    # Hourly spread is largest on half-cloudy days, small on clear or overcast ones.
    spread = HOUR_SPREAD * 4.0 * k_day_step * (1.0 - k_day_step)
    k_hour = np.clip(k_day_step + spread * hour_noise, CLEAR_SKY_INDEX_MIN, CLEAR_SKY_INDEX_MAX)
    return k_day, k_hour


def synthetic_air_temperature_c(
    local_hour: np.ndarray, k_day_step: np.ndarray, day_noise_c: np.ndarray
) -> np.ndarray:
    """Synthetic tropical air temperature [°C].

    A daily minimum at 06:00 and maximum at 15:00 joined by half-cosines;
    ``day_noise_c`` holds per-step (min, max) offsets, shape (n, 2) [°C].
    """
    t_min = TEMP_MIN_C + day_noise_c[:, 0]
    t_max = (
        TEMP_MAX_C
        + TEMP_MAX_PER_CLEAR_SKY_INDEX_C * (k_day_step - TYPICAL_DAILY_CLEAR_SKY_INDEX)
        + day_noise_c[:, 1]
    )
    t_max = np.maximum(t_max, t_min + 2.0)
    rise_h = TEMP_HOUR_MAX - TEMP_HOUR_MIN
    fall_h = 24.0 - rise_h
    since_min_h = np.mod(local_hour - TEMP_HOUR_MIN, 24.0)
    since_max_h = np.mod(local_hour - TEMP_HOUR_MAX, 24.0)
    shape = np.where(
        since_min_h < rise_h,
        0.5 * (1.0 - np.cos(np.pi * since_min_h / rise_h)),
        0.5 * (1.0 + np.cos(np.pi * since_max_h / fall_h)),
    )
    return t_min + (t_max - t_min) * shape


def generate_pv(
    index: pd.DatetimeIndex,
    *,
    latitude_deg: float,
    longitude_deg: float,
    altitude_m: float,
    tilt_deg: float,
    azimuth_deg: float,
    dc_kwp: float,
    ac_kw: float,
    system_losses_frac: float,
    ghi_target_kwh_m2_day: float,
    seed: int,
) -> pd.DataFrame:
    """Seeded synthetic weather and PV output on ``index``.

    Parameters
    ----------
    index : tz-aware, uniform, left-labelled time index
    latitude_deg, longitude_deg : site position [°]
    altitude_m : site altitude [m]
    tilt_deg : module tilt from horizontal [°]
    azimuth_deg : module azimuth, pvlib convention (0 = north, 180 = south) [°]
    dc_kwp : array DC rating at STC [kWp]
    ac_kw : inverter AC rating; AC output clips here [kW]
    system_losses_frac : DC-side losses (soiling, wiring, mismatch...) [-]
    ghi_target_kwh_m2_day : mean daily GHI over ``index`` [kWh/m²/day]
    seed : random seed for the weather

    Returns
    -------
    DataFrame on ``index`` with ``ghi_w_m2``, ``dni_w_m2``, ``dhi_w_m2`` [W/m²],
    ``temp_air_c`` [°C], ``dc_power_kw`` (after losses, inverter input) and
    ``ac_power_kw`` [kW], each the mean over its step.
    """
    if dc_kwp < 0 or ac_kw <= 0:
        raise ValueError(f"need dc_kwp >= 0 and ac_kw > 0, got {dc_kwp}, {ac_kw}")
    if not 0 <= system_losses_frac < 1:
        raise ValueError(f"system_losses_frac must be in [0, 1), got {system_losses_frac}")
    step_h = _step_hours(index)
    mid = index + pd.Timedelta(hours=step_h / 2.0)
    sky = clear_sky_ghi_w_m2(mid, latitude_deg, longitude_deg, altitude_m)
    ghi_clear = sky["ghi_clear_w_m2"].to_numpy()
    sun_up = ghi_clear > 0.0

    day_of_step, days = pd.factorize(mid.normalize())
    n_days, n_steps = len(days), len(index)
    # One child stream per kind of draw: the draws for the first days do not
    # depend on how long the index is.
    rng_day, rng_hour, rng_temp = (
        np.random.default_rng(s) for s in np.random.SeedSequence([_STREAM_PV, seed]).spawn(3)
    )
    day_z = _ar1(rng_day.standard_normal(n_days), rng_day.standard_normal(), DAY_LAG1_CORR)
    day_quantile = stats.norm.cdf(day_z)
    hour_lag1 = HOUR_LAG1_CORR**step_h
    hour_noise = _ar1(rng_hour.standard_normal(n_steps), rng_hour.standard_normal(), hour_lag1)
    temp_noise_c = rng_temp.normal(0.0, [0.6, 0.8], size=(n_days, 2))

    n_days_covered = n_steps * step_h / 24.0

    def mean_daily_ghi_kwh_m2(mean_frac: float) -> float:
        _, k_hour = clear_sky_index(mean_frac, day_quantile, hour_noise, day_of_step)
        return float(np.sum(k_hour * ghi_clear) * step_h / 1000.0 / n_days_covered)

    # Calibrate the Beta mean so that the mean daily GHI hits the target. The
    # random draws are fixed (common random numbers), so this is a continuous
    # function of one variable that increases with the mean.
    lo, hi = 0.01, 0.99
    achievable = (mean_daily_ghi_kwh_m2(lo), mean_daily_ghi_kwh_m2(hi))
    if not achievable[0] <= ghi_target_kwh_m2_day <= achievable[1]:
        raise ConfigError(
            f"site.pv.ghi_target_kwh_m2_day: {ghi_target_kwh_m2_day} kWh/m²/day is outside "
            f"what this sky allows over the index ({achievable[0]:.2f}-{achievable[1]:.2f})"
        )
    mean_frac = optimize.brentq(
        lambda m: mean_daily_ghi_kwh_m2(m) - ghi_target_kwh_m2_day, lo, hi, xtol=1e-12
    )
    k_day, k_hour = clear_sky_index(mean_frac, day_quantile, hour_noise, day_of_step)
    ghi_w_m2 = k_hour * ghi_clear

    local_hour = (mid.hour + mid.minute / 60.0).to_numpy(dtype=float)
    temp_air_c = synthetic_air_temperature_c(
        local_hour, k_day[day_of_step], temp_noise_c[day_of_step]
    )

    zenith = sky["zenith_deg"]
    split = pvlib.irradiance.erbs(pd.Series(ghi_w_m2, index=mid), zenith, mid)
    dni_w_m2 = np.where(sun_up, split["dni"].to_numpy(), 0.0)
    # Erbs returns dhi = ghi - dni cos(z); keep that closure exact.
    dhi_w_m2 = np.where(sun_up, split["dhi"].to_numpy(), 0.0)

    poa = pvlib.irradiance.get_total_irradiance(
        tilt_deg,
        azimuth_deg,
        zenith,
        sky["azimuth_deg"],
        dni_w_m2,
        ghi_w_m2,
        dhi_w_m2,
        dni_extra=sky["dni_extra_w_m2"],
        albedo=GROUND_ALBEDO,
        model="haydavies",
    )
    aoi_deg = pvlib.irradiance.aoi(tilt_deg, azimuth_deg, zenith, sky["azimuth_deg"])
    # Reflection losses on the beam only (as PVWatts v5); diffuse IAM is small.
    iam_beam = pvlib.iam.physical(aoi_deg)
    poa_global = np.nan_to_num(poa["poa_global"].to_numpy())
    effective_w_m2 = np.nan_to_num(
        poa["poa_direct"].to_numpy() * np.asarray(iam_beam) + poa["poa_diffuse"].to_numpy()
    )
    effective_w_m2 = np.where(sun_up, np.maximum(effective_w_m2, 0.0), 0.0)

    temp_cell_c = pvlib.temperature.faiman(poa_global, temp_air_c, wind_speed=WIND_SPEED_M_S)
    # pdc0 in kW gives DC power in kW.
    dc_array_kw = pvlib.pvsystem.pvwatts_dc(
        effective_w_m2, temp_cell_c, pdc0=dc_kwp, gamma_pdc=GAMMA_PDC_PER_C
    )
    dc_power_kw = np.maximum(np.asarray(dc_array_kw, dtype=float), 0.0) * (1.0 - system_losses_frac)
    ac_power_kw = pvlib.inverter.pvwatts(
        dc_power_kw, pdc0=ac_kw / ETA_INV_NOM, eta_inv_nom=ETA_INV_NOM
    )
    # pvlib clips at 0.96 * (ac_kw / 0.96), which may round one ulp above ac_kw.
    ac_power_kw = np.where(sun_up, np.minimum(np.asarray(ac_power_kw, dtype=float), ac_kw), 0.0)

    out = pd.DataFrame(
        {
            "ghi_w_m2": ghi_w_m2,
            "dni_w_m2": dni_w_m2,
            "dhi_w_m2": dhi_w_m2,
            "temp_air_c": temp_air_c,
            "dc_power_kw": dc_power_kw,
            "ac_power_kw": ac_power_kw,
        },
        index=index,
    )
    if out.isna().to_numpy().any():
        raise RuntimeError("generate_pv produced NaN values")  # a bug, not a user error
    return out


def inverter_dc_limit_kw(ac_kw: float) -> float:
    """DC input at which the PVWatts inverter reaches ``ac_kw`` [kW]."""
    return ac_kw / ETA_INV_NOM


def specific_yield_kwh_per_kwp(
    ac_power_kw: pd.Series, dc_kwp: float, step_hours: float = 1.0
) -> float:
    """Annual AC energy per installed kWp [kWh/kWp/yr].

    ``ac_power_kw`` holds the mean power of each step [kW]; a series shorter or
    longer than a year is annualised by 8760 h / covered hours.
    """
    if dc_kwp <= 0:
        raise ValueError(f"specific yield needs dc_kwp > 0, got {dc_kwp}")
    if len(ac_power_kw) == 0 or step_hours <= 0:
        raise ValueError("need a non-empty series and step_hours > 0")
    if ac_power_kw.isna().any():
        raise ValueError("ac_power_kw contains NaN")
    covered_h = len(ac_power_kw) * step_hours
    energy_kwh = float(ac_power_kw.sum()) * step_hours
    return energy_kwh / dc_kwp * HOURS_PER_YEAR / covered_h


def from_config(index: pd.DatetimeIndex, site: Any) -> pd.DataFrame:
    """``generate_pv`` with the parameters of a ``SiteConfig``-like object."""
    pv = site.pv
    return generate_pv(
        index,
        latitude_deg=site.latitude_deg,
        longitude_deg=site.longitude_deg,
        altitude_m=site.altitude_m,
        tilt_deg=pv.tilt_deg,
        azimuth_deg=pv.azimuth_deg,
        dc_kwp=pv.dc_kwp,
        ac_kw=pv.ac_kw,
        system_losses_frac=pv.system_losses_frac,
        ghi_target_kwh_m2_day=pv.ghi_target_kwh_m2_day,
        seed=site.seed,
    )
