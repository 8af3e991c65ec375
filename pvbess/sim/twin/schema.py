"""The twin's data: what it reads from pvbess's CityLearn schema, exactly as CityLearn
reads it, and the refusal of anything else (``NotImplementedError``).

Also CityLearn's observation layout and bounds (``Building.estimate_observation_space_limits``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pvbess.site.dataset import BUILDING, OBSERVATIONS, SiteDataset

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
        f"pvbess.sim.twin does not simulate {what}; use env.backend=citylearn for this schema"
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
    pv_kwh32 = pv_generation_kwh32(np.array(frame["solar_generation"], dtype=F32), pv_kw)
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


def pv_generation_kwh32(solar_w_per_kw32: np.ndarray, nominal_kw: float) -> np.ndarray:
    """PV.get_generation (per kW, W/kW) on float32 data, as CityLearn computes it [kWh]."""
    return np.array(nominal_kw * solar_w_per_kw32 / 1000.0 * (3600.0 / 3600.0), dtype=F32)


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
