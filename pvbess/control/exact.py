"""The optimum made exact: binaries where the LP's schedule overlaps (charge and
discharge, import and curtailment), MILP windows that polish a schedule, and a
Lagrangian block bound that proves it (see ``pvbess.control.optimal``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from pvbess.control.highs import _run_highs
from pvbess.control.lp import (
    Problem,
    Schedule,
    _Cells,
    _discharge_cap_kwh,
    _Layout,
    _max_import_kwh,
)
from pvbess.units import STEP_HOURS

log = logging.getLogger(__name__)


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
        ramp = np.diff(imp, prepend=p.initial_import_kwh)
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
