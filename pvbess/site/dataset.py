"""Turn a site config into a validated CityLearn dataset (schema.json + CSVs), cached.

The cache key is a hash of everything that shapes the data: the site config,
the content (not the location) of any user file it reads, and ``DATA_VERSION``
(bumped when the generators or the folder layout change). Runs are tagged with
that hash. Every input is validated before anything is written; a folder is
written under a temporary name, closed by ``manifest.json`` and renamed, so a
half-written dataset is never reused.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from omegaconf import OmegaConf

from pvbess.config import ConfigError, SiteConfig, validate_site
from pvbess.errors import DataError
from pvbess.experiment import plots
from pvbess.site import battery, ev_sessions, load, pv, tariff
from pvbess.site.timeseries_io import read_series
from pvbess.site.validation import PlausibilityWarning, check_pv_plausibility, check_series
from pvbess.units import STEP_HOURS

log = logging.getLogger(__name__)

# 2: manifest.json closes a folder; user files hashed by content only; summary warnings.
DATA_VERSION = "2"
BUILDING = "mall"
MANIFEST = "manifest.json"
SERIES_COLUMNS = ("pv_kwh", "load_kwh", "price_per_kwh", "carbon_kg_per_kwh")

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
    data_hash: str
    site: SiteConfig
    index: pd.DatetimeIndex
    series: pd.DataFrame  # per-step inputs: pv_kwh, load_kwh, price_per_kwh, carbon_kg_per_kwh
    sessions: pd.DataFrame
    sockets: list[tuple[str, str]]
    summary: dict[str, Any]

    @property
    def schema_path(self) -> Path:
        """The CityLearn schema of this dataset (derived from its folder)."""
        return self.root / "schema.json"

    @property
    def n_sockets(self) -> int:
        return len(self.sockets)


def site_index(site: SiteConfig) -> pd.DatetimeIndex:
    """Hourly, left-labelled, tz-aware steps of the site's period.

    Raises ConfigError naming ``site.start`` or ``site.timezone`` when they cannot
    define the period: an unreadable start, a start with a UTC offset (it is local
    time in ``site.timezone``) or off the hourly grid, an unknown time zone.
    """
    try:
        start = pd.Timestamp(site.start)
    except ValueError as exc:
        raise ConfigError(
            f"site.start: cannot read {site.start!r} as a date and time (e.g. '2024-01-01 00:00')"
        ) from exc
    if start.tz is not None:
        raise ConfigError(
            f"site.start: {site.start!r} has a UTC offset; write the local time, the zone is "
            "site.timezone"
        )
    if start != start.floor("h"):
        raise ConfigError(f"site.start: {site.start!r} must be on a whole hour (hourly steps)")
    try:
        return pd.date_range(start, periods=site.days * 24, freq="h", tz=site.timezone, name="time")
    except KeyError as exc:  # zoneinfo's ZoneInfoNotFoundError
        raise ConfigError(
            f"site.timezone: unknown time zone {site.timezone!r} (an IANA name, e.g. America/Lima)"
        ) from exc


def _file_digest(path: str | None) -> str | None:
    if not path:
        return None
    p = Path(path).expanduser()  # as read_series opens it
    if not p.is_file():
        return f"missing:{p}"
    return hashlib.sha256(p.read_bytes()).hexdigest()


def data_hash(site: SiteConfig) -> str:
    """Short hash [12 hex digits] of everything that shapes the generated data.

    A user file counts by its content (SHA-256), not by its path: the same data give
    the same hash in every checkout, and an edited file gives a new one.
    """
    settings = asdict(site)
    files = {}
    for key, source in (("pv", site.pv), ("load", site.load)):
        if source.source == "csv":
            files[key] = _file_digest(source.csv.path)
            settings[key]["csv"]["path"] = None
    payload = {"version": DATA_VERSION, "site": settings, "files": files}
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def _pv_frame(site: SiteConfig, index: pd.DatetimeIndex) -> pd.DataFrame:
    """PV energy per step [kWh] plus the weather CityLearn wants."""
    frame = pv.from_config(index, site)
    if site.pv.source == "csv":
        # Its plausibility is checked with the other inputs, in validate_inputs.
        frame["pv_kwh"] = read_series(site.pv.csv, index, name="pv_kwh").to_numpy()
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
    return series, weather


def validate_inputs(
    site: SiteConfig,
    index: pd.DatetimeIndex,
    series: pd.DataFrame,
    sessions: ev_sessions.EvSessions,
) -> list[str]:
    """Check every input before anything is written; return the plausibility warnings.

    Raises DataError (naming the column and the first offending row and time) unless
    each series has one finite, non-negative value per step of the period and the EV
    sessions fit the sockets, the EV pool and the period. Warns (PlausibilityWarning)
    about PV no system of this size delivers and about EV classes whose median session
    cannot reach its required SOC at socket power; the messages are returned.
    """
    source = f"site {site.name}"
    for column in SERIES_COLUMNS:
        if column not in series.columns:
            raise DataError(f"{source}: series has no column {column!r}.", column=column)
        check_series(series[column], source=source, column=column, expected_index=index)
    ev_sessions.check_sessions(
        sessions.sessions,
        sessions.sockets,
        len(index),
        source=f"{source}, EV sessions",
        index=index,
        vehicles=set(ev_sessions.ev_pool(sessions, site.ev)),
    )
    pv_source = str(site.pv.csv.path) if site.pv.source == "csv" else f"{source}, generated PV"
    messages = check_pv_plausibility(
        series["pv_kwh"],
        dc_kwp=site.pv.dc_kwp,
        ac_kw=site.pv.ac_kw,
        step_hours=STEP_HOURS,
        source=pv_source,
    )
    messages += ev_sessions.check_reachable(
        sessions.sessions, site.ev, step_hours=STEP_HOURS, source=source
    )
    return messages


def calendar(index: pd.DatetimeIndex) -> dict[str, np.ndarray]:
    """CityLearn's calendar of each step: month, hour 1..24 (hour ending), day_type 1..7 =
    Mon..Sun (local time)."""
    return {
        "month": index.month.to_numpy(),
        "hour": index.hour.to_numpy() + 1,
        "day_type": index.dayofweek.to_numpy() + 1,
    }


def solar_generation_w_per_kw(pv_kwh: np.ndarray, dc_kwp: float) -> np.ndarray:
    """PV per kWp as the building file holds it [W/kW]; 0 without PV."""
    return pv_kwh / dc_kwp * 1000.0 if dc_kwp > 0 else np.zeros(len(pv_kwh))


def _building_frame(index: pd.DatetimeIndex, series: pd.DataFrame, dc_kwp: float) -> pd.DataFrame:
    zeros = np.zeros(len(index))
    cal = calendar(index)
    return pd.DataFrame(
        {
            "month": cal["month"],
            "hour": cal["hour"],
            "day_type": cal["day_type"],
            "daylight_savings_status": 0,
            "indoor_dry_bulb_temperature": 24.0,
            "average_unmet_cooling_setpoint_difference": 0.0,
            "indoor_relative_humidity": 60.0,
            "non_shiftable_load": series["load_kwh"].to_numpy(),
            "dhw_demand": zeros,
            "cooling_demand": zeros,
            "heating_demand": zeros,
            "solar_generation": solar_generation_w_per_kw(series["pv_kwh"].to_numpy(), dc_kwp),
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
    # Sockets occupied at once: +1 at each arrival, -1 at each departure.
    occupied = np.zeros(len(series) + 1, dtype=np.int64)
    np.add.at(occupied, s["arrival_step"].to_numpy(dtype=np.int64), 1)
    np.add.at(occupied, s["departure_step"].to_numpy(dtype=np.int64), -1)
    plugged_peak = int(np.cumsum(occupied).max()) if len(s) else 0
    served = s["ev_class"].value_counts()
    return {
        "site": site.name,
        "pv_source": site.pv.source,
        "load_source": site.load.source,
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
        "ev_served_arrivals": {name: int(served.get(name, 0)) for name in site.ev.classes},
        "ev_unserved_arrivals": dict(sessions.unserved),
        "ev_unreachable_sessions": ev_sessions.unreachable_sessions(s, site.ev, STEP_HOURS),
        "ev_socket_power_kw_total": len(sessions.sockets) * site.ev.socket_power_kw,
        "ev_plugged_peak": plugged_peak,
        "ev_plugged_peak_kw": plugged_peak * site.ev.socket_power_kw,
        "bess_capacity_kwh": site.bess.capacity_kwh,
        "bess_power_kw": site.bess.power_kw,
    }


def _check_config(site: SiteConfig) -> None:
    """The config's own checks (config.py), also for a SiteConfig built in code."""
    validate_site(OmegaConf.structured(site))


def _is_complete(root: Path, digest: str) -> bool:
    """True if ``root`` holds a finished dataset of this hash: its manifest and every file."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    if manifest.get("data_hash") != digest:
        return False
    for name, size in manifest.get("files", {}).items():
        path = root / name
        if not path.is_file() or path.stat().st_size != size:
            return False
    return True


def _write_manifest(folder: Path, digest: str) -> None:
    """Close a dataset folder: the list of its files and sizes, written last."""
    files = {
        p.relative_to(folder).as_posix(): p.stat().st_size
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
    manifest = {"data_hash": digest, "data_version": DATA_VERSION, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def _publish(tmp: Path, root: Path, digest: str, *, replace: bool) -> None:
    """Rename the finished ``tmp`` folder to ``root``, replacing an incomplete one.

    A complete ``root`` of the same hash is kept unless ``replace`` (a forced rebuild).
    """
    if not replace and _is_complete(root, digest):
        # A concurrent build of the same hash finished first; it may be in use: keep it.
        return
    if root.exists():
        # An interrupted or outdated build: move it aside first so that root never
        # holds a mix of old and new files.
        stale = Path(tempfile.mkdtemp(prefix=f".{root.name}-", suffix=".stale", dir=root.parent))
        root.rename(stale / root.name)
        shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.rename(root)  # atomic on one file system
    except OSError:
        if not _is_complete(root, digest):
            raise


# Datasets of one site that differ only in PV or battery (the designs of pvbess.size) share
# their EV sessions and charger files: drawn once per process and reused (they depend only
# on the EV config, the period and the seed, and the draw is deterministic). A few entries.
_SESSIONS: dict[str, tuple[ev_sessions.EvSessions, dict[str, pd.DataFrame]]] = {}
_SESSIONS_MAX = 4


def _sessions(
    site: SiteConfig, index: pd.DatetimeIndex
) -> tuple[ev_sessions.EvSessions, dict[str, pd.DataFrame]]:
    """The period's EV sessions and each socket's charger table (one step more than the
    period, all "away": the padding row); copies, so callers may change them."""
    key = json.dumps(
        {"ev": asdict(site.ev), "start": str(index[0]), "steps": len(index), "seed": site.seed},
        sort_keys=True,
        default=str,
    )
    if key not in _SESSIONS:
        sessions = ev_sessions.generate_sessions(index, site.ev, seed=site.seed)
        tables = {
            sid: ev_sessions.charger_table(sessions.sessions, sid, len(index) + 1)
            for sid, _ in sessions.sockets
        }
        while len(_SESSIONS) >= _SESSIONS_MAX:
            _SESSIONS.pop(next(iter(_SESSIONS)))
        _SESSIONS[key] = (sessions, tables)
    return copy.deepcopy(_SESSIONS[key])


def _load(site: SiteConfig, root: Path, index: pd.DatetimeIndex, digest: str) -> SiteDataset:
    """A finished dataset from the cache; its plausibility warnings are raised again."""
    # round_trip: the floats read back are the very ones written, as in a fresh build.
    series = pd.read_csv(root / "series.csv", index_col=0, float_precision="round_trip")
    series.index = index
    summary = json.loads((root / "summary.json").read_text())
    for message in summary.get("warnings", []):
        # Doubtful data stay doubtful on every use, not only on the first build.
        warnings.warn(message, PlausibilityWarning, stacklevel=3)
    return SiteDataset(
        root=root,
        data_hash=digest,
        site=site,
        index=index,
        series=series,
        sessions=pd.read_csv(
            root / "sessions.csv", keep_default_na=False, float_precision="round_trip"
        ),
        sockets=ev_sessions.socket_ids(site.ev),
        summary=summary,
    )


def _write(
    folder: Path,
    site: SiteConfig,
    series: pd.DataFrame,
    weather: pd.DataFrame,
    sessions: ev_sessions.EvSessions,
    summary: dict[str, Any],
    tables: dict[str, pd.DataFrame] | None = None,
) -> None:
    """Every file of the dataset into ``folder``, the manifest last (``tables``: the
    sockets' charger tables, if already made)."""
    n_steps = len(series)
    (folder / "chargers").mkdir()
    _pad(_building_frame(series.index, series, site.pv.dc_kwp)).to_csv(
        folder / "building.csv", index=False
    )
    _pad(_weather_frame(weather)).to_csv(folder / "weather.csv", index=False)
    pricing = pd.DataFrame(
        _with_predictions(series["price_per_kwh"].to_numpy(), "electricity_pricing")
    )
    _pad(pricing).to_csv(folder / "pricing.csv", index=False)
    carbon = pd.DataFrame({"carbon_intensity": series["carbon_kg_per_kwh"].to_numpy()})
    _pad(carbon).to_csv(folder / "carbon_intensity.csv", index=False)
    for sid, _ in sessions.sockets:
        # One step more than the period, all "away": the padding row.
        table = (tables or {}).get(sid)
        if table is None:
            table = ev_sessions.charger_table(sessions.sessions, sid, n_steps + 1)
        table.to_csv(folder / "chargers" / f"{sid}.csv", index=False)
    (folder / "schema.json").write_text(json.dumps(_schema(site, n_steps, sessions), indent=1))
    series.to_csv(folder / "series.csv")
    sessions.sessions.to_csv(folder / "sessions.csv", index=False)
    (folder / "summary.json").write_text(json.dumps(summary, indent=1))
    # What a training run logs about its site: the summary and a one-page plot.
    (folder / "report").mkdir()
    shutil.copy(folder / "summary.json", folder / "report" / "summary.json")
    plots.site_page(series, sessions.sessions, summary, folder / "report" / "site.png")
    _write_manifest(folder, summary["data_hash"])


def build(site: SiteConfig, data_dir: str | Path, force: bool = False) -> SiteDataset:
    """Build (or reuse from cache) the site's CityLearn dataset.

    Before anything is written: ConfigError (naming the key) for a contradictory
    config, DataError (naming the file or table, column and first offending row) for
    bad data, PlausibilityWarning for doubtful data (again on each cache reuse).
    """
    _check_config(site)
    index = site_index(site)
    digest = data_hash(site)
    root = Path(data_dir) / f"{site.name}-{digest}"
    if not force and _is_complete(root, digest):
        log.info("Reusing site dataset %s from %s", site.name, root)
        return _load(site, root, index, digest)

    log.info("Building site dataset %s in %s", site.name, root)
    series, weather = build_series(site, index)
    sessions, tables = _sessions(site, index)
    messages = validate_inputs(site, index, series, sessions)
    summary = summarize(site, series, sessions) | {"data_hash": digest, "warnings": messages}
    root.parent.mkdir(parents=True, exist_ok=True)
    # A unique name: concurrent builds (a multirun sweep) never write into one folder.
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}-", suffix=".tmp", dir=root.parent))
    tmp.chmod(0o755)  # mkdtemp's 0o700 would hide the dataset from other users
    try:
        _write(tmp, site, series, weather, sessions, summary, tables)
        _publish(tmp, root, digest, replace=force)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already once renamed
    return SiteDataset(
        root=root,
        data_hash=digest,
        site=site,
        index=index,
        series=series,
        sessions=sessions.sessions,
        sockets=sessions.sockets,
        summary=summary,
    )
