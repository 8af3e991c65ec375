"""A numpy twin of CityLearn 3.0.2 for the schema pvbess writes: ``env.backend=twin``.

Why: CityLearn spends its time in per-charger Python bookkeeping (about 190 env
steps/s for 38 sockets). The physics pvbess's schema switches on is small, so
the twin implements exactly that physics with arrays, behind the same backend
interface as ``pvbess.sim.citylearn.CityLearnBackend``:

- the BESS as CityLearn's ``Battery.charge`` with flat power-efficiency and
  capacity-power curves, no standby loss and no degradation: power limit,
  one-way efficiency = sqrt(round trip), depth of discharge, capacity ceiling,
  and the same two-pass limiting;
- chargers (efficiency, power limit and dead band) feeding EV batteries
  (efficiency 1, SOC ceiling); an EV's SOC on arrival is taken from the charger
  file exactly where CityLearn takes it; unplugged EVs drift randomly with
  CityLearn's own random stream (seed = random seed + episode index), which
  matters because CityLearn shows the previous step's SOC of a vehicle that
  has just plugged in;
- the observations, in CityLearn's order, with its observation-space bounds
  computed as ``Building.estimate_observation_space_limits`` does;
- CityLearn's float32 storage: SOCs, battery and charger energies and the net
  consumption are rounded to float32 where CityLearn stores them and computed
  in float64 in between, so the twin's numbers are CityLearn's bit for bit
  (``tests/test_twin.py`` checks every step of whole episodes).

Anything else in a schema (other devices, noise, power outages, charging
constraints, degradation, non-flat curves, other time steps) raises
``NotImplementedError`` when the twin is built: it never silently simulates
something else.

``TwinVecEnv`` steps N copies of the site in one numpy call per step (an SB3
VecEnv without subprocesses), with ``pvbess.sim.env``'s own safety layer, flows and
reward applied to the batch.
"""

from pvbess.sim.twin.core import StepResult, TwinCore
from pvbess.sim.twin.schema import BatteryParams, TwinData, observation_bounds
from pvbess.sim.twin.simulator import TwinCharger, TwinSimulator, TwinVecEnv

__all__ = [
    "BatteryParams",
    "StepResult",
    "TwinCharger",
    "TwinCore",
    "TwinData",
    "TwinSimulator",
    "TwinVecEnv",
    "observation_bounds",
]
