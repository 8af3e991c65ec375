"""Energy tariff and grid carbon intensity as per-step series."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pvbess.config import GridConfig, TariffConfig


def peak_mask(index: pd.DatetimeIndex, tariff: TariffConfig) -> np.ndarray:
    """True in the tariff's peak hours (OSINERGMIN 'HP'), local wall-clock time."""
    hours = index.hour.to_numpy()
    return (hours >= tariff.peak_start_hour) & (hours < tariff.peak_end_hour)


def price_per_kwh(index: pd.DatetimeIndex, tariff: TariffConfig) -> pd.Series:
    """Energy price of each step [currency/kWh]."""
    values = np.where(
        peak_mask(index, tariff), tariff.peak_price_per_kwh, tariff.offpeak_price_per_kwh
    )
    return pd.Series(values, index=index, name="price_per_kwh")


def carbon_intensity_kg_per_kwh(index: pd.DatetimeIndex, grid: GridConfig) -> pd.Series:
    """Grid carbon intensity of each step [kg CO2/kWh]; constant for a thermal island grid."""
    return pd.Series(
        grid.carbon_intensity_kg_per_kwh, index=index, name="carbon_intensity_kg_per_kwh"
    )
