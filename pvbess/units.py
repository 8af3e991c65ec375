"""Units and time constants, defined once.

pvbess simulates hourly steps: an energy per step [kWh] equals the step's mean
power [kW] times ``STEP_HOURS``. Every conversion between the two goes through
these names, so that kW and kWh are never mixed silently.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

# One simulation step [h] (CityLearn's seconds_per_time_step = 3600).
STEP_HOURS = 1.0
SECONDS_PER_HOUR = 3600.0
# A non-leap year [h]: figures "per year" are annualised with it.
HOURS_PER_YEAR = 8760.0


def step_hours(index: pd.DatetimeIndex) -> float:
    """The uniform step of ``index`` [h]; raise ValueError if it is empty or not uniform."""
    if len(index) == 0:
        raise ValueError("index is empty")
    if len(index) == 1:
        if index.freq is None:
            raise ValueError("a one-step index needs a freq to define its step")
        return pd.Timedelta(index.freq).total_seconds() / SECONDS_PER_HOUR
    # Via Timedelta, not asi8: pandas 3 indexes may be in us rather than ns.
    steps_s = np.asarray((index[1:] - index[:-1]).total_seconds(), dtype=float)
    if not np.allclose(steps_s, steps_s[0]):
        raise ValueError("index must have a uniform step")
    return float(steps_s[0]) / SECONDS_PER_HOUR
