"""What a design costs per year: capital cost annualized over each part's life.

The annualized investment of a part is its capital cost times the capital
recovery factor (CRF) of the discount rate and its life:

    CRF(r, n) = r (1 + r)^n / ((1 + r)^n - 1)     [1/yr]   (1 / n when r = 0)

i.e. the constant yearly payment that repays the capital with interest over n
years. The battery's life is the shorter of its calendar life and its cycle life
at the cycling the design's controller gives it (equivalent full cycles of the
usable window per year, ``pvbess.sim.kpis``): a battery cycled hard is replaced
sooner. Every part of a design is counted, not only what it adds to today's, so
designs compare by their long-run yearly cost (equipment already on site is
replaced at the end of its life too).

Capital costs are given in USD per unit (the sources' currency) and converted
to the site's tariff currency with ``currency_per_usd``; ``costs.currency`` must
name the site's currency (``site.tariff.currency``), so energy cost and
investment add up in one unit. Defaults and their sources: ``conf/costs/default.yaml``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pvbess.config import ConfigError


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"costs.{key}: {message}")


@dataclass
class CostsConfig:
    """Capital costs [USD per unit], lives [yr] and the discount rate; ``costs=<preset>``."""

    currency: str = "PEN"  # the site's tariff currency, which results are in
    currency_per_usd: float = 3.75
    bess_energy_capex_usd_per_kwh: float = 241.0
    bess_power_capex_usd_per_kw: float = 339.0
    bess_calendar_life_yr: float = 15.0
    # Equivalent full cycles of the usable window before end of life.
    bess_cycle_life_cycles: float = 6000.0
    inverter_capex_usd_per_kw: float = 100.0  # PV inverters, per kW AC
    inverter_life_yr: float = 12.0
    pv_capex_usd_per_kwp: float = 800.0  # modules, mounting, wiring, installation; no inverters
    pv_life_yr: float = 25.0
    discount_rate_frac: float = 0.08  # real, per year

    def check(self) -> None:
        _require(self.currency_per_usd > 0, "currency_per_usd", "must be > 0")
        for key in (
            "bess_energy_capex_usd_per_kwh",
            "bess_power_capex_usd_per_kw",
            "inverter_capex_usd_per_kw",
            "pv_capex_usd_per_kwp",
        ):
            value = getattr(self, key)
            _require(math.isfinite(value) and value >= 0, key, f"must be >= 0, got {value}")
        for key in (
            "bess_calendar_life_yr",
            "bess_cycle_life_cycles",
            "inverter_life_yr",
            "pv_life_yr",
        ):
            value = getattr(self, key)
            _require(math.isfinite(value) and value > 0, key, f"must be > 0, got {value}")
        rate = self.discount_rate_frac
        _require(0 <= rate < 1, "discount_rate_frac", f"must be in [0, 1), got {rate}")


def capital_recovery_factor(rate_frac: float, life_yr: float) -> float:
    """CRF [1/yr]: the yearly share of a capital cost that repays it over ``life_yr`` at
    ``rate_frac`` (1 / life at a rate of 0)."""
    if life_yr <= 0:
        raise ValueError(f"life_yr must be > 0, got {life_yr}")
    if rate_frac == 0:
        return 1.0 / life_yr
    growth = (1.0 + rate_frac) ** life_yr
    return rate_frac * growth / (growth - 1.0)


def battery_life_yr(costs: CostsConfig, cycles_per_yr: float) -> float:
    """The battery's life [yr]: its calendar life, or sooner when cycling wears it out
    (cycle life / equivalent full cycles per year)."""
    if cycles_per_yr <= 0:
        return costs.bess_calendar_life_yr
    return min(costs.bess_calendar_life_yr, costs.bess_cycle_life_cycles / cycles_per_yr)


@dataclass(frozen=True)
class Design:
    """What is built: battery energy and power, PV modules (DC) and inverters (AC)."""

    bess_capacity_kwh: float
    bess_power_kw: float
    pv_dc_kwp: float
    pv_ac_kw: float


@dataclass(frozen=True)
class Investment:
    """A design's annualized investment [currency/yr] by part, and the battery's life [yr]."""

    bess_per_yr: float
    inverter_per_yr: float
    pv_per_yr: float
    bess_life_yr: float

    @property
    def total_per_yr(self) -> float:
        return self.bess_per_yr + self.inverter_per_yr + self.pv_per_yr


def annualized_investment(
    design: Design, costs: CostsConfig, bess_cycles_per_yr: float
) -> Investment:
    """Each part's capital cost [currency] times its CRF [1/yr] -> [currency/yr]."""
    usd = costs.currency_per_usd
    rate = costs.discount_rate_frac
    bess_capex = (
        design.bess_capacity_kwh * costs.bess_energy_capex_usd_per_kwh
        + design.bess_power_kw * costs.bess_power_capex_usd_per_kw
    ) * usd
    life = battery_life_yr(costs, bess_cycles_per_yr)
    inverter_capex = design.pv_ac_kw * costs.inverter_capex_usd_per_kw * usd
    pv_capex = design.pv_dc_kwp * costs.pv_capex_usd_per_kwp * usd
    return Investment(
        bess_per_yr=bess_capex * capital_recovery_factor(rate, life),
        inverter_per_yr=inverter_capex * capital_recovery_factor(rate, costs.inverter_life_yr),
        pv_per_yr=pv_capex * capital_recovery_factor(rate, costs.pv_life_yr),
        bess_life_yr=life,
    )
