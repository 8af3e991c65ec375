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

from pvbess import errors
from pvbess.config import EvConfig
from pvbess.site.validation import PlausibilityWarning

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


# --- checks -------------------------------------------------------------------------------

# Energies below this are float noise, not a shortfall [kWh].
_ENERGY_TOLERANCE_KWH = 1e-9


@dataclass(frozen=True)
class _Table:
    """The session columns the checks need, as arrays, and how to report a bad row."""

    sessions: pd.DataFrame
    source: str
    index: pd.DatetimeIndex | None

    def fail(self, pos: int | None, column: str, problem: str) -> NoReturn:
        """Raise DataError for 0-based session row ``pos`` (None = the whole table)."""
        where, time = "", None
        if pos is not None:
            row = self.sessions.iloc[pos]
            arrival = int(self.sessions["arrival_step"].iloc[pos])
            if self.index is not None and 0 <= arrival < len(self.index):
                time = str(self.index[arrival])
            where = f"row {pos + 1} of {len(self.sessions)} (session {row['session_id']!r}"
            where += f", arrival {time})" if time else ")"
        errors.fail(
            self.source,
            column,
            problem,
            row=None if pos is None else pos + 1,
            where=where,
            time=time,
        )

    def fail_first(self, mask: np.ndarray, column: str, problem: str) -> None:
        """Fail on the first row where ``mask`` holds, counting all such rows."""
        bad = np.flatnonzero(mask)
        if len(bad):
            self.fail(int(bad[0]), column, f"{problem} ({len(bad)} such session(s))")

    def column(self, name: str, dtype: type) -> np.ndarray:
        return self.sessions[name].to_numpy(dtype=dtype)


def _first_overlap(
    key: np.ndarray, arrival: np.ndarray, departure: np.ndarray
) -> tuple[int, int] | None:
    """Positions (earlier, later) of the first two sessions with one ``key`` that overlap."""
    order = np.lexsort((arrival, key))
    same = key[order][1:] == key[order][:-1]
    overlap = same & (arrival[order][1:] < departure[order][:-1])
    hits = np.flatnonzero(overlap)
    if len(hits) == 0:
        return None
    # Report the overlap met first in the table's own row order.
    later = order[hits + 1]
    k = int(np.argmin(later))
    return int(order[hits[k]]), int(later[k])


def check_sessions(
    sessions: pd.DataFrame,
    sockets: list[tuple[str, str]],
    n_steps: int,
    *,
    source: str,
    index: pd.DatetimeIndex | None = None,
    vehicles: Collection[str] | None = None,
) -> None:
    """Raise DataError unless the sessions fit the sockets, the vehicles and the period.

    Checks, in order: the columns; a known socket of the session's class; a known
    vehicle (``vehicles``, e.g. the CityLearn EV pool, which silently ignores any
    other id); ``0 <= arrival_step < departure_step <= n_steps`` [steps]; a
    battery [kWh] > 0 and SOC fractions in [0, 1] with arrival <= required; no two
    sessions overlapping on one socket; no vehicle in two sessions at once (at two
    sockets). The message names ``source``, the column and the first offending row
    (1-based, in the table's order) with its arrival time when ``index`` is given.
    """
    table = _Table(sessions, source, index)
    missing = [c for c in SESSION_COLUMNS if c not in sessions.columns]
    if missing:
        table.fail(None, missing[0], f"missing column(s) {missing}; expected {SESSION_COLUMNS}.")
    if len(sessions) == 0:
        return
    for column in ("arrival_step", "departure_step"):
        if not pd.api.types.is_integer_dtype(sessions[column]):
            table.fail(None, column, f"steps must be integers, got {sessions[column].dtype}.")
    _check_identity(table, sockets, vehicles)
    arrival = table.column("arrival_step", np.int64)
    departure = table.column("departure_step", np.int64)
    table.fail_first(arrival < 0, "arrival_step", "arrives before the period (step < 0).")
    table.fail_first(
        departure > n_steps, "departure_step", f"departs after the period (step > {n_steps})."
    )
    table.fail_first(departure <= arrival, "departure_step", "departure is not after arrival.")
    _check_vehicle_values(table)
    _check_overlaps(table, arrival, departure)


def _check_identity(
    table: _Table, sockets: list[tuple[str, str]], vehicles: Collection[str] | None
) -> None:
    """Known sockets, each session of its socket's class, known vehicles."""
    class_of = dict(sockets)
    socket = table.column("socket_id", str)
    unknown = np.flatnonzero(~np.isin(socket, list(class_of)))
    if len(unknown):
        table.fail(int(unknown[0]), "socket_id", f"unknown socket; the site has {len(sockets)}.")
    expected = np.array([class_of[s] for s in socket], dtype=str)
    wrong = np.flatnonzero(table.column("ev_class", str) != expected)
    if len(wrong):
        pos = int(wrong[0])
        table.fail(pos, "ev_class", f"socket {socket[pos]!r} serves class {expected[pos]!r}.")
    if vehicles is not None:
        ev_id = table.column("ev_id", str)
        table.fail_first(
            ~np.isin(ev_id, list(vehicles)),
            "ev_id",
            "vehicle not defined in the EV pool, so CityLearn would never connect it.",
        )


def _check_overlaps(table: _Table, arrival: np.ndarray, departure: np.ndarray) -> None:
    """One session per socket at a time; one socket per vehicle at a time."""
    socket = table.column("socket_id", str)
    ev_id = table.column("ev_id", str)
    overlap = _first_overlap(socket, arrival, departure)
    if overlap is not None:
        first, pos = overlap
        table.fail(
            pos,
            "socket_id",
            f"socket {socket[pos]!r} is still occupied by row {first + 1} (steps "
            f"{arrival[first]}..{departure[first]}) when this session arrives at step "
            f"{arrival[pos]}.",
        )
    overlap = _first_overlap(ev_id, arrival, departure)
    if overlap is not None:
        first, pos = overlap
        table.fail(
            pos,
            "ev_id",
            f"vehicle {ev_id[pos]!r} is at socket {socket[first]!r} (row {first + 1}, steps "
            f"{arrival[first]}..{departure[first]}) and at socket {socket[pos]!r} from step "
            f"{arrival[pos]}: one vehicle cannot be in two places at once.",
        )


def _check_vehicle_values(table: _Table) -> None:
    """Battery [kWh] > 0, SOC fractions in [0, 1], arrival SOC <= required SOC."""
    battery = table.column("battery_kwh", np.float64)
    soc0 = table.column("arrival_soc_frac", np.float64)
    soc1 = table.column("required_soc_frac", np.float64)
    # Written as "not (ok)" so that NaN fails too.
    table.fail_first(~(battery > 0), "battery_kwh", "battery capacity must be > 0 kWh.")
    table.fail_first(~((soc0 >= 0) & (soc0 <= 1)), "arrival_soc_frac", "must be in [0, 1].")
    table.fail_first(~((soc1 >= 0) & (soc1 <= 1)), "required_soc_frac", "must be in [0, 1].")
    table.fail_first(soc0 > soc1, "arrival_soc_frac", "exceeds required_soc_frac.")


def shortfall_kwh(sessions: pd.DataFrame, ev: EvConfig, step_hours: float = 1.0) -> np.ndarray:
    """Battery-side energy [kWh] each session misses even at full socket power (0 = reachable).

    A session needs ``(required - arrival SOC) x battery_kwh`` and can receive at most
    ``dwell [h] x socket_power_kw x charger_efficiency_frac``, as in the env's safety layer.
    """
    need_kwh = (sessions["required_soc_frac"] - sessions["arrival_soc_frac"]).clip(
        lower=0
    ) * sessions["battery_kwh"]
    dwell_h = (sessions["departure_step"] - sessions["arrival_step"]) * step_hours
    max_kwh = dwell_h * ev.socket_power_kw * ev.charger_efficiency_frac
    short = (need_kwh - max_kwh).to_numpy(dtype=np.float64)
    return np.where(short > _ENERGY_TOLERANCE_KWH, short, 0.0)


def unreachable_sessions(
    sessions: pd.DataFrame, ev: EvConfig, step_hours: float = 1.0
) -> dict[str, int]:
    """Sessions per class that cannot reach their required SOC within their dwell."""
    short = shortfall_kwh(sessions, ev, step_hours) > 0
    counts = pd.Series(short).groupby(sessions["ev_class"].to_numpy()).sum()
    return {name: int(counts.get(name, 0)) for name in ev.classes}


def check_reachable(
    sessions: pd.DataFrame, ev: EvConfig, *, step_hours: float = 1.0, source: str
) -> list[str]:
    """Warn (PlausibilityWarning) for each class whose median session cannot be charged in time.

    Such a class cannot be served whatever the controller does: the env charges those
    vehicles at full socket power and reports the rest as ``ev_unmet_kwh``. Returns the
    messages (empty if the median session of every class is reachable).
    """
    short = shortfall_kwh(sessions, ev, step_hours)
    messages = []
    for name, c in ev.classes.items():
        mine = (sessions["ev_class"] == name).to_numpy()
        if not mine.any() or np.median(short[mine]) <= 0:
            continue
        s = sessions[mine]
        need_kwh = (s["required_soc_frac"] - s["arrival_soc_frac"]).clip(lower=0) * s["battery_kwh"]
        dwell_h = (s["departure_step"] - s["arrival_step"]) * step_hours
        rate_kwh_per_h = ev.socket_power_kw * ev.charger_efficiency_frac
        messages.append(
            f"{source}: EV class {name!r}: the median session cannot reach its required SOC "
            f"{c.required_soc_frac:g} within its dwell; {(short[mine] > 0).mean():.1%} of "
            f"{mine.sum()} sessions fall short (median need {need_kwh.median():.2f} kWh in "
            f"{dwell_h.median():g} h; a socket delivers at most {rate_kwh_per_h:.2f} kWh/h = "
            f"{ev.socket_power_kw:g} kW x charger efficiency {ev.charger_efficiency_frac:g}). "
            "No controller can serve them; the shortfall is reported as ev_unmet_kwh. Check "
            f"site.ev.socket_power_kw, site.ev.classes.{name}.battery_kwh, "
            "session_minutes_mean and required_soc_frac."
        )
    for message in messages:
        warnings.warn(message, PlausibilityWarning, stacklevel=2)
    return messages
