"""The perfect-foresight optimum over the whole period, solved with HiGHS.

Variables per step [kWh per hourly step]: grid import, PV used, battery charge
and discharge (grid side) and stored energy; per plugged-in (socket, step) the
socket's grid-side energy. The battery follows CityLearn's model with the schema
pvbess writes (``pvbess.site.battery``): stored += charge x sqrt(rt_eff) - discharge /
sqrt(rt_eff), between the SOC window's floor and ceiling. Every session receives
exactly its required battery-side energy (equal service; an unreachable session
gets full socket power throughout, as the env's safety layer gives it). The
objective is the reward's weighted sum (``pvbess.sim.reward``), which is linear here:
CO2 and cost in import, curtailment = PV - PV used, import above the peak
threshold and |change of import| through slacks.

Why the LP alone is not the optimum. CityLearn takes one net battery action per
step and derives import and curtailment from the net consumption, so a step
never charges and discharges at once, nor imports while PV is curtailed. The
LP's variables allow both, and each is a free disposal of energy: charging x and
discharging y in one step draws x - y but stores only eta x - y / eta (eta =
sqrt(rt_eff)); importing while curtailing draws grid energy the PV could have
covered. Disposal pays wherever the objective falls as consumption rises: the
solar term while PV is curtailed (a full battery "burns" surplus PV: the plain
LP did so in 3,305 steps of iquitos_mall_128 under ``balanced``) and the ramp
term, where extra import fills a dip. The CO2, cost and peak terms only grow
with consumption, so under ``co2_only`` overlaps are at most degenerate.

No linear program over these variables is exact in general. In one step
CityLearn's battery reaches the points (b, min(eta b, b / eta)), b in [-P, P]: a
concave curve, whose convex hull (the triangle (0, 0), (P, eta P), (-P, -P / eta))
holds disposals; likewise (import, curtailed) = (max(u, 0), max(-u, 0)). A convex
model of these points contains their hull, and the solar or ramp term can then
profit. ``_build`` adds rows that every CityLearn schedule without export
satisfies (``VALID_ROWS``), which take most of the profit away: dis - sum(ev) <=
load (a discharging step only feeds the site); pv_used + dis - sum(ev) <=
max(load, PV) (a charging step uses at most all the PV, a discharging one leaves
PV only the load it does not cover); ch / P + dis / D <= 1 with D = min(P, the
step's largest load + EV) (the hull of "charge or discharge"); PV x import / M <=
pv_used with M the step's largest import (the hull of "import or curtail"). The
plain LP's bound on iquitos_mall_128 (balanced) rises from 150.63 to 169.83 with
them; the exact optimum is 171.686.

``solve`` then makes the optimum exact:

1. The LP gives the first bound. Its solution, realized as net actions
   (``_realize``: the LP's stored-energy trajectory, import and curtailment from
   the net consumption by the env's definitions), is the first schedule. Where it
   does not overlap, its realized objective equals the bound: done.
2. Horizons longer than ``WINDOW_STEPS``: the exact model (a binary per step for
   "charge or discharge", per step with PV for "import or curtail"; big-Ms from
   the data) is solved window by window (``_polish``: 24 steps every 12, all
   other columns fixed, each window a small MILP started from the current
   schedule), which gives an exact schedule. A lower bound on the exact optimum
   comes from Lagrangian decomposition (``_block_bound``): the rows linking
   24-step blocks (stored energy, ramp, sessions across a boundary) are priced
   with the LP's duals and dropped; the sum of the blocks' MILP bounds is a lower
   bound for any prices. On iquitos_mall_128 the two meet to 1e-8.
3. While the gap between the best schedule and the best bound exceeds
   ``gap_tol_rel``: a MILP over the whole horizon with binaries on the steps where
   the last solution overlaps (first the LP's), started from the best schedule;
   its dual bound is valid (binaries on some steps relax the exact model), its
   solution is realized and checked again. Each round adds binaries, so the loop
   ends, at worst with the exact model.

Every MILP uses HiGHS's ``mip_rel_gap``; ``Solution.metrics()`` reports the gap
left between the realized schedule and the best bound (``lp/relaxation_gap_rel``).
The optimum is over schedules that push no battery energy out to the island grid
(``bess_export_kwh``, which CityLearn allows); on iquitos_mall_128 letting the LP
dump energy in PV-free steps leaves its bound unchanged.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import highspy
import numpy as np
import pandas as pd
import scipy.sparse as sp

from pvbess.config import BessConfig, RewardWeights
from pvbess.sim import reward as rw
from pvbess.site.battery import one_way_efficiency_frac
from pvbess.site.dataset import SiteDataset

log = logging.getLogger(__name__)

STEP_HOURS = 1.0


@dataclass(frozen=True)
class Problem:
    """Everything the LP needs, as plain arrays [kWh per step, currency/kWh, kg/kWh]."""

    pv_kwh: np.ndarray
    load_kwh: np.ndarray
    price_per_kwh: np.ndarray
    carbon_kg_per_kwh: np.ndarray
    bess: BessConfig
    socket_power_kw: float
    charger_efficiency_frac: float
    n_sockets: int
    # One entry per session: socket index (action order), steps [arrival, departure),
    # battery-side energy it must receive [kWh].
    session_socket: np.ndarray
    session_arrival_step: np.ndarray
    session_departure_step: np.ndarray
    session_energy_kwh: np.ndarray
    weights: RewardWeights
    scales: rw.RewardScales
    # Lowest stored energy at the end of the period [kWh]; None = free, like every controller.
    final_energy_kwh_min: float | None = None

    @property
    def n_steps(self) -> int:
        return len(self.load_kwh)

    @property
    def floor_kwh(self) -> float:
        return self.bess.capacity_kwh * self.bess.soc_min_frac

    @property
    def ceiling_kwh(self) -> float:
        return self.bess.capacity_kwh * self.bess.soc_max_frac

    @property
    def initial_kwh(self) -> float:
        return self.bess.capacity_kwh * self.bess.initial_soc_frac

    @property
    def socket_kwh(self) -> float:
        """Grid-side energy one socket can deliver in a step [kWh]."""
        return self.socket_power_kw * STEP_HOURS

    @classmethod
    def from_dataset(
        cls,
        dataset: SiteDataset,
        weights: RewardWeights,
        scales: rw.RewardScales,
        final_soc_frac_min: float | None = None,
    ) -> Problem:
        """The LP of a built site dataset under the given reward."""
        site = dataset.site
        bess = site.bess
        if final_soc_frac_min is not None and not (
            bess.soc_min_frac <= final_soc_frac_min <= bess.soc_max_frac
        ):
            raise ValueError(
                f"final_soc_frac_min={final_soc_frac_min} lies outside the SOC window "
                f"[{bess.soc_min_frac}, {bess.soc_max_frac}]"
            )
        s = dataset.sessions
        position = {sid: i for i, (sid, _) in enumerate(dataset.sockets)}
        delta_soc_frac = (s["required_soc_frac"] - s["arrival_soc_frac"]).clip(lower=0)
        energy_kwh = delta_soc_frac * s["battery_kwh"]
        series = dataset.series
        return cls(
            pv_kwh=series["pv_kwh"].to_numpy(dtype=np.float64),
            load_kwh=series["load_kwh"].to_numpy(dtype=np.float64),
            price_per_kwh=series["price_per_kwh"].to_numpy(dtype=np.float64),
            carbon_kg_per_kwh=series["carbon_kg_per_kwh"].to_numpy(dtype=np.float64),
            bess=site.bess,
            socket_power_kw=site.ev.socket_power_kw,
            charger_efficiency_frac=site.ev.charger_efficiency_frac,
            n_sockets=dataset.n_sockets,
            session_socket=s["socket_id"].map(position).to_numpy(dtype=np.int64),
            session_arrival_step=s["arrival_step"].to_numpy(dtype=np.int64),
            session_departure_step=s["departure_step"].to_numpy(dtype=np.int64),
            session_energy_kwh=energy_kwh.to_numpy(dtype=np.float64),
            weights=weights,
            scales=scales,
            final_energy_kwh_min=(
                None if final_soc_frac_min is None else final_soc_frac_min * site.bess.capacity_kwh
            ),
        )


@dataclass
class Schedule:
    """A realizable schedule and what it does, by the env's definitions [kWh per step]."""

    bess_charge_kwh: np.ndarray
    bess_discharge_kwh: np.ndarray
    bess_energy_kwh: np.ndarray  # stored at the end of each step
    ev_grid_kwh: np.ndarray  # [socket, step], grid side
    grid_import_kwh: np.ndarray
    pv_curtailed_kwh: np.ndarray
    co2_kg: np.ndarray
    cost: np.ndarray
    ev_unmet_kwh: np.ndarray
    components: dict[str, np.ndarray]
    reward_total: np.ndarray

    @property
    def objective(self) -> float:
        """The LP's objective for this schedule: minus the episode's summed reward [-]."""
        return -float(self.reward_total.sum())


@dataclass
class Solution:
    """The optimum's result: the realizable schedule, the bound, and the solver's figures."""

    schedule: Schedule
    objective_bound: float  # the best lower bound on any controller's objective (LP or MILP) [-]
    status: str
    n_variables: int
    n_constraints: int
    n_nonzeros: int
    build_seconds: float
    solve_seconds: float
    peak_memory_mb: float
    steps_realized: int  # steps of the final solution realized with a change (overlaps)
    unreachable_sessions: int
    extra: dict[str, float] = field(default_factory=dict)
    objective_lp: float = float("nan")  # the plain LP's optimum [-]
    objective_solver: float = float("nan")  # the last solve's objective (its primal value) [-]
    steps_relaxed_lp: int = 0  # steps where the plain LP overlapped
    binaries: int = 0  # binary variables in the last MILP (0: the LP was exact)
    mip_gap: float | None = None  # HiGHS's relative gap of the last MILP; None if none was solved
    rounds: int = 1  # solves: the LP, then one per MILP

    @property
    def objective(self) -> float:
        return self.schedule.objective

    @property
    def relaxation_gap_rel(self) -> float:
        """(realized objective - best bound) / |bound|: 0 when the schedule is optimal [-]."""
        return (self.objective - self.objective_bound) / max(abs(self.objective_bound), 1e-9)

    def metrics(self) -> dict[str, float]:
        """Figures for tracking, namespaced ``lp/``."""
        s = self.schedule
        out = {
            "lp/objective": self.objective,
            "lp/objective_bound": self.objective_bound,
            "lp/objective_lp": self.objective_lp,
            "lp/objective_solver": self.objective_solver,
            "lp/relaxation_gap": self.objective - self.objective_bound,
            "lp/relaxation_gap_rel": self.relaxation_gap_rel,
            "lp/binaries": float(self.binaries),
            "lp/rounds": float(self.rounds),
            "lp/co2_kg": float(s.co2_kg.sum()),
            "lp/grid_import_kwh": float(s.grid_import_kwh.sum()),
            "lp/cost": float(s.cost.sum()),
            "lp/pv_curtailed_kwh": float(s.pv_curtailed_kwh.sum()),
            "lp/ev_energy_kwh": float(s.ev_grid_kwh.sum()),
            "lp/ev_unmet_kwh": float(s.ev_unmet_kwh.sum()),
            "lp/unreachable_sessions": float(self.unreachable_sessions),
            "lp/steps_realized": float(self.steps_realized),
            "lp/steps_relaxed_lp": float(self.steps_relaxed_lp),
            "lp/variables": float(self.n_variables),
            "lp/constraints": float(self.n_constraints),
            "lp/nonzeros": float(self.n_nonzeros),
            "lp/build_seconds": self.build_seconds,
            "lp/solve_seconds": self.solve_seconds,
            "lp/peak_memory_mb": self.peak_memory_mb,
        }
        if self.mip_gap is not None:
            out["lp/mip_gap"] = self.mip_gap
        return out | self.extra


@dataclass(frozen=True)
class _Layout:
    """Column offsets of each variable block."""

    n_steps: int
    n_cells: int
    with_grid: bool

    @property
    def imp(self) -> int:
        return 0

    @property
    def pvu(self) -> int:
        return self.n_steps

    @property
    def ch(self) -> int:
        return 2 * self.n_steps

    @property
    def dis(self) -> int:
        return 3 * self.n_steps

    @property
    def soc(self) -> int:
        return 4 * self.n_steps

    @property
    def ev(self) -> int:
        return 5 * self.n_steps

    @property
    def over(self) -> int:
        return self.ev + self.n_cells

    @property
    def rup(self) -> int:
        return self.over + self.n_steps

    @property
    def rdn(self) -> int:
        return self.rup + self.n_steps

    @property
    def n_cols(self) -> int:
        return self.ev + self.n_cells + (3 * self.n_steps if self.with_grid else 0)


@dataclass
class _Cells:
    """Plugged-in (session, step) cells: one EV variable each."""

    session: np.ndarray
    step: np.ndarray
    socket: np.ndarray
    reachable: np.ndarray  # per session


def _cells(p: Problem) -> _Cells:
    arrival, departure = p.session_arrival_step, p.session_departure_step
    if np.any(arrival < 0) or np.any(departure > p.n_steps) or np.any(departure <= arrival):
        raise ValueError("session steps must satisfy 0 <= arrival < departure <= n_steps")
    lengths = departure - arrival
    n_cells = int(lengths.sum())
    session = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    step = np.repeat(arrival, lengths) + np.arange(n_cells) - np.repeat(starts, lengths)
    socket = p.session_socket[session]
    # Two sessions on one socket at once would make the per-socket power limit wrong.
    occupied = np.zeros((p.n_sockets, p.n_steps), dtype=np.int64)
    np.add.at(occupied, (socket, step), 1)
    if occupied.max(initial=0) > 1:
        raise ValueError("two sessions overlap on one socket")
    deliverable_kwh = lengths * p.socket_kwh * p.charger_efficiency_frac
    reachable = p.session_energy_kwh <= deliverable_kwh * (1 + 1e-12)
    return _Cells(session=session, step=step, socket=socket, reachable=reachable)


def plugged_mask(p: Problem) -> np.ndarray:
    """True where a vehicle is plugged in [socket, step], from the sessions."""
    cells = _cells(p)
    mask = np.zeros((p.n_sockets, p.n_steps), dtype=bool)
    mask[cells.socket, cells.step] = True
    return mask


# Add the rows every CityLearn schedule without export satisfies (see the module docstring):
# they tighten the LP and every MILP's relaxation. False = the plain LP (for tests).
VALID_ROWS = True


def _max_import_kwh(p: Problem, cells: _Cells) -> np.ndarray:
    """The largest import each step can have [kWh]: load, full charge, every plugged socket."""
    plugged = np.bincount(cells.step, minlength=p.n_steps)
    return p.load_kwh + p.bess.power_kw * STEP_HOURS + plugged * p.socket_kwh


def _discharge_cap_kwh(p: Problem, cells: _Cells) -> np.ndarray:
    """The most the battery can discharge in each step without export [kWh]."""
    plugged = np.bincount(cells.step, minlength=p.n_steps)
    return np.minimum(p.bess.power_kw * STEP_HOURS, p.load_kwh + plugged * p.socket_kwh)


def _unreachable_unmet_kwh(p: Problem, cells: _Cells) -> np.ndarray:
    """Energy unreachable sessions still miss, on their last step as the env records it [kWh]."""
    lengths = p.session_departure_step - p.session_arrival_step
    gap = p.session_energy_kwh - lengths * p.socket_kwh * p.charger_efficiency_frac
    gap = np.where(~cells.reachable & (gap > 1e-6), gap, 0.0)
    unmet = np.zeros(p.n_steps)
    np.add.at(unmet, p.session_departure_step - 1, gap)
    return unmet


def _build(p: Problem, cells: _Cells) -> tuple[sp.csc_matrix, dict[str, np.ndarray], float]:
    """Constraint matrix, bounds and costs (vectorised, no loop over steps or cells)."""
    n = p.n_steps
    w, sc = p.weights, p.scales
    with_grid = w.grid > 0
    lay = _Layout(n_steps=n, n_cells=len(cells.step), with_grid=with_grid)
    eta = one_way_efficiency_frac(p.bess)
    t = np.arange(n)
    e = np.arange(lay.n_cells)
    rows: list[np.ndarray] = []
    cols: list[np.ndarray] = []
    vals: list[np.ndarray] = []

    def add(r: np.ndarray, c: np.ndarray, v: float | np.ndarray) -> None:
        rows.append(r)
        cols.append(c)
        vals.append(np.broadcast_to(np.asarray(v, dtype=np.float64), r.shape))

    # Rows 0..n-1, power balance: pv_used + import + discharge - charge - sum(ev) = load.
    add(t, lay.pvu + t, 1.0)
    add(t, lay.imp + t, 1.0)
    add(t, lay.dis + t, 1.0)
    add(t, lay.ch + t, -1.0)
    add(cells.step, lay.ev + e, -1.0)
    # Rows n..2n-1, battery: stored_t - stored_{t-1} - eta*charge + discharge/eta = 0.
    add(n + t, lay.soc + t, 1.0)
    add(n + t[1:], lay.soc + t[:-1], -1.0)
    add(n + t, lay.ch + t, -eta)
    add(n + t, lay.dis + t, 1.0 / eta)
    # One row per reachable session: charger_eff * sum(ev) = required battery-side energy.
    reach_idx = np.flatnonzero(cells.reachable)
    row_of_session = np.full(len(cells.reachable), -1)
    row_of_session[reach_idx] = 2 * n + np.arange(reach_idx.size)
    in_row = cells.reachable[cells.session]
    add(row_of_session[cells.session[in_row]], lay.ev + e[in_row], p.charger_efficiency_frac)
    n_rows = 2 * n + reach_idx.size
    row_lower = np.concatenate([p.load_kwh, np.zeros(n), p.session_energy_kwh[reach_idx]])
    row_lower[n] = p.initial_kwh  # the first battery row has no stored_{-1}: move it right
    row_upper = row_lower.copy()
    if with_grid:
        # Import above the threshold: import - over <= threshold.
        add(n_rows + t, lay.imp + t, 1.0)
        add(n_rows + t, lay.over + t, -1.0)
        # Ramp: import_t - import_{t-1} - up + down = 0 (the env starts from 0 import).
        add(n_rows + n + t, lay.imp + t, 1.0)
        add(n_rows + n + t[1:], lay.imp + t[:-1], -1.0)
        add(n_rows + n + t, lay.rup + t, -1.0)
        add(n_rows + n + t, lay.rdn + t, 1.0)
        row_lower = np.concatenate([row_lower, np.full(n, -np.inf), np.zeros(n)])
        row_upper = np.concatenate([row_upper, np.full(n, sc.peak_threshold_kwh), np.zeros(n)])
        n_rows += 2 * n

    if VALID_ROWS:
        # Rows every CityLearn schedule satisfies (one net battery action per step, no
        # export); they cut most of the LP's disposal (see the module docstring).
        # Discharge goes only into the site's load and vehicles: dis - sum(ev) <= load.
        power_kwh = p.bess.power_kw * STEP_HOURS
        add(n_rows + t, lay.dis + t, 1.0)
        add(n_rows + cells.step, lay.ev + e, -1.0)
        # A discharging step uses PV only for what the battery does not cover, a charging
        # one at most all of it: pv_used + dis - sum(ev) <= max(load, PV).
        add(n_rows + n + t, lay.pvu + t, 1.0)
        add(n_rows + n + t, lay.dis + t, 1.0)
        add(n_rows + n + cells.step, lay.ev + e, -1.0)
        # The hull of "charge or discharge": ch / P + dis / D <= 1, with D = min(P, the
        # step's largest load + EV).
        cap = _discharge_cap_kwh(p, cells)
        add(n_rows + 2 * n + t, lay.ch + t, 1.0)
        # (Where D = 0 the first row already keeps dis at 0.)
        add(
            n_rows + 2 * n + t,
            lay.dis + t,
            np.where(cap > 0, power_kwh / np.maximum(cap, 1e-12), 1.0),
        )
        # The hull of "import or curtail" where PV can be curtailed:
        # PV x import / M - pv_used <= 0, with M the step's largest import.
        sunny = np.flatnonzero(p.pv_kwh > 0)
        hull_rows = n_rows + 3 * n + np.arange(sunny.size)
        add(hull_rows, lay.imp + sunny, p.pv_kwh[sunny] / _max_import_kwh(p, cells)[sunny])
        add(hull_rows, lay.pvu + sunny, -1.0)
        row_lower = np.concatenate([row_lower, np.full(3 * n + sunny.size, -np.inf)])
        row_upper = np.concatenate(
            [
                row_upper,
                p.load_kwh,
                np.maximum(p.load_kwh, p.pv_kwh),
                np.full(n, power_kwh),
                np.zeros(sunny.size),
            ]
        )
        n_rows += 3 * n + sunny.size

    matrix = sp.csc_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n_rows, lay.n_cols),
    )

    lower = np.zeros(lay.n_cols)
    upper = np.full(lay.n_cols, np.inf)
    upper[lay.pvu : lay.pvu + n] = p.pv_kwh
    upper[lay.ch : lay.ch + n] = p.bess.power_kw * STEP_HOURS
    upper[lay.dis : lay.dis + n] = p.bess.power_kw * STEP_HOURS
    lower[lay.soc : lay.soc + n] = p.floor_kwh
    upper[lay.soc : lay.soc + n] = p.ceiling_kwh
    if p.final_energy_kwh_min is not None:
        lower[lay.soc + n - 1] = max(p.final_energy_kwh_min, p.floor_kwh)
    upper[lay.ev : lay.ev + lay.n_cells] = p.socket_kwh
    # Unreachable sessions charge at full power throughout, as the safety layer makes them.
    lower[lay.ev + e[~in_row]] = p.socket_kwh

    cost = np.zeros(lay.n_cols)
    cost[lay.imp : lay.imp + n] = (
        w.co2 * p.carbon_kg_per_kwh / sc.max_co2_kg
        + w.cost * p.price_per_kwh / max(sc.max_cost, 1e-9)
    )
    cost[lay.pvu : lay.pvu + n] = -w.solar / sc.max_pv_kwh
    offset = float(w.solar * p.pv_kwh.sum() / sc.max_pv_kwh)  # curtailed = pv - pv_used
    # What unreachable sessions miss is fixed; the env penalises it at their departure.
    unmet = _unreachable_unmet_kwh(p, cells)
    offset += float(w.ev * np.minimum(unmet / sc.max_ev_unmet_kwh, 1.0).sum())
    if with_grid:
        headroom = max(sc.max_import_kwh - sc.peak_threshold_kwh, 1e-9)
        cost[lay.over : lay.over + n] = 0.5 * w.grid / headroom
        cost[lay.rup : lay.rdn + n] = 0.5 * w.grid / sc.max_import_kwh
    arrays = {
        "cost": cost,
        "lower": lower,
        "upper": upper,
        "row_lower": row_lower,
        "row_upper": row_upper,
    }
    return matrix, arrays, offset


def schedule_from_actions(
    p: Problem, bess_net_kwh: np.ndarray, ev_grid_kwh: np.ndarray
) -> Schedule:
    """What a schedule does, by the env's definitions [kWh per step].

    ``bess_net_kwh`` is the battery's grid-side energy (+ charges), ``ev_grid_kwh``
    the sockets' grid-side energy [socket, step]. Import and curtailment follow
    from the site's net consumption as in ``SiteEnv``; the reward terms come from
    ``pvbess.sim.reward``, so the objective is the env's summed reward.
    """
    eta = one_way_efficiency_frac(p.bess)
    charge = np.maximum(bess_net_kwh, 0.0)
    discharge = np.maximum(-bess_net_kwh, 0.0)
    stored = p.initial_kwh + np.cumsum(charge * eta - discharge / eta)
    net = p.load_kwh + ev_grid_kwh.sum(axis=0) + bess_net_kwh - p.pv_kwh
    grid_import = np.maximum(net, 0.0)
    # What the site pushes out is curtailed PV up to the step's PV, beyond it battery energy
    # lost to the island grid (not curtailment), as in ``pvbess.sim.env``.
    curtailed = np.minimum(np.maximum(-net, 0.0), p.pv_kwh)
    # Energy still missing at departure, recorded on the session's last step as the env does.
    delivered = np.zeros(len(p.session_socket))
    lengths = p.session_departure_step - p.session_arrival_step
    session = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    step = np.repeat(p.session_arrival_step, lengths) + np.arange(session.size)
    step -= np.repeat(starts, lengths)
    np.add.at(delivered, session, ev_grid_kwh[p.session_socket[session], step])
    gap = np.maximum(p.session_energy_kwh - delivered * p.charger_efficiency_frac, 0.0)
    # Below 1e-6 kWh is solver tolerance, not a shortfall.
    gap = np.where(gap > 1e-6, gap, 0.0)
    unmet = np.zeros(p.n_steps)
    np.add.at(unmet, p.session_departure_step - 1, gap)
    co2 = grid_import * p.carbon_kg_per_kwh
    cost = grid_import * p.price_per_kwh
    prev = np.concatenate([[0.0], grid_import[:-1]])
    parts = rw.components(
        grid_import_kwh=grid_import,
        prev_grid_import_kwh=prev,
        co2_kg=co2,
        cost=cost,
        pv_curtailed_kwh=curtailed,
        ev_unmet_kwh=unmet,
        scales=p.scales,
    )
    return Schedule(
        bess_charge_kwh=charge,
        bess_discharge_kwh=discharge,
        bess_energy_kwh=stored,
        ev_grid_kwh=ev_grid_kwh,
        grid_import_kwh=grid_import,
        pv_curtailed_kwh=curtailed,
        co2_kg=co2,
        cost=cost,
        ev_unmet_kwh=unmet,
        components=parts,
        reward_total=np.asarray(rw.weighted_total(parts, p.weights)),
    )


def _rss_mb() -> float | None:
    """The process's resident memory now [MB], from /proc (None where there is none)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return None


class _PeakMemory:
    """Highest resident memory above the starting level while the block runs [MB].

    Sampled by a thread (HiGHS allocates in C++, out of tracemalloc's sight); the
    process-wide peak is left alone, so other measurements are not disturbed.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self.peak_mb = float("nan")
        self._stop = threading.Event()

    def _sample(self, start_mb: float) -> None:
        high = start_mb
        while not self._stop.wait(self.interval_s):
            high = max(high, _rss_mb() or high)
        self.peak_mb = max(high, _rss_mb() or high) - start_mb

    def __enter__(self) -> _PeakMemory:
        start_mb = _rss_mb()
        self._thread = None
        if start_mb is not None:
            self._thread = threading.Thread(target=self._sample, args=(start_mb,), daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


@dataclass
class _Run:
    """One HiGHS solve: the columns' values (None if it found no solution) and its figures."""

    x: np.ndarray | None
    objective: float  # of x [-]
    bound: float  # a proven lower bound: the LP's optimum, or the MILP's dual bound [-]
    status: str
    seconds: float
    mip_gap: float | None = None
    nodes: int = 0
    row_dual: np.ndarray | None = None  # an LP's row duals (reduced costs = cost - A' dual)


def _run_highs(
    matrix: sp.csc_matrix,
    arrays: dict[str, np.ndarray],
    offset: float,
    solver: str,
    time_limit_s: float,
    threads: int,
    integrality: np.ndarray | None = None,
    mip_rel_gap: float = 1e-6,
    start: np.ndarray | None = None,
) -> _Run:
    """Solve with HiGHS: an LP, or a MILP where ``integrality`` marks integer columns.

    An LP must reach its optimum (else RuntimeError). A MILP stopped by its time
    limit returns its incumbent, or no solution; ``start`` is a feasible point
    offered as the first incumbent.
    """
    started = time.perf_counter()
    # The reward's costs per kWh are 1e-6..1e-4: scale them by a power of two to about 1, so
    # HiGHS's absolute dual tolerance (1e-7) is small against them; undone on the way out.
    magnitudes = np.abs(arrays["cost"][arrays["cost"] != 0])
    scale = 2.0 ** -np.round(np.log2(np.median(magnitudes))) if magnitudes.size else 1.0
    lp = highspy.HighsLp()
    lp.num_col_, lp.num_row_ = matrix.shape[1], matrix.shape[0]
    lp.col_cost_ = arrays["cost"] * scale
    lp.col_lower_ = arrays["lower"]
    lp.col_upper_ = arrays["upper"]
    lp.row_lower_ = arrays["row_lower"]
    lp.row_upper_ = arrays["row_upper"]
    lp.offset_ = offset * scale
    lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
    lp.a_matrix_.start_ = matrix.indptr
    lp.a_matrix_.index_ = matrix.indices
    lp.a_matrix_.value_ = matrix.data
    lp.a_matrix_.num_col_, lp.a_matrix_.num_row_ = lp.num_col_, lp.num_row_
    is_mip = integrality is not None and bool(integrality.any())
    if is_mip:
        lp.integrality_ = [
            highspy.HighsVarType.kInteger if i else highspy.HighsVarType.kContinuous
            for i in integrality
        ]
    h = highspy.Highs()
    h.setOptionValue("output_flag", False)
    # ``solver`` picks the LP's algorithm; MILPs keep HiGHS's default (its MIP solver).
    h.setOptionValue("solver", "choose" if is_mip else solver)
    h.setOptionValue("time_limit", max(float(time_limit_s), 1e-3))
    if is_mip:
        h.setOptionValue("mip_rel_gap", float(mip_rel_gap))
    if threads:
        h.setOptionValue("threads", int(threads))
    h.passModel(lp)
    if start is not None:
        guess = highspy.HighsSolution()
        guess.col_value = start
        guess.value_valid = True
        h.setSolution(guess)
    h.run()
    model_status = h.getModelStatus()
    status = h.modelStatusToString(model_status)
    info = h.getInfo()
    seconds = time.perf_counter() - started
    if not is_mip:
        if model_status != highspy.HighsModelStatus.kOptimal:
            raise RuntimeError(f"HiGHS did not find the optimum: {status}")
        objective = float(info.objective_function_value) / scale
        solution = h.getSolution()
        return _Run(
            np.asarray(solution.col_value),
            objective,
            objective,
            status,
            seconds,
            row_dual=np.asarray(solution.row_dual) / scale if solution.dual_valid else None,
        )
    has_solution = info.primal_solution_status == 2  # kSolutionStatusFeasible
    if model_status == highspy.HighsModelStatus.kInfeasible:
        raise RuntimeError(f"HiGHS: the MILP is infeasible ({status})")
    return _Run(
        x=np.asarray(h.getSolution().col_value) if has_solution else None,
        objective=float(info.objective_function_value) / scale if has_solution else float("inf"),
        bound=float(info.mip_dual_bound) / scale,
        status=status,
        seconds=seconds,
        mip_gap=float(info.mip_gap),
        nodes=int(info.mip_node_count),
    )


def _overlaps(p: Problem, lay: _Layout, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Steps where the solution charges and discharges, and where it imports and curtails."""
    n = p.n_steps
    tol = 1e-6
    charge, discharge = x[lay.ch : lay.ch + n], x[lay.dis : lay.dis + n]
    lp_import, lp_curtailed = x[lay.imp : lay.imp + n], p.pv_kwh - x[lay.pvu : lay.pvu + n]
    return np.minimum(charge, discharge) > tol, np.minimum(lp_import, lp_curtailed) > tol


def _with_binaries(
    p: Problem,
    cells: _Cells,
    lay: _Layout,
    matrix: sp.csc_matrix,
    arrays: dict[str, np.ndarray],
    bess_steps: np.ndarray,
    grid_steps: np.ndarray,
) -> tuple[sp.csc_matrix, dict[str, np.ndarray], np.ndarray]:
    """The model plus one binary per listed step: charge or discharge; import or curtail.

    z = 1 allows charging, 0 discharging: ch - P z <= 0, dis + D z <= D, with D the
    most the step can discharge without export, and pv_used + dis - sum(ev) -
    max(PV - load, 0) z <= load (a discharging step leaves PV to the load it does
    not cover; without it the relaxation still charges and discharges at once).
    y = 1 allows import, 0 curtailment: import - M y <= 0, pv_used - PV y >= 0,
    with M the step's largest possible import.
    """
    n_rows, n_cols = matrix.shape
    kb, kg = bess_steps.size, grid_steps.size
    power_kwh = p.bess.power_kw * STEP_HOURS
    cap = _discharge_cap_kwh(p, cells)[bess_steps]
    surplus = np.maximum(p.pv_kwh - p.load_kwh, 0.0)[bess_steps]
    zb = n_cols + np.arange(kb)
    zg = n_cols + kb + np.arange(kg)
    rb = np.arange(kb)
    rg = 3 * kb + np.arange(kg)
    # The EV cells of each binary step, for the PV row.
    position = np.full(p.n_steps, -1)
    position[bess_steps] = rb
    ev_in = np.flatnonzero(position[cells.step] >= 0)
    entries = [
        (rb, lay.ch + bess_steps, 1.0),
        (rb, zb, -power_kwh),
        (kb + rb, lay.dis + bess_steps, 1.0),
        (kb + rb, zb, cap),
        (2 * kb + rb, lay.pvu + bess_steps, 1.0),
        (2 * kb + rb, lay.dis + bess_steps, 1.0),
        (2 * kb + position[cells.step[ev_in]], lay.ev + ev_in, -1.0),
        (2 * kb + rb, zb, -surplus),
        (rg, lay.imp + grid_steps, 1.0),
        (rg, zg, -_max_import_kwh(p, cells)[grid_steps]),
        (kg + rg, lay.pvu + grid_steps, 1.0),
        (kg + rg, zg, -p.pv_kwh[grid_steps]),
    ]
    rows = np.concatenate([r for r, _, _ in entries])
    cols = np.concatenate([c for _, c, _ in entries])
    vals = np.concatenate([np.broadcast_to(np.asarray(v, float), r.shape) for r, _, v in entries])
    n_extra = 3 * kb + 2 * kg
    extra = sp.csc_matrix((vals, (rows, cols)), shape=(n_extra, n_cols + kb + kg))
    grown = sp.vstack([sp.hstack([matrix, sp.csc_matrix((n_rows, kb + kg))]), extra]).tocsc()
    grown.sort_indices()
    out = {
        "cost": np.concatenate([arrays["cost"], np.zeros(kb + kg)]),
        "lower": np.concatenate([arrays["lower"], np.zeros(kb + kg)]),
        "upper": np.concatenate([arrays["upper"], np.ones(kb + kg)]),
        "row_lower": np.concatenate(
            [arrays["row_lower"], np.full(3 * kb + kg, -np.inf), np.zeros(kg)]
        ),
        "row_upper": np.concatenate(
            [
                arrays["row_upper"],
                np.zeros(kb),
                cap,
                p.load_kwh[bess_steps],
                np.zeros(kg),
                np.full(kg, np.inf),
            ]
        ),
    }
    integrality = np.concatenate([np.zeros(n_cols, dtype=bool), np.ones(kb + kg, dtype=bool)])
    return grown, out, integrality


def _start(
    p: Problem,
    cells: _Cells,
    lay: _Layout,
    s: Schedule,
    bess_steps: np.ndarray,
    grid_steps: np.ndarray,
) -> np.ndarray:
    """A realized schedule as values of the MILP's columns: a first incumbent for HiGHS."""
    n = p.n_steps
    x = np.zeros(lay.n_cols + bess_steps.size + grid_steps.size)
    x[lay.imp : lay.imp + n] = s.grid_import_kwh
    x[lay.pvu : lay.pvu + n] = np.maximum(p.pv_kwh - s.pv_curtailed_kwh, 0.0)
    x[lay.ch : lay.ch + n] = s.bess_charge_kwh
    x[lay.dis : lay.dis + n] = s.bess_discharge_kwh
    x[lay.soc : lay.soc + n] = s.bess_energy_kwh
    x[lay.ev : lay.ev + lay.n_cells] = s.ev_grid_kwh[cells.socket, cells.step]
    if lay.with_grid:
        imp = s.grid_import_kwh
        ramp = np.diff(imp, prepend=0.0)
        x[lay.over : lay.over + n] = np.maximum(imp - p.scales.peak_threshold_kwh, 0.0)
        x[lay.rup : lay.rup + n] = np.maximum(ramp, 0.0)
        x[lay.rdn : lay.rdn + n] = np.maximum(-ramp, 0.0)
    x[lay.n_cols : lay.n_cols + bess_steps.size] = s.bess_discharge_kwh[bess_steps] <= 0
    x[lay.n_cols + bess_steps.size :] = s.grid_import_kwh[grid_steps] > 0
    return x


def _step_of_columns(
    p: Problem, cells: _Cells, lay: _Layout, bess_steps: np.ndarray, grid_steps: np.ndarray
) -> np.ndarray:
    """The step each column of the model (with binaries) belongs to."""
    t = np.arange(p.n_steps)
    blocks = [t] * 5 + [cells.step] + ([t] * 3 if lay.with_grid else [])
    return np.concatenate([*blocks, bess_steps, grid_steps])


@dataclass
class _Exact:
    """The exact model (binaries on every step that needs them), columns sorted by step.

    Every row involves the columns of one step, except the battery's and the ramp's
    rows linking a step to the previous one and each session's energy row.
    """

    matrix: sp.csc_matrix
    arrays: dict[str, np.ndarray]
    integrality: np.ndarray
    steps: np.ndarray  # the step of each (sorted) column, non-decreasing
    order: np.ndarray  # sorted column -> column of the unsorted model
    n_base_rows: int  # the rows of the LP come first, in the LP's order

    @classmethod
    def build(
        cls,
        p: Problem,
        cells: _Cells,
        lay: _Layout,
        matrix: sp.csc_matrix,
        arrays: dict[str, np.ndarray],
    ) -> _Exact:
        bess_steps = np.arange(p.n_steps)
        grid_steps = np.flatnonzero(p.pv_kwh > 0)
        grown, grown_arrays, integrality = _with_binaries(
            p, cells, lay, matrix, arrays, bess_steps, grid_steps
        )
        step_of_col = _step_of_columns(p, cells, lay, bess_steps, grid_steps)
        order = np.argsort(step_of_col, kind="stable")
        col_arrays = ("cost", "lower", "upper")
        return cls(
            matrix=grown[:, order].tocsc(),
            arrays={k: v[order] if k in col_arrays else v for k, v in grown_arrays.items()},
            integrality=integrality[order],
            steps=step_of_col[order],
            order=order,
            n_base_rows=matrix.shape[0],
        )

    def point(self, p: Problem, cells: _Cells, lay: _Layout, s: Schedule) -> np.ndarray:
        """A schedule as values of the sorted columns."""
        bess_steps = np.arange(p.n_steps)
        grid_steps = np.flatnonzero(p.pv_kwh > 0)
        return _start(p, cells, lay, s, bess_steps, grid_steps)[self.order]

    def lp_columns(self, x: np.ndarray, n_lp_cols: int) -> np.ndarray:
        """The LP's columns of a point, in the LP's order."""
        out = np.empty(self.order.size)
        out[self.order] = x
        return out[:n_lp_cols]

    def columns_of(self, first_step: int, end_step: int) -> slice:
        c0, c1 = np.searchsorted(self.steps, [first_step, end_step])
        return slice(int(c0), int(c1))


def _window_starts(n_steps: int, window: int, stride: int) -> list[int]:
    starts = list(range(0, max(n_steps - window, 0) + 1, stride))
    if starts[-1] + window < n_steps:
        starts.append(n_steps - window)
    return starts


def _polish(
    ex: _Exact,
    x: np.ndarray,
    n_steps: int,
    window: int,
    stride: int,
    deadline: float,
    mip_rel_gap: float,
    threads: int,
) -> tuple[np.ndarray, int, int, float]:
    """Improve a point of the exact model one window of steps at a time.

    Every column outside the window keeps its value (the rows it enters are shifted
    by it); the window's columns, binaries included, are re-optimised as a small MILP
    that starts from the current values. Returns the point, the windows solved, the
    windows that improved it and the largest MIP gap HiGHS reported.
    """
    x = x.copy()
    a_mat, arr = ex.matrix, ex.arrays
    activity = a_mat @ x
    solved = improved = 0
    worst_gap = 0.0
    for first in _window_starts(n_steps, window, stride):
        left_s = deadline - time.perf_counter()
        if left_s <= 0:
            break
        cols = ex.columns_of(first, first + window)
        block = a_mat[:, cols]
        rows = np.unique(block.indices)
        sub = block.tocsr()[rows].tocsc()
        shift = activity[rows] - sub @ x[cols]
        before = float(arr["cost"][cols] @ x[cols])
        try:
            run = _run_highs(
                sub,
                {
                    "cost": arr["cost"][cols],
                    "lower": arr["lower"][cols],
                    "upper": arr["upper"][cols],
                    "row_lower": arr["row_lower"][rows] - shift,
                    "row_upper": arr["row_upper"][rows] - shift,
                },
                0.0,
                "choose",
                left_s,
                threads,
                ex.integrality[cols],
                mip_rel_gap,
                x[cols],
            )
        except RuntimeError:  # the fixed rest leaves the window no solution: keep it
            continue
        solved += 1
        if run.mip_gap is not None and np.isfinite(run.mip_gap):
            worst_gap = max(worst_gap, run.mip_gap)
        if run.x is not None and run.objective < before - 1e-12 * max(abs(before), 1.0):
            activity += block @ (run.x - x[cols])
            x[cols] = run.x
            improved += 1
    return x, solved, improved, worst_gap


def _block_bound(
    ex: _Exact,
    row_dual: np.ndarray,
    offset: float,
    n_steps: int,
    block: int,
    deadline: float,
    mip_rel_gap: float,
    threads: int,
) -> tuple[float, int, float]:
    """A lower bound on the exact optimum: Lagrangian decomposition into blocks of steps.

    The rows linking two blocks (stored energy and ramp from one step to the next, the
    energy of a session across the boundary; all equalities) are priced with the LP's
    duals and dropped, each block's exact MILP is solved on its own (HiGHS's dual
    bound), and the sum plus the prices' constant is a lower bound for any prices
    (weak duality). Returns the bound (-inf if a block could not be bounded), the
    blocks solved and the largest MIP gap.
    """
    a_csr = ex.matrix.tocsr()
    n_rows = a_csr.shape[0]
    blk = ex.steps // block
    row_of_nz = np.repeat(np.arange(n_rows), np.diff(a_csr.indptr))
    first = np.full(n_rows, np.iinfo(np.int64).max)
    last = np.full(n_rows, -1)
    np.minimum.at(first, row_of_nz, blk[a_csr.indices])
    np.maximum.at(last, row_of_nz, blk[a_csr.indices])
    arr = ex.arrays
    linking = (last >= 0) & (first != last)
    priced = linking & (arr["row_lower"] == arr["row_upper"])
    priced[ex.n_base_rows :] = False  # only the LP's rows have duals; others are dropped
    mu = np.zeros(n_rows)
    mu[priced] = row_dual[np.flatnonzero(priced)]
    cost = arr["cost"] - a_csr.T @ mu
    total = offset + float(mu[priced] @ arr["row_lower"][priced])
    own = np.flatnonzero((last >= 0) & ~linking)
    own = own[np.argsort(first[own], kind="stable")]
    bounds = np.searchsorted(first[own], np.arange(blk[-1] + 2))
    solved = 0
    worst_gap = 0.0
    for k in range(int(blk[-1]) + 1):
        left_s = deadline - time.perf_counter()
        if left_s <= 0:
            return -np.inf, solved, worst_gap
        cols = ex.columns_of(k * block, (k + 1) * block)
        rows = own[bounds[k] : bounds[k + 1]]
        run = _run_highs(
            a_csr[rows][:, cols].tocsc(),
            {
                "cost": cost[cols],
                "lower": arr["lower"][cols],
                "upper": arr["upper"][cols],
                "row_lower": arr["row_lower"][rows],
                "row_upper": arr["row_upper"][rows],
            },
            0.0,
            "choose",
            left_s,
            threads,
            ex.integrality[cols],
            mip_rel_gap,
        )
        solved += 1
        if run.mip_gap is not None and np.isfinite(run.mip_gap):
            worst_gap = max(worst_gap, run.mip_gap)
        if not np.isfinite(run.bound):
            return -np.inf, solved, worst_gap
        total += run.bound
    return total, solved, worst_gap


def _realize(p: Problem, cells: _Cells, lay: _Layout, x: np.ndarray) -> Schedule:
    """The solution as actions CityLearn can take, scored by the env's definitions."""
    n = p.n_steps
    eta = one_way_efficiency_frac(p.bess)
    power_kwh = p.bess.power_kw * STEP_HOURS
    charge = np.clip(x[lay.ch : lay.ch + n], 0.0, power_kwh)
    discharge = np.clip(x[lay.dis : lay.dis + n], 0.0, power_kwh)
    # CityLearn takes one net action per step: keep the solution's change of stored energy,
    # which drops a simultaneous charge and discharge (a loss the LP may use to burn PV).
    stored_change = charge * eta - discharge / eta
    bess_net = np.where(stored_change >= 0, stored_change / eta, stored_change * eta)
    ev_grid = np.zeros((p.n_sockets, n))
    ev_grid[cells.socket, cells.step] = np.clip(x[lay.ev : lay.ev + len(cells.step)], 0, None)
    np.minimum(ev_grid, p.socket_kwh, out=ev_grid)
    # Import and curtailment then follow from the net consumption, as in the env.
    return schedule_from_actions(p, bess_net, ev_grid)


class _Search:
    """``solve``'s state: the best realized schedule, the best lower bound, what was solved."""

    def __init__(
        self,
        p: Problem,
        cells: _Cells,
        lay: _Layout,
        model: tuple[sp.csc_matrix, dict[str, np.ndarray], float],
        solver: str,
        threads: int,
        mip_rel_gap: float,
        deadline: float,
    ) -> None:
        self.p, self.cells, self.lay = p, cells, lay
        self.matrix, self.arrays, self.offset = model
        self.solver, self.threads, self.mip_rel_gap = solver, threads, mip_rel_gap
        self.deadline = deadline
        self.best: Schedule | None = None
        self.best_x = np.zeros(lay.n_cols)
        self.best_solver_objective = float("nan")
        self.bound = -np.inf
        self.runs: list[_Run] = []  # HiGHS's solves of the whole horizon
        self.mip_gaps: list[float] = []
        self.binaries = 0
        self.extra: dict[str, float] = {}

    @property
    def gap_rel(self) -> float:
        """(best realized objective - best bound) / |bound| [-]."""
        assert self.best is not None
        return (self.best.objective - self.bound) / max(abs(self.bound), 1e-9)

    def consider(self, x: np.ndarray, solver_objective: float) -> Schedule:
        """Realize a solution; keep it if best (a later one wins ties: fewer overlaps)."""
        s = _realize(self.p, self.cells, self.lay, x)
        best = self.best
        if best is None or s.objective <= best.objective + 1e-12 * max(abs(best.objective), 1):
            self.best, self.best_x, self.best_solver_objective = s, x, solver_objective
        return s

    def _log_round(self, run: _Run, x: np.ndarray, n_binaries: int) -> None:
        s = self.consider(x, run.objective)
        over_bess, over_grid = _overlaps(self.p, self.lay, x)
        log.info(
            "optimum, %s over the horizon (%d binaries): %s in %.2f s; solver objective "
            "%.10g, realized %.10g (%+.3g), bound %.10g; overlaps: %d charge/discharge, "
            "%d import/curtail%s",
            "LP" if run.mip_gap is None else "MILP",
            n_binaries,
            run.status,
            run.seconds,
            run.objective,
            s.objective,
            s.objective - run.objective,
            self.bound,
            int(over_bess.sum()),
            int(over_grid.sum()),
            "" if run.mip_gap is None else f"; MIP gap {run.mip_gap:.3g}, {run.nodes} nodes",
        )

    def lp(self) -> _Run:
        """The LP: the first bound, and a first schedule realized from it."""
        run = _run_highs(
            self.matrix,
            self.arrays,
            self.offset,
            self.solver,
            self.deadline - time.perf_counter(),
            self.threads,
        )
        self.runs.append(run)
        self.bound = run.bound
        assert run.x is not None
        self._log_round(run, run.x, 0)
        return run

    def _windows(self, ex: _Exact, window: int, stride: int, deadline: float) -> None:
        """Make the best schedule exact (and better) window by window (``_polish``)."""
        p, cells, lay = self.p, self.cells, self.lay
        assert self.best is not None
        t0 = time.perf_counter()
        x, solved, improved, worst = _polish(
            ex,
            ex.point(p, cells, lay, self.best),
            p.n_steps,
            window,
            stride,
            deadline,
            self.mip_rel_gap,
            self.threads,
        )
        self.mip_gaps.append(worst)
        s = self.consider(ex.lp_columns(x, lay.n_cols), float(ex.arrays["cost"] @ x) + self.offset)
        for key, value in (("lp/windows", solved), ("lp/windows_improved", improved)):
            self.extra[key] = self.extra.get(key, 0.0) + value
        log.info(
            "optimum, windows of %d steps every %d: %d MILPs (%d binaries in all, %d improved) "
            "in %.1f s; realized %.10g",
            window,
            stride,
            solved,
            self.binaries,
            improved,
            time.perf_counter() - t0,
            s.objective,
        )

    def _blocks(self, ex: _Exact, row_dual: np.ndarray, block: int) -> None:
        """Raise the bound by Lagrangian decomposition into blocks (``_block_bound``)."""
        assert self.best is not None
        t0 = time.perf_counter()
        lower, blocks, worst = _block_bound(
            ex,
            row_dual,
            self.offset,
            self.p.n_steps,
            block,
            self.deadline,
            self.mip_rel_gap,
            self.threads,
        )
        self.mip_gaps.append(worst)
        self.bound = max(self.bound, lower)
        self.extra["lp/blocks"] = float(blocks)
        log.info(
            "optimum, bound from blocks of %d steps: %d MILPs in %.1f s; bound %.10g, "
            "realized %.10g, gap %.3g relative",
            block,
            blocks,
            time.perf_counter() - t0,
            lower,
            self.best.objective,
            self.gap_rel,
        )

    def windows_and_blocks(
        self, lp: _Run, window: int, stride: int, block: int, gap_tol_rel: float
    ) -> None:
        """The best schedule made exact window by window, the bound raised block by block;
        if they do not meet, windows twice as long once more."""
        ex = _Exact.build(self.p, self.cells, self.lay, self.matrix, self.arrays)
        self.binaries = int(ex.integrality.sum())
        t0 = time.perf_counter()
        # The windows get at most 3/4 of the time left, so the blocks can still bound them.
        self._windows(ex, window, stride, t0 + 0.75 * max(self.deadline - t0, 0.0))
        if lp.row_dual is not None:
            self._blocks(ex, lp.row_dual, block)
        if self.gap_rel > gap_tol_rel and time.perf_counter() < self.deadline:
            self._windows(ex, 2 * window, window, self.deadline)

    def whole_horizon(self, lp: _Run, gap_tol_rel: float, max_rounds: int) -> None:
        """One MILP over the horizon, binaries where its solution overlaps, until exact."""
        p, cells, lay = self.p, self.cells, self.lay
        assert lp.x is not None
        x = lp.x
        bess_steps = np.zeros(0, dtype=np.int64)
        grid_steps = np.zeros(0, dtype=np.int64)
        while self.gap_rel > gap_tol_rel:
            over_bess, over_grid = _overlaps(p, lay, x)
            new_bess = np.setdiff1d(np.flatnonzero(over_bess), bess_steps)
            new_grid = np.setdiff1d(np.flatnonzero(over_grid), grid_steps)
            if not (new_bess.size or new_grid.size):
                return  # the solver's result realizes exactly: what is left is its MIP gap
            left_s = self.deadline - time.perf_counter()
            if len(self.runs) >= max_rounds or left_s <= 0:
                log.warning(
                    "optimum: stopped after %d solves of the horizon (%s), %d overlapping "
                    "steps without binaries",
                    len(self.runs),
                    "round limit" if left_s > 0 else "time limit",
                    new_bess.size + new_grid.size,
                )
                return
            bess_steps = np.union1d(bess_steps, new_bess)
            grid_steps = np.union1d(grid_steps, new_grid)
            grown, grown_arrays, integrality = _with_binaries(
                p, cells, lay, self.matrix, self.arrays, bess_steps, grid_steps
            )
            assert self.best is not None
            run = _run_highs(
                grown,
                grown_arrays,
                self.offset,
                self.solver,
                left_s,
                self.threads,
                integrality,
                self.mip_rel_gap,
                _start(p, cells, lay, self.best, bess_steps, grid_steps),
            )
            self.runs.append(run)
            self.binaries = max(self.binaries, bess_steps.size + grid_steps.size)
            self.bound = max(self.bound, run.bound)
            if run.mip_gap is not None and np.isfinite(run.mip_gap):
                self.mip_gaps.append(run.mip_gap)
            if run.x is None:
                log.warning("optimum: the MILP found no solution (%s)", run.status)
                return
            x = run.x[: lay.n_cols]
            self._log_round(run, x, bess_steps.size + grid_steps.size)


# Horizons longer than WINDOW_STEPS are made exact window by window (``_polish``: windows of
# WINDOW_STEPS, every WINDOW_STRIDE_STEPS; if that does not meet the bound, once more twice as
# long) and bounded block by block (``_block_bound``); whatever gap is left, and shorter
# horizons, go to one MILP over the whole horizon. On iquitos_mall_128, windows of 24 steps
# reach the optimum as windows of 48 do (to 3e-10), in about half the time.
WINDOW_STEPS = 24
WINDOW_STRIDE_STEPS = 12
BLOCK_STEPS = 24


def solve(
    p: Problem,
    solver: str = "choose",
    time_limit_s: float = 600.0,
    threads: int = 0,
    mip_rel_gap: float = 1e-6,
    gap_tol_rel: float = 1e-6,
    max_rounds: int = 20,
) -> Solution:
    """The optimum of ``p``: the LP, made exact with binaries where it needs them.

    ``solver`` is HiGHS's option for the LP (choose, simplex, ipm, pdlp; MILPs use
    HiGHS's MIP solver); ``time_limit_s`` bounds all solves together; ``threads`` 0 =
    HiGHS's default. ``mip_rel_gap`` is HiGHS's relative gap for every MILP; the search
    ends once the realized schedule is within ``gap_tol_rel`` (relative) of the best
    lower bound, or after ``max_rounds`` solves of the whole horizon. See the module
    docstring for the method.
    """
    n = p.n_steps
    with _PeakMemory() as memory:
        started = time.perf_counter()
        cells = _cells(p)
        lay = _Layout(n_steps=n, n_cells=len(cells.step), with_grid=p.weights.grid > 0)
        model = _build(p, cells)
        build_seconds = time.perf_counter() - started
        started = time.perf_counter()
        search = _Search(p, cells, lay, model, solver, threads, mip_rel_gap, started + time_limit_s)
        lp = search.lp()
        if search.gap_rel > gap_tol_rel and n > WINDOW_STEPS:
            try:
                search.windows_and_blocks(
                    lp, WINDOW_STEPS, WINDOW_STRIDE_STEPS, BLOCK_STEPS, gap_tol_rel
                )
            except RuntimeError as err:
                log.warning("optimum: windows and blocks failed (%s); the whole horizon next", err)
        search.whole_horizon(lp, gap_tol_rel, max_rounds)
        solve_seconds = time.perf_counter() - started
    return _solution(search, lp, gap_tol_rel, build_seconds, solve_seconds, memory.peak_mb)


def _solution(
    search: _Search,
    lp: _Run,
    gap_tol_rel: float,
    build_seconds: float,
    solve_seconds: float,
    peak_memory_mb: float,
) -> Solution:
    """The search's result as a ``Solution``, logged."""
    p, cells, lay = search.p, search.cells, search.lay
    schedule, x = search.best, search.best_x
    assert schedule is not None and lp.x is not None
    steps_realized = int(np.logical_or(*_overlaps(p, lay, x)).sum())
    exact = search.gap_rel <= gap_tol_rel
    stored_diff = np.abs(x[lay.soc : lay.soc + p.n_steps] - schedule.bess_energy_kwh)
    matrix = search.matrix
    solution = Solution(
        schedule=schedule,
        objective_bound=search.bound,
        status="Optimal" if exact else search.runs[-1].status,
        n_variables=lay.n_cols,
        n_constraints=matrix.shape[0],
        n_nonzeros=int(matrix.nnz),
        build_seconds=build_seconds,
        solve_seconds=solve_seconds,
        peak_memory_mb=peak_memory_mb,
        steps_realized=steps_realized,
        unreachable_sessions=int((~cells.reachable).sum()),
        extra=search.extra
        | {"lp/stored_energy_max_abs_diff_kwh": float(stored_diff.max(initial=0))},
        objective_lp=lp.objective,
        objective_solver=search.best_solver_objective,
        steps_relaxed_lp=int(np.logical_or(*_overlaps(p, lay, lp.x)).sum()),
        binaries=search.binaries,
        mip_gap=max(search.mip_gaps) if search.mip_gaps else None,
        rounds=len(search.runs),
    )
    log.info(
        "optimum: %d variables (+%d binaries), %d constraints, built in %.2f s, solved in "
        "%.2f s (%s); objective %.10g, bound %.10g (gap %.3g relative; LP %.10g, %d steps "
        "overlapping), CO2 %.1f kg, %d unreachable sessions",
        solution.n_variables,
        solution.binaries,
        solution.n_constraints,
        build_seconds,
        solve_seconds,
        solution.status,
        solution.objective,
        solution.objective_bound,
        solution.relaxation_gap_rel,
        solution.objective_lp,
        solution.steps_relaxed_lp,
        float(schedule.co2_kg.sum()),
        solution.unreachable_sessions,
    )
    loss = schedule.objective - search.best_solver_objective
    if steps_realized and loss > gap_tol_rel * max(abs(search.best_solver_objective), 1.0):
        log.warning(
            "optimum: %d steps charged and discharged (or imported and curtailed) at once; "
            "realized as net actions, objective %.6g above the solver's",
            steps_realized,
            loss,
        )
    if not exact:
        log.warning(
            "optimum: the realized schedule is %.3g (relative) above the best bound; "
            "agent=optimal is that close to the ceiling, not on it",
            solution.relaxation_gap_rel,
        )
    return solution


def compare_with_history(solution: Solution, ts: pd.DataFrame, p: Problem) -> dict[str, float]:
    """How closely an episode replayed in the env (``SiteEnv.history``) matches the LP.

    Max absolute differences per step [kWh, SOC fraction of CityLearn's capacity]
    and relative gaps of the totals.
    """
    s = solution.schedule
    n = len(ts)
    soc_frac = s.bess_energy_kwh[:n] / p.ceiling_kwh
    co2_lp = float(s.co2_kg[:n].sum())
    co2_env = float(ts["co2_kg"].sum())
    return {
        "lp/replay_import_max_abs_kwh": float(
            np.abs(ts["grid_import_kwh"].to_numpy() - s.grid_import_kwh[:n]).max(initial=0.0)
        ),
        "lp/replay_soc_max_abs_frac": float(
            np.abs(ts["bess_soc_frac"].to_numpy() - soc_frac).max(initial=0.0)
        ),
        "lp/replay_ev_max_abs_kwh": float(
            np.abs(ts["ev_charging_kwh"].to_numpy() - s.ev_grid_kwh[:, :n].sum(axis=0)).max(
                initial=0.0
            )
        ),
        "lp/replay_co2_gap_rel": abs(co2_env - co2_lp) / max(co2_lp, 1e-9),
        "lp/replay_objective_gap_rel": abs(-float(ts["reward_total"].sum()) - s.objective)
        / max(abs(s.objective), 1e-9),
    }


__all__ = [
    "Problem",
    "Schedule",
    "Solution",
    "compare_with_history",
    "plugged_mask",
    "schedule_from_actions",
    "solve",
]
