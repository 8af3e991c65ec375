"""The Gymnasium env: a central agent over the site's simulation.

Action: ``[battery, socket_1 .. socket_n]``; battery in [-1, 1] as a fraction
of its power rating (+ charges), each socket in [0, 1] of its power.
Observation: CityLearn's active observations, scaled to [0, 1] by its own
observation-space bounds. Reward: ``pvbess.reward`` from the step's physical
quantities, which are also recorded as the hourly timeseries (``history``).

The step itself (safety layer, simulator, flows, reward, record, observation) is
``SiteStep``, written once over [n_envs, ...] arrays. It drives a ``Simulator``:
``CityLearnBackend`` (the reference, one copy) or ``pvbess.twin.TwinSimulator`` (a
numpy twin of the same physics, ``env.backend=twin``, any number of copies).
``SiteEnv`` is one copy on either; the twin's VecEnv (``pvbess.twin.TwinVecEnv``)
is n copies.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import pandas as pd

from pvbess import reward as rw
from pvbess.config import BACKENDS, RewardConfig, SiteConfig
from pvbess.dataset import BUILDING, SiteDataset
from pvbess.units import STEP_HOURS

os.environ.setdefault("CITYLEARN_OFFLINE", "1")
log = logging.getLogger(__name__)

# Per-step quantities recorded in the timeseries, all [kWh per step] unless named otherwise.
RECORD_FIELDS = (
    "load_kwh",
    "pv_kwh",
    "ev_charging_kwh",
    "bess_charge_kwh",
    "bess_discharge_kwh",
    "bess_soc_frac",
    "net_kwh",
    "grid_import_kwh",
    "pv_curtailed_kwh",
    "pv_used_kwh",
    "bess_export_kwh",
    "solar_direct_kwh",
    "co2_kg",
    "cost",
    "ev_departures",
    "ev_departures_met",
    "ev_departing_required_kwh",
    "ev_unmet_kwh",
    "ev_forced_kwh",
    "action_bess",
    "action_ev_mean",
)


# Below this fraction of capacity a departing EV's gap is float32 rounding of CityLearn's SOC.
SOC_ROUNDING_FRAC = 1e-4
# A per-step quantity of one env (a float) or of a batch of env copies (an array).
Quantity = float | np.floating | np.ndarray


class Simulator(Protocol):
    """What the env's step uses of a simulator of ``n_envs`` copies of the site.

    Session tables are [socket, step] arrays over the episode, shared by the copies:
    ``state`` (1 plugged in, 2 arriving next step, 3 away), ``departure_steps`` (steps
    left while plugged in), ``required_soc``. Observations are raw (unscaled) in
    ``observation_names`` order, [n_envs, n_obs]; ``obs_low`` and ``obs_span`` scale
    them to [0, 1]. Quantities are [n_envs] arrays [kWh per step, SOC fraction].
    """

    n_envs: int
    n_steps: int
    observation_names: list[str]
    obs_low: np.ndarray
    obs_span: np.ndarray
    state: np.ndarray
    departure_steps: np.ndarray
    required_soc: np.ndarray
    chargers: list[Any]  # each with charger_id and electricity_consumption [kWh per step]

    @property
    def t(self) -> int: ...

    def reset(self, seeds: Sequence[int | None] | None = None) -> np.ndarray: ...

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], bool]: ...

    def ev_soc_and_capacity(self, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def ev_soc_after_step(self, t: int, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def clip_action(
    action: np.ndarray, low: np.ndarray, high: np.ndarray, n_envs: int | None = None
) -> np.ndarray:
    """The action as float64 inside the action space: flat, or [n_envs, n_actions]."""
    a = np.asarray(action, dtype=np.float64)
    return np.clip(a.reshape(-1) if n_envs is None else a.reshape(n_envs, -1), low, high)


def action_space(n_sockets: int) -> gym.spaces.Box:
    """``[battery, socket_1 .. socket_n]``: battery in [-1, 1] (+ charges), sockets in [0, 1]."""
    low = np.concatenate([[-1.0], np.zeros(n_sockets)]).astype(np.float32)
    return gym.spaces.Box(low=low, high=np.ones(n_sockets + 1, dtype=np.float32))


def observation_space(n_obs: int) -> gym.spaces.Box:
    """Observations scaled to [0, 1]."""
    return gym.spaces.Box(0.0, 1.0, shape=(n_obs,), dtype=np.float32)


def observation_scaling(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offset and span [float64] that map the simulator's observation bounds to [0, 1]."""
    obs_low = np.asarray(low, dtype=np.float64)
    return obs_low, np.maximum(np.asarray(high, dtype=np.float64) - obs_low, 1e-9)


def normalize_observation(raw: np.ndarray, obs_low: np.ndarray, obs_span: np.ndarray) -> np.ndarray:
    """Raw observations scaled to [0, 1] by the simulator's observation-space bounds."""
    return np.clip((raw - obs_low) / obs_span, 0.0, 1.0).astype(np.float32)


def safety_actions(
    ev_action: np.ndarray,
    soc: np.ndarray,
    capacity_kwh: np.ndarray,
    required_soc: np.ndarray,
    departure_steps: np.ndarray,
    step_kwh: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Raise plugged sockets' actions so each EV can still reach its required SOC.

    All arrays are per plugged socket (last axis; a leading env axis broadcasts).
    A vehicle with L steps left needing E kWh in its battery can receive at most
    (L-1) full steps after this one; the rest must be delivered now. ``step_kwh``
    is one full step's battery-side energy. Returns the new actions in [0, 1] and
    the battery-side energy forced [kWh].
    """
    need_kwh = np.maximum(required_soc - soc, 0.0) * capacity_kwh
    later_kwh = np.maximum(departure_steps - 1, 0) * step_kwh
    must_now = np.clip((need_kwh - later_kwh) / step_kwh, 0.0, 1.0)
    # Tiny upward margin: CityLearn stores SOC in float32.
    must_now = np.where(must_now > 0, np.minimum(must_now * (1 + 1e-5) + 1e-7, 1.0), 0.0)
    new = np.maximum(ev_action, must_now)
    return new, (new - ev_action) * step_kwh


def step_flows(
    *,
    load_kwh: Quantity,
    pv_kwh: Quantity,
    ev_charging_kwh: Quantity,
    net_kwh: Quantity,
    carbon_kg_per_kwh: float,
    price_per_kwh: float,
) -> dict[str, Quantity]:
    """Grid import, curtailment, PV use, CO2 and cost of a step from its balance (vectorised).

    The island grid takes no export: what the site pushes out is lost. Up to the
    step's PV it is curtailed PV; beyond that it is battery energy discharged
    with nothing to supply (``bess_export_kwh``), which CityLearn allows.
    """
    grid_import = np.maximum(net_kwh, 0.0)
    export = np.maximum(-net_kwh, 0.0)
    curtailed = np.minimum(export, pv_kwh)
    return {
        "grid_import_kwh": grid_import,
        "pv_curtailed_kwh": curtailed,
        "pv_used_kwh": pv_kwh - curtailed,
        "bess_export_kwh": export - curtailed,
        "solar_direct_kwh": np.minimum(pv_kwh, load_kwh + ev_charging_kwh),
        "co2_kg": grid_import * carbon_kg_per_kwh,
        "cost": grid_import * price_per_kwh,
    }


def departure_gap_kwh(
    required_soc: np.ndarray, soc_after: np.ndarray, capacity_kwh: np.ndarray
) -> np.ndarray:
    """Battery-side energy each departing EV still misses for its required SOC [kWh]."""
    gap = np.maximum(required_soc - soc_after, 0.0) * capacity_kwh
    # Below SOC_ROUNDING_FRAC of capacity it is float32 rounding in the SOC, not a shortfall.
    return np.where(gap > SOC_ROUNDING_FRAC * capacity_kwh, gap, 0.0)


def socket_step_kwh(site: SiteConfig) -> float:
    """Battery-side energy one socket delivers in a full hourly step [kWh]."""
    return site.ev.socket_power_kw * STEP_HOURS * site.ev.charger_efficiency_frac


def reward_scales(dataset: SiteDataset, reward: RewardConfig) -> rw.RewardScales:
    """The reward's per-step normalisation for this site."""
    return rw.RewardScales.from_site(
        dataset.site,
        load_peak_kw=float(dataset.series["load_kwh"].max()),
        peak_threshold_frac=reward.peak_threshold_frac,
    )


def make_backend(name: str, dataset: SiteDataset, seed: int | None) -> Simulator:
    """The simulator behind the env (one copy): ``citylearn`` (reference) or ``twin`` (numpy)."""
    if name == "citylearn":
        return CityLearnBackend(dataset, seed=seed)
    if name == "twin":
        from pvbess.twin import TwinSimulator  # the twin imports this module

        return TwinSimulator.from_dataset(dataset, n_envs=1, seeds=[seed])
    raise ValueError(f"env.backend={name!r}: choose one of {', '.join(BACKENDS)}")


class CityLearnBackend:
    """CityLearn 3 with a central agent, loaded from a local schema: one copy."""

    n_envs = 1

    def __init__(self, dataset: SiteDataset, seed: int | None = None) -> None:
        from citylearn.citylearn import CityLearnEnv  # slow import, kept local

        self.dataset = dataset
        self.env = CityLearnEnv(str(dataset.schema_path), central_agent=True, random_seed=seed)
        self.building = self.env.buildings[0]
        chargers = self.building.electric_vehicle_chargers or []
        n_expected = dataset.n_sockets
        n_actions = self.env.action_space[0].shape[0]
        # CityLearn silently drops misspelled keys and unknown EV ids: check the result.
        if len(chargers) != n_expected or n_actions != n_expected + 1:
            raise RuntimeError(
                f"CityLearn built {len(chargers)} chargers and {n_actions} actions from "
                f"{dataset.schema_path}; the site config has {n_expected} sockets "
                f"(expected {n_expected + 1} actions)."
            )
        by_id = {c.charger_id: c for c in chargers}
        self.chargers = [by_id[sid] for sid, _ in dataset.sockets]
        self.n_steps = self.env.time_steps - 1
        space = self.env.observation_space[0]
        self.obs_low, self.obs_span = observation_scaling(space.low, space.high)
        self.observation_names = list(self.env.observation_names[0])
        sims = [c.charger_simulation for c in self.chargers]
        # Session tables as [socket, step] arrays, read once: the safety layer needs them each step.
        self.state = np.stack([s.electric_vehicle_charger_state[: self.n_steps] for s in sims])
        self.departure_steps = np.stack(
            [s.electric_vehicle_departure_time[: self.n_steps] for s in sims]
        )
        self.required_soc = np.stack(
            [s.electric_vehicle_required_soc_departure[: self.n_steps] for s in sims]
        ).astype(np.float64)

    @property
    def t(self) -> int:
        return int(self.env.time_step)

    def reset(self, seeds: Sequence[int | None] | None = None) -> np.ndarray:
        obs, _ = self.env.reset(seed=None if seeds is None else seeds[0])
        return np.asarray(obs, dtype=np.float64)

    def ev_soc_and_capacity(self, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SOC at the start of this step and capacity [kWh] of the EV at each given socket,
        [1, len(sockets)]. Only the sockets asked for are read: attribute access into
        CityLearn is the cost here."""
        soc = np.zeros((1, len(sockets)))
        cap = np.zeros((1, len(sockets)))
        for j, i in enumerate(sockets):
            ev = self.chargers[i].connected_electric_vehicle
            if ev is not None:
                b = ev.battery
                cap[0, j] = b.capacity
                soc[0, j] = b.energy_init / b.capacity
        return soc, cap

    def ev_soc_after_step(self, t: int, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SOC after step t and capacity [kWh] of the EV that was at each given socket."""
        soc = np.zeros((1, len(sockets)))
        cap = np.zeros((1, len(sockets)))
        for j, i in enumerate(sockets):
            ev = self.chargers[i].past_connected_evs[t]
            if ev is not None:
                soc[0, j] = ev.battery.soc[t]
                cap[0, j] = ev.battery.capacity
        return soc, cap

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], bool]:
        t = self.t
        obs, _, terminated, truncated, _ = self.env.step([actions[0].tolist()])
        b = self.building
        storage_kwh = float(b.electrical_storage.electricity_consumption[t])
        quantities = {
            "load_kwh": float(b.non_shiftable_load_device.electricity_consumption[t]),
            "pv_kwh": -float(b.solar_generation[t]),
            "ev_charging_kwh": float(b.chargers_electricity_consumption[t]),
            "bess_charge_kwh": max(storage_kwh, 0.0),
            "bess_discharge_kwh": max(-storage_kwh, 0.0),
            "bess_soc_frac": float(b.electrical_storage.soc[t]),
            "net_kwh": float(b.net_electricity_consumption[t]),
        }
        batch = {k: np.array([v]) for k, v in quantities.items()}
        return np.asarray(obs, dtype=np.float64), batch, bool(terminated or truncated)


class SiteStep:
    """The env's step, for ``n_envs`` copies at once: the one place it is written.

    safety layer -> simulator step -> flows -> reward -> record -> observation, over
    [n_envs, ...] arrays. ``SiteEnv`` runs one copy on either simulator; the twin's
    VecEnv runs n copies. A new observation feature or action mode is written here
    once, and the twin/CityLearn parity tests cover it on both simulators.
    """

    def __init__(
        self,
        sim: Simulator,
        dataset: SiteDataset,
        reward: RewardConfig,
        safety_layer: bool = True,
        record: bool = True,
    ) -> None:
        self.sim = sim
        self.dataset = dataset
        self.site = dataset.site
        self.n_envs = sim.n_envs
        self.n_steps = sim.n_steps
        self.n_sockets = dataset.n_sockets
        self.weights = reward.weights
        self.scales = reward_scales(dataset, reward)
        self.safety_layer = safety_layer
        self.record = record
        self.action_space = action_space(self.n_sockets)
        self.observation_space = observation_space(len(sim.observation_names))
        # What scales observations to [0, 1]: the simulator's own bounds, or bounds shared
        # by every year a learner sees (``shared_obs_bounds``), so that one raw value is
        # one observation whichever year it comes from.
        self.obs_low, self.obs_span = sim.obs_low, sim.obs_span
        self._step_kwh = socket_step_kwh(self.site)
        self._price = dataset.series["price_per_kwh"].to_numpy()
        self._carbon = dataset.series["carbon_kg_per_kwh"].to_numpy()
        n = self.n_steps
        state = sim.state[:, :n]
        self._plugged = [np.flatnonzero(state[:, t] == 1) for t in range(n)]
        self._departing = [
            np.flatnonzero((state[:, t] == 1) & (sim.departure_steps[:, t] == 1)) for t in range(n)
        ]
        self.t = 0
        self.history_arrays: dict[str, np.ndarray] = {}
        self.components: dict[str, np.ndarray] = {}
        self.returns = np.zeros(self.n_envs)
        self.component_sums: dict[str, np.ndarray] = {}

    def observe(self, raw: np.ndarray) -> np.ndarray:
        """[n_envs, n_obs] observations scaled to [0, 1]."""
        return normalize_observation(raw, self.obs_low, self.obs_span)

    def set_obs_bounds(self, low: np.ndarray, span: np.ndarray) -> None:
        """Scale observations with these bounds [raw units] instead of the simulator's."""
        if low.shape != self.obs_low.shape:
            raise ValueError(f"{low.shape[0]} bounds for {self.obs_low.shape[0]} observations")
        self.obs_low, self.obs_span = low, span

    def reset(self, seeds: Sequence[int | None] | None = None) -> np.ndarray:
        raw = self.sim.reset(seeds)
        n = self.n_envs
        self.t = 0
        self._prev_import = np.zeros(n)
        self.returns = np.zeros(n)
        self.component_sums = {k: np.zeros(n) for k in rw.COMPONENTS}
        if self.record:
            self.history_arrays = {k: np.zeros((n, self.n_steps)) for k in RECORD_FIELDS}
            self.components = {k: np.zeros((n, self.n_steps)) for k in (*rw.COMPONENTS, "total")}
        return self.observe(raw)

    def safety(self, ev_action: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Raise plugged sockets' actions [n_envs, socket] so that each EV can still reach
        its required SOC; returns the new actions and the battery-side energy forced [kWh]."""
        new = ev_action.copy()
        forced = np.zeros_like(ev_action)
        plugged = self._plugged[t]
        if plugged.size == 0:
            return new, forced
        soc, cap = self.sim.ev_soc_and_capacity(plugged)
        new[:, plugged], forced[:, plugged] = safety_actions(
            ev_action[:, plugged],
            soc,
            cap,
            self.sim.required_soc[plugged, t],
            self.sim.departure_steps[plugged, t],
            self._step_kwh,
        )
        return new, forced

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, bool, dict[str, np.ndarray]]:
        """Actions [n_envs, 1 + socket] -> (observations, rewards [n_envs], done, reward parts)."""
        t = self.t
        a = clip_action(actions, self.action_space.low, self.action_space.high, self.n_envs)
        ev_action = a[:, 1:]
        forced = np.zeros_like(ev_action)
        if self.safety_layer and self.n_sockets:
            ev_action, forced = self.safety(ev_action, t)
        raw, q, done = self.sim.step(np.concatenate([a[:, :1], ev_action], axis=1))
        flows = step_flows(
            load_kwh=q["load_kwh"],
            pv_kwh=q["pv_kwh"],
            ev_charging_kwh=q["ev_charging_kwh"],
            net_kwh=q["net_kwh"],
            carbon_kg_per_kwh=self._carbon[t],
            price_per_kwh=self._price[t],
        )
        departing = self._departing[t]
        soc_after, caps = self.sim.ev_soc_after_step(t, departing)
        required = self.sim.required_soc[departing, t]
        gap = departure_gap_kwh(required, soc_after, caps)
        unmet = gap.sum(axis=1) if departing.size else np.zeros(self.n_envs)
        parts = rw.components(
            grid_import_kwh=flows["grid_import_kwh"],
            prev_grid_import_kwh=self._prev_import,
            co2_kg=flows["co2_kg"],
            cost=flows["cost"],
            pv_curtailed_kwh=flows["pv_curtailed_kwh"],
            ev_unmet_kwh=unmet,
            scales=self.scales,
        )
        total = rw.weighted_total(parts, self.weights)
        self._prev_import = flows["grid_import_kwh"]
        self.returns += total
        for k in rw.COMPONENTS:
            self.component_sums[k] += parts[k]
        if self.record:
            departures = {
                "ev_departures": np.full(self.n_envs, float(departing.size)),
                "ev_departures_met": (gap == 0).sum(axis=1).astype(np.float64),
                "ev_departing_required_kwh": (required * caps).sum(axis=1),
                "ev_unmet_kwh": unmet,
                "ev_forced_kwh": forced.sum(axis=1),
            }
            self._record(t, q | flows | departures, a, ev_action, parts, total)
        self.t = t + 1
        return self.observe(raw), total, done, parts

    def _record(
        self,
        t: int,
        values: dict[str, np.ndarray],
        a: np.ndarray,
        ev_action: np.ndarray,
        parts: dict[str, np.ndarray],
        total: np.ndarray,
    ) -> None:
        h = self.history_arrays
        for k, v in values.items():
            h[k][:, t] = v
        h["action_bess"][:, t] = a[:, 0]
        h["action_ev_mean"][:, t] = ev_action.mean(axis=1) if ev_action.shape[1] else 0.0
        for k, v in parts.items():
            self.components[k][:, t] = v
        self.components["total"][:, t] = total

    def history(self, copy: int = 0) -> pd.DataFrame:
        """One copy's episode so far, one row per step, with reward components."""
        n = self.t
        frame = pd.DataFrame(
            {k: v[copy, :n] for k, v in self.history_arrays.items()},
            index=self.dataset.index[:n],
        )
        frame["price_per_kwh"] = self._price[:n]
        frame["carbon_kg_per_kwh"] = self._carbon[:n]
        for k, v in self.components.items():
            frame[f"reward_{k}"] = v[copy, :n]
        return frame


class SiteEnv(gym.Env):
    """Central-agent env for SB3: one copy of ``SiteStep`` on either simulator."""

    metadata = {"render_modes": []}  # noqa: RUF012 - gymnasium's convention

    def __init__(
        self,
        dataset: SiteDataset,
        reward: RewardConfig,
        backend: str = "citylearn",
        safety_layer: bool = True,
        seed: int | None = None,
        n_envs: int = 1,
    ) -> None:
        """``n_envs`` is only recorded (``self.n_envs``): how many copies a trainer steps
        at once (``pvbess.twin.TwinVecEnv``); this env is always one."""
        super().__init__()
        if n_envs > 1 and backend != "twin":
            raise ValueError(f"env.n_envs={n_envs} needs env.backend=twin (got {backend!r})")
        self.dataset = dataset
        self.site = dataset.site
        self.backend_name = backend
        self.n_envs = n_envs
        self.backend: Simulator = make_backend(
            backend, dataset, dataset.site.seed if seed is None else seed
        )
        self.weights = reward.weights
        self.reward_config = reward
        self.safety_layer = safety_layer
        self.core = SiteStep(self.backend, dataset, reward, safety_layer=safety_layer)
        self.scales = self.core.scales
        self.n_sockets = dataset.n_sockets
        self.n_steps = self.backend.n_steps
        self.action_space = self.core.action_space
        self.observation_space = self.core.observation_space

    @property
    def _t(self) -> int:
        """The step the next action applies to."""
        return self.core.t

    def ev_soc_and_capacity(self, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SOC at the start of this step and capacity [kWh] of the EV at each given socket."""
        soc, cap = self.backend.ev_soc_and_capacity(sockets)
        return soc[0], cap[0]

    def apply_safety(self, ev_action: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Socket actions raised so each plugged-in EV can still reach its required SOC,
        and the battery-side energy forced [kWh] (``SiteStep.safety`` for this copy)."""
        new, forced = self.core.safety(np.asarray(ev_action, dtype=np.float64)[None, :], t)
        return new[0], forced[0]

    # -- gym API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        return self.core.reset([seed])[0], {}

    def step(self, action: np.ndarray):
        obs, total, done, parts = self.core.step(np.asarray(action).reshape(1, -1))
        info: dict[str, Any] = {"reward_components": {k: float(v[0]) for k, v in parts.items()}}
        if done:
            info["episode_components"] = {
                k: float(v[0]) for k, v in self.core.component_sums.items()
            }
        return obs[0], float(total[0]), done, False, info

    # -- results -------------------------------------------------------------------------
    def history(self) -> pd.DataFrame:
        """The episode so far, one row per step, with reward components."""
        return self.core.history()

    @property
    def citylearn(self):
        """The wrapped CityLearnEnv (for its own evaluate()); only with env.backend=citylearn."""
        if not isinstance(self.backend, CityLearnBackend):
            raise AttributeError(
                f"env.backend={self.backend_name!r} has no CityLearnEnv: evaluate with "
                "env.backend=citylearn for CityLearn's own KPIs"
            )
        return self.backend.env


__all__ = [
    "BUILDING",
    "CityLearnBackend",
    "Simulator",
    "SiteEnv",
    "SiteStep",
    "action_space",
    "clip_action",
    "departure_gap_kwh",
    "make_backend",
    "normalize_observation",
    "observation_scaling",
    "observation_space",
    "reward_scales",
    "safety_actions",
    "socket_step_kwh",
    "step_flows",
]


def shared_obs_bounds(steps: Sequence[SiteStep]) -> tuple[np.ndarray, np.ndarray]:
    """One scaling for several years: the lowest low and the highest high of their
    simulators' observation bounds [raw units] -> (low, span)."""
    low = np.min([s.sim.obs_low for s in steps], axis=0)
    high = np.max([s.sim.obs_low + s.sim.obs_span for s in steps], axis=0)
    return low, np.maximum(high - low, 1e-9)


class YearCycle(gym.Env):
    """One env over several years of the site: each reset moves to the next year's env."""

    metadata = {"render_modes": []}  # noqa: RUF012 - gymnasium's convention

    def __init__(self, envs: Sequence[SiteEnv]) -> None:
        super().__init__()
        self.envs = list(envs)
        self.index = -1
        self.action_space = self.envs[0].action_space
        self.observation_space = self.envs[0].observation_space

    @property
    def current(self) -> SiteEnv:
        return self.envs[max(self.index, 0)]

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.index = (self.index + 1) % len(self.envs)
        return self.current.reset(seed=seed, options=options)

    def step(self, action: np.ndarray):
        return self.current.step(action)


@dataclass
class Envs:
    """The envs of one run: where the agent trains, where it is evaluated (CityLearn, the
    evaluation year), where its learning curve is measured, and what they hold."""

    train: Any
    evaluate: SiteEnv
    curve: SiteEnv | None
    train_datasets: list[SiteDataset]
    tags: dict[str, str]


def build_envs(
    *,
    dataset: SiteDataset,
    reward: RewardConfig,
    learns: bool,
    seed: int,
    data_dir: str | None = None,
    backend: str = "twin",
    n_envs: int = 1,
    safety_layer: bool = True,
    train_seeds: Sequence[int] = (1, 2, 3),
    eval_on_training_data: bool = False,
    eval_backend: str = "citylearn",
    learning_curve: bool = True,
) -> Envs:
    """Every env of a run (``env._target_``).

    Every reported figure comes from ``eval_backend`` (CityLearn, or its bit-exact
    twin) on ``dataset``, the evaluation year (``site.seed``). A learning agent
    trains on the years of ``train_seeds`` (the same site built with those seeds;
    each episode the next year), on ``backend`` in ``n_envs`` copies (> 1: the
    twin's VecEnv), with observations scaled by bounds shared by its training
    years; its evaluation and learning curve (the twin, the evaluation year) use
    the same scaling. A controller (``learns`` false) reads the env it acts in at
    every step, so it is built on the evaluation env.
    """
    from stable_baselines3.common.monitor import Monitor

    from pvbess import dataset as ds_module

    evaluate = SiteEnv(dataset, reward, backend=eval_backend, safety_layer=safety_layer)
    tags = {"eval_data_hash": dataset.data_hash, "eval_backend": eval_backend}
    if not learns:
        return Envs(Monitor(evaluate), evaluate, None, [], tags)
    if dataset.site.seed in train_seeds and not eval_on_training_data:
        raise ValueError(f"env.train_seeds {list(train_seeds)} contains site.seed")
    if data_dir is None:
        raise ValueError("build_envs needs data_dir to build the training years")
    years = [ds_module.build(replace(dataset.site, seed=int(s)), data_dir) for s in train_seeds]
    tags |= {
        "train_seeds": ",".join(str(s) for s in train_seeds),
        "train_data_hashes": ",".join(y.data_hash for y in years),
        "eval_on_training_data": str(dataset.data_hash in {y.data_hash for y in years}).lower(),
    }
    if n_envs > 1:
        from pvbess.twin import TwinVecEnv

        train: Any = TwinVecEnv(years, reward, n_envs=n_envs, safety_layer=safety_layer, seed=seed)
        steps = train.steps
    else:
        year_envs = [SiteEnv(y, reward, backend=backend, safety_layer=safety_layer) for y in years]
        train = Monitor(YearCycle(year_envs))
        steps = [e.core for e in year_envs]
    low, span = shared_obs_bounds(steps)
    for step in steps:
        step.set_obs_bounds(low, span)
    evaluate.core.set_obs_bounds(low, span)
    curve = None
    if learning_curve:
        curve = _curve_env(dataset, reward, safety_layer)
        curve.core.set_obs_bounds(low, span)
    return Envs(train, evaluate, curve, years, tags)


def _curve_env(dataset: SiteDataset, reward: RewardConfig, safety_layer: bool) -> SiteEnv:
    """The env of the learning curve: the twin when it models the schema (bit-exact with
    CityLearn, ~30x faster, seconds per point), else CityLearn."""
    try:
        return SiteEnv(dataset, reward, backend="twin", safety_layer=safety_layer)
    except NotImplementedError as exc:
        log.info("learning curve on CityLearn (the twin does not model this schema: %s)", exc)
        return SiteEnv(dataset, reward, backend="citylearn", safety_layer=safety_layer)
