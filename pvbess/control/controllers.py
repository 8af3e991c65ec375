"""Controllers that do not learn: the uncontrolled reference, a rule-based one and the optimum.

Each is built like an SB3 agent (``builder(env=..., seed=..., device=...)``) and
answers ``predict(observation) -> (action, None)`` with the env's action
``[battery, socket_1 .. socket_n]``: battery in [-1, 1] of its power rating (+
charges), sockets in [0, 1] of socket power. ``learns = False`` tells
``pvbess.train`` to skip training. They read the step's inputs from the
unwrapped ``SiteEnv`` (its dataset, session arrays and the vehicles' SOC); the
env's safety layer still guarantees every departure SOC.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd

from pvbess.control import optimal
from pvbess.sim.env import SiteEnv
from pvbess.site import tariff
from pvbess.site.battery import one_way_efficiency_frac
from pvbess.units import STEP_HOURS


def _per_rating(energy_kwh: Any, rating_kwh: float) -> Any:
    """A battery energy per step [kWh] as its action (/ the rating per step); 0 without a
    battery (power 0: capacity_kwh = 0, the design without one)."""
    return energy_kwh / rating_kwh if rating_kwh > 0 else energy_kwh * 0.0


class Controller:
    """Shared plumbing: the unwrapped env, the action's shape, the vehicles' energy needs."""

    learns = False

    def __init__(
        self,
        env: gym.Env,
        seed: int | None = None,
        device: Any = None,
        name: str | None = None,
    ) -> None:
        site_env = env.unwrapped
        if not isinstance(site_env, SiteEnv):
            raise TypeError(f"{type(self).__name__} needs a pvbess SiteEnv, got {type(site_env)}")
        self.env = site_env
        self.name = name or type(self).__name__.lower()
        self.seed = seed
        site = site_env.site
        self.bess_power_kw = site.bess.power_kw
        self.socket_kwh = site.ev.socket_power_kw * STEP_HOURS
        self.charger_eff = site.ev.charger_efficiency_frac
        self.action_shape = site_env.action_space.shape
        self._low = site_env.action_space.low
        self._high = site_env.action_space.high

    def ev_need_kwh(self, t: int) -> np.ndarray:
        """Battery-side energy each plugged-in vehicle still needs for its required SOC [kWh]."""
        b = self.env.backend
        need_kwh = np.zeros(self.env.n_sockets)
        plugged = np.flatnonzero(b.state[:, t] == 1)
        if plugged.size:
            soc, cap = self.env.ev_soc_and_capacity(plugged)
            need_kwh[plugged] = np.maximum(b.required_soc[plugged, t] - soc, 0.0) * cap
        return need_kwh

    def _action(self, bess: float, sockets: np.ndarray) -> np.ndarray:
        a = np.concatenate([[bess], sockets]).astype(np.float32)
        return np.clip(a, self._low, self._high).reshape(self.action_shape)

    def predict(
        self, observation: np.ndarray, deterministic: bool = True
    ) -> tuple[np.ndarray, None]:
        raise NotImplementedError


class Uncontrolled(Controller):
    """The reference: full socket power from plug-in to the required SOC; battery idle.

    A vehicle that cannot reach its SOC charges at full power until it leaves.
    Stopping at the required SOC, not at 100 %, keeps the service equal across
    controllers, so every "% reduction" compares the same delivered energy.
    """

    def predict(
        self, observation: np.ndarray, deterministic: bool = True
    ) -> tuple[np.ndarray, None]:
        need_kwh = self.ev_need_kwh(self.env._t)
        sockets = np.clip(need_kwh / (self.socket_kwh * self.charger_eff), 0.0, 1.0)
        return self._action(0.0, sockets), None


class RuleBased(Controller):
    """What a site engineer would write, from the current hour's measured PV and load.

    Vehicles: the PV surplus (PV - load) goes to plugged-in vehicles first,
    earliest departure first, up to what each still needs; the env's safety
    layer adds whatever must be charged now for a vehicle to leave at its
    required SOC. Battery: what surplus is left charges it; when the site
    imports, it discharges to cover the import, at most ``peak_discharge_frac``
    of its power in the tariff's peak hours (down to the SOC floor) and
    ``offpeak_discharge_frac`` outside them, where it keeps ``reserve_soc_frac``
    of its capacity for the next peak.
    """

    def __init__(
        self,
        env: gym.Env,
        seed: int | None = None,
        device: Any = None,
        name: str | None = None,
        reserve_soc_frac: float = 0.5,
        peak_discharge_frac: float = 1.0,
        offpeak_discharge_frac: float = 1.0,
        ev_from_surplus: bool = True,
    ) -> None:
        super().__init__(env, seed=seed, device=device, name=name)
        site = self.env.site
        for key, value in (
            ("reserve_soc_frac", reserve_soc_frac),
            ("peak_discharge_frac", peak_discharge_frac),
            ("offpeak_discharge_frac", offpeak_discharge_frac),
        ):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"agent.{key}: must be in [0, 1], got {value}")
        self.ev_from_surplus = ev_from_surplus
        self.peak_discharge_kwh = peak_discharge_frac * self.bess_power_kw * STEP_HOURS
        self.offpeak_discharge_kwh = offpeak_discharge_frac * self.bess_power_kw * STEP_HOURS
        bess = site.bess
        self.floor_kwh = bess.capacity_kwh * bess.soc_min_frac
        self.reserve_kwh = max(bess.capacity_kwh * reserve_soc_frac, self.floor_kwh)
        # CityLearn's SOC is relative to its capacity, the SOC window's ceiling
        # (pvbess.site.battery).
        self.ceiling_kwh = bess.capacity_kwh * bess.soc_max_frac
        self.eta = one_way_efficiency_frac(bess)
        series = self.env.dataset.series
        self.pv_kwh = series["pv_kwh"].to_numpy()
        self.load_kwh = series["load_kwh"].to_numpy()
        self.peak = tariff.peak_mask(self.env.dataset.index, site.tariff)
        self._soc_index = self.env.backend.observation_names.index("electrical_storage_soc")

    def stored_kwh(self, observation: np.ndarray) -> float:
        """The battery's stored energy from the observed SOC [kWh]."""
        scaling = self.env.core  # the bounds the env scaled this observation with
        i = self._soc_index
        soc = float(np.asarray(observation).reshape(-1)[i]) * scaling.obs_span[i]
        soc += scaling.obs_low[i]
        return soc * self.ceiling_kwh

    def ev_from_pv(self, t: int, surplus_kwh: float) -> np.ndarray:
        """Socket energies [kWh, grid side] sharing the PV surplus, earliest departure first."""
        b = self.env.backend
        need_kwh = np.minimum(self.ev_need_kwh(t) / self.charger_eff, self.socket_kwh)
        order = np.argsort(b.departure_steps[:, t], kind="stable")
        order = order[need_kwh[order] > 0]
        wanted = need_kwh[order]
        # Each vehicle gets what is left of the surplus after those leaving before it.
        before = np.concatenate([[0.0], np.cumsum(wanted)[:-1]])
        out = np.zeros_like(need_kwh)
        out[order] = np.clip(surplus_kwh - before, 0.0, wanted)
        return out

    def predict(
        self, observation: np.ndarray, deterministic: bool = True
    ) -> tuple[np.ndarray, None]:
        t = self.env._t
        surplus_kwh = self.pv_kwh[t] - self.load_kwh[t]
        ev_kwh = np.zeros(self.env.n_sockets)
        if self.ev_from_surplus and surplus_kwh > 0:
            ev_kwh = self.ev_from_pv(t, surplus_kwh)
        sockets = ev_kwh / self.socket_kwh
        # The env raises these again the same way; done here to size the battery for it.
        sockets, _ = self.env.apply_safety(sockets, t)
        residual_kwh = surplus_kwh - float(sockets.sum()) * self.socket_kwh
        if residual_kwh >= 0:
            bess_kwh = min(residual_kwh, self.bess_power_kw * STEP_HOURS)
        else:
            stored = self.stored_kwh(observation)
            if self.peak[t]:
                limit_kwh, floor_kwh = self.peak_discharge_kwh, self.floor_kwh
            else:
                limit_kwh, floor_kwh = self.offpeak_discharge_kwh, self.reserve_kwh
            available_kwh = max(stored - floor_kwh, 0.0) * self.eta  # grid side
            bess_kwh = -min(-residual_kwh, limit_kwh, available_kwh)
        return self._action(_per_rating(bess_kwh, self.bess_power_kw * STEP_HOURS), sockets), None


class Optimal(Controller):
    """Replays the perfect-foresight LP's schedule (``pvbess.control.optimal``) step by step.

    Solves once at construction for the env's reward weights; each step returns
    the battery's net grid-side energy / power rating and each socket's energy /
    socket energy per step.
    """

    def __init__(
        self,
        env: gym.Env,
        seed: int | None = None,
        device: Any = None,
        name: str | None = None,
        solver: str = "choose",
        time_limit_s: float = 600.0,
        threads: int = 0,
        final_soc_frac_min: float | None = None,
    ) -> None:
        super().__init__(env, seed=seed, device=device, name=name)
        e = self.env
        self.problem = optimal.Problem.from_dataset(
            e.dataset, e.weights, e.scales, final_soc_frac_min=final_soc_frac_min
        )
        # The LP's sessions must be the ones CityLearn simulates, cell for cell.
        if not np.array_equal(optimal.plugged_mask(self.problem), e.backend.state == 1):
            raise RuntimeError("the dataset's sessions differ from CityLearn's charger states")
        self.solution = optimal.solve(
            self.problem, solver=solver, time_limit_s=time_limit_s, threads=threads
        )
        s = self.solution.schedule
        bess_net_kwh = s.bess_charge_kwh - s.bess_discharge_kwh
        self.actions = np.column_stack(
            [
                _per_rating(bess_net_kwh, self.bess_power_kw * STEP_HOURS),
                (s.ev_grid_kwh / self.socket_kwh).T,
            ]
        ).astype(np.float32)

    def predict(
        self, observation: np.ndarray, deterministic: bool = True
    ) -> tuple[np.ndarray, None]:
        a = self.actions[self.env._t]
        return np.clip(a, self._low, self._high).reshape(self.action_shape), None

    def metrics(self, timeseries: pd.DataFrame | None = None) -> dict[str, float]:
        """The LP's figures (``lp/*``); with a replayed episode, also its gaps to the LP."""
        out = self.solution.metrics()
        if timeseries is not None:
            out |= optimal.compare_with_history(self.solution, timeseries, self.problem)
        return out


__all__ = ["Controller", "Optimal", "RuleBased", "Uncontrolled", "_per_rating"]
