"""EV charging sessions: seeded arrivals per vehicle class, assigned to free sockets.

A session occupies one socket for the steps ``[arrival_step, departure_step)``.
Vehicles that find every socket of their class busy are counted as unserved,
never dropped silently. Each socket alternates between two vehicle ids, so a
vehicle is never at two sockets at once and back-to-back sessions at one socket
are always distinct vehicles (CityLearn resets the SOC on a new connection).
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
import pandas as pd

from pvbess.config import EvConfig
from pvbess.timeseries_io import DataError
from pvbess.validation import PlausibilityWarning

SESSION_COLUMNS = [
    "session_id",
    "socket_id",
    "ev_class",
    "ev_id",
    "arrival_step",
    "departure_step",
    "battery_kwh",
    "arrival_soc_frac",
    "required_soc_frac",
]


@dataclass
class EvSessions:
    """Sessions of a whole period, plus what could not be served."""

    sessions: pd.DataFrame
    sockets: list[tuple[str, str]]  # (socket_id, ev_class), in action order
    unserved: dict[str, int] = field(default_factory=dict)
    arrivals: dict[str, int] = field(default_factory=dict)

    @property
    def required_energy_kwh(self) -> float:
        """Battery-side energy needed to lift every session to its required SOC [kWh]."""
        s = self.sessions
        delta = (s["required_soc_frac"] - s["arrival_soc_frac"]).clip(lower=0)
        return float((delta * s["battery_kwh"]).sum())


def socket_ids(ev: EvConfig) -> list[tuple[str, str]]:
    """Socket ids in a fixed order (class order of the config, then index)."""
    out = []
    for name, c in ev.classes.items():
        out += [(f"{name}_{i:03d}", name) for i in range(c.sockets)]
    return out


def generate_sessions(index: pd.DatetimeIndex, ev: EvConfig, seed: int) -> EvSessions:
    """Draw a period of sessions for every class and assign them to sockets.

    Arrivals are Poisson per opening hour (daily mean ``vehicles_per_day``);
    dwell times are Gamma(shape 4) around ``session_minutes_mean``, rounded to
    whole steps (at least one) and cut at closing time; arrival SOC is a
    clipped normal. One RNG stream, so a seed fixes everything.
    """
    rng = np.random.default_rng(seed)
    n_steps = len(index)
    hours = index.hour.to_numpy()
    open_steps = np.flatnonzero((hours >= ev.open_hour) & (hours < ev.close_hour))
    # Closing step of the day each step belongs to (sessions end by closing time).
    day_start = np.arange(n_steps) - hours
    close_step = np.minimum(day_start + ev.close_hour, n_steps)
    n_open_hours = ev.close_hour - ev.open_hour
    step_minutes = 60.0

    rows: list[tuple] = []
    sockets = socket_ids(ev)
    unserved: dict[str, int] = {}
    arrivals: dict[str, int] = {}
    for name, c in ev.classes.items():
        free_at = np.zeros(c.sockets, dtype=np.int64)
        sessions_at = np.zeros(c.sockets, dtype=np.int64)
        counts = rng.poisson(c.vehicles_per_day / n_open_hours, size=len(open_steps))
        arrivals[name] = int(counts.sum())
        unserved[name] = 0
        for step, count in zip(open_steps, counts, strict=True):
            for _ in range(count):
                minutes = rng.gamma(4.0, c.session_minutes_mean / 4.0)
                dwell = max(1, round(minutes / step_minutes))
                soc0 = float(
                    np.clip(
                        rng.normal(c.arrival_soc_frac_mean, c.arrival_soc_frac_std),
                        0.0,
                        c.required_soc_frac,
                    )
                )
                free = np.flatnonzero(free_at <= step)
                if c.sockets == 0 or free.size == 0:
                    unserved[name] += 1
                    continue
                k = int(free[np.argmin(free_at[free])])  # longest-idle socket
                departure = int(min(step + dwell, close_step[step]))
                ev_id = vehicle_ids(f"{name}_{k:03d}")[sessions_at[k] % 2]
                rows.append(
                    (
                        f"{name}_{k:03d}-{sessions_at[k]}",
                        f"{name}_{k:03d}",
                        name,
                        ev_id,
                        int(step),
                        departure,
                        c.battery_kwh,
                        soc0,
                        c.required_soc_frac,
                    )
                )
                free_at[k] = departure
                sessions_at[k] += 1
    sessions = pd.DataFrame(rows, columns=SESSION_COLUMNS)
    sessions = sessions.sort_values(["arrival_step", "socket_id"], ignore_index=True)
    return EvSessions(sessions=sessions, sockets=sockets, unserved=unserved, arrivals=arrivals)


def charger_table(sessions: pd.DataFrame, socket_id: str, n_steps: int) -> pd.DataFrame:
    """One socket's CityLearn charger file: one row per step.

    State 1 = plugged in (``departure_time`` counts down to 1 on the last
    plugged step), 2 = arriving next step (carries the arrival SOC, which
    CityLearn reads on connection), 3 = away.
    """
    state = np.full(n_steps, 3, dtype=np.int64)
    ev_id = np.full(n_steps, "", dtype=object)
    session_id = np.full(n_steps, "", dtype=object)
    departure = np.full(n_steps, np.nan)
    required = np.full(n_steps, np.nan)
    est_arrival = np.full(n_steps, np.nan)
    est_soc = np.full(n_steps, np.nan)
    mine = sessions[sessions["socket_id"] == socket_id]
    for s in mine.itertuples(index=False):
        a, d = s.arrival_step, s.departure_step
        steps = np.arange(a, d)
        state[steps] = 1
        ev_id[steps] = s.ev_id
        session_id[steps] = s.session_id
        departure[steps] = d - steps
        required[steps] = s.required_soc_frac
        est_soc[steps] = s.arrival_soc_frac
    for s in mine.itertuples(index=False):
        a = s.arrival_step
        if a > 0 and state[a - 1] == 3:
            state[a - 1] = 2
            ev_id[a - 1] = s.ev_id
            est_arrival[a - 1] = 1
            est_soc[a - 1] = s.arrival_soc_frac
    return pd.DataFrame(
        {
            "electric_vehicle_charger_state": state,
            "electric_vehicle_id": ev_id,
            "electric_vehicle_departure_time": departure,
            "electric_vehicle_required_soc_departure": required,
            "electric_vehicle_estimated_arrival_time": est_arrival,
            "electric_vehicle_estimated_soc_arrival": est_soc,
            "electric_vehicle_session_id": session_id,
        }
    )


def vehicle_ids(socket_id: str) -> list[str]:
    """The two vehicle ids that alternate at one socket (as in the sessions' ``ev_id``)."""
    return [f"{socket_id}_ev{k}" for k in range(2)]


def ev_pool(sessions: EvSessions, ev: EvConfig) -> dict[str, dict]:
    """CityLearn ``electric_vehicles_def``: two vehicles per socket.

    Constant efficiency and power curves, so that the only loss is the
    charger's and the socket power is the only limit.
    """
    pool = {}
    for sid, name in sessions.sockets:
        c = ev.classes[name]
        for vid in vehicle_ids(sid):
            pool[vid] = {
                "include": True,
                "battery": {
                    "type": "citylearn.energy_model.Battery",
                    "autosize": False,
                    "attributes": {
                        "capacity": c.battery_kwh,
                        "nominal_power": ev.socket_power_kw,
                        "initial_soc": c.arrival_soc_frac_mean,
                        "depth_of_discharge": 1.0,
                        "efficiency": 1.0,
                        "loss_coefficient": 0.0,
                        "capacity_loss_coefficient": 0.0,
                        "power_efficiency_curve": [[0.0, 1.0], [1.0, 1.0]],
                        "capacity_power_curve": [[0.0, 1.0], [1.0, 1.0]],
                    },
                },
            }
    return pool
