"""Figures: the evaluation dashboard and the site summary page."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: files only
import matplotlib.pyplot as plt
import pandas as pd


def typical_day(ts: pd.DataFrame, columns: list[str]) -> pd.DataFrame:
    """The mean of ``columns`` per hour of the day (0..23), in their own units."""
    return ts[columns].groupby(ts.index.hour).mean()


def dashboard(ts: pd.DataFrame, kpis: dict[str, float], title: str, path: str | Path) -> Path:
    """One page: mean day (kW), monthly energy and CO2, battery SOC, a summary of KPIs."""
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5))
    day = typical_day(
        ts,
        [
            "load_kwh",
            "pv_kwh",
            "ev_charging_kwh",
            "grid_import_kwh",
            "bess_charge_kwh",
            "bess_discharge_kwh",
            "pv_curtailed_kwh",
        ],
    )
    ax = axes[0, 0]
    for col, label in [
        ("load_kwh", "mall load"),
        ("pv_kwh", "PV"),
        ("ev_charging_kwh", "EV charging"),
        ("grid_import_kwh", "grid import"),
        ("pv_curtailed_kwh", "PV curtailed"),
    ]:
        ax.plot(day.index, day[col], label=label)
    ax.plot(
        day.index, day["bess_discharge_kwh"] - day["bess_charge_kwh"], label="battery (+ discharge)"
    )
    ax.set(title="Mean day", xlabel="hour", ylabel="power [kW]")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)

    monthly = (
        ts[["grid_import_kwh", "pv_used_kwh", "pv_curtailed_kwh", "co2_kg"]].resample("MS").sum()
    )
    ax = axes[0, 1]
    x = list(range(len(monthly)))
    ax.bar(x, monthly["pv_used_kwh"] / 1e3, label="PV used")
    ax.bar(
        x,
        monthly["grid_import_kwh"] / 1e3,
        bottom=monthly["pv_used_kwh"] / 1e3,
        label="grid import",
    )
    ax.set_xticks(x, monthly.index.strftime("%b"))
    ax.set(title="Monthly energy", ylabel="energy [MWh]")
    ax2 = ax.twinx()
    ax2.plot(x, monthly["co2_kg"] / 1e3, "k.-", label="CO2")
    ax2.set_ylabel("CO2 [t]")
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[1, 0]
    ax.plot(ts.index, ts["bess_soc_frac"], lw=0.6)
    ax.set(title="Battery SOC", ylabel="SOC [-]", ylim=(0, 1.02))
    ax.tick_params(axis="x", labelrotation=25)
    ax.grid(alpha=0.3)

    ax = axes[1, 1]
    ax.axis("off")
    keys = [
        "co2_kg",
        "grid_import_kwh",
        "cost",
        "pv_generation_kwh",
        "solar_self_consumption_ratio",
        "ev_energy_kwh",
        "ev_unmet_kwh",
        "ev_departure_success_ratio",
        "peak_import_kw",
        "battery_equivalent_cycles",
        "reward_total_mean",
    ]
    lines = [f"{k:32s} {kpis[k]:>14,.3f}" for k in keys if k in kpis]
    ax.text(0.0, 1.0, "\n".join(lines), family="monospace", va="top", fontsize=9)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def site_page(
    series: pd.DataFrame, sessions: pd.DataFrame, summary: dict, path: str | Path
) -> Path:
    """The site dataset at a glance: a mean day of each input and monthly energy."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    ev_kwh = pd.Series(0.0, index=series.index)
    if len(sessions):
        # Spread each session's energy evenly over its plugged steps (a picture, not the model).
        import numpy as np

        per_step = np.zeros(len(series))
        need = (sessions["required_soc_frac"] - sessions["arrival_soc_frac"]).clip(
            lower=0
        ) * sessions["battery_kwh"]
        for a, d, e in zip(sessions["arrival_step"], sessions["departure_step"], need, strict=True):
            per_step[a:d] += e / max(d - a, 1)
        ev_kwh[:] = per_step
    frame = series.assign(ev_kwh=ev_kwh.to_numpy())
    day = frame.groupby(frame.index.hour).mean()
    ax = axes[0]
    ax.plot(day.index, day["load_kwh"], label="mall load")
    ax.plot(day.index, day["pv_kwh"], label="PV")
    ax.plot(day.index, day["ev_kwh"], label="EV demand (spread over sessions)")
    ax.set(title=f"{summary['site']}: mean day", xlabel="hour", ylabel="power [kW]")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    monthly = frame[["load_kwh", "pv_kwh", "ev_kwh"]].resample("MS").sum() / 1e3
    monthly.index = monthly.index.strftime("%b")
    monthly.plot.bar(ax=axes[1])
    axes[1].set(title="Monthly energy", ylabel="energy [MWh]")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
