"""The optimum's linear program: the problem (``Problem``), its matrix (``_build``),
and what a schedule does by the env's own definitions (``schedule_from_actions``,
``_realize``, ``compare_with_history``). See ``pvbess.control.optimal`` for why the
LP alone is not exact and how ``solve`` makes it so."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pvbess.config import BessConfig, RewardWeights
from pvbess.sim import reward as rw
from pvbess.site.battery import one_way_efficiency_frac
from pvbess.site.dataset import SiteDataset
from pvbess.units import STEP_HOURS

log = logging.getLogger(__name__)


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
    # Grid import in the step before the first step [kWh]: the first step's ramp is
    # |import_0 - this|. 0 at the episode's start (the env starts from 0 import).
    initial_import_kwh: float = 0.0

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
    if not (np.isfinite(p.initial_import_kwh) and p.initial_import_kwh >= 0):
        raise ValueError(f"initial_import_kwh must be finite and >= 0, got {p.initial_import_kwh}")
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
        # Ramp: import_t - import_{t-1} - up + down = 0; import_{-1} is the problem's
        # initial import, moved to the right-hand side of the first row.
        add(n_rows + n + t, lay.imp + t, 1.0)
        add(n_rows + n + t[1:], lay.imp + t[:-1], -1.0)
        add(n_rows + n + t, lay.rup + t, -1.0)
        add(n_rows + n + t, lay.rdn + t, 1.0)
        ramp_rhs = np.zeros(n)
        ramp_rhs[0] = p.initial_import_kwh
        row_lower = np.concatenate([row_lower, np.full(n, -np.inf), ramp_rhs])
        row_upper = np.concatenate([row_upper, np.full(n, sc.peak_threshold_kwh), ramp_rhs])
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
    prev = np.concatenate([[p.initial_import_kwh], grid_import[:-1]])
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


def compare_with_history(solution: Solution, ts: pd.DataFrame, p: Problem) -> dict[str, float]:
    """How closely an episode replayed in the env (``SiteEnv.history``) matches the LP.

    Max absolute differences per step [kWh, SOC fraction of CityLearn's capacity]
    and relative gaps of the totals.
    """
    s = solution.schedule
    n = len(ts)
    # No battery (capacity 0): the SOC is 0 throughout.
    stored_kwh = s.bess_energy_kwh[:n]
    soc_frac = stored_kwh / p.ceiling_kwh if p.ceiling_kwh > 0 else 0.0 * stored_kwh
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
