"""HiGHS for the optimum: one LP or MILP solve with its figures (objective, bound,
duals, time, peak memory)."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import highspy
import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)


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

    def __init__(self, interval_s: float = 0.01, enabled: bool = True) -> None:
        self.interval_s = interval_s
        self.enabled = enabled
        self.peak_mb = float("nan")
        self._stop = threading.Event()

    def _sample(self, start_mb: float) -> None:
        high = start_mb
        while not self._stop.wait(self.interval_s):
            high = max(high, _rss_mb() or high)
        self.peak_mb = max(high, _rss_mb() or high) - start_mb

    def __enter__(self) -> _PeakMemory:
        # A rolling planner's small solves skip it: a thread per solve costs them ~1 ms.
        start_mb = _rss_mb() if self.enabled else None
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
