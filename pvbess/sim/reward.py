"""The multi-objective reward: five components, each scaled to [-1, 0] per step.

Every component divides a physical quantity of the step by the largest value
it can take at this site, so a weight of 0.5 on CO2 means half of the worst
possible step penalty, whatever the site's size. The components are computed
from the same per-step quantities the KPIs sum, so the two never disagree.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pvbess.config import RewardWeights, SiteConfig

COMPONENTS = ("co2", "solar", "cost", "ev", "grid")


@dataclass(frozen=True)
class RewardScales:
    """The worst value of each quantity in one step, used to normalise."""

    max_import_kwh: float
    max_co2_kg: float
    max_cost: float
    max_pv_kwh: float
    max_ev_unmet_kwh: float
    peak_threshold_kwh: float

    @classmethod
    def from_site(
        cls, site: SiteConfig, load_peak_kw: float, peak_threshold_frac: float
    ) -> RewardScales:
        n_sockets = sum(c.sockets for c in site.ev.classes.values())
        max_import_kwh = load_peak_kw + n_sockets * site.ev.socket_power_kw + site.bess.power_kw
        max_price = max(site.tariff.peak_price_per_kwh, site.tariff.offpeak_price_per_kwh, 1e-9)
        biggest_battery_kwh = max(c.battery_kwh for c in site.ev.classes.values())
        return cls(
            max_import_kwh=max_import_kwh,
            max_co2_kg=max(max_import_kwh * site.grid.carbon_intensity_kg_per_kwh, 1e-9),
            max_cost=max_import_kwh * max_price,
            max_pv_kwh=max(site.pv.ac_kw, 1e-9),
            max_ev_unmet_kwh=max(n_sockets * biggest_battery_kwh, 1e-9),
            peak_threshold_kwh=peak_threshold_frac * load_peak_kw,
        )


def components(
    *,
    grid_import_kwh: np.ndarray,
    prev_grid_import_kwh: np.ndarray,
    co2_kg: np.ndarray,
    cost: np.ndarray,
    pv_curtailed_kwh: np.ndarray,
    ev_unmet_kwh: np.ndarray,
    scales: RewardScales,
) -> dict[str, np.ndarray]:
    """Each component in [-1, 0] (vectorised over steps or envs).

    solar penalises PV that is curtailed (exported PV earns nothing on an
    island grid); ev the energy still missing for vehicles leaving this step;
    grid the import above the peak threshold and the step-to-step ramp, equally.
    """
    over_peak = np.maximum(grid_import_kwh - scales.peak_threshold_kwh, 0.0)
    headroom = max(scales.max_import_kwh - scales.peak_threshold_kwh, 1e-9)
    ramp = np.abs(grid_import_kwh - prev_grid_import_kwh)
    return {
        "co2": -co2_kg / scales.max_co2_kg,
        "solar": -pv_curtailed_kwh / scales.max_pv_kwh,
        "cost": -cost / max(scales.max_cost, 1e-9),
        "ev": -np.minimum(ev_unmet_kwh / scales.max_ev_unmet_kwh, 1.0),
        "grid": -0.5
        * (np.minimum(over_peak / headroom, 1.0) + np.minimum(ramp / scales.max_import_kwh, 1.0)),
    }


def weighted_total(parts: dict[str, np.ndarray], weights: RewardWeights) -> np.ndarray:
    """The reward: sum of weight x component."""
    return sum(getattr(weights, name) * parts[name] for name in COMPONENTS)  # type: ignore[return-value]
