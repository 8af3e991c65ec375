"""Model predictive control: the optimum's LP over a rolling window, on forecasts.

Every ``replan_every_h`` hours the controller builds ``pvbess.control.optimal``'s
``Problem`` for the next ``horizon_h`` hours (same physics, constraints and
objective as ``agent=optimal``: ``dataclasses.replace`` on the full period's
problem) and solves it with ``optimal.solve``. What it knows at decision time:

- the battery's stored energy, from the observed ``electrical_storage_soc``
  (scaled back with the env's observation bounds, as ``RuleBased`` does);
- each plugged-in vehicle's SOC, required SOC and steps to departure, read from
  the env as its safety layer does. A vehicle leaving after the window must have
  by the window's end what full socket power after it cannot deliver;
- price and carbon intensity (the tariff and the grid are known);
- PV, load and EV arrivals of the current hour as measured (like ``RuleBased``),
  later ones through ``forecast``:

  - ``perfect``: the dataset's own future values and sessions;
  - ``persistence``: the value of the same hour on the last day observed (24 h
    earlier, 48 h for leads beyond 24 h, ...; before the first day, the first
    day's), and that day's arrivals shifted to today with their dwell and energy;
  - ``noisy``: perfect x (1 + e), e Gaussian with std ``noise_frac_at_24h`` x
    sqrt(lead / 24 h), clipped at >= 0; sessions' energies likewise by the lead
    of their arrival. Seeded by (run seed, step): reproducible, and independent
    of how often the controller replans;
  - ``average`` (PV and load; arrivals then persistence): the mean of the same hour on
    the last 7 days observed (persistence's day and the 6 before it);
  - ``learned`` (PV and load; arrivals then persistence): ``pvbess.site.forecast.Learned``,
    a gradient-boosted day-ahead regression fitted on the site's years of
    ``forecast_fit_seeds`` (by default the learners' training years,
    ``env.train_seeds``), never on the evaluated year.

  ``forecast_pv``, ``forecast_load`` and ``forecast_arrivals`` override ``forecast``
  for one signal (``null``: ``forecast``): ``experiment=mpc_forecasts`` measures what a
  perfect forecast of each is worth, by running every mix of perfect and persistence.

Forecast sessions sit on virtual sockets beyond the site's, one each, so they
never collide with a plugged vehicle; each keeps a "home" (the site socket of the
session it is, or is copied from). ``terminal=start`` keeps the stored energy at
the window's end at least its start (else a window empties the battery); a window
that reaches the end of the period ends free, like ``agent=optimal``. A window's
first ramp is from the import the env realized in the step before it
(``Problem.initial_import_kwh``; 0 at the episode's start, as in the env).

The first planned step becomes the action: battery = net grid-side energy /
(power_kw x 1 h), each socket = its energy / socket energy per step; the plan's
later steps are used until the next replan, a socket whose planning-time vehicle
has left taking what the plan gives the forecast vehicles homed there. Every
socket's energy is capped at what its vehicle still needs; the env's safety layer
stays underneath and raises whatever a vehicle that came unforeseen needs.
By default each window is solved as the LP alone (``exact: false``: a few ms
each); its realized plan can sit above the window's LP bound where the LP
charges and discharges (or imports and curtails) at once, reported as
``mpc/window_gap_rel_*``. ``exact: true`` runs ``solve``'s MILP machinery.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd

from pvbess.config import ConfigError, GridConfig, TariffConfig
from pvbess.control import optimal
from pvbess.control.controllers import Controller, Measured, Sockets, _per_rating
from pvbess.site import forecast as site_forecast
from pvbess.site import tariff
from pvbess.units import STEP_HOURS

log = logging.getLogger(__name__)

FORECASTS = ("perfect", "persistence", "noisy", "average", "learned")
# What ``average`` and ``learned`` forecast; arrivals are neither averaged nor learned.
LEARNED_SIGNALS = ("pv", "load")
TERMINALS = ("start", "free")


@dataclass
class Forecast:
    """PV and load over a window [kWh per step], and the sessions expected to arrive after
    its first step: absolute arrival and departure steps, battery-side energy [kWh], and
    the site socket each is attributed to (its own, or the one it is copied from)."""

    pv_kwh: np.ndarray
    load_kwh: np.ndarray
    arrival: np.ndarray
    departure: np.ndarray
    energy_kwh: np.ndarray
    home: np.ndarray


@dataclass(frozen=True)
class Sessions:
    """A period's EV sessions in arrival order: arrival and departure steps, battery-side
    energy [kWh] and site socket. What ``Mpc`` and the residual learner's planner
    (``pvbess.control.residual.MpcBase``) forecast arrivals from."""

    arrival: np.ndarray
    departure: np.ndarray
    energy_kwh: np.ndarray
    socket: np.ndarray

    @classmethod
    def of_problem(cls, p: optimal.Problem) -> Sessions:
        order = np.argsort(p.session_arrival_step, kind="stable")
        return cls(
            p.session_arrival_step[order],
            p.session_departure_step[order],
            p.session_energy_kwh[order],
            p.session_socket[order],
        )

    def arriving(self, src: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Indices (arrival order) of the sessions arriving at each step of ``src`` in turn,
        and how many arrive at each."""
        lo = np.searchsorted(self.arrival, src, side="left")
        counts = np.searchsorted(self.arrival, src, side="right") - lo
        starts = np.cumsum(counts) - counts
        return np.repeat(lo - starts, counts) + np.arange(int(counts.sum())), counts

    def persistence(self, t: int, n_w: int, n_steps: int) -> Forecast:
        """The sessions persistence expects over (t, t + n_w) (absolute steps): those that
        arrived on the last day observed at the same hours (before the first day, the first
        day's), shifted to their lead with their dwell and energy, homed at their socket.
        Its PV and load are left empty."""
        lead = np.arange(1, n_w)
        src = site_forecast.persistence_source(t, lead, n_steps)
        idx, counts = self.arriving(src)
        shift = np.repeat(t + lead - src, counts)
        return Forecast(
            pv_kwh=np.zeros(0),
            load_kwh=np.zeros(0),
            arrival=self.arrival[idx] + shift,
            departure=self.departure[idx] + shift,
            energy_kwh=self.energy_kwh[idx],
            home=self.socket[idx],
        )


def sessions_json(f: Forecast) -> str:
    """``f``'s sessions (steps relative to now) as a request's ``expected_sessions``: a JSON
    array of ``[hours_to_arrival, hours_to_departure, energy_kwh, socket]`` (battery-side
    energy the vehicle needs; socket 1..n), every float's digits kept."""
    rows = zip(
        (f.arrival * STEP_HOURS).tolist(),
        (f.departure * STEP_HOURS).tolist(),
        f.energy_kwh.tolist(),
        (f.home + 1).tolist(),
        strict=True,
    )
    return json.dumps([list(r) for r in rows], separators=(",", ":"))


def parse_sessions(text: str, n_sockets: int, horizon: int) -> Forecast:
    """A request's ``expected_sessions`` (``sessions_json``'s format) as the sessions a
    ``Planner`` plans for (steps relative to now); those arriving at or beyond the
    horizon are left out. ValueError names what is wrong."""
    try:
        rows = json.loads(text)
    except (TypeError, json.JSONDecodeError) as exc:
        raise ValueError(f"not JSON ({exc})") from exc
    table = np.asarray(rows, dtype=np.float64) if isinstance(rows, list) else None
    if table is None or (table.size and (table.ndim != 2 or table.shape[1] != 4)):
        raise ValueError(
            "must be a JSON array of [hours_to_arrival, hours_to_departure, energy_kwh, socket]"
        )
    table = table.reshape(-1, 4)
    if not np.isfinite(table).all():
        raise ValueError("holds a value that is not a finite number")
    steps = table[:, :2] / STEP_HOURS
    whole = np.abs(steps - np.round(steps)) < 1e-9
    arrival, departure = np.round(steps).astype(np.int64).T
    socket = table[:, 3]
    checks = (
        (~whole.all(axis=1), f"hours must be whole {STEP_HOURS:g} h steps"),
        (arrival < 1, "a vehicle arriving now is plugged in: hours_to_arrival must be >= 1 step"),
        (departure <= arrival, "hours_to_departure must exceed hours_to_arrival"),
        (table[:, 2] < 0, "energy_kwh is negative"),
        ((socket < 1) | (socket > n_sockets) | (socket != np.round(socket)), "socket is not 1..n"),
    )
    for bad, what in checks:
        if bad.any():
            raise ValueError(f"session {int(np.argmax(bad))}: {what}")
    keep = arrival < horizon
    return Forecast(
        pv_kwh=np.zeros(0),
        load_kwh=np.zeros(0),
        arrival=arrival[keep],
        departure=departure[keep],
        energy_kwh=table[keep, 2],
        home=socket[keep].astype(np.int64) - 1,
    )


@dataclass
class Window:
    """One replan's problem: plugged vehicles first (their site sockets and departures
    within the window), then the forecast ones on virtual sockets (their ``home``)."""

    problem: optimal.Problem
    sockets: np.ndarray
    plugged_departure: np.ndarray
    homes: np.ndarray


def _zeros() -> dict[str, float]:
    return {"pv": 0.0, "load": 0.0, "ev": 0.0}


@dataclass
class _Stats:
    """What the replans of one episode did."""

    replans: int = 0
    solve_s: list[float] = field(default_factory=list)
    window_gap_rel: list[float] = field(default_factory=list)
    overlap_windows: int = 0
    not_exact_windows: int = 0
    variables: int = 0
    # Forecast errors over the forecast steps (lead >= 1) of every window, per quantity.
    abs_err: dict[str, float] = field(default_factory=_zeros)
    actual_sum: dict[str, float] = field(default_factory=_zeros)
    n_forecast: int = 0


@contextlib.contextmanager
def _quiet(logger: logging.Logger) -> Iterator[None]:
    """``optimal.solve`` logs two INFO lines per solve: 17,520 a year at hourly replans."""
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _steps(key: str, hours: float) -> int:
    steps = hours / STEP_HOURS
    if not (math.isfinite(steps) and steps >= 1 and abs(steps - round(steps)) < 1e-9):
        raise ConfigError(
            f"{key}: must be a whole number of {STEP_HOURS:g} h steps >= 1, got {hours}"
        )
    return round(steps)


def window_problem(
    p: optimal.Problem,
    f: Forecast,
    sockets: np.ndarray,
    departure_steps: np.ndarray,
    need_kwh: np.ndarray,
    *,
    price_per_kwh: np.ndarray,
    carbon_kg_per_kwh: np.ndarray,
    stored_kwh: float,
    prev_import_kwh: float,
    keep_stored: bool,
    step_battery_kwh: float,
) -> Window:
    """The optimum's problem ``p`` over one window (``f``'s length) from what is known at its
    start: the forecast ``f`` (sessions' steps relative to the window's start), the
    plugged vehicles (``sockets``, steps to departure, battery-side need [kWh]), price
    and carbon over the window, the stored energy [kWh] and the last step's import
    [kWh]; ``keep_stored`` keeps the stored energy at the window's end at least its
    start. ``Mpc`` in simulation and the served MPC (``Planner``) both build it here."""
    n_w = f.pv_kwh.size
    arrival = np.concatenate([np.zeros(sockets.size, dtype=np.int64), f.arrival])
    departure = np.concatenate([departure_steps, f.departure])
    energy = np.concatenate([need_kwh, f.energy_kwh])
    # Leaving after the window: what full socket power after it cannot deliver is due by
    # its end (the safety layer's rule), so the window cannot postpone everything.
    after = np.maximum(departure - n_w, 0)
    energy = np.maximum(energy - after * step_battery_kwh, 0.0)
    departure = np.minimum(departure, n_w)
    # Forecast vehicles on virtual sockets beyond the site's, one each.
    socket = np.concatenate([sockets, p.n_sockets + np.arange(f.arrival.size)])
    # Without a battery (capacity 0) nothing is stored: keep the config's fraction.
    cap_kwh = p.bess.capacity_kwh
    soc_frac = stored_kwh / cap_kwh if cap_kwh > 0 else p.bess.initial_soc_frac
    bess = replace(p.bess, initial_soc_frac=soc_frac)
    problem = replace(
        p,
        pv_kwh=f.pv_kwh,
        load_kwh=f.load_kwh,
        price_per_kwh=price_per_kwh,
        carbon_kg_per_kwh=carbon_kg_per_kwh,
        bess=bess,
        n_sockets=p.n_sockets + f.arrival.size,
        session_socket=socket.astype(np.int64),
        session_arrival_step=arrival.astype(np.int64),
        session_departure_step=departure.astype(np.int64),
        session_energy_kwh=energy,
        final_energy_kwh_min=stored_kwh if keep_stored else None,
        initial_import_kwh=prev_import_kwh,
    )
    return Window(problem, sockets, departure[: sockets.size], f.home)


def socket_plan(w: Window, ev_grid_kwh: np.ndarray, n_real: int) -> np.ndarray:
    """The plan's grid-side energy per site socket and step [kWh].

    A vehicle plugged in at planning time keeps its socket until it leaves; after
    that, a socket takes what the plan gives the forecast vehicles homed there
    (``Forecast.home``; at most, where several overlap), for whoever arrives.
    """
    n_w = ev_grid_kwh.shape[1]
    ev = np.zeros((n_real, n_w))
    ev[w.sockets] = ev_grid_kwh[w.sockets]
    busy = np.zeros((n_real, n_w), dtype=bool)
    busy[w.sockets] = np.arange(n_w)[None, :] < w.plugged_departure[:, None]
    i, j = np.nonzero(ev_grid_kwh[n_real:] > 0)
    k = w.homes[i]
    keep = ~busy[k, j]
    np.maximum.at(ev, (k[keep], j[keep]), ev_grid_kwh[n_real + i[keep], j[keep]])
    return ev


@dataclass(frozen=True)
class Planner:
    """The served MPC's decision (``pvbess.deploy``): at every call it plans the next
    ``horizon`` steps from what it measures and the PV and load forecasts it is given
    (lead 1 .. horizon - 1), and acts on the plan's first step as ``Mpc`` does. Given
    ``arrivals`` (a ``Forecast``'s sessions, steps relative to now, arrivals >= 1) it
    plans for those vehicles too; without, only for the plugged ones (the safety layer
    serves any vehicle that comes).

    ``template`` is the optimum's problem without a period (physics, weights, scales).
    """

    template: optimal.Problem
    sockets: Sockets
    tariff: TariffConfig
    grid: GridConfig
    horizon: int
    terminal: str
    solve_options: dict[str, Any]
    bess_power_kw: float

    def act(
        self,
        m: Measured,
        pv_forecast_kwh: np.ndarray,
        load_forecast_kwh: np.ndarray,
        arrivals: Forecast | None = None,
    ) -> np.ndarray:
        s, p = self.sockets, self.template
        index = pd.date_range(m.time, periods=self.horizon, freq=pd.Timedelta(hours=STEP_HOURS))
        none = np.zeros(0, dtype=np.int64)
        sessions = arrivals or Forecast(none, none, none, none, np.zeros(0), none)
        f = replace(
            sessions,
            pv_kwh=np.concatenate([[m.pv_kwh], pv_forecast_kwh]),
            load_kwh=np.concatenate([[m.load_kwh], load_forecast_kwh]),
        )
        stored_kwh = float(np.clip(m.battery_soc_frac * p.ceiling_kwh, p.floor_kwh, p.ceiling_kwh))
        need_kwh = m.need_kwh(s.n_sockets)
        w = window_problem(
            p,
            f,
            m.plugged,
            np.asarray(m.departure_steps, dtype=np.int64),
            need_kwh[m.plugged],
            price_per_kwh=tariff.price_per_kwh(index, self.tariff).to_numpy(),
            carbon_kg_per_kwh=tariff.carbon_intensity_kg_per_kwh(index, self.grid).to_numpy(),
            stored_kwh=stored_kwh,
            prev_import_kwh=m.prev_import_kwh,
            keep_stored=self.terminal == "start",
            step_battery_kwh=s.step_kwh,
        )
        with _quiet(logging.getLogger(optimal.__name__)):
            sol = optimal.solve(w.problem, **self.solve_options)
        sched = sol.schedule
        bess = _per_rating(
            sched.bess_charge_kwh[0] - sched.bess_discharge_kwh[0], self.bess_power_kw * STEP_HOURS
        )
        ev_kwh = np.minimum(
            socket_plan(w, sched.ev_grid_kwh, s.n_sockets)[:, 0], need_kwh / s.charger_eff
        )
        return s.action(float(bess), ev_kwh / s.socket_kwh)


def planner_template(p: optimal.Problem) -> optimal.Problem:
    """The optimum's problem without its period: what a ``Planner`` fills per window."""
    empty = np.zeros(0)
    nothing = np.zeros(0, dtype=np.int64)
    return replace(
        p,
        pv_kwh=empty,
        load_kwh=empty,
        price_per_kwh=empty,
        carbon_kg_per_kwh=empty,
        session_socket=nothing,
        session_arrival_step=nothing,
        session_departure_step=nothing,
        session_energy_kwh=empty,
    )


LP_ONLY: dict[str, Any] = {
    "solver": "choose",
    "time_limit_s": 60.0,
    "threads": 0,
    "mip_rel_gap": 1e-6,
    "gap_tol_rel": math.inf,
    "max_rounds": 1,
    "measure_memory": False,
}


class Mpc(Controller):
    """Rolling-horizon optimum on forecasts (see the module docstring)."""

    def __init__(
        self,
        env: gym.Env,
        seed: int | None = None,
        device: Any = None,
        name: str | None = None,
        horizon_h: float = 24,
        replan_every_h: float = 1,
        forecast: str = "perfect",
        forecast_pv: str | None = None,
        forecast_load: str | None = None,
        forecast_arrivals: str | None = None,
        forecast_fit_seeds: Sequence[int] = (1, 2, 3),
        terminal: str = "start",
        noise_frac_at_24h: float = 0.2,
        exact: bool = False,
        solver: str = "choose",
        time_limit_s: float = 60.0,
        threads: int = 0,
        mip_rel_gap: float = 1e-6,
        gap_tol_rel: float = 1e-6,
        max_rounds: int = 20,
        full_period_bound: bool = True,
        log_every_h: float = 720,
    ) -> None:
        self.horizon = _steps("agent.horizon_h", horizon_h)
        self.replan = _steps("agent.replan_every_h", replan_every_h)
        if self.replan > self.horizon:
            raise ConfigError(
                f"agent.replan_every_h: {replan_every_h} h exceeds agent.horizon_h = "
                f"{horizon_h} h (a plan must cover the steps until the next replan)"
            )
        kinds = {"pv": forecast_pv, "load": forecast_load, "arrivals": forecast_arrivals}
        given = {f"forecast_{k}": v for k, v in kinds.items() if v is not None}
        for key, kind in {"forecast": forecast, **given}.items():
            if kind not in FORECASTS:
                raise ConfigError(f"agent.{key}: {kind!r}, choose one of {', '.join(FORECASTS)}")
        if forecast_arrivals in ("average", "learned"):
            raise ConfigError(
                f"agent.forecast_arrivals: {forecast_arrivals!r} forecasts PV and load only; "
                "arrivals: perfect, persistence or noisy"
            )
        if terminal not in TERMINALS:
            raise ConfigError(f"agent.terminal: {terminal!r}, choose one of {', '.join(TERMINALS)}")
        if not (math.isfinite(noise_frac_at_24h) and noise_frac_at_24h >= 0):
            raise ConfigError(f"agent.noise_frac_at_24h: must be >= 0, got {noise_frac_at_24h}")
        if not time_limit_s > 0:
            raise ConfigError(f"agent.time_limit_s: must be > 0, got {time_limit_s}")
        super().__init__(env, seed=seed, device=device, name=name)
        e = self.env
        self.forecast = forecast
        # What each signal's forecast is: the override, else ``forecast``.
        self.forecasts: dict[str, str] = {k: v or forecast for k, v in kinds.items()}
        if self.forecasts["arrivals"] in ("average", "learned"):
            # forecast=average or learned without forecast_arrivals: yesterday's arrivals.
            self.forecasts["arrivals"] = "persistence"
        self.terminal = terminal
        self.noise_frac_at_24h = float(noise_frac_at_24h)
        self.full_period_bound = full_period_bound
        self.log_every = max(round(log_every_h / STEP_HOURS), 1)
        self.solve_options: dict[str, Any] = {
            "solver": solver,
            "time_limit_s": float(time_limit_s),
            "threads": int(threads),
            "mip_rel_gap": float(mip_rel_gap),
            # The LP alone: no window, block or whole-horizon MILP is tried.
            "gap_tol_rel": float(gap_tol_rel) if exact else math.inf,
            "max_rounds": int(max_rounds) if exact else 1,
        }
        self.exact = exact
        self.problem = optimal.Problem.from_dataset(e.dataset, e.weights, e.scales)
        p = self.problem
        # The forecasts' sessions must be the ones the simulator plays, cell for cell.
        if not np.array_equal(optimal.plugged_mask(p), e.backend.state[:, : p.n_steps] == 1):
            raise RuntimeError("the dataset's sessions differ from the simulator's charger states")
        self.sessions = Sessions.of_problem(p)
        # The learned forecasts' predictions for every step [days back, step] [kWh].
        self._learned = self._fit_learned(e, [int(s) for s in forecast_fit_seeds])
        self._soc_index = e.backend.observation_names.index("electrical_storage_soc")
        self.ceiling_kwh = p.ceiling_kwh
        self.step_battery_kwh = self.socket_kwh * self.charger_eff
        self._rng_seed = abs(int(seed if seed is not None else e.site.seed))
        self._optimal_log = logging.getLogger(optimal.__name__)
        self._plan_t0 = -1  # the step the current plan starts at; -1: none
        self._plan_bess = np.zeros(0)  # battery action per step of the plan
        self._plan_ev_kwh = np.zeros((e.n_sockets, 0))  # grid-side energy [socket, step]
        self._last_t = -1
        self.stats = _Stats()
        self.policy = Planner(
            template=planner_template(p),
            sockets=self.sockets,
            tariff=e.site.tariff,
            grid=e.site.grid,
            horizon=self.horizon,
            terminal=terminal,
            solve_options=self.solve_options,
            bess_power_kw=self.bess_power_kw,
        )
        self.last_solution: optimal.Solution | None = None

    def _fit_learned(self, e: Any, seeds: list[int]) -> dict[str, np.ndarray]:
        """Fit ``learned`` forecasts on the site's years of ``seeds`` (built beside the
        evaluated dataset, as a learner's training years are) and predict the evaluated
        year with them; {} when no signal is learned. ConfigError when a fit year is the
        evaluated one: its forecast would have seen the answers."""
        keys = [k for k in LEARNED_SIGNALS if self.forecasts[k] == "learned"]
        if not keys:
            return {}
        from pvbess.site import dataset as ds_module

        if not seeds:
            raise ConfigError("agent.forecast_fit_seeds: forecast=learned needs a year to fit on")
        ds = e.dataset
        years = [ds_module.build(replace(ds.site, seed=s), ds.root.parent) for s in seeds]
        for seed, year in zip(seeds, years, strict=True):
            if year.data_hash == ds.data_hash:
                raise ConfigError(
                    f"agent.forecast_fit_seeds: the year of seed {seed} is the evaluated "
                    f"year (site.seed={ds.site.seed}); fit the learned forecast on other years"
                )
            for key in keys:
                # A series read from a file is the same whatever the seed.
                column = f"{key}_kwh"
                if np.array_equal(year.series[column], ds.series[column]):
                    raise ConfigError(
                        f"agent.forecast_fit_seeds: the {key} series of seed {seed}'s year is "
                        f"the evaluated year's (site.{key}.source=csv gives every seed the "
                        f"same one); a learned {key} forecast needs other years of it"
                    )
        p = self.problem
        index = ds.index[: p.n_steps]
        max_days_back = max(-(-(self.horizon - 1) // site_forecast.DAY_STEPS), 1)
        out = {}
        for key in keys:
            column = f"{key}_kwh"
            model = site_forecast.Learned(
                [(y.series[column].to_numpy(), y.index) for y in years], max_days_back
            )
            out[key] = model.predictions(getattr(p, column), index)
        log.info("learned %s forecasts fitted on site seeds %s", "/".join(keys), seeds)
        return out

    # -- what the controller knows at step t ------------------------------------------------
    def stored_kwh(self, observation: np.ndarray) -> float:
        """The battery's stored energy from the observed SOC [kWh], inside the SOC window."""
        core, i = self.env.core, self._soc_index
        soc = float(np.asarray(observation).reshape(-1)[i]) * core.obs_span[i] + core.obs_low[i]
        return float(np.clip(soc * self.ceiling_kwh, self.problem.floor_kwh, self.ceiling_kwh))

    def plugged(self, t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Plugged vehicles' sockets, absolute departure steps and battery-side need [kWh]."""
        b = self.env.backend
        sockets = np.flatnonzero(b.state[:, t] == 1)
        if not sockets.size:
            return sockets, np.zeros(0, dtype=np.int64), np.zeros(0)
        soc, cap = self.env.ev_soc_and_capacity(sockets)
        need = np.maximum(b.required_soc[sockets, t] - soc, 0.0) * cap
        return sockets, t + b.departure_steps[sockets, t].astype(np.int64), need

    def forecast_window(self, t: int, n_w: int) -> Forecast:
        """PV, load and future sessions over [t, t + n_w) as ``forecasts`` predict them.

        Lead 0 (the current hour) is measured; vehicles arriving now are plugged in.
        """
        p = self.problem
        lead = np.arange(n_w)
        kind = self.forecasts
        ss = self.sessions
        if kind["arrivals"] == "persistence":
            f = ss.persistence(t, n_w, p.n_steps)
        else:
            idx, _ = ss.arriving(t + lead[1:])
            f = Forecast(
                pv_kwh=np.zeros(0),
                load_kwh=np.zeros(0),
                arrival=ss.arrival[idx],
                departure=ss.departure[idx],
                energy_kwh=ss.energy_kwh[idx].copy(),
                home=ss.socket[idx],
            )
        # The last observed day at that hour; before the first day, the first day's.
        src = site_forecast.persistence_source(t, lead, p.n_steps)
        f.pv_kwh, f.load_kwh = (
            self._series_window(kind[key], key, series, t, src)
            for key, series in (("pv", p.pv_kwh), ("load", p.load_kwh))
        )
        if "noisy" in kind.values():
            # Drawn in a fixed order (PV, load, sessions): one seed, one set of errors.
            rng = np.random.default_rng([self._rng_seed, t])
            std = site_forecast.noise_std(lead, self.noise_frac_at_24h)
            if kind["pv"] == "noisy":
                f.pv_kwh *= np.maximum(1.0 + std * rng.standard_normal(n_w), 0.0)
            if kind["load"] == "noisy":
                f.load_kwh *= np.maximum(1.0 + std * rng.standard_normal(n_w), 0.0)
            if kind["arrivals"] == "noisy":
                noise = std[f.arrival - t] * rng.standard_normal(f.arrival.size)
                f.energy_kwh *= np.maximum(1.0 + noise, 0.0)
        return f

    def _series_window(
        self, kind: str, key: str, series: np.ndarray, t: int, src: np.ndarray
    ) -> np.ndarray:
        """One series over [t, t + src.size) as ``kind`` forecasts it (lead 0 measured)."""
        if kind == "persistence":
            return series[src]
        out = series[t : t + src.size].copy()
        if kind == "average":
            lead = np.arange(1, src.size)
            out[1:] = series[site_forecast.average_source(t, lead, series.size)].mean(axis=-1)
        elif kind == "learned":
            lead = np.arange(1, src.size)
            out[1:] = self._learned[key][-(-lead // site_forecast.DAY_STEPS) - 1, t + lead]
        return out

    def window(self, t: int, stored_kwh: float, prev_import_kwh: float = 0.0) -> Window:
        """The optimum's problem over [t, t + horizon) as the controller sees it at step t,
        ``prev_import_kwh`` the grid import realized in step t - 1 [kWh]."""
        p = self.problem
        n_w = min(self.horizon, p.n_steps - t)
        end = t + n_w
        f = self.forecast_window(t, n_w)
        self._score_forecast(t, n_w, f)
        sockets, dep, need = self.plugged(t)
        f.arrival, f.departure = f.arrival - t, f.departure - t
        return window_problem(
            p,
            f,
            sockets,
            dep - t,
            need,
            price_per_kwh=p.price_per_kwh[t:end],
            carbon_kg_per_kwh=p.carbon_kg_per_kwh[t:end],
            stored_kwh=stored_kwh,
            prev_import_kwh=prev_import_kwh,
            keep_stored=self.terminal == "start" and end < p.n_steps,
            step_battery_kwh=self.step_battery_kwh,
        )

    def _score_forecast(self, t: int, n_w: int, f: Forecast) -> None:
        """Absolute errors of the forecast steps (lead >= 1) against the dataset."""
        if n_w < 2:
            return
        p, st = self.problem, self.stats
        truth = slice(t + 1, t + n_w)
        ss = self.sessions
        idx, _ = ss.arriving(np.arange(t + 1, t + n_w))
        ev_true = np.bincount(ss.arrival[idx] - t, ss.energy_kwh[idx], minlength=n_w)[1:]
        ev_hat = np.bincount(f.arrival - t, f.energy_kwh, minlength=n_w)[1:]
        for key, hat, true in (
            ("pv", f.pv_kwh[1:], p.pv_kwh[truth]),
            ("load", f.load_kwh[1:], p.load_kwh[truth]),
            ("ev", ev_hat, ev_true),
        ):
            st.abs_err[key] += float(np.abs(hat - true).sum())
            st.actual_sum[key] += float(true.sum())
        st.n_forecast += n_w - 1

    # -- planning and acting -------------------------------------------------------------------
    def _socket_plan(self, w: Window, ev_grid_kwh: np.ndarray) -> np.ndarray:
        """The plan's grid-side energy per site socket and step [kWh].

        A vehicle plugged in at planning time keeps its socket until it leaves; after
        that, a socket takes what the plan gives the forecast vehicles homed there
        (``Forecast.home``; at most, where several overlap), for whoever arrives.
        """
        return socket_plan(w, ev_grid_kwh, self.env.n_sockets)

    def plan(self, t: int, observation: np.ndarray) -> None:
        """Solve the window starting at step t; keep its actions until the next replan."""
        started = time.perf_counter()
        w = self.window(t, self.stored_kwh(observation), self.env.last_grid_import_kwh)
        with _quiet(self._optimal_log):
            sol = optimal.solve(w.problem, **self.solve_options)
        s = sol.schedule
        self._plan_bess = _per_rating(
            s.bess_charge_kwh - s.bess_discharge_kwh, self.bess_power_kw * STEP_HOURS
        )
        self._plan_ev_kwh = self._socket_plan(w, s.ev_grid_kwh)
        self._plan_t0 = t
        self.last_solution = sol
        self._record(t, sol, time.perf_counter() - started)

    def _record(self, t: int, sol: optimal.Solution, seconds: float) -> None:
        st = self.stats
        st.replans += 1
        st.solve_s.append(seconds)
        st.window_gap_rel.append(sol.relaxation_gap_rel)
        st.overlap_windows += int(sol.steps_realized > 0)
        st.not_exact_windows += int(self.exact and sol.status != "Optimal")
        st.variables = max(st.variables, sol.n_variables)
        if st.replans % max(self.log_every // self.replan, 1) == 0:
            total = float(np.sum(st.solve_s))
            log.info(
                "mpc: step %d/%d, %d replans, solves %.1f s (mean %.1f ms, max %.1f ms)",
                t,
                self.problem.n_steps,
                st.replans,
                total,
                1e3 * total / st.replans,
                1e3 * max(st.solve_s),
            )

    def predict(
        self, observation: np.ndarray, deterministic: bool = True
    ) -> tuple[np.ndarray, None]:
        t = self.env._t
        if t <= self._last_t:  # a new episode
            self.stats, self._plan_t0 = _Stats(), -1
        self._last_t = t
        j = t - self._plan_t0
        if self._plan_t0 < 0 or j >= min(self.replan, len(self._plan_bess)):
            self.plan(t, observation)
            j = 0
        # What each vehicle still needs caps the plan: a forecast vehicle is not the one
        # that came (the safety layer raises the rest).
        need_grid_kwh = self.ev_need_kwh(t) / self.charger_eff
        ev_kwh = np.minimum(self._plan_ev_kwh[:, j], need_grid_kwh)
        return self._action(float(self._plan_bess[j]), ev_kwh / self.socket_kwh), None

    # -- figures -------------------------------------------------------------------------------
    def metrics(self, timeseries: pd.DataFrame | None = None) -> dict[str, float]:
        """Figures for tracking, namespaced ``mpc/``; with the episode, its gap to the LP bound."""
        st = self.stats
        solve_s = np.asarray(st.solve_s) if st.solve_s else np.zeros(1)
        gaps = np.asarray(st.window_gap_rel) if st.window_gap_rel else np.zeros(1)
        n = max(st.n_forecast, 1)
        out = {
            "mpc/replans": float(st.replans),
            "mpc/solve_seconds_total": float(solve_s.sum()),
            "mpc/solve_seconds_mean": float(solve_s.mean()),
            "mpc/solve_seconds_max": float(solve_s.max()),
            "mpc/window_variables_max": float(st.variables),
            "mpc/window_gap_rel_mean": float(gaps.mean()),
            "mpc/window_gap_rel_max": float(gaps.max()),
            "mpc/windows_overlapping": float(st.overlap_windows),
        }
        if self.exact:
            out["mpc/windows_not_exact"] = float(st.not_exact_windows)
        for key in ("pv", "load", "ev"):
            out[f"mpc/forecast_mae_{key}_kwh"] = st.abs_err[key] / n
            out[f"mpc/forecast_mae_{key}_rel"] = st.abs_err[key] / max(st.actual_sum[key], 1e-9)
        if timeseries is not None and len(timeseries):
            objective = -float(timeseries["reward_total"].sum())
            out["mpc/objective"] = objective
            out["mpc/ev_forced_kwh"] = float(timeseries["ev_forced_kwh"].sum())
            if self.full_period_bound and len(timeseries) == self.problem.n_steps:
                out |= self._bound(objective)
        return out

    def _bound(self, objective: float) -> dict[str, float]:
        """The whole period's LP bound (perfect foresight, free end) and the episode's gap."""
        with _quiet(self._optimal_log):
            sol = optimal.solve(self.problem, **(self.solve_options | {"gap_tol_rel": math.inf}))
        bound = sol.objective_bound
        return {
            "mpc/lp_bound": bound,
            "mpc/gap_to_lp_bound_rel": (objective - bound) / max(abs(bound), 1e-9),
        }


__all__ = [
    "FORECASTS",
    "TERMINALS",
    "Mpc",
    "Planner",
    "Sessions",
    "parse_sessions",
    "sessions_json",
    "socket_plan",
    "window_problem",
]
