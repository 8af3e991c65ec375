"""A numpy twin of CityLearn 3.0.2 for the schema pvbess writes: ``env.backend=twin``.

Why: CityLearn spends its time in per-charger Python bookkeeping (about 190 env
steps/s for 38 sockets). The physics pvbess's schema switches on is small, so
the twin implements exactly that physics with arrays, behind the same backend
interface as ``pvbess.env.CityLearnBackend``:

- the BESS as CityLearn's ``Battery.charge`` with flat power-efficiency and
  capacity-power curves, no standby loss and no degradation: power limit,
  one-way efficiency = sqrt(round trip), depth of discharge, capacity ceiling,
  and the same two-pass limiting;
- chargers (efficiency, power limit and dead band) feeding EV batteries
  (efficiency 1, SOC ceiling); an EV's SOC on arrival is taken from the charger
  file exactly where CityLearn takes it; unplugged EVs drift randomly with
  CityLearn's own random stream (seed = random seed + episode index), which
  matters because CityLearn shows the previous step's SOC of a vehicle that
  has just plugged in;
- the observations, in CityLearn's order, with its observation-space bounds
  computed as ``Building.estimate_observation_space_limits`` does;
- CityLearn's float32 storage: SOCs, battery and charger energies and the net
  consumption are rounded to float32 where CityLearn stores them and computed
  in float64 in between, so the twin's numbers are CityLearn's bit for bit
  (``tests/test_twin.py`` checks every step of whole episodes).

Anything else in a schema (other devices, noise, power outages, charging
constraints, degradation, non-flat curves, other time steps) raises
``NotImplementedError`` when the twin is built: it never silently simulates
something else.

``TwinVecEnv`` steps N copies of the site in one numpy call per step (an SB3
VecEnv without subprocesses), with ``pvbess.env``'s own safety layer, flows and
reward applied to the batch.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd
from stable_baselines3.common.vec_env.base_vec_env import (
    VecEnv,
    VecEnvIndices,
    VecEnvObs,
    VecEnvStepReturn,
)

from pvbess import env as site_env
from pvbess.config import RewardConfig
from pvbess.dataset import BUILDING, OBSERVATIONS, SiteDataset

F32 = np.float32
F64 = np.float64
# CityLearn's guard against dividing by zero (citylearn.data.ZERO_DIVISION_PLACEHOLDER).
ZERO_DIVISION = 1e-6
# Std of CityLearn's multiplicative SOC drift of unplugged EVs per hour (runtime service).
EV_DRIFT_STD_PER_SQRT_H = 0.2
EV_DRIFT_CLIP = (0.6, 1.4)
# Placeholders CityLearn observes at a socket without a plugged-in EV.
NO_EV = {"connected_state": 0.0, "departure_time": -1.0, "required_soc": -0.1, "soc": -0.1}

# What the twin implements; a schema asking for more is refused (NotImplementedError).
# (exactly the per-building observations pvbess's schema writes).
BASE_OBSERVATIONS = tuple(OBSERVATIONS)
# Generic schema name -> (CityLearn's per-charger name pattern, field), in CityLearn's order.
CHARGER_OBSERVATIONS = {
    "electric_vehicle_charger_connected_state": (
        "electric_vehicle_charger_{}_connected_state",
        "connected_state",
    ),
    "connected_electric_vehicle_at_charger_departure_time": (
        "connected_electric_vehicle_at_charger_{}_departure_time",
        "departure_time",
    ),
    "connected_electric_vehicle_at_charger_required_soc_departure": (
        "connected_electric_vehicle_at_charger_{}_required_soc_departure",
        "required_soc",
    ),
    "connected_electric_vehicle_at_charger_soc": (
        "connected_electric_vehicle_at_charger_{}_soc",
        "soc",
    ),
}
_SCHEMA_KEYS = {
    "random_seed",
    "root_directory",
    "central_agent",
    "simulation_start_time_step",
    "simulation_end_time_step",
    "episode_time_steps",
    "rolling_episode_split",
    "random_episode_split",
    "seconds_per_time_step",
    "observations",
    "actions",
    "reward_function",
    "electric_vehicles_def",
    "buildings",
}
_BUILDING_KEYS = {
    "include",
    "energy_simulation",
    "weather",
    "carbon_intensity",
    "pricing",
    "inactive_observations",
    "inactive_actions",
    "electrical_storage",
    "pv",
    "chargers",
}
_CHARGER_ATTRIBUTES = {
    "efficiency",
    "max_charging_power",
    "min_charging_power",
    "max_discharging_power",
    "min_discharging_power",
}
_BATTERY_ATTRIBUTES = {
    "capacity",
    "nominal_power",
    "efficiency",
    "capacity_loss_coefficient",
    "loss_coefficient",
    "initial_soc",
    "depth_of_discharge",
    "power_efficiency_curve",
    "capacity_power_curve",
}


def _unsupported(what: str) -> NotImplementedError:
    return NotImplementedError(
        f"pvbess.twin does not simulate {what}; use env.backend=citylearn for this schema"
    )


def _is_id(value: Any) -> bool:
    """CityLearn's test for a usable EV or session id in a charger file."""
    return isinstance(value, str) and value.strip() not in {"", "nan"}


# -- parameters -------------------------------------------------------------------------------


@dataclass(frozen=True)
class BatteryParams:
    """A CityLearn ``Battery`` with flat curves, no standby loss and no degradation."""

    capacity_kwh: float
    nominal_power_kw: float
    # sqrt of the curve's round-trip efficiency, as CityLearn's round_trip_efficiency property.
    one_way_efficiency_frac: float
    depth_of_discharge_frac: float
    initial_soc_frac: float

    @property
    def min_soc_frac(self) -> float:
        return float(np.clip(1.0 - self.depth_of_discharge_frac, 0.0, 1.0))

    @property
    def min_energy_kwh(self) -> float:
        return self.min_soc_frac * self.capacity_kwh

    @classmethod
    def from_schema(cls, entry: dict[str, Any], where: str) -> BatteryParams:
        if entry.get("type", "citylearn.energy_model.Battery") != "citylearn.energy_model.Battery":
            raise _unsupported(f"{where} of type {entry.get('type')!r}")
        if entry.get("autosize", False):
            raise _unsupported(f"{where} with autosize")
        attrs = entry.get("attributes", {})
        extra = set(attrs) - _BATTERY_ATTRIBUTES
        if extra:
            raise _unsupported(f"{where} attributes {sorted(extra)}")
        for key in ("capacity_loss_coefficient", "loss_coefficient"):
            if float(attrs.get(key, -1.0)) != 0.0:
                raise _unsupported(f"{where}.{key} other than 0 (degradation, standby loss)")
        efficiency = _flat_curve(attrs.get("power_efficiency_curve"), f"{where} efficiency")
        if _flat_curve(attrs.get("capacity_power_curve"), f"{where} capacity-power") != 1.0:
            raise _unsupported(f"{where} with a capacity-power curve other than 1")
        capacity = float(attrs["capacity"])
        dod = float(attrs.get("depth_of_discharge", 1.0))
        initial = attrs.get("initial_soc")
        return cls(
            capacity_kwh=capacity,
            nominal_power_kw=float(attrs["nominal_power"]),
            # CityLearn: efficiency ** 0.5, with the efficiency read off the curve.
            one_way_efficiency_frac=efficiency**0.5,
            depth_of_discharge_frac=dod,
            initial_soc_frac=1.0 - dod if initial is None else float(initial),
        )


def _flat_curve(curve: Any, what: str) -> float:
    """The value of a flat two-point curve [[0, y], [1, y]]; anything else is refused."""
    if curve is None:
        raise _unsupported(f"the default (random) {what} curve")
    points = np.asarray(curve, dtype=F64)
    if points.shape != (2, 2) or list(points[:, 0]) != [0.0, 1.0] or points[0, 1] != points[1, 1]:
        raise _unsupported(f"a non-flat {what} curve {curve!r}")
    return float(points[0, 1])


# -- data -------------------------------------------------------------------------------------


@dataclass
class TwinData:
    """Everything the twin reads from a dataset, as CityLearn reads it (dtypes included)."""

    n_rows: int  # rows in the files; CityLearn simulates n_rows - 1 steps
    seconds_per_step: float
    random_seed: int
    # Per row, as CityLearn holds them.
    month: np.ndarray  # int32
    day_type: np.ndarray  # int32
    hour: np.ndarray  # int32
    load_kwh32: np.ndarray  # float32
    pv_kwh32: np.ndarray  # float32, >= 0 (CityLearn stores it negated)
    price32: np.ndarray  # float32
    carbon32: np.ndarray  # float32
    # Per socket and row, from the charger files.
    socket_ids: list[str]
    state32: np.ndarray  # float32: 1 plugged, 2 arriving next step, 3 away
    departure_steps: np.ndarray  # int32, -1 when absent
    required_soc32: np.ndarray  # float32, -0.1 when absent
    connected_ev: np.ndarray  # int64 [socket, row]: index of the plugged-in EV, -1 none
    arrival_soc32: np.ndarray  # float32 [socket, row]: SOC set on connection, NaN none
    # Per EV (CityLearn's electric_vehicles_def order).
    ev_names: list[str]
    ev_capacity_kwh: np.ndarray
    ev_nominal_power_kw: np.ndarray
    ev_one_way_efficiency: np.ndarray
    ev_min_soc: np.ndarray
    ev_initial_soc: np.ndarray
    # Per EV and row t (the step just reached): 0 drifts, 1 unchanged, 2 set to ev_event_soc32.
    ev_event_kind: np.ndarray  # int8 [ev, row]
    ev_event_soc32: np.ndarray  # float32 [ev, row]
    # Per socket: the charger.
    charger_efficiency: np.ndarray
    charger_max_power_kw: np.ndarray
    charger_min_power_kw: np.ndarray
    bess: BatteryParams
    # Observations: CityLearn's names, what each shows (field, socket or -1), its bounds.
    observation_names: list[str]
    observation_fields: list[tuple[str, int]]
    obs_low32: np.ndarray
    obs_high32: np.ndarray

    @property
    def n_steps(self) -> int:
        return self.n_rows - 1

    @property
    def n_sockets(self) -> int:
        return len(self.socket_ids)

    @property
    def step_hours(self) -> float:
        # citylearn.internal.units.seconds_to_hours
        return max(float(self.seconds_per_step), 0.0) / 3600.0

    @classmethod
    def load(cls, dataset: SiteDataset) -> TwinData:
        return _load_twin_data(dataset.schema_path, [sid for sid, _ in dataset.sockets])


def _read_rows(path: Path, n_rows: int) -> pd.DataFrame:
    # As CityLearn reads a time series (pandas' default float parser, same row window).
    frame = pd.read_csv(path, nrows=n_rows)
    if len(frame) != n_rows:
        raise ValueError(f"{path}: {len(frame)} rows, expected {n_rows}")
    return frame


def _charger_state32(values: np.ndarray) -> np.ndarray:
    """CityLearn's parse of charger states: int(str(v)) for digit strings, else NaN."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    parsed = [int(str(u)) if str(u).isdigit() else np.nan for u in uniques] + [np.nan]
    return np.array(parsed, dtype=F32)[codes]


def _soc32(values: np.ndarray) -> np.ndarray:
    """CityLearn's ChargerSimulation.normalize_soc_series without noise."""
    raw = np.array(values, dtype=F32)
    raw = np.where(np.isnan(raw), F32(-0.1), raw)
    out = np.full(raw.shape, -0.1, dtype=F32)
    valid = (raw != F32(-0.1)) & (raw >= 0.0)
    fraction = valid & (raw <= 1.0)
    percent = valid & (raw > 1.0)
    out[fraction] = raw[fraction]
    out[percent] = raw[percent] / 100.0
    out[valid] = np.clip(out[valid], 0.0, 1.0)
    return out.astype(F32)


def _check_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The one building's schema entry; refuse anything the twin does not simulate."""
    extra = set(schema) - _SCHEMA_KEYS
    if extra:
        raise _unsupported(f"schema keys {sorted(extra)}")
    if not schema.get("central_agent", False):
        raise _unsupported("a decentralised agent")
    if int(schema.get("simulation_start_time_step", 0)) != 0:
        raise _unsupported("a simulation that does not start at row 0")
    if schema.get("episode_time_steps") is not None or schema.get("rolling_episode_split"):
        raise _unsupported("split episodes")
    if schema.get("random_episode_split"):
        raise _unsupported("random episode splits")
    buildings = {k: v for k, v in schema["buildings"].items() if v.get("include", True)}
    if list(buildings) != [BUILDING]:
        raise _unsupported(f"buildings {sorted(buildings)} (only {BUILDING!r})")
    return _check_building(schema, buildings[BUILDING])


def _check_building(schema: dict[str, Any], building: dict[str, Any]) -> dict[str, Any]:
    extra = set(building) - _BUILDING_KEYS
    if extra:
        raise _unsupported(f"building keys {sorted(extra)}")
    if building.get("inactive_actions"):
        raise _unsupported("inactive actions")
    actions = {k: bool(v.get("active", False)) for k, v in schema["actions"].items()}
    if {k for k, v in actions.items() if v} != {"electrical_storage", "electric_vehicle_storage"}:
        raise _unsupported(f"actions {actions} (pvbess's are the battery and the EV sockets)")
    pv = building["pv"]
    if pv.get("autosize", False) or set(pv.get("attributes", {})) != {"nominal_power"}:
        raise _unsupported(f"PV {pv!r}")
    for entry in schema["electric_vehicles_def"].values():
        if set(entry) - {"include", "battery"}:
            raise _unsupported(f"EV definition keys {sorted(entry)}")
    return building


def _observation_layout(
    schema: dict[str, Any], building: dict[str, Any], socket_ids: list[str]
) -> tuple[list[str], list[tuple[str, int]]]:
    """Active observation names in CityLearn's order, and (field, socket or -1) per name."""
    inactive = set(building.get("inactive_observations") or [])
    active = [
        k
        for k, v in schema["observations"].items()
        if bool(v.get("active", False)) and k not in inactive
    ]
    unknown = [k for k in active if k not in BASE_OBSERVATIONS and k not in CHARGER_OBSERVATIONS]
    if unknown:
        raise _unsupported(f"observations {unknown}")
    names = [k for k in active if k in BASE_OBSERVATIONS]
    fields: list[tuple[str, int]] = [(k, -1) for k in names]
    for s, sid in enumerate(socket_ids):
        for generic, (pattern, field) in CHARGER_OBSERVATIONS.items():
            if generic in active:
                names.append(pattern.format(sid))
                fields.append((field, s))
    return names, fields


def _load_twin_data(schema_path: Path, socket_ids: list[str]) -> TwinData:
    schema = json.loads(Path(schema_path).read_text())
    building = _check_schema(schema)
    root = Path(schema.get("root_directory") or Path(schema_path).parent)
    n_rows = int(schema["simulation_end_time_step"]) - int(schema["simulation_start_time_step"]) + 1
    if float(schema.get("seconds_per_time_step", 3600)) != 3600.0:
        raise _unsupported("time steps other than one hour")

    frame = _read_rows(root / building["energy_simulation"], n_rows)
    for column in ("cooling_demand", "heating_demand", "dhw_demand"):
        if np.any(frame[column].to_numpy() != 0):
            raise _unsupported(f"a building with {column}")
    if "power_outage" in frame and np.any(frame["power_outage"].to_numpy() != 0):
        raise _unsupported("power outages")
    pv_kw = float(building["pv"]["attributes"]["nominal_power"])
    solar32 = np.array(frame["solar_generation"], dtype=F32)
    # PV.get_generation (per kW, W/kW) on float32 data, as CityLearn computes it.
    pv_kwh32 = np.array(pv_kw * solar32 / 1000.0 * (3600.0 / 3600.0), dtype=F32)
    pricing = _read_rows(root / building["pricing"], n_rows)
    carbon = _read_rows(root / building["carbon_intensity"], n_rows)

    chargers = building.get("chargers") or {}
    if list(chargers) != socket_ids:
        raise ValueError(
            f"{schema_path}: chargers {list(chargers)} do not match the site's sockets {socket_ids}"
        )
    evs = {k: v for k, v in schema["electric_vehicles_def"].items() if v.get("include", True)}
    ev_names = list(evs)
    ev_index = {name: i for i, name in enumerate(ev_names)}
    ev_params = [BatteryParams.from_schema(evs[n]["battery"], f"EV {n} battery") for n in ev_names]

    c = _read_chargers(root, chargers, n_rows)
    ev = _Ids.of(c.ev_ids, ev_index)
    session = _Ids.of(c.session_ids, ev_index)
    connected, arrival32 = _connections(c.state32, ev, session, c.departure, c.est_soc32)
    kind, event32 = _unplugged_events(c.state32, ev, c.est_soc32, len(ev_names))
    names, fields = _observation_layout(schema, building, socket_ids)
    data = TwinData(
        n_rows=n_rows,
        seconds_per_step=float(schema.get("seconds_per_time_step", 3600)),
        random_seed=int(schema.get("random_seed", 0)),
        month=np.array(frame["month"], dtype=np.int32),
        day_type=np.array(frame["day_type"], dtype=np.int32),
        hour=np.array(frame["hour"], dtype=np.int32),
        load_kwh32=np.array(frame["non_shiftable_load"], dtype=F32),
        pv_kwh32=pv_kwh32,
        price32=np.array(pricing["electricity_pricing"], dtype=F32),
        carbon32=np.array(carbon["carbon_intensity"], dtype=F32),
        socket_ids=list(socket_ids),
        state32=c.state32,
        departure_steps=c.departure,
        required_soc32=c.required32,
        connected_ev=connected,
        arrival_soc32=arrival32,
        ev_names=ev_names,
        ev_capacity_kwh=np.array([p.capacity_kwh for p in ev_params]),
        ev_nominal_power_kw=np.array([p.nominal_power_kw for p in ev_params]),
        ev_one_way_efficiency=np.array([p.one_way_efficiency_frac for p in ev_params]),
        ev_min_soc=np.array([p.min_soc_frac for p in ev_params]),
        ev_initial_soc=np.array([p.initial_soc_frac for p in ev_params]),
        ev_event_kind=kind,
        ev_event_soc32=event32,
        charger_efficiency=c.efficiency,
        charger_max_power_kw=c.max_power_kw,
        charger_min_power_kw=c.min_power_kw,
        bess=BatteryParams.from_schema(building["electrical_storage"], "electrical_storage"),
        observation_names=names,
        observation_fields=fields,
        obs_low32=np.zeros(0, dtype=F32),  # set below: the bounds read the data's series
        obs_high32=np.zeros(0, dtype=F32),
    )
    data.obs_low32, data.obs_high32 = observation_bounds(data)
    return data


@dataclass
class _Chargers:
    """The chargers' parameters and files, per socket (and row), as CityLearn parses them."""

    efficiency: np.ndarray
    max_power_kw: np.ndarray
    min_power_kw: np.ndarray
    state32: np.ndarray
    departure: np.ndarray
    required32: np.ndarray
    est_soc32: np.ndarray
    ev_ids: np.ndarray
    session_ids: np.ndarray


def _read_chargers(root: Path, chargers: dict[str, Any], n_rows: int) -> _Chargers:
    n = len(chargers)
    c = _Chargers(
        efficiency=np.zeros(n),
        max_power_kw=np.zeros(n),
        min_power_kw=np.zeros(n),
        state32=np.full((n, n_rows), np.nan, dtype=F32),
        departure=np.full((n, n_rows), -1, dtype=np.int32),
        required32=np.full((n, n_rows), -0.1, dtype=F32),
        est_soc32=np.full((n, n_rows), -0.1, dtype=F32),
        ev_ids=np.empty((n, n_rows), dtype=object),
        session_ids=np.full((n, n_rows), "", dtype=object),
    )
    for s, (sid, entry) in enumerate(chargers.items()):
        if entry.get("type") != "citylearn.electric_vehicle_charger.Charger":
            raise _unsupported(f"charger {sid} of type {entry.get('type')!r}")
        if set(entry) - {"type", "charger_simulation", "attributes"}:
            raise _unsupported(f"charger {sid} keys {sorted(entry)}")
        attrs = entry.get("attributes", {})
        if set(attrs) - _CHARGER_ATTRIBUTES:
            raise _unsupported(f"charger {sid} attributes {sorted(attrs)}")
        if float(attrs.get("max_discharging_power", 50.0)) != 0.0:
            raise _unsupported(f"vehicle-to-grid discharging at charger {sid}")
        # Charger's defaults: efficiency 1, 50 kW, no minimum power.
        c.efficiency[s] = 1.0 if attrs.get("efficiency") is None else float(attrs["efficiency"])
        c.max_power_kw[s] = float(attrs.get("max_charging_power", 50.0))
        c.min_power_kw[s] = float(attrs.get("min_charging_power", 0.0))
        table = _read_rows(root / entry["charger_simulation"], n_rows)
        if "electric_vehicle_current_soc" in table:
            raise _unsupported("charger files with electric_vehicle_current_soc")
        c.state32[s] = _charger_state32(table["electric_vehicle_charger_state"].to_numpy())
        c.ev_ids[s] = table["electric_vehicle_id"].to_numpy(dtype=object)
        if "electric_vehicle_session_id" in table:
            c.session_ids[s] = table["electric_vehicle_session_id"].to_numpy(dtype=object)
        departure = np.array(table["electric_vehicle_departure_time"], dtype=F32)
        c.departure[s] = np.where(np.isnan(departure), -1, departure).astype(np.int32)
        c.required32[s] = _soc32(table["electric_vehicle_required_soc_departure"].to_numpy())
        c.est_soc32[s] = _soc32(table["electric_vehicle_estimated_soc_arrival"].to_numpy())
    return c


@dataclass(frozen=True)
class _Ids:
    """A [socket, row] table of ids from the charger files, as integer codes."""

    code: np.ndarray  # equal codes = equal strings; -1 = not a string
    is_id: np.ndarray  # CityLearn's test for a usable id (_is_id)
    pool: np.ndarray  # index in the EV pool, -1 if none

    @classmethod
    def of(cls, values: np.ndarray, ev_index: dict[str, int]) -> _Ids:
        codes, uniques = pd.factorize(values.ravel(), use_na_sentinel=True)
        strings = np.array([isinstance(u, str) for u in uniques] + [False])
        ids = np.array([_is_id(u) for u in uniques] + [False])
        pool = np.array([ev_index.get(u, -1) if isinstance(u, str) else -1 for u in uniques] + [-1])
        # Code -1 (NaN) reads the appended "not a string" entry.
        code = np.where(strings[codes], codes, -1).reshape(values.shape)
        return cls(
            code=code,
            is_id=ids[codes].reshape(values.shape),
            pool=pool[codes].reshape(values.shape),
        )


def _shift(a: np.ndarray, fill: Any) -> np.ndarray:
    """Each socket's previous row (``fill`` before the first)."""
    out = np.empty_like(a)
    out[:, 0] = fill
    out[:, 1:] = a[:, :-1]
    return out


def _connections(
    state32: np.ndarray,
    ev: _Ids,
    session: _Ids,
    departure: np.ndarray,
    est_soc32: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Which EV is plugged in at each socket and step, and the SOC CityLearn sets on arrival.

    As ``associate_chargers_to_electric_vehicles``: a step is a new connection when the
    socket's previous step had another (or no) vehicle, or a new session id (or, without
    session ids, a restarted departure countdown); then the SOC comes from the estimated
    arrival SOC of the step before (if that step was "arriving" or "away") or of this step.
    """
    n_rows = state32.shape[1]
    first = np.zeros(state32.shape, dtype=bool)
    first[:, 0] = True
    connected = np.where((state32 == 1) & ev.is_id & (ev.pool >= 0), ev.pool, -1)
    previous = _shift(connected, -1)
    changed = np.where(
        session.is_id,
        _shift(session.is_id, False) & (session.code != _shift(session.code, -1)),
        (_shift(departure, 0) <= 1) & (departure > _shift(departure, 0)),
    )
    new = (connected >= 0) & (first | (previous != connected) | changed)
    previous_state = _shift(state32, np.nan)
    from_previous = ~first & ((previous_state == 2) | (previous_state == 3))
    mismatch = new & from_previous & _shift(ev.is_id, False) & (_shift(ev.code, -1) != ev.code)
    if mismatch.any():
        s, t = (int(i[0]) for i in np.nonzero(mismatch))
        raise ValueError(
            f"charger file of socket {s}: another EV is announced at step {t - 1} than the one "
            f"that plugs in at step {t}"
        )
    soc = np.where(from_previous, _shift(est_soc32, np.nan), est_soc32)
    valid = new & ~np.isnan(soc) & (soc >= 0.0) & (soc <= 1.0)
    arrival32 = np.where(valid, soc, np.nan).astype(F32)
    assert arrival32.shape[1] == n_rows
    return connected, arrival32


def _unplugged_events(
    state32: np.ndarray, ev: _Ids, est_soc32: np.ndarray, n_evs: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per EV and step t: does CityLearn's ``simulate_unconnected_ev_soc`` leave its SOC
    alone (plugged in at t: 1), set it to the coming arrival SOC (2), or drift it (0)?"""
    n_sockets, n_rows = state32.shape
    kind = np.zeros((n_evs + 1, n_rows), dtype=np.int8)  # row n_evs: ids not in the pool
    event32 = np.full((n_evs + 1, n_rows), np.nan, dtype=F32)
    decided = np.zeros((n_evs + 1, n_rows), dtype=bool)  # the first charger naming an EV wins
    steps = np.arange(n_rows - 1)
    for s in range(n_sockets):
        state, following = state32[s, :-1], state32[s, 1:]
        is_str = ev.code[s, :-1] >= 0
        plugged = is_str & (state == 1)
        arriving = ~plugged & ev.is_id[s, 1:] & (following == 1) & (state != 1)
        incoming = is_str & (ev.code[s, :-1] == ev.code[s, 1:]) & (state == 2)
        soc = np.where(incoming, est_soc32[s, :-1], est_soc32[s, 1:])
        for mask, who in ((plugged, ev.pool[s, :-1]), (arriving, ev.pool[s, 1:])):
            t = steps[mask]
            e = np.where(who[mask] >= 0, who[mask], n_evs)
            fresh = ~decided[e, t]
            t, e = t[fresh], e[fresh]
            decided[e, t] = True
            kind[e, t] = 1
            if mask is arriving:
                ok = (soc[t] >= 0.0) & (soc[t] <= 1.0)
                kind[e[ok], t[ok]] = 2
                event32[e[ok], t[ok]] = soc[t[ok]]
    return kind[:n_evs], event32[:n_evs]


def observation_bounds(data: TwinData) -> tuple[np.ndarray, np.ndarray]:
    """CityLearn's observation-space bounds for these observations (float32).

    As ``Building.estimate_observation_space_limits`` (unnormalised, delta 0):
    series bounds over every row for calendar, PV, load, price and carbon; the net
    consumption's rough estimate from load, PV and the battery's power (it ignores
    the EV chargers, so it can be exceeded: the env clips); fixed ranges for SOCs
    and the chargers' placeholders; departure times up to the episode length.
    """
    storage_kwh = data.bess.nominal_power_kw * data.step_hours
    series = _exogenous(data)
    load, pv = data.load_kwh32, data.pv_kwh32
    # Float32 array arithmetic in CityLearn's order (its HVAC and escalator limits are 0).
    net_low = min(float((load - (storage_kwh + pv)).min()), 0.0)
    net_high = float((load + 0.0 + 0.0 + 0.0 + storage_kwh + 0 - pv).max())
    departure_high = max(24.0, float(data.n_rows), float(data.departure_steps.max(initial=-1)))
    fixed = {
        "electrical_storage_soc": (0.0, 1.0),
        "net_electricity_consumption": (net_low, net_high),
        "connected_state": (0.0, 1.0),
        "departure_time": (-1.0, departure_high),
        "required_soc": (-0.1, 1.0),
        "soc": (-0.1, 1.0),
    }
    bounds = [
        (float(np.nanmin(series[f])), float(np.nanmax(series[f]))) if f in series else fixed[f]
        for f, _ in data.observation_fields
    ]
    return np.array([lo for lo, _ in bounds], dtype=F32), np.array(
        [hi for _, hi in bounds], dtype=F32
    )


# -- the simulation ---------------------------------------------------------------------------


@dataclass
class StepResult:
    """One step of every env copy, as CityLearn records it (float32 where it stores float32)."""

    bess_energy_kwh32: np.ndarray  # [n]: + charged, - discharged (battery's electricity use)
    bess_soc32: np.ndarray  # [n]: after the step
    charger_kwh32: np.ndarray  # [n, socket]: each charger's electricity use
    ev_charging_kwh32: np.ndarray  # [n]
    net_kwh32: np.ndarray  # [n]
    load_kwh32: np.float32
    pv_kwh32: np.float32


class TwinCore:
    """The site's physics for ``n_envs`` copies stepped in lockstep (one shared time step).

    All copies share the data (PV, load, sessions) and differ only by their actions
    and their random stream for unplugged EVs.
    """

    def __init__(
        self, data: TwinData, n_envs: int = 1, random_seeds: Sequence[int] | None = None
    ) -> None:
        self.data = data
        self.n_envs = n_envs
        d = data
        n_obs = len(d.observation_names)
        b = d.bess
        self._bess = b
        self._ev_min_energy = d.ev_min_soc * d.ev_capacity_kwh
        self._ev_max_input_kwh = d.ev_nominal_power_kw * d.step_hours
        self._ev_eff_divisor = np.maximum(d.ev_one_way_efficiency, ZERO_DIVISION)
        self._charger_min_kw = np.maximum(
            np.minimum(d.charger_min_power_kw, d.charger_max_power_kw), 0
        )
        self._drift_std = EV_DRIFT_STD_PER_SQRT_H * np.sqrt(max(d.seconds_per_step, 1.0) / 3600.0)
        # Per row: plugged-in sockets and their EVs, arrivals, and unplugged EVs' events.
        self._plugged = [np.flatnonzero(d.connected_ev[:, t] >= 0) for t in range(d.n_rows)]
        self._plugged_ev = [d.connected_ev[p, t] for t, p in enumerate(self._plugged)]
        self._arrivals = []
        for t in range(d.n_rows):
            socks = np.flatnonzero(~np.isnan(d.arrival_soc32[:, t]))
            self._arrivals.append((d.connected_ev[socks, t], d.arrival_soc32[socks, t]))
        self._drifting = [np.flatnonzero(d.ev_event_kind[:, t] == 0) for t in range(d.n_rows)]
        self._set_on_event = []
        for t in range(d.n_rows):
            evs = np.flatnonzero(d.ev_event_kind[:, t] == 2)
            self._set_on_event.append((evs, d.ev_event_soc32[evs, t]))
        # The observation table: every entry that does not depend on actions, per row.
        self._static_obs = np.zeros((d.n_rows, n_obs))
        self._soc_col = self._net_col = -1
        self._ev_soc_cols = np.full(d.n_sockets, -1)
        for j, (field, s) in enumerate(d.observation_fields):
            if s < 0:
                if field == "electrical_storage_soc":
                    self._soc_col = j
                elif field == "net_electricity_consumption":
                    self._net_col = j
                else:
                    self._static_obs[:, j] = _base_series(d, field)
                continue
            plugged = d.connected_ev[s] >= 0
            values = {
                "connected_state": np.ones(d.n_rows),
                "departure_time": d.departure_steps[s].astype(F64),
                "required_soc": d.required_soc32[s].astype(F64),
                "soc": np.full(d.n_rows, NO_EV["soc"]),
            }[field]
            self._static_obs[:, j] = np.where(plugged, values, NO_EV[field])
            if field == "soc":
                self._ev_soc_cols[s] = j
        seeds = [d.random_seed] * n_envs if random_seeds is None else list(random_seeds)
        if len(seeds) != n_envs:
            raise ValueError(f"{len(seeds)} random seeds for {n_envs} copies")
        self.episode = -1
        self.reset(seeds)
        # Building is not an episode: CityLearn's first reset() is episode 0.
        self.episode = -1

    # -- state -------------------------------------------------------------------------------
    def reset(self, random_seeds: Sequence[int] | None = None) -> None:
        """A new episode; CityLearn seeds its drift stream with random seed + episode index."""
        d, n = self.data, self.n_envs
        if random_seeds is not None:
            self.random_seeds = [int(s) for s in random_seeds]
        self.episode += 1
        self._rngs = [np.random.RandomState(s + self.episode) for s in self.random_seeds]
        self.t = 0
        b = self._bess
        self.bess_soc32 = np.full(n, max(b.initial_soc_frac, b.min_soc_frac), dtype=F32)
        self.ev_soc32 = np.tile(np.maximum(d.ev_initial_soc, d.ev_min_soc).astype(F32), (n, 1))
        self._associate(0)
        # What the observation of step t shows: CityLearn reads SOCs and net use of t - 1
        # (of t = 0 at the start).
        self.obs_bess_soc32 = self.bess_soc32.copy()
        self.obs_ev_soc32 = self.ev_soc32.copy()
        # Net use at reset: load and PV only, in CityLearn's float32 order.
        zero = F32(0.0)
        net0 = (((zero + d.load_kwh32[0]) + zero) + -d.pv_kwh32[0]) + zero
        self.obs_net32 = np.full(n, net0, dtype=F32)
        self._last_net32 = self.obs_net32

    def plugged(self, t: int) -> np.ndarray:
        """Sockets with an EV plugged in at step t (CityLearn's connected chargers)."""
        return self._plugged[t]

    def _associate(self, t: int) -> None:
        evs, soc32 = self._arrivals[t]
        if evs.size:
            self.ev_soc32[:, evs] = soc32

    @property
    def done(self) -> bool:
        return self.t >= self.data.n_steps

    # -- observation -------------------------------------------------------------------------
    def observe(self) -> np.ndarray:
        """Raw observations [n, n_obs] (float64 of CityLearn's values)."""
        # After the last step CityLearn's buildings stay on the last row.
        row = min(self.t, self.data.n_steps - 1)
        obs = np.repeat(self._static_obs[row][None, :], self.n_envs, axis=0)
        if self._soc_col >= 0:
            obs[:, self._soc_col] = self.obs_bess_soc32
        if self._net_col >= 0:
            obs[:, self._net_col] = self.obs_net32
        socks = self._plugged[row]
        cols = self._ev_soc_cols[socks]
        keep = cols >= 0
        if keep.any():
            obs[:, cols[keep]] = self.obs_ev_soc32[:, self._plugged_ev[row][keep]]
        return obs

    def ev_soc_and_capacity(self, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SOC at the start of this step (from CityLearn's energy_init) and capacity [kWh]
        of the EV at each given socket; 0 where none is plugged in. Shapes [n, len(sockets)]."""
        d = self.data
        ev = d.connected_ev[sockets, self.t]
        has = ev >= 0
        e = np.where(has, ev, 0)
        cap = d.ev_capacity_kwh[e]
        energy = np.maximum(self._ev_min_energy[e], self.ev_soc32[:, e].astype(F64) * cap)
        soc = np.where(has, energy / cap, 0.0)
        return soc, np.broadcast_to(np.where(has, cap, 0.0), soc.shape).copy()

    def ev_soc_after_step(self, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SOC just after this step (before advancing) and capacity [kWh] of the EV that is
        plugged in at each given socket; 0 where none is."""
        d = self.data
        ev = d.connected_ev[sockets, self.t]
        has = ev >= 0
        e = np.where(has, ev, 0)
        soc = np.where(has, self.ev_soc32[:, e].astype(F64), 0.0)
        cap = np.where(has, d.ev_capacity_kwh[e], 0.0)
        return soc, np.broadcast_to(cap, soc.shape).copy()

    # -- dynamics ----------------------------------------------------------------------------
    def step(self, bess_action: np.ndarray, ev_action: np.ndarray) -> StepResult:
        """Apply actions ([n] in [-1, 1], [n, socket] in [0, 1]) to step t; do not advance."""
        if self.done:
            raise RuntimeError("episode is over: call reset()")
        d, t = self.data, self.t
        bess_energy32, self.bess_soc32 = self._charge_bess(np.asarray(bess_action, dtype=F64))
        chargers32 = np.zeros((self.n_envs, d.n_sockets), dtype=F32)
        socks = self._plugged[t]
        if socks.size:
            chargers32[:, socks] = self._charge_evs(socks, self._plugged_ev[t], ev_action[:, socks])
            # CityLearn: 0 + float32 per charger, in float64, stored in float32.
            ev_total32 = np.cumsum(chargers32[:, socks].astype(F64), axis=1)[:, -1].astype(F32)
        else:
            ev_total32 = np.zeros(self.n_envs, dtype=F32)
        # Building.update_variables: float32 sums in its order (HVAC, appliances are 0).
        load32, pv32 = d.load_kwh32[t], d.pv_kwh32[t]
        net32 = ((load32 + bess_energy32) + -pv32) + ev_total32
        self._last_net32 = net32
        return StepResult(
            bess_energy_kwh32=bess_energy32,
            bess_soc32=self.bess_soc32,
            charger_kwh32=chargers32,
            ev_charging_kwh32=ev_total32,
            net_kwh32=net32,
            load_kwh32=load32,
            pv_kwh32=pv32,
        )

    def _charge_bess(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Building.update_electrical_storage + Battery.charge, per copy."""
        b, h = self._bess, self.data.step_hours
        a = _clip(action, -1.0, 1.0)
        requested = (a * b.nominal_power_kw) * h
        energy_init = np.maximum(b.min_energy_kwh, self.bess_soc32.astype(F64) * b.capacity_kwh)
        max_kwh = max(b.nominal_power_kw, 0.0) * h  # flat capacity-power curve
        eta = b.one_way_efficiency_frac
        # Charging: power, then the capacity ceiling (twice in CityLearn; flat curves: same).
        headroom = np.maximum(b.capacity_kwh - energy_init, 0.0) / max(eta, ZERO_DIVISION)
        charge = np.minimum(np.minimum(requested, max_kwh), headroom)
        # Discharging: power, then the depth of discharge.
        floor_kwh = (1.0 - b.depth_of_discharge_frac) * b.capacity_kwh
        available = np.maximum(energy_init - floor_kwh, 0.0) * eta
        discharge = np.minimum(np.minimum(np.abs(requested), max_kwh), available)
        energy = np.where(requested >= 0, charge, -discharge)
        return _store(energy, energy_init, b.capacity_kwh, b.min_energy_kwh, eta)

    def _charge_evs(self, socks: np.ndarray, evs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """Charger.update_connected_electric_vehicle_soc for plugged-in sockets; returns
        the chargers' electricity use [kWh, float32] and updates the EVs' SOC."""
        d, h = self.data, self.data.step_hours
        a = _clip(action, -1.0, 1.0)
        max_kw = d.charger_max_power_kw[socks]
        requested_kw = np.abs(a) * max_kw
        power_kw = np.where(
            (a > 0) & (max_kw > 0) & (requested_kw >= self._charger_min_kw[socks]),
            np.minimum(requested_kw, max_kw),
            0.0,
        )
        charging = power_kw != 0.0
        normalized = power_kw / np.maximum(max_kw, ZERO_DIVISION)
        eff = d.charger_efficiency[socks]
        commanded_kwh = (normalized * max_kw) * h
        # No power requested: CityLearn still calls battery.charge(0.0) (re-storing the SOC).
        battery_kwh = np.where(charging, commanded_kwh * eff, 0.0)
        cap = d.ev_capacity_kwh[evs]
        energy_init = np.maximum(self._ev_min_energy[evs], self.ev_soc32[:, evs].astype(F64) * cap)
        eta = d.ev_one_way_efficiency[evs]
        headroom = np.maximum(cap - energy_init, 0.0) / self._ev_eff_divisor[evs]
        energy = np.minimum(np.minimum(battery_kwh, self._ev_max_input_kwh[evs]), headroom)
        balance32, soc32 = _store(energy, energy_init, cap, self._ev_min_energy[evs], eta)
        self.ev_soc32[:, evs] = soc32
        balance = balance32.astype(F64)
        eff_div = np.maximum(eff, ZERO_DIVISION)
        use = np.where(balance >= 0, balance / eff_div, balance * eff)
        return np.where(charging, use, 0.0).astype(F32)

    def advance(self) -> bool:
        """To the next step, as CityLearn's next_time_step; returns True when the episode ends."""
        d = self.data
        last = self.t >= d.n_steps - 1
        if not last:
            b = self._bess
            self.obs_bess_soc32 = self.bess_soc32
            self.obs_net32 = self._last_net32
            self.obs_ev_soc32 = self.ev_soc32.copy()
            # StorageDevice.next_time_step: SOC carried over (no standby loss), clipped.
            self.bess_soc32 = _clip(self.bess_soc32.astype(F64), b.min_soc_frac, 1.0).astype(F32)
            previous = self.ev_soc32.astype(F64)
            self.ev_soc32 = _clip(previous, d.ev_min_soc, 1.0).astype(F32)
        self.t += 1
        if last:
            return True  # CityLearn's buildings stay on the last row
        t = self.t
        drifting = self._drifting[t]
        if drifting.size:
            # One draw per drifting EV, in pool order, from each copy's own stream.
            draws = np.stack(
                [rng.normal(1.0, self._drift_std, drifting.size) for rng in self._rngs]
            )
            factor = _clip(draws, *EV_DRIFT_CLIP)
            self.ev_soc32[:, drifting] = _clip(previous[:, drifting] * factor, 0.0, 1.0)
        evs, soc32 = self._set_on_event[t]
        if evs.size:
            self.ev_soc32[:, evs] = soc32
        self._associate(t)
        return False


def _clip(x: Any, low: Any, high: Any) -> np.ndarray:
    """np.clip's values without its Python overhead (this is the hot loop)."""
    return np.minimum(np.maximum(x, low), high)


def _store(
    energy: np.ndarray,
    energy_init: np.ndarray,
    capacity_kwh: Any,
    min_energy_kwh: Any,
    eta: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """StorageDevice._charge: the stored energy after a limited charge, as CityLearn rounds it.

    Returns the battery's energy balance [kWh, float32; + charged from outside, before
    losses] and its SOC [float32].
    """
    final = np.where(
        energy >= 0,
        np.minimum(energy_init + energy * eta, capacity_kwh),
        np.maximum(min_energy_kwh, energy_init + energy / eta),
    )
    soc32 = (final / np.maximum(capacity_kwh, ZERO_DIVISION)).astype(F32)
    delta = final - energy_init
    balance32 = np.where(delta >= 0, delta / eta, delta * eta).astype(F32)
    return balance32, soc32


def _exogenous(data: TwinData) -> dict[str, np.ndarray]:
    """The observations read straight from the site's files, by CityLearn name."""
    return {
        "month": data.month,
        "day_type": data.day_type,
        "hour": data.hour,
        "solar_generation": data.pv_kwh32,
        "non_shiftable_load": data.load_kwh32,
        "electricity_pricing": data.price32,
        "carbon_intensity": data.carbon32,
    }


def _base_series(data: TwinData, name: str) -> np.ndarray:
    return _exogenous(data)[name].astype(F64)


# -- the backend behind SiteEnv ---------------------------------------------------------------


class TwinCharger:
    """What callers read of a CityLearn charger: its id and electricity use per step [kWh]."""

    def __init__(self, charger_id: str, electricity_consumption: np.ndarray) -> None:
        self.charger_id = charger_id
        self.electricity_consumption = electricity_consumption


class TwinSimulator:
    """``n_envs`` copies of the site on one ``TwinCore``: the ``pvbess.env.Simulator`` the
    env's step (``pvbess.env.SiteStep``) runs, for ``SiteEnv`` (one copy) and the VecEnv."""

    def __init__(self, data: TwinData, n_envs: int = 1, seeds: Sequence[int | None] = ()) -> None:
        self.data = d = data
        self.n_envs = n_envs
        # CityLearnEnv(random_seed=seed) per copy; a reset with a seed replaces it.
        seeds = list(seeds) or [None] * n_envs
        if len(seeds) != n_envs:
            raise ValueError(f"{len(seeds)} seeds for {n_envs} copies")
        self.random_seeds = [d.random_seed if s is None else int(s) for s in seeds]
        self.core = TwinCore(d, n_envs=n_envs, random_seeds=self.random_seeds)
        self.n_steps = d.n_steps
        self.obs_low, self.obs_span = site_env.observation_scaling(d.obs_low32, d.obs_high32)
        self.observation_names = list(d.observation_names)
        n = self.n_steps
        self.state = d.state32[:, :n]
        self.departure_steps = d.departure_steps[:, :n]
        self.required_soc = d.required_soc32[:, :n].astype(F64)
        # The first copy's chargers, as CityLearn's (tests and plots read them).
        self._charger_kwh = np.zeros((d.n_sockets, d.n_rows), dtype=F32)
        self.chargers = [
            TwinCharger(sid, self._charger_kwh[s]) for s, sid in enumerate(d.socket_ids)
        ]
        self._soc_after = np.zeros((n_envs, d.n_sockets))
        self._soc_after_t = -1

    @classmethod
    def from_dataset(
        cls, dataset: SiteDataset, n_envs: int = 1, seeds: Sequence[int | None] = ()
    ) -> TwinSimulator:
        return cls(TwinData.load(dataset), n_envs=n_envs, seeds=seeds)

    @property
    def random_seed(self) -> int:
        return self.random_seeds[0]

    @property
    def t(self) -> int:
        return self.core.t

    def reset(self, seeds: Sequence[int | None] | None = None) -> np.ndarray:
        if seeds is not None:
            self.random_seeds = [
                old if s is None else int(s)
                for old, s in zip(self.random_seeds, seeds, strict=True)
            ]
        self.core.reset(self.random_seeds)
        self._charger_kwh[:] = 0.0
        self._soc_after_t = -1
        return self.core.observe()

    def ev_soc_and_capacity(self, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SOC at the start of this step and capacity [kWh] of the EV at each given socket."""
        return self.core.ev_soc_and_capacity(np.asarray(sockets, dtype=np.int64))

    def ev_soc_after_step(self, t: int, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SOC after step t (the last step taken) and capacity [kWh] of the EV that was at
        each given socket."""
        if t != self._soc_after_t:
            raise ValueError(f"the twin keeps the SOCs of step {self._soc_after_t} only, not {t}")
        idx = np.asarray(sockets, dtype=np.int64)
        ev = self.data.connected_ev[idx, t]
        cap = np.where(ev >= 0, self.data.ev_capacity_kwh[np.maximum(ev, 0)], 0.0)
        return self._soc_after[:, idx].copy(), np.broadcast_to(cap, (self.n_envs, idx.size)).copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], bool]:
        core, t = self.core, self.core.t
        a = np.asarray(actions, dtype=F64)
        r = core.step(a[:, 0], a[:, 1:])
        self._charger_kwh[:, t] = r.charger_kwh32[0]
        socks = core.plugged(t)
        self._soc_after[:] = 0.0
        self._soc_after[:, socks] = core.ev_soc_after_step(socks)[0]
        self._soc_after_t = t
        storage_kwh = r.bess_energy_kwh32.astype(F64)
        quantities = {
            "load_kwh": np.full(self.n_envs, F64(r.load_kwh32)),
            "pv_kwh": np.full(self.n_envs, F64(r.pv_kwh32)),
            "ev_charging_kwh": r.ev_charging_kwh32.astype(F64),
            "bess_charge_kwh": np.maximum(storage_kwh, 0.0),
            "bess_discharge_kwh": np.maximum(-storage_kwh, 0.0),
            "bess_soc_frac": r.bess_soc32.astype(F64),
            "net_kwh": r.net_kwh32.astype(F64),
        }
        done = core.advance()
        return core.observe(), quantities, done


# -- many copies for training -----------------------------------------------------------------


class TwinVecEnv(VecEnv):
    """``n_envs`` copies of ``SiteEnv`` on the twin, stepped in one numpy call: an SB3 VecEnv.

    The step is ``pvbess.env.SiteStep`` over n copies (the same code ``SiteEnv`` runs
    for one). The copies run in lockstep over the same year, so they all end (and
    reset) together; they differ by their actions and their random stream for
    unplugged EVs (seed + i). Given several years (datasets of the site built with
    other seeds), each episode runs the next one. Infos carry ``episode`` (as SB3's
    Monitor) and ``episode_components`` at the end of an episode, not the per-step
    ``reward_components``.
    """

    def __init__(
        self,
        datasets: SiteDataset | Sequence[SiteDataset],
        reward: RewardConfig,
        n_envs: int,
        safety_layer: bool = True,
        seed: int | None = None,
    ) -> None:
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        years = [datasets] if isinstance(datasets, SiteDataset) else list(datasets)
        self.datasets = years
        base_seed = years[0].site.seed if seed is None else int(seed)
        seeds = [base_seed + i for i in range(n_envs)]
        self.steps = [
            site_env.SiteStep(
                TwinSimulator.from_dataset(ds, n_envs, seeds=seeds),
                ds,
                reward,
                safety_layer=safety_layer,
                record=False,
            )
            for ds in years
        ]
        if len({s.n_steps for s in self.steps}) > 1:
            raise ValueError("the training years differ in length")
        self.year = 0
        self.render_mode = None
        self.safety_layer = safety_layer
        first = self.steps[0]
        self.n_sockets = first.n_sockets
        self.n_steps = first.n_steps
        self.observation_names = first.sim.observation_names
        self._actions = np.zeros((n_envs, self.n_sockets + 1))
        super().__init__(n_envs, first.observation_space, first.action_space)
        self._created = time.time()

    @property
    def step_fn(self) -> site_env.SiteStep:
        """The current year's step."""
        return self.steps[self.year]

    @property
    def sim(self) -> TwinSimulator:
        return self.step_fn.sim  # type: ignore[return-value]

    @property
    def core(self) -> TwinCore:
        return self.sim.core

    # -- VecEnv API ------------------------------------------------------------------------
    def reset(self) -> VecEnvObs:
        seeds = list(self._seeds)
        self._reset_seeds()
        self._reset_options()
        return self.step_fn.reset(seeds)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        step = self.step_fn
        obs, total, done, _ = step.step(self._actions)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if done:
            elapsed = round(time.time() - self._created, 6)  # as SB3's Monitor
            for i, info in enumerate(infos):
                info["terminal_observation"] = obs[i]
                info["TimeLimit.truncated"] = False
                info["episode"] = {"r": float(step.returns[i]), "l": step.t, "t": elapsed}
                info["episode_components"] = {
                    k: float(v[i]) for k, v in step.component_sums.items()
                }
            self.year = (self.year + 1) % len(self.steps)
            obs = self.step_fn.reset()
        dones = np.full(self.num_envs, done)
        return obs, total.astype(np.float32), dones, infos

    def close(self) -> None:
        return None

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **kwargs: Any
    ) -> list[Any]:
        raise NotImplementedError(f"TwinVecEnv copies have no methods of their own ({method_name})")

    def env_is_wrapped(
        self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None
    ) -> list[bool]:
        return [False for _ in self._get_indices(indices)]


__all__ = [
    "BatteryParams",
    "StepResult",
    "TwinCharger",
    "TwinCore",
    "TwinData",
    "TwinSimulator",
    "TwinVecEnv",
    "observation_bounds",
]
