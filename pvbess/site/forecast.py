"""Forecasts of the site's hourly series (PV, load): what a controller or a learner
is told about the hours ahead.

- ``perfect``: the series' own future values;
- ``persistence``: the value of the same hour on the last day observed (24 h
  earlier, 48 h for leads beyond 24 h, ...; before the first day, the first day's);
- ``noisy``: perfect x (1 + e), e Gaussian with std ``noise_frac_at_24h`` x
  sqrt(lead / 24 h), clipped at >= 0 (an error that grows with the lead time).

``pvbess.control.mpc`` plans on them; ``pvbess.sim.features`` observes them.
"""

from __future__ import annotations

import numpy as np

from pvbess.units import STEP_HOURS

DAY_STEPS = round(24 / STEP_HOURS)


def persistence_source(t: int | np.ndarray, lead: np.ndarray, n_steps: int) -> np.ndarray:
    """The step whose value persistence predicts for step t + lead: the same hour on the
    last day observed at t (lead 0: t itself); before the first day, the first day's."""
    lead = np.asarray(lead)
    days_back = -(-lead // DAY_STEPS)
    src = np.add.outer(t, lead - DAY_STEPS * days_back)
    return np.minimum(np.where(src < 0, src % DAY_STEPS, src), n_steps - 1)


def noise_std(lead: np.ndarray, noise_frac_at_24h: float) -> np.ndarray:
    """Std of the relative error at each lead [steps]: it grows as sqrt(lead / 24 h)."""
    return noise_frac_at_24h * np.sqrt(np.asarray(lead) / DAY_STEPS)


def table(
    values: np.ndarray,
    leads: np.ndarray,
    kind: str,
    noise_frac_at_24h: float = 0.2,
    seed: int = 0,
) -> np.ndarray:
    """Forecasts made at every step t of ``values`` for t + lead: [n_steps, n_leads].

    Beyond the series' end, perfect and noisy forecasts hold its last value. ``noisy``
    draws its errors from ``seed``: the same table for the same series and seed.
    """
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    t = np.arange(n)
    leads = np.asarray(leads, dtype=np.int64)
    if kind == "persistence":
        return values[persistence_source(t, leads, n)]
    out = values[np.minimum(t[:, None] + leads[None, :], n - 1)]
    if kind == "noisy":
        rng = np.random.default_rng(seed)
        error = noise_std(leads, noise_frac_at_24h) * rng.standard_normal(out.shape)
        out = out * np.maximum(1.0 + error, 0.0)
    elif kind != "perfect":
        raise ValueError(f"unknown forecast {kind!r} (perfect | persistence | noisy)")
    return out
