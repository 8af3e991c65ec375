"""The plugged-in fleet as one thing: its energy needs and laxity, its aggregates (an
observation), and fleet-level actions allocated to sockets (``env.action_mode=fleet``).

Laxity is the slack of a plugged vehicle [h]: the hours left before it leaves minus
the hours of full socket power it still needs. A vehicle at zero laxity must charge
at full power every remaining step; the safety layer forces exactly that.
"""

from __future__ import annotations

import numpy as np

from pvbess.units import STEP_HOURS

# Laxity and time-to-go features saturate at one day.
DAY_H = 24.0


def needs(
    soc: np.ndarray,
    capacity_kwh: np.ndarray,
    required_soc: np.ndarray,
    departure_steps: np.ndarray,
    step_kwh: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Battery-side energy each plugged vehicle still needs [kWh] and its laxity [h].

    Arrays are per plugged socket (last axis; a leading env axis broadcasts);
    ``departure_steps`` counts the steps left including the current one, ``step_kwh``
    is one full step's battery-side energy at socket power.
    """
    need_kwh = np.maximum(required_soc - soc, 0.0) * capacity_kwh
    laxity_h = (departure_steps - need_kwh / step_kwh) * STEP_HOURS
    return need_kwh, laxity_h


def allocate(
    intensity: np.ndarray,
    group: np.ndarray,
    need_kwh: np.ndarray,
    laxity_h: np.ndarray,
    step_kwh: float,
) -> np.ndarray:
    """Socket actions [n_envs, k] in [0, 1] from one charging intensity per group.

    ``intensity`` [n_envs, n_groups] in [0, 1] is the share of the group's plugged
    sockets' full power the group draws this step; ``group`` [k] is each plugged
    socket's group. Within a group the energy goes to the least laxity first, each
    vehicle up to its need or one full step, whichever is smaller: intensity 1
    charges every vehicle as the uncontrolled site does, 0 leaves it to the safety
    layer. Energy no plugged vehicle needs is not drawn.
    """
    n_envs, k = need_kwh.shape
    out = np.zeros((n_envs, k))
    want_kwh = np.minimum(need_kwh, step_kwh)
    rows = np.arange(n_envs)[:, None]
    for g in np.unique(group):
        cols = np.flatnonzero(group == g)
        budget_kwh = intensity[:, g] * cols.size * step_kwh
        order = np.argsort(laxity_h[:, cols], axis=1, kind="stable")
        want = want_kwh[:, cols][rows, order]
        before = np.cumsum(want, axis=1) - want
        give = np.clip(budget_kwh[:, None] - before, 0.0, want)
        out[rows, cols[order]] = give / step_kwh
    return out


def aggregates(
    need_kwh: np.ndarray, laxity_h: np.ndarray, n_sockets: int, max_need_kwh: float
) -> np.ndarray:
    """[n_envs, 3] in [0, 1]: share of sockets with a vehicle, the energy the plugged
    vehicles still need (/ ``max_need_kwh``), the least laxity (/ 24 h; 1 when none)."""
    n_envs, k = need_kwh.shape
    out = np.ones((n_envs, 3))
    out[:, 0] = k / max(n_sockets, 1)
    out[:, 1] = np.minimum(need_kwh.sum(axis=1) / max(max_need_kwh, 1e-9), 1.0)
    if k:
        out[:, 2] = np.clip(laxity_h.min(axis=1) / DAY_H, 0.0, 1.0)
    return out
