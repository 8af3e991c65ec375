"""The stationary battery (BESS) as CityLearn's Battery model.

CityLearn's ``efficiency`` is the round-trip efficiency; each direction loses
its square root. Flat power-efficiency and capacity-power curves and no
degradation make the simulator's battery the linear model the optimum's LP
uses, so the two can be compared step for step.
"""

from __future__ import annotations

import math
from typing import Any

from pvbess.config import BessConfig


def one_way_efficiency_frac(bess: BessConfig) -> float:
    """Charge (or discharge) efficiency: the square root of the round trip [-]."""
    return math.sqrt(bess.round_trip_efficiency_frac)


def citylearn_battery(bess: BessConfig) -> dict[str, Any]:
    """The schema's ``electrical_storage`` entry.

    SOC in CityLearn is relative to its capacity, which is set to the usable
    ceiling ``capacity_kwh * soc_max_frac``; the floor becomes a depth of
    discharge relative to it.
    """
    ceiling_kwh = bess.capacity_kwh * bess.soc_max_frac
    floor_kwh = bess.capacity_kwh * bess.soc_min_frac
    eff = bess.round_trip_efficiency_frac
    return {
        "type": "citylearn.energy_model.Battery",
        "autosize": False,
        "attributes": {
            "capacity": ceiling_kwh,
            "nominal_power": bess.power_kw,
            "efficiency": eff,
            "capacity_loss_coefficient": 0.0,
            "loss_coefficient": 0.0,
            "initial_soc": bess.initial_soc_frac / bess.soc_max_frac,
            # No battery (capacity 0): any depth of discharge; 1.0 avoids 0 / 0.
            "depth_of_discharge": 1.0 - floor_kwh / ceiling_kwh if ceiling_kwh > 0 else 1.0,
            "power_efficiency_curve": [[0.0, eff], [1.0, eff]],
            "capacity_power_curve": [[0.0, 1.0], [1.0, 1.0]],
        },
    }
