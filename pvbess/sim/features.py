"""What a learner observes beyond the simulator's own observations (``env.observations``).

The simulator observes month, day type, hour, PV, load, battery SOC, net
consumption, price, carbon intensity and 4 values per socket. These levers add:

- ``time``: hour, weekday and day of year as sin/cos (the raw hour jumps 23 -> 0);
- ``tariff``: price now and hours to the next price change;
- ``forecast``: PV and load at ``forecast_leads_h`` ahead (``pvbess.site.forecast``);
- ``peak``: the episode's running peak grid import;
- ``fleet``: vehicles plugged, their energy need, the least laxity (``pvbess.sim.fleet``);

and ``sockets: false`` drops the per-socket observations. Every feature is in
[0, 1]. The ones that depend only on the step (time, tariff, forecast) are one
table per year, built once; ``SiteStep`` appends them and the others to the
simulator's scaled observations, the same way on CityLearn and on the twin.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from pvbess.config import ObservationConfig
from pvbess.site import forecast
from pvbess.site.dataset import SiteDataset
from pvbess.units import STEP_HOURS

# The simulator's per-socket observations start with these.
SOCKET_PREFIXES = ("electric_vehicle_charger_", "connected_electric_vehicle_at_charger_")
FLEET_NAMES = ["fleet_plugged_frac", "fleet_need_frac", "fleet_least_laxity_frac"]


def _cyclic(value: np.ndarray, period: float, name: str) -> dict[str, np.ndarray]:
    angle = 2 * np.pi * value / period
    return {f"{name}_sin": (np.sin(angle) + 1) / 2, f"{name}_cos": (np.cos(angle) + 1) / 2}


def steps_to_change(values: np.ndarray, cap: int) -> np.ndarray:
    """For each step, the steps until the value first differs from its own (at most ``cap``)."""
    n = values.size
    out = np.full(n, cap, dtype=np.int64)
    next_change = n + cap  # none ahead: saturate
    for t in range(n - 1, -1, -1):
        if t + 1 < n and values[t + 1] != values[t]:
            next_change = t + 1
        out[t] = min(next_change - t, cap)
    return out


def time_features(index: pd.DatetimeIndex) -> dict[str, np.ndarray]:
    """Hour, weekday and day of year of each step as sin/cos in [0, 1] (local time)."""
    hour = index.hour.to_numpy() + index.minute.to_numpy() / 60
    return (
        _cyclic(hour, 24.0, "hour")
        | _cyclic(index.dayofweek.to_numpy(), 7.0, "weekday")
        | _cyclic(index.dayofyear.to_numpy() - 1, 365.25, "day_of_year")
    )


def tariff_features(
    price: np.ndarray, price_max: float, steps_to_next_change: np.ndarray
) -> dict[str, np.ndarray]:
    """Price now (/ the highest price) and the time to its next change (/ 24 h)."""
    day_steps = round(24 / STEP_HOURS)
    return {
        "price_frac": price / max(price_max, 1e-9),
        "price_change_in_frac": steps_to_next_change / day_steps,
    }


def forecast_scales(dataset: SiteDataset) -> dict[str, float]:
    """What scales a forecast of PV and of load to [0, 1] [kWh per step]: the inverters'
    rating and the year's peak load."""
    return {
        "pv_kwh": max(dataset.site.pv.ac_kw * STEP_HOURS, 1e-9),
        "load_kwh": max(float(dataset.series["load_kwh"].max()), 1e-9),
    }


def forecast_names(leads_h: Sequence[int | float]) -> list[str]:
    """The forecast features' names: PV at each lead, then load at each lead."""
    return [f"{q}_forecast_{h}h_frac" for q in ("pv", "load") for h in leads_h]


def forecast_features(
    forecast_kwh: dict[str, np.ndarray], leads_h: Sequence[int | float], scales: dict[str, float]
) -> dict[str, np.ndarray]:
    """PV and load forecasts [n_steps, n_leads] (kWh per step, by ``pv_kwh``/``load_kwh``)
    as features in [0, 1]."""
    cols = {}
    for name, full in scales.items():
        for i, h in enumerate(leads_h):
            cols[f"{name[:-4]}_forecast_{h}h_frac"] = np.clip(
                forecast_kwh[name][:, i] / full, 0.0, 1.0
            )
    return cols


def forecast_tables(dataset: SiteDataset, obs: ObservationConfig) -> dict[str, np.ndarray]:
    """The forecasts a learner observes at every step: ``pv_kwh`` and ``load_kwh``, each
    [n_steps, n_leads] [kWh per step] (``pvbess.site.forecast``)."""
    leads = np.asarray([round(h / STEP_HOURS) for h in obs.forecast_leads_h])
    return {
        name: forecast.table(
            dataset.series[name].to_numpy(),
            leads,
            obs.forecast,
            noise_frac_at_24h=obs.noise_frac_at_24h,
            seed=dataset.site.seed * 2 + j,
        )
        for j, name in enumerate(("pv_kwh", "load_kwh"))
    }


def step_table(dataset: SiteDataset, obs: ObservationConfig) -> dict[str, np.ndarray]:
    """The features that depend only on the step, each [n_steps + 1] in [0, 1] (the last
    row, the terminal observation's, repeats the last step's)."""
    series = dataset.series
    cols: dict[str, np.ndarray] = {}
    if obs.time:
        cols |= time_features(dataset.index)
    if obs.tariff:
        price = series["price_per_kwh"].to_numpy()
        day_steps = round(24 / STEP_HOURS)
        cols |= tariff_features(price, float(price.max()), steps_to_change(price, day_steps))
    if obs.forecast != "none":
        cols |= forecast_features(
            forecast_tables(dataset, obs), obs.forecast_leads_h, forecast_scales(dataset)
        )
    return {k: np.append(v, v[-1]).astype(np.float32) for k, v in cols.items()}


class Features:
    """The observation's layout: which simulator observations are kept, and the features
    appended to them (names in order, ``names``)."""

    def __init__(
        self, obs: ObservationConfig, dataset: SiteDataset, simulator_names: list[str]
    ) -> None:
        self.config = obs
        self.keep = np.asarray(
            [
                j
                for j, name in enumerate(simulator_names)
                if obs.sockets or not name.startswith(SOCKET_PREFIXES)
            ],
            dtype=np.int64,
        )
        table = step_table(dataset, obs)
        self.table = (
            np.stack(list(table.values()), axis=1)
            if table
            else np.zeros((len(dataset.index) + 1, 0), dtype=np.float32)
        )
        self.names = [simulator_names[j] for j in self.keep] + list(table)
        if obs.peak:
            self.names.append("peak_import_frac")
        if obs.fleet:
            self.names += FLEET_NAMES
        self.all_kept = self.keep.size == len(simulator_names)

    @property
    def size(self) -> int:
        return len(self.names)
