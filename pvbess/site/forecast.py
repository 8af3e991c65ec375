"""Forecasts of the site's hourly series (PV, load): what a controller or a learner
is told about the hours ahead.

- ``perfect``: the series' own future values;
- ``persistence``: the value of the same hour on the last day observed (24 h
  earlier, 48 h for leads beyond 24 h, ...; before the first day, the first day's);
- ``noisy``: perfect x (1 + e), e Gaussian with std ``noise_frac_at_24h`` x
  sqrt(lead / 24 h), clipped at >= 0 (an error that grows with the lead time);
- ``average``: the mean of the same hour on the last ``AVERAGE_DAYS`` days observed
  (persistence's day and the 6 before it);
- ``learned`` (the MPC's PV and load): ``Learned``, a gradient-boosted regression
  fitted on other years of the site (the learners' training years) from the same
  hour on the last 7 days observed and the calendar, as CityLearn Challenge
  winners forecast for their LPs.

``pvbess.control.mpc`` plans on them; ``pvbess.sim.features`` observes them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pvbess.units import STEP_HOURS

DAY_STEPS = round(24 / STEP_HOURS)


def persistence_source(t: int | np.ndarray, lead: np.ndarray, n_steps: int) -> np.ndarray:
    """The step whose value persistence predicts for step t + lead: the same hour on the
    last day observed at t (lead 0: t itself); before the first day, the first day's."""
    lead = np.asarray(lead)
    days_back = -(-lead // DAY_STEPS)
    src = np.add.outer(t, lead - DAY_STEPS * days_back)
    return np.minimum(np.where(src < 0, src % DAY_STEPS, src), n_steps - 1)


# How many past days ``average`` takes the mean of.
AVERAGE_DAYS = 7


def average_source(
    t: int | np.ndarray, lead: np.ndarray, n_steps: int, days: int = AVERAGE_DAYS
) -> np.ndarray:
    """The steps ``average`` takes the mean of for step t + lead, [(t,) leads, days]: persistence's
    step and the same hour on the ``days - 1`` days before it (before the first day, the
    first day's)."""
    back = persistence_source(t, lead, n_steps)[..., None] - DAY_STEPS * np.arange(days)
    return np.where(back < 0, back % DAY_STEPS, back)


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
    if kind == "average":
        return values[average_source(t, leads, n)].mean(axis=-1)
    out = values[np.minimum(t[:, None] + leads[None, :], n - 1)]
    if kind == "noisy":
        rng = np.random.default_rng(seed)
        error = noise_std(leads, noise_frac_at_24h) * rng.standard_normal(out.shape)
        out = out * np.maximum(1.0 + error, 0.0)
    elif kind != "perfect":
        raise ValueError(f"unknown forecast {kind!r} (perfect | persistence | noisy | average)")
    return out


# How many past days at the target's hour ``Learned`` reads.
LEARNED_LAG_DAYS = 7


def _learned_features(values: np.ndarray, index: pd.DatetimeIndex, days_back: int) -> np.ndarray:
    """Per target step s: the value at s's hour on each of the ``LEARNED_LAG_DAYS`` days
    observed ``days_back`` days before it and earlier (before the first day, the first
    day's), their mean, the hour, the weekday and the day of year (sin, cos)."""
    s = np.arange(values.size)
    lag = s[:, None] - DAY_STEPS * (days_back + np.arange(LEARNED_LAG_DAYS))[None, :]
    lags = values[np.where(lag < 0, lag % DAY_STEPS, lag)]
    angle = 2.0 * np.pi * index.dayofyear.to_numpy() / 365.25
    return np.column_stack(
        [
            lags,
            lags.mean(axis=1),
            index.hour.to_numpy(),
            index.dayofweek.to_numpy(),
            np.sin(angle),
            np.cos(angle),
        ]
    )


class Learned:
    """A day-ahead forecast of one hourly series fitted on other years of it [kWh per step].

    For a target step s at lead L from now (``days_back`` = ceil(L / 24 h)), a
    scikit-learn ``HistGradientBoostingRegressor`` reads s's hour on the 7 days
    observed at least ``days_back`` days before s, and the calendar: all of it known at
    the forecast's time, so no future value leaks in. One model per ``days_back``,
    each fitted on every step of the years of ``years`` (lags before a year's start
    read its first day, as they do when predicting). Deterministic for one set of years.
    """

    def __init__(
        self,
        years: Sequence[tuple[np.ndarray, pd.DatetimeIndex]],
        max_days_back: int = 1,
        non_negative: bool = True,
    ) -> None:
        from sklearn.ensemble import HistGradientBoostingRegressor

        if not years:
            raise ValueError("a learned forecast needs at least one year to fit on")
        if max_days_back < 1:
            raise ValueError(f"max_days_back must be >= 1, got {max_days_back}")
        self.non_negative = non_negative
        self.models = []
        n_lags = LEARNED_LAG_DAYS
        for d in range(1, max_days_back + 1):
            x = np.vstack([_learned_features(np.asarray(v, float), i, d) for v, i in years])
            y = np.concatenate([np.asarray(v, float) for v, _ in years])
            # Fixed iterations, no early stopping: no random validation split to draw.
            model = HistGradientBoostingRegressor(
                max_iter=200,
                early_stopping=False,
                categorical_features=[n_lags + 1, n_lags + 2],
                random_state=0,
            )
            self.models.append(model.fit(x, y))

    def predictions(self, values: np.ndarray, index: pd.DatetimeIndex) -> np.ndarray:
        """What the forecast says for every step s of ``values`` made ``d`` days ahead,
        [max_days_back, n_steps]: row d - 1 is read at leads (24 (d - 1), 24 d] h."""
        values = np.asarray(values, dtype=np.float64)
        out = np.stack(
            [m.predict(_learned_features(values, index, d + 1)) for d, m in enumerate(self.models)]
        )
        return np.maximum(out, 0.0) if self.non_negative else out
