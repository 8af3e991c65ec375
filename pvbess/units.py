"""Units and time constants, defined once.

pvbess simulates hourly steps: an energy per step [kWh] equals the step's mean
power [kW] times ``STEP_HOURS``. Every conversion between the two goes through
these names, so that kW and kWh are never mixed silently.
"""

from __future__ import annotations

# One simulation step [h] (CityLearn's seconds_per_time_step = 3600).
STEP_HOURS = 1.0
SECONDS_PER_HOUR = 3600.0
# A non-leap year [h]: figures "per year" are annualised with it.
HOURS_PER_YEAR = 8760.0
