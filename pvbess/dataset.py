"""Turn a site config into a validated CityLearn dataset (schema.json + CSVs), cached.

The cache key is a hash of everything that shapes the data: the site config,
the content of any user file it reads, and ``DATA_VERSION`` (bumped when the
generators change). Runs are tagged with that hash.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pvbess import battery, ev_sessions, load, plots, pv, tariff
from pvbess.config import SiteConfig
from pvbess.timeseries_io import read_series
from pvbess.validation import check_pv_plausibility, check_series

log = logging.getLogger(__name__)

DATA_VERSION = "1"
BUILDING = "mall"
STEP_HOURS = 1.0

# Per-building observations the agent sees (CityLearn names), then per charger.
OBSERVATIONS = [
    "month",
    "day_type",
    "hour",
    "solar_generation",
    "non_shiftable_load",
    "electrical_storage_soc",
    "net_electricity_consumption",
    "electricity_pricing",
    "carbon_intensity",
]
CHARGER_OBSERVATIONS = [
    "electric_vehicle_charger_connected_state",
    "connected_electric_vehicle_at_charger_departure_time",
    "connected_electric_vehicle_at_charger_required_soc_departure",
    "connected_electric_vehicle_at_charger_soc",
]


@dataclass
class SiteDataset:
    """A built dataset on disk and what the pipeline needs to know about it."""

    root: Path
    schema_path: Path
    data_hash: str
    site: SiteConfig
    index: pd.DatetimeIndex
    series: pd.DataFrame  # per-step inputs: pv_kwh, load_kwh, price_per_kwh, carbon_kg_per_kwh
    sessions: pd.DataFrame
    sockets: list[tuple[str, str]]
    summary: dict[str, Any]

    @property
    def n_sockets(self) -> int:
        return len(self.sockets)


def site_index(site: SiteConfig) -> pd.DatetimeIndex:
    """Hourly, left-labelled, tz-aware steps of the site's period."""
    return pd.date_range(
        pd.Timestamp(site.start), periods=site.days * 24, freq="h", tz=site.timezone, name="time"
    )


def _file_digest(path: str | None) -> str | None:
    if not path:
        return None
    p = Path(path)
    if not p.is_file():
        return f"missing:{p}"
    return hashlib.sha256(p.read_bytes()).hexdigest()


def data_hash(site: SiteConfig) -> str:
    """Short hash of everything that shapes the generated data."""
    payload = {
        "version": DATA_VERSION,
        "site": asdict(site),
        "pv_file": _file_digest(site.pv.csv.path) if site.pv.source == "csv" else None,
        "load_file": _file_digest(site.load.csv.path) if site.load.source == "csv" else None,
    }
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _pv_frame(site: SiteConfig, index: pd.DatetimeIndex) -> pd.DataFrame:
    """PV energy per step [kWh] plus the weather CityLearn wants."""
    frame = pv.from_config(index, site)
    if site.pv.source == "csv":
        pv_kwh = read_series(site.pv.csv, index, name="pv_kwh")
        check_pv_plausibility(
            pv_kwh,
            dc_kwp=site.pv.dc_kwp,
            ac_kw=site.pv.ac_kw,
            step_hours=STEP_HOURS,
            source=str(site.pv.csv.path),
        )
        frame["pv_kwh"] = pv_kwh.to_numpy()
    else:
        frame["pv_kwh"] = frame["ac_power_kw"] * STEP_HOURS
    return frame


def _load_kwh(site: SiteConfig, index: pd.DatetimeIndex) -> pd.Series:
    if site.load.source == "csv":
        return read_series(site.load.csv, index, name="load_kwh")
    return (load.from_config(index, site) * STEP_HOURS).rename("load_kwh")


def build_series(site: SiteConfig, index: pd.DatetimeIndex) -> tuple[pd.DataFrame, pd.DataFrame]:
    """All per-step inputs [kWh per step, currency/kWh, kg/kWh] and the weather frame."""
    weather = _pv_frame(site, index)
    series = pd.DataFrame(
        {
            "pv_kwh": weather["pv_kwh"].to_numpy(),
            "load_kwh": _load_kwh(site, index).to_numpy(),
            "price_per_kwh": tariff.price_per_kwh(index, site.tariff).to_numpy(),
            "carbon_kg_per_kwh": tariff.carbon_intensity_kg_per_kwh(index, site.grid).to_numpy(),
        },
        index=index,
    )
    for column in series.columns:
        check_series(
            series[column], source=f"site {site.name}", column=column, expected_index=index
        )
    return series, weather


def _building_frame(index: pd.DatetimeIndex, series: pd.DataFrame, dc_kwp: float) -> pd.DataFrame:
    zeros = np.zeros(len(index))
    # CityLearn: hour 1..24 (hour ending), day_type 1..7 = Mon..Sun.
    return pd.DataFrame(
        {
            "month": index.month,
            "hour": index.hour + 1,
            "day_type": index.dayofweek + 1,
            "daylight_savings_status": 0,
            "indoor_dry_bulb_temperature": 24.0,
            "average_unmet_cooling_setpoint_difference": 0.0,
            "indoor_relative_humidity": 60.0,
            "non_shiftable_load": series["load_kwh"].to_numpy(),
            "dhw_demand": zeros,
            "cooling_demand": zeros,
            "heating_demand": zeros,
            "solar_generation": (
                series["pv_kwh"].to_numpy() / dc_kwp * 1000.0 if dc_kwp > 0 else zeros
            ),
            "occupant_count": 0,
            "power_outage": 0,
        }
    )


def _pad(frame: pd.DataFrame) -> pd.DataFrame:
    # CityLearn simulates rows - 1 steps: one extra row makes the episode cover every step.
    return pd.concat([frame, frame.iloc[[-1]]], ignore_index=True)


def _with_predictions(values: np.ndarray, name: str) -> dict[str, np.ndarray]:
    # CityLearn wants 1-3 step-ahead forecasts; perfect ones, rolled from the series.
    out = {name: values}
    for k in (1, 2, 3):
        out[f"{name}_predicted_{k}"] = np.roll(values, -k)
    return out


def _weather_frame(weather: pd.DataFrame) -> pd.DataFrame:
    cols: dict[str, np.ndarray] = {}
    cols |= _with_predictions(weather["temp_air_c"].to_numpy(), "outdoor_dry_bulb_temperature")
    cols |= _with_predictions(np.full(len(weather), 80.0), "outdoor_relative_humidity")
    cols |= _with_predictions(weather["dhi_w_m2"].to_numpy(), "diffuse_solar_irradiance")
    cols |= _with_predictions(weather["dni_w_m2"].to_numpy(), "direct_solar_irradiance")
    return pd.DataFrame(cols)


def _schema(site: SiteConfig, n_steps: int, sessions: ev_sessions.EvSessions) -> dict[str, Any]:
    chargers = {
        sid: {
            "type": "citylearn.electric_vehicle_charger.Charger",
            "charger_simulation": f"chargers/{sid}.csv",
            "attributes": {
                "efficiency": site.ev.charger_efficiency_frac,
                "max_charging_power": site.ev.socket_power_kw,
                "min_charging_power": 0.0,
                "max_discharging_power": 0.0,
                "min_discharging_power": 0.0,
            },
        }
        for sid, _ in sessions.sockets
    }
    observations = {
        name: {"active": True, "shared_in_central_agent": True} for name in OBSERVATIONS
    }
    observations |= {
        name: {"active": True, "shared_in_central_agent": True} for name in CHARGER_OBSERVATIONS
    }
    return {
        "random_seed": int(site.seed),
        "root_directory": None,
        "central_agent": True,
        "simulation_start_time_step": 0,
        "simulation_end_time_step": n_steps,  # rows are padded by one
        "episode_time_steps": None,
        "rolling_episode_split": False,
        "random_episode_split": False,
        "seconds_per_time_step": 3600,
        "observations": observations,
        "actions": {
            "electrical_storage": {"active": True},
            "electric_vehicle_storage": {"active": True},
        },
        "reward_function": {"type": "citylearn.reward_function.RewardFunction", "attributes": {}},
        "electric_vehicles_def": ev_sessions.ev_pool(sessions, site.ev),
        "buildings": {
            BUILDING: {
                "include": True,
                "energy_simulation": "building.csv",
                "weather": "weather.csv",
                "carbon_intensity": "carbon_intensity.csv",
                "pricing": "pricing.csv",
                "inactive_observations": [],
                "inactive_actions": [],
                "electrical_storage": battery.citylearn_battery(site.bess),
                "pv": {
                    "type": "citylearn.energy_model.PV",
                    "autosize": False,
                    "attributes": {"nominal_power": site.pv.dc_kwp},
                },
                "chargers": chargers,
            }
        },
    }


def summarize(
    site: SiteConfig, series: pd.DataFrame, sessions: ev_sessions.EvSessions
) -> dict[str, Any]:
    """The figures a user checks first, in physical units."""
    n_days = len(series) / 24.0
    pv_kwh = float(series["pv_kwh"].sum())
    s = sessions.sessions
    return {
        "site": site.name,
        "steps": len(series),
        "days": n_days,
        "pv_energy_kwh": pv_kwh,
        "pv_specific_yield_kwh_per_kwp_yr": (
            pv_kwh / site.pv.dc_kwp * 365.0 / n_days if site.pv.dc_kwp > 0 else 0.0
        ),
        "pv_peak_kw": float(series["pv_kwh"].max() / STEP_HOURS),
        "load_energy_kwh": float(series["load_kwh"].sum()),
        "load_peak_kw": float(series["load_kwh"].max() / STEP_HOURS),
        "ev_sockets": len(sessions.sockets),
        "ev_sessions": len(s),
        "ev_sessions_per_day": len(s) / n_days,
        "ev_required_energy_kwh": sessions.required_energy_kwh,
        "ev_required_energy_kwh_per_day": sessions.required_energy_kwh / n_days,
        "ev_arrivals": dict(sessions.arrivals),
        "ev_unserved_arrivals": dict(sessions.unserved),
        "ev_socket_power_kw_total": len(sessions.sockets) * site.ev.socket_power_kw,
        "bess_capacity_kwh": site.bess.capacity_kwh,
        "bess_power_kw": site.bess.power_kw,
    }


def build(site: SiteConfig, data_dir: str | Path, force: bool = False) -> SiteDataset:
    """Build (or reuse from cache) the site's CityLearn dataset."""
    index = site_index(site)
    digest = data_hash(site)
    root = Path(data_dir) / f"{site.name}-{digest}"
    series_path = root / "series.csv"
    sessions_path = root / "sessions.csv"
    summary_path = root / "summary.json"
    if not force and (root / "schema.json").is_file() and summary_path.is_file():
        series = pd.read_csv(series_path, index_col=0)
        series.index = index
        sessions_df = pd.read_csv(sessions_path, keep_default_na=False)
        return SiteDataset(
            root=root,
            schema_path=root / "schema.json",
            data_hash=digest,
            site=site,
            index=index,
            series=series,
            sessions=sessions_df,
            sockets=ev_sessions.socket_ids(site.ev),
            summary=json.loads(summary_path.read_text()),
        )

    log.info("Building site dataset %s in %s", site.name, root)
    series, weather = build_series(site, index)
    sessions = ev_sessions.generate_sessions(index, site.ev, seed=site.seed)
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "chargers").mkdir(parents=True)
    _pad(_building_frame(index, series, site.pv.dc_kwp)).to_csv(tmp / "building.csv", index=False)
    _pad(_weather_frame(weather)).to_csv(tmp / "weather.csv", index=False)
    pricing = pd.DataFrame(
        _with_predictions(series["price_per_kwh"].to_numpy(), "electricity_pricing")
    )
    _pad(pricing).to_csv(tmp / "pricing.csv", index=False)
    carbon = pd.DataFrame({"carbon_intensity": series["carbon_kg_per_kwh"].to_numpy()})
    _pad(carbon).to_csv(tmp / "carbon_intensity.csv", index=False)
    for sid, _ in sessions.sockets:
        # One step more than the period, all "away": the padding row.
        table = ev_sessions.charger_table(sessions.sessions, sid, len(index) + 1)
        table.to_csv(tmp / "chargers" / f"{sid}.csv", index=False)
    (tmp / "schema.json").write_text(json.dumps(_schema(site, len(index), sessions), indent=1))
    series.to_csv(tmp / "series.csv")
    sessions.sessions.to_csv(tmp / "sessions.csv", index=False)
    summary = summarize(site, series, sessions) | {"data_hash": digest}
    (tmp / "summary.json").write_text(json.dumps(summary, indent=1))
    # What a training run logs about its site: the summary and a one-page plot.
    (tmp / "report").mkdir()
    shutil.copy(tmp / "summary.json", tmp / "report" / "summary.json")
    plots.site_page(series, sessions.sessions, summary, tmp / "report" / "site.png")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)  # atomic: a half-written dataset is never picked up from the cache
    return SiteDataset(
        root=root,
        schema_path=root / "schema.json",
        data_hash=digest,
        site=site,
        index=index,
        series=series,
        sessions=sessions.sessions,
        sockets=sessions.sockets,
        summary=summary,
    )
