"""The twin behind the env's step: ``TwinSimulator`` (n copies of the site, the
``pvbess.sim.step.Simulator`` interface) and ``TwinVecEnv`` (an SB3 VecEnv over it)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env.base_vec_env import (
    VecEnv,
    VecEnvIndices,
    VecEnvObs,
    VecEnvStepReturn,
)

from pvbess.config import ObservationConfig, RewardConfig
from pvbess.sim import step as site_env
from pvbess.sim.twin.core import TwinCore
from pvbess.sim.twin.schema import F32, F64, TwinData
from pvbess.site.dataset import SiteDataset

# -- the backend behind SiteEnv ---------------------------------------------------------------


class TwinCharger:
    """What callers read of a CityLearn charger: its id and electricity use per step [kWh]."""

    def __init__(self, charger_id: str, electricity_consumption: np.ndarray) -> None:
        self.charger_id = charger_id
        self.electricity_consumption = electricity_consumption


class TwinSimulator:
    """``n_envs`` copies of the site on one ``TwinCore``: the ``pvbess.sim.step.Simulator`` the
    env's step (``pvbess.sim.env.SiteStep``) runs, for ``SiteEnv`` (one copy) and the VecEnv."""

    def __init__(self, data: TwinData, n_envs: int = 1, seeds: Sequence[int | None] = ()) -> None:
        self.data = d = data
        self.n_envs = n_envs
        # CityLearnEnv(random_seed=seed) per copy; a reset with a seed replaces it.
        seeds = list(seeds) or [None] * n_envs
        if len(seeds) != n_envs:
            raise ValueError(f"{len(seeds)} seeds for {n_envs} copies")
        self.random_seeds = [d.random_seed if s is None else int(s) for s in seeds]
        self.core = TwinCore(d, n_envs=n_envs, random_seeds=self.random_seeds)
        self.n_steps = d.n_steps
        self.obs_low, self.obs_span = site_env.observation_scaling(d.obs_low32, d.obs_high32)
        self.observation_names = list(d.observation_names)
        n = self.n_steps
        self.state = d.state32[:, :n]
        self.departure_steps = d.departure_steps[:, :n]
        self.required_soc = d.required_soc32[:, :n].astype(F64)
        # The first copy's chargers, as CityLearn's (tests and plots read them).
        self._charger_kwh = np.zeros((d.n_sockets, d.n_rows), dtype=F32)
        self.chargers = [
            TwinCharger(sid, self._charger_kwh[s]) for s, sid in enumerate(d.socket_ids)
        ]
        self._soc_after = np.zeros((n_envs, d.n_sockets))
        self._soc_after_t = -1

    @classmethod
    def from_dataset(
        cls, dataset: SiteDataset, n_envs: int = 1, seeds: Sequence[int | None] = ()
    ) -> TwinSimulator:
        return cls(TwinData.load(dataset), n_envs=n_envs, seeds=seeds)

    @property
    def random_seed(self) -> int:
        return self.random_seeds[0]

    @property
    def t(self) -> int:
        return self.core.t

    def reset(self, seeds: Sequence[int | None] | None = None) -> np.ndarray:
        if seeds is not None:
            self.random_seeds = [
                old if s is None else int(s)
                for old, s in zip(self.random_seeds, seeds, strict=True)
            ]
        self.core.reset(self.random_seeds)
        self._charger_kwh[:] = 0.0
        self._soc_after_t = -1
        return self.core.observe()

    def ev_soc_and_capacity(self, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SOC at the start of this step and capacity [kWh] of the EV at each given socket."""
        return self.core.ev_soc_and_capacity(np.asarray(sockets, dtype=np.int64))

    def ev_soc_after_step(self, t: int, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SOC after step t (the last step taken) and capacity [kWh] of the EV that was at
        each given socket."""
        if t != self._soc_after_t:
            raise ValueError(f"the twin keeps the SOCs of step {self._soc_after_t} only, not {t}")
        idx = np.asarray(sockets, dtype=np.int64)
        ev = self.data.connected_ev[idx, t]
        cap = np.where(ev >= 0, self.data.ev_capacity_kwh[np.maximum(ev, 0)], 0.0)
        return self._soc_after[:, idx].copy(), np.broadcast_to(cap, (self.n_envs, idx.size)).copy()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], bool]:
        core, t = self.core, self.core.t
        a = np.asarray(actions, dtype=F64)
        r = core.step(a[:, 0], a[:, 1:])
        self._charger_kwh[:, t] = r.charger_kwh32[0]
        socks = core.plugged(t)
        self._soc_after[:] = 0.0
        self._soc_after[:, socks] = core.ev_soc_after_step(socks)[0]
        self._soc_after_t = t
        storage_kwh = r.bess_energy_kwh32.astype(F64)
        quantities = {
            "load_kwh": np.full(self.n_envs, F64(r.load_kwh32)),
            "pv_kwh": np.full(self.n_envs, F64(r.pv_kwh32)),
            "ev_charging_kwh": r.ev_charging_kwh32.astype(F64),
            "bess_charge_kwh": np.maximum(storage_kwh, 0.0),
            "bess_discharge_kwh": np.maximum(-storage_kwh, 0.0),
            "bess_soc_frac": r.bess_soc32.astype(F64),
            "net_kwh": r.net_kwh32.astype(F64),
        }
        done = core.advance()
        return core.observe(), quantities, done


# -- many copies for training -----------------------------------------------------------------


class TwinVecEnv(VecEnv):
    """``n_envs`` copies of ``SiteEnv`` on the twin, stepped in one numpy call: an SB3 VecEnv.

    The step is ``pvbess.sim.env.SiteStep`` over n copies (the same code ``SiteEnv`` runs
    for one). The copies run in lockstep over the same year, so they all end (and
    reset) together; they differ by their actions and their random stream for
    unplugged EVs (seed + i). Given several years (datasets of the site built with
    other seeds), each episode runs the next one. Infos carry ``episode`` (as SB3's
    Monitor) and ``episode_components`` at the end of an episode, not the per-step
    ``reward_components``.
    """

    def __init__(
        self,
        datasets: SiteDataset | Sequence[SiteDataset],
        reward: RewardConfig,
        n_envs: int,
        safety_layer: bool = True,
        seed: int | None = None,
        observations: ObservationConfig | None = None,
        action_mode: str = "per_socket",
        battery_action: str = "power",
        residual_frac: float = 0.5,
        ev_action: str = "intensity",
        planner_arrivals: str = "none",
        ev_residual_frac: float = 1.0,
        planner_forecast: str = "persistence",
    ) -> None:
        if n_envs < 1:
            raise ValueError(f"n_envs must be >= 1, got {n_envs}")
        years = [datasets] if isinstance(datasets, SiteDataset) else list(datasets)
        self.datasets = years
        base_seed = years[0].site.seed if seed is None else int(seed)
        seeds = [base_seed + i for i in range(n_envs)]
        self.steps = [
            site_env.SiteStep(
                TwinSimulator.from_dataset(ds, n_envs, seeds=seeds),
                ds,
                reward,
                safety_layer=safety_layer,
                record=False,
                observations=observations,
                action_mode=action_mode,
                battery_action=battery_action,
                residual_frac=residual_frac,
                ev_action=ev_action,
                planner_arrivals=planner_arrivals,
                ev_residual_frac=ev_residual_frac,
                planner_forecast=planner_forecast,
            )
            for ds in years
        ]
        if len({s.n_steps for s in self.steps}) > 1:
            raise ValueError("the training years differ in length")
        self.year = 0
        self.render_mode = None
        self.safety_layer = safety_layer
        first = self.steps[0]
        self.n_sockets = first.n_sockets
        self.n_steps = first.n_steps
        self.observation_names = first.sim.observation_names
        self._actions = np.zeros((n_envs, *first.action_space.shape))
        super().__init__(n_envs, first.observation_space, first.action_space)
        self._created = time.time()

    @property
    def step_fn(self) -> site_env.SiteStep:
        """The current year's step."""
        return self.steps[self.year]

    @property
    def sim(self) -> TwinSimulator:
        return self.step_fn.sim  # type: ignore[return-value]

    @property
    def core(self) -> TwinCore:
        return self.sim.core

    # -- VecEnv API ------------------------------------------------------------------------
    def reset(self) -> VecEnvObs:
        seeds = list(self._seeds)
        self._reset_seeds()
        self._reset_options()
        return self.step_fn.reset(seeds)

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        step = self.step_fn
        obs, total, done, _ = step.step(self._actions)
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if done:
            elapsed = round(time.time() - self._created, 6)  # as SB3's Monitor
            for i, info in enumerate(infos):
                info["terminal_observation"] = obs[i]
                info["TimeLimit.truncated"] = False
                info["episode"] = {"r": float(step.returns[i]), "l": step.t, "t": elapsed}
                info["episode_components"] = {
                    k: float(v[i]) for k, v in step.component_sums.items()
                }
            self.year = (self.year + 1) % len(self.steps)
            obs = self.step_fn.reset()
        dones = np.full(self.num_envs, done)
        return obs, total.astype(np.float32), dones, infos

    def close(self) -> None:
        return None

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return [getattr(self, attr_name) for _ in self._get_indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        setattr(self, attr_name, value)

    def env_method(
        self, method_name: str, *method_args: Any, indices: VecEnvIndices = None, **kwargs: Any
    ) -> list[Any]:
        raise NotImplementedError(f"TwinVecEnv copies have no methods of their own ({method_name})")

    def env_is_wrapped(
        self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None
    ) -> list[bool]:
        return [False for _ in self._get_indices(indices)]
