"""Cross-checks that act: a run whose figures disagree with an independent source is marked.

Each check compares a logged metric with a limit. Above it the run logs a
warning, gets the tag ``check_failed=<name>[,<name>...]``, and ``pvbess.compare``
marks its row; the run still finishes, so the evidence stays in the store.
The limits (README, "Checks that act") sit well above float rounding and well
below any difference a reader would notice in the tables.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

log = logging.getLogger(__name__)

CHECK_TAG = "check_failed"


@dataclass(frozen=True)
class Check:
    name: str
    metric: str
    limit: float
    what: str


CHECKS: tuple[Check, ...] = (
    # pvbess's CO2 (import x intensity, float64) vs. CityLearn's evaluate_v2 total
    # (float32 per step): a year's float32 rounding stays below 1e-6 relative.
    Check(
        "co2_vs_citylearn",
        "eval/co2_vs_citylearn_rel",
        1e-5,
        "CO2 differs from CityLearn's own figure",
    ),
    # The LP's schedule replayed in CityLearn: CO2 of the replay vs. the LP's.
    Check(
        "lp_replay_co2",
        "lp/replay_co2_gap_rel",
        1e-5,
        "the optimum's replay in CityLearn differs from the LP's CO2",
    ),
    # A run evaluated on the twin, replayed in CityLearn (pvbess.experiment.replay): every KPI
    # must be the same to the last bit.
    Check(
        "twin_replay",
        "replay/kpi_max_abs_diff",
        0.0,
        "the run's KPIs differ when its evaluation is replayed in CityLearn",
    ),
    # The realized optimum vs. the solver's objective: above this it is no ceiling.
    Check(
        "lp_relaxation_gap",
        "lp/relaxation_gap_rel",
        1e-5,
        "the realized optimum is above the solver's objective",
    ),
)


def failed(metrics: dict[str, float]) -> list[tuple[Check, float]]:
    """The checks whose metric is present and above its limit (NaN fails too)."""
    out = []
    for check in CHECKS:
        if check.metric not in metrics:
            continue
        value = float(metrics[check.metric])
        if math.isnan(value) or abs(value) > check.limit:
            out.append((check, value))
    return out


def act(metrics: dict[str, float]) -> list[str]:
    """Warn about and tag the active MLflow run with every failed check; return their names."""
    import mlflow

    bad = failed(metrics)
    for check, value in bad:
        log.warning(
            "check failed: %s (%s = %.3g, limit %.3g); the run is tagged %s",
            check.what,
            check.metric,
            value,
            check.limit,
            CHECK_TAG,
        )
    names = [check.name for check, _ in bad]
    if names:
        mlflow.set_tag(CHECK_TAG, ",".join(names))
    return names
