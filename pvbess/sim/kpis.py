"""KPIs of an episode, in physical units, from its hourly timeseries (``SiteEnv.history``).

One definition of each quantity: the reward components are computed from the
same per-step columns these sums use.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pvbess.sim.reward import COMPONENTS
from pvbess.units import STEP_HOURS


def energy_balance_residual_kwh(ts: pd.DataFrame) -> np.ndarray:
    """Per step: (PV used + import + battery discharge)
    - (load + EV + battery charge + battery energy lost to the grid) [kWh]."""
    supply = ts["pv_used_kwh"] + ts["grid_import_kwh"] + ts["bess_discharge_kwh"]
    demand = ts["load_kwh"] + ts["ev_charging_kwh"] + ts["bess_charge_kwh"] + ts["bess_export_kwh"]
    return (supply - demand).to_numpy()


def check_energy_balance(ts: pd.DataFrame, rel_tol: float = 1e-6) -> float:
    """Raise if any step's balance is off by more than rel_tol of its throughput; return the max."""
    residual = np.abs(energy_balance_residual_kwh(ts))
    scale = (ts["load_kwh"] + ts["ev_charging_kwh"] + ts["bess_charge_kwh"]).to_numpy()
    scale = np.maximum(scale + ts["bess_export_kwh"].to_numpy(), 1.0)
    bad = np.flatnonzero(residual > rel_tol * scale)
    if bad.size:
        i = bad[0]
        raise AssertionError(
            f"energy balance does not close at {ts.index[i]}: residual {residual[i]:.6g} kWh "
            f"({bad.size} steps off)"
        )
    return float(residual.max()) if residual.size else 0.0


def compute(ts: pd.DataFrame, usable_capacity_kwh: float) -> dict[str, float]:
    """All KPIs of one episode [kWh, kg, kW, currency, ratios]."""
    pv = float(ts["pv_kwh"].sum())
    pv_used = float(ts["pv_used_kwh"].sum())
    departures = float(ts["ev_departures"].sum())
    imp = ts["grid_import_kwh"].to_numpy() / STEP_HOURS
    throughput = float(ts["bess_charge_kwh"].sum() + ts["bess_discharge_kwh"].sum())
    out = {
        "hours": len(ts) * STEP_HOURS,
        "grid_import_kwh": float(ts["grid_import_kwh"].sum()),
        "co2_kg": float(ts["co2_kg"].sum()),
        "cost": float(ts["cost"].sum()),
        "load_kwh": float(ts["load_kwh"].sum()),
        "pv_generation_kwh": pv,
        "pv_used_kwh": pv_used,
        "pv_curtailed_kwh": float(ts["pv_curtailed_kwh"].sum()),
        "bess_export_kwh": float(ts["bess_export_kwh"].sum()),
        "solar_self_consumption_ratio": pv_used / pv if pv > 0 else float("nan"),
        "solar_direct_kwh": float(ts["solar_direct_kwh"].sum()),
        "ev_energy_kwh": float(ts["ev_charging_kwh"].sum()),
        "ev_unmet_kwh": float(ts["ev_unmet_kwh"].sum()),
        "ev_forced_kwh": float(ts["ev_forced_kwh"].sum()),
        "ev_departures": departures,
        "ev_departure_success_ratio": (
            float(ts["ev_departures_met"].sum()) / departures if departures else float("nan")
        ),
        "peak_import_kw": float(imp.max()) if imp.size else 0.0,
        # Mean absolute change of import power between consecutive steps.
        "ramping_kw": float(np.abs(np.diff(imp)).mean()) if imp.size > 1 else 0.0,
        "battery_throughput_kwh": throughput,
        # No battery (capacity 0): no cycles.
        "battery_equivalent_cycles": (
            throughput / (2.0 * usable_capacity_kwh) if usable_capacity_kwh > 0 else 0.0
        ),
        "energy_balance_max_residual_kwh": float(np.abs(energy_balance_residual_kwh(ts)).max()),
        "reward_total_mean": float(ts["reward_total"].mean()),
    }
    for name in COMPONENTS:
        out[f"reward_{name}_mean"] = float(ts[f"reward_{name}"].mean())
    return out
