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
import time

import numpy as np
import scipy.sparse as sp

from pvbess.control.exact import _block_bound, _Exact, _overlaps, _polish, _start, _with_binaries
from pvbess.control.highs import _PeakMemory, _Run, _run_highs
from pvbess.control.lp import (
    Problem,
    Schedule,
    Solution,
    _build,
    _Cells,
    _cells,
    _Layout,
    _realize,
    compare_with_history,
    plugged_mask,
    schedule_from_actions,
)

log = logging.getLogger(__name__)


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
    measure_memory: bool = True,
) -> Solution:
    """The optimum of ``p``: the LP, made exact with binaries where it needs them.

    ``solver`` is HiGHS's option for the LP (choose, simplex, ipm, pdlp; MILPs use
    HiGHS's MIP solver); ``time_limit_s`` bounds all solves together; ``threads`` 0 =
    HiGHS's default. ``mip_rel_gap`` is HiGHS's relative gap for every MILP; the search
    ends once the realized schedule is within ``gap_tol_rel`` (relative) of the best
    lower bound, or after ``max_rounds`` solves of the whole horizon; ``measure_memory``
    samples the solve's peak memory (``peak_memory_mb``, else NaN). See the module
    docstring for the method.
    """
    n = p.n_steps
    with _PeakMemory(enabled=measure_memory) as memory:
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


__all__ = [
    "Problem",
    "Schedule",
    "Solution",
    "compare_with_history",
    "plugged_mask",
    "schedule_from_actions",
    "solve",
]
