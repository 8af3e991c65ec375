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

from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd

from pvbess.config import SiteConfig, TariffConfig
from pvbess.control import optimal
from pvbess.sim.env import SiteEnv
from pvbess.sim.step import BATTERY_SOC_OBS, plugged_safety, socket_step_kwh
from pvbess.site import tariff
from pvbess.site.battery import one_way_efficiency_frac
from pvbess.units import STEP_HOURS


def _per_rating(energy_kwh: Any, rating_kwh: float) -> Any:
    """A battery energy per step [kWh] as its action (/ the rating per step); 0 without a
    battery (power 0: capacity_kwh = 0, the design without one)."""
    return energy_kwh / rating_kwh if rating_kwh > 0 else energy_kwh * 0.0


@dataclass
class Measured:
    """What a controller knows at the start of a step, in physical units: from the env in
    simulation (``Controller.measure``), from a request when served (``pvbess.deploy``).

    ``plugged`` are the sockets with a vehicle; ``soc``, ``capacity_kwh``,
    ``required_soc`` and ``departure_steps`` (steps left, this one included) are theirs,
    in that order. ``battery_soc_frac`` is the battery's SOC as the controller reads it
    from its observation; ``prev_import_kwh`` the grid import of the step before.
    """

    time: pd.Timestamp
    pv_kwh: float
    load_kwh: float
    battery_soc_frac: float
    plugged: np.ndarray
    soc: np.ndarray
    capacity_kwh: np.ndarray
    required_soc: np.ndarray
    departure_steps: np.ndarray
    prev_import_kwh: float = 0.0

    def need_kwh(self, n_sockets: int) -> np.ndarray:
        """Battery-side energy each socket's vehicle still needs for its required SOC [kWh]
        (0 at an empty socket)."""
        need_kwh = np.zeros(n_sockets)
        if self.plugged.size:
            need_kwh[self.plugged] = (
                np.maximum(self.required_soc - self.soc, 0.0) * self.capacity_kwh
            )
        return need_kwh


def observed_soc_frac(
    observation: np.ndarray, index: int, low: np.ndarray, span: np.ndarray
) -> float:
    """A raw value back from its [0, 1] observation (the bounds it was scaled with)."""
    return float(np.asarray(observation).reshape(-1)[index]) * span[index] + low[index]


@dataclass(frozen=True)
class Sockets:
    """What every controller needs of the sockets: how many, one full step's energy at
    socket power (grid side) [kWh], the chargers' efficiency, and the action's bounds."""

    n_sockets: int
    socket_kwh: float
    charger_eff: float
    step_kwh: float  # battery side, = socket_kwh x charger_eff
    low: np.ndarray
    high: np.ndarray

    @classmethod
    def of_site(
        cls, site: SiteConfig, n_sockets: int, low: np.ndarray, high: np.ndarray
    ) -> Sockets:
        """The ``n_sockets`` sockets of ``site``, acted on within ``low``..``high``."""
        return cls(
            n_sockets=n_sockets,
            socket_kwh=site.ev.socket_power_kw * STEP_HOURS,
            charger_eff=site.ev.charger_efficiency_frac,
            step_kwh=socket_step_kwh(site),
            low=low,
            high=high,
        )

    def action(self, bess: float, sockets: np.ndarray) -> np.ndarray:
        """``[battery, socket_1 .. socket_n]`` as float32 inside the action space."""
        a = np.concatenate([[bess], sockets]).astype(np.float32)
        return np.clip(a, self.low, self.high)

    def safety(self, sockets: np.ndarray, m: Measured) -> np.ndarray:
        """Socket actions raised as the env's safety layer raises them."""
        new, _ = plugged_safety(
            np.asarray(sockets, dtype=np.float64)[None, :],
            m.plugged,
            m.soc[None, :],
            m.capacity_kwh[None, :],
            m.required_soc,
            m.departure_steps,
            self.step_kwh,
        )
        return new[0]


class Controller:
    """Shared plumbing: the unwrapped env, the action's shape, the vehicles' energy needs.

    A controller that can be served (``pvbess.deploy``) keeps its decision in
    ``policy``: an env-free object whose ``act(Measured) -> action`` both ``predict``
    (on what ``measure`` reads from the env) and the served model call.
    """

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
        self.sockets = Sockets.of_site(site, site_env.n_sockets, self._low, self._high)
        self._soc_index = site_env.backend.observation_names.index(BATTERY_SOC_OBS)
        self.policy: Any = None

    def measure(self, observation: np.ndarray) -> Measured:
        """What the controller knows at the env's current step."""
        e = self.env
        t, b = e._t, e.backend
        plugged = np.flatnonzero(b.state[:, t] == 1)
        soc = cap = np.zeros(0)
        if plugged.size:
            soc, cap = e.ev_soc_and_capacity(plugged)
        core = e.core  # the bounds the env scaled this observation with
        series = e.dataset.series
        return Measured(
            time=e.dataset.index[t],
            pv_kwh=float(series["pv_kwh"].iloc[t]),
            load_kwh=float(series["load_kwh"].iloc[t]),
            battery_soc_frac=observed_soc_frac(
                observation, self._soc_index, core.obs_low, core.obs_span
            ),
            plugged=plugged,
            soc=soc,
            capacity_kwh=cap,
            required_soc=b.required_soc[plugged, t],
            departure_steps=b.departure_steps[plugged, t],
            prev_import_kwh=e.last_grid_import_kwh,
        )

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
        """The decision of ``self.policy`` (``FullPower``, ``Rules``: what a served
        controller runs too) on what the controller measures; others override this."""
        policy = getattr(self, "policy", None)
        if policy is None:
            raise NotImplementedError
        return policy.act(self.measure(observation)).reshape(self.action_shape), None


class Uncontrolled(Controller):
    """The reference: full socket power from plug-in to the required SOC; battery idle.

    A vehicle that cannot reach its SOC charges at full power until it leaves.
    Stopping at the required SOC, not at 100 %, keeps the service equal across
    controllers, so every "% reduction" compares the same delivered energy.
    """

    def __init__(
        self, env: gym.Env, seed: int | None = None, device: Any = None, name: str | None = None
    ) -> None:
        super().__init__(env, seed=seed, device=device, name=name)
        self.policy = FullPower(self.sockets)


@dataclass(frozen=True)
class FullPower:
    """``Uncontrolled``'s decision: each socket at full power until its vehicle's required
    SOC, the battery idle."""

    sockets: Sockets

    def act(self, m: Measured) -> np.ndarray:
        s = self.sockets
        need_kwh = m.need_kwh(s.n_sockets)
        return s.action(0.0, np.clip(need_kwh / (s.socket_kwh * s.charger_eff), 0.0, 1.0))


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
        bess = site.bess
        floor_kwh = bess.capacity_kwh * bess.soc_min_frac
        self.policy = Rules(
            sockets=self.sockets,
            tariff=site.tariff,
            bess_power_kw=self.bess_power_kw,
            peak_discharge_kwh=peak_discharge_frac * self.bess_power_kw * STEP_HOURS,
            offpeak_discharge_kwh=offpeak_discharge_frac * self.bess_power_kw * STEP_HOURS,
            floor_kwh=floor_kwh,
            reserve_kwh=max(bess.capacity_kwh * reserve_soc_frac, floor_kwh),
            # CityLearn's SOC is relative to its capacity, the SOC window's ceiling
            # (pvbess.site.battery).
            ceiling_kwh=bess.capacity_kwh * bess.soc_max_frac,
            eta=one_way_efficiency_frac(bess),
            ev_from_surplus=ev_from_surplus,
        )


@dataclass(frozen=True)
class Rules:
    """``RuleBased``'s decision from what it measures at a step (see ``RuleBased``)."""

    sockets: Sockets
    tariff: TariffConfig
    bess_power_kw: float
    peak_discharge_kwh: float
    offpeak_discharge_kwh: float
    floor_kwh: float
    reserve_kwh: float
    ceiling_kwh: float
    eta: float
    ev_from_surplus: bool

    def ev_from_pv(self, m: Measured, surplus_kwh: float) -> np.ndarray:
        """Socket energies [kWh, grid side] sharing the PV surplus, earliest departure first."""
        s = self.sockets
        need_kwh = np.minimum(m.need_kwh(s.n_sockets) / s.charger_eff, s.socket_kwh)
        departure = np.zeros(s.n_sockets)
        departure[m.plugged] = m.departure_steps
        # Stable: the order of the vehicles that need energy does not depend on empty sockets.
        order = np.argsort(departure, kind="stable")
        order = order[need_kwh[order] > 0]
        wanted = need_kwh[order]
        # Each vehicle gets what is left of the surplus after those leaving before it.
        before = np.concatenate([[0.0], np.cumsum(wanted)[:-1]])
        out = np.zeros_like(need_kwh)
        out[order] = np.clip(surplus_kwh - before, 0.0, wanted)
        return out

    def act(self, m: Measured) -> np.ndarray:
        s = self.sockets
        surplus_kwh = m.pv_kwh - m.load_kwh
        ev_kwh = np.zeros(s.n_sockets)
        if self.ev_from_surplus and surplus_kwh > 0:
            ev_kwh = self.ev_from_pv(m, surplus_kwh)
        # The env raises these again the same way; done here to size the battery for it.
        sockets = s.safety(ev_kwh / s.socket_kwh, m)
        residual_kwh = surplus_kwh - float(sockets.sum()) * s.socket_kwh
        if residual_kwh >= 0:
            bess_kwh = min(residual_kwh, self.bess_power_kw * STEP_HOURS)
        else:
            stored = m.battery_soc_frac * self.ceiling_kwh
            if tariff.peak_mask(pd.DatetimeIndex([m.time]), self.tariff)[0]:
                limit_kwh, floor_kwh = self.peak_discharge_kwh, self.floor_kwh
            else:
                limit_kwh, floor_kwh = self.offpeak_discharge_kwh, self.reserve_kwh
            available_kwh = max(stored - floor_kwh, 0.0) * self.eta  # grid side
            bess_kwh = -min(-residual_kwh, limit_kwh, available_kwh)
        return s.action(_per_rating(bess_kwh, self.bess_power_kw * STEP_HOURS), sockets)


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


__all__ = [
    "Controller",
    "FullPower",
    "Measured",
    "Optimal",
    "RuleBased",
    "Rules",
    "Sockets",
    "Uncontrolled",
    "_per_rating",
]
