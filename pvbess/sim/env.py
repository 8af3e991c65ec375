"""The Gymnasium env and the envs of a run.

``SiteEnv`` is a central-agent env over one copy of ``pvbess.sim.step.SiteStep``,
on CityLearn (``CityLearnBackend``, the reference) or on the numpy twin
(``pvbess.sim.twin``). ``build_envs`` (``env._target_``) makes every env of a run:
the training years, the evaluation year, the learning curve.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd

from pvbess.config import BACKENDS, ObservationConfig, RewardConfig
from pvbess.sim.citylearn import CityLearnBackend
from pvbess.sim.step import Simulator, SiteStep, neutral_action
from pvbess.sim.twin import TwinSimulator, TwinVecEnv
from pvbess.site.dataset import SiteDataset

log = logging.getLogger(__name__)


def make_backend(name: str, dataset: SiteDataset, seed: int | None) -> Simulator:
    """The simulator behind the env (one copy): ``citylearn`` (reference) or ``twin`` (numpy)."""
    if name == "citylearn":
        return CityLearnBackend(dataset, seed=seed)
    if name == "twin":
        return TwinSimulator.from_dataset(dataset, n_envs=1, seeds=[seed])
    raise ValueError(f"env.backend={name!r}: choose one of {', '.join(BACKENDS)}")


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
        observations: ObservationConfig | None = None,
        action_mode: str = "per_socket",
        battery_action: str = "power",
        residual_frac: float = 0.5,
        ev_action: str = "intensity",
        planner_arrivals: str = "none",
        ev_residual_frac: float = 1.0,
        planner_forecast: str = "persistence",
    ) -> None:
        """``n_envs`` is only recorded (``self.n_envs``): how many copies a trainer steps
        at once (``pvbess.sim.twin.TwinVecEnv``); this env is always one."""
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
        self.core = SiteStep(
            self.backend,
            dataset,
            reward,
            safety_layer=safety_layer,
            observations=observations,
            action_mode=action_mode,
            battery_action=battery_action,
            residual_frac=residual_frac,
            ev_action=ev_action,
            planner_arrivals=planner_arrivals,
            ev_residual_frac=ev_residual_frac,
            planner_forecast=planner_forecast,
        )
        self.scales = self.core.scales
        self.n_sockets = dataset.n_sockets
        self.n_steps = self.backend.n_steps
        self.action_space = self.core.action_space
        self.observation_space = self.core.observation_space

    @property
    def _t(self) -> int:
        """The step the next action applies to."""
        return self.core.t

    @property
    def last_grid_import_kwh(self) -> float:
        """The grid import of the last step taken (0 before the first) [kWh]: what the
        reward's ramp term compares the next step's import with."""
        return float(self.core.prev_import_kwh[0])

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
    evaluation year), where its learning curve is measured, where its policy is chosen
    (the validation year), and what they hold."""

    train: Any
    evaluate: SiteEnv
    curve: SiteEnv | None
    train_datasets: list[SiteDataset]
    tags: dict[str, str]
    validation: SiteEnv | None = None


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
    validation_seed: int | None = None,
    eval_backend: str = "citylearn",
    learning_curve: bool = True,
    observations: ObservationConfig | Mapping[str, Any] | None = None,
    action_mode: str = "per_socket",
    battery_action: str = "power",
    residual_frac: float = 0.5,
    ev_action: str = "intensity",
    planner_arrivals: str = "none",
    ev_residual_frac: float = 1.0,
    planner_forecast: str = "persistence",
    reward_baseline: str = "none",
    normalize: bool = False,
    gamma: float = 0.99,
) -> Envs:
    """Every env of a run (``env._target_``).

    Every reported figure comes from ``eval_backend`` (CityLearn, or its bit-exact
    twin) on ``dataset``, the evaluation year (``site.seed``). A learning agent
    trains on the years of ``train_seeds`` (the same site built with those seeds;
    each episode the next year), on ``backend`` in ``n_envs`` copies (> 1: the
    twin's VecEnv), with observations scaled by bounds shared by its training
    years; its evaluation and learning curve (the twin, the evaluation year) use
    the same scaling. A controller (``learns`` false) reads the env it acts in at
    every step, so it is built on the evaluation env. ``eval_on_training_data`` is
    the config's consent to ``site.seed`` among ``train_seeds`` (``TrainConfig.check``
    refuses it otherwise); the tag says whether it happened. ``validation_seed``: the
    year (twin, same levers and scaling) on which the run chooses its policy.

    A learner's levers (issue 15; tag ``env_levers``): ``observations`` (extra
    features, ``pvbess.sim.features``), ``action_mode`` (``fleet``: one intensity per
    vehicle class), ``battery_action`` (``grid_target``: the battery aims at a grid
    import; ``mpc_residual``: a correction of up to ``residual_frac`` of the rating to
    the forecast MPC's battery action), ``ev_action`` (``mpc_residual``: the EV actions
    are corrections to the MPC's charging plan, scaled by ``ev_residual_frac``),
    ``planner_arrivals`` (``persistence``: that planner forecasts yesterday's arrivals),
    ``planner_forecast`` (``average``: it forecasts PV and load as ``agent=mpc_average``),
    ``reward_baseline`` (``uncontrolled``: each
    training year's uncontrolled reward per step is subtracted from its reward; ``mpc``:
    the reward of the residual learner's zero correction) and ``normalize``
    (SB3's VecNormalize of observations and reward with ``gamma``; its statistics
    also scale the evaluation's observations, frozen). Controllers act per socket on
    the simulator's observations.
    """
    from stable_baselines3.common.monitor import Monitor

    from pvbess.site import dataset as ds_module

    tags = {"eval_data_hash": dataset.data_hash, "eval_backend": eval_backend}
    if not learns:
        evaluate = SiteEnv(dataset, reward, backend=eval_backend, safety_layer=safety_layer)
        return Envs(Monitor(evaluate), evaluate, None, [], tags)
    obs = (
        observations
        if isinstance(observations, ObservationConfig)
        else ObservationConfig(**dict(observations or {}))
    )
    levers = {
        "observations": obs,
        "action_mode": action_mode,
        "battery_action": battery_action,
        "residual_frac": residual_frac,
        "ev_action": ev_action,
        "planner_arrivals": planner_arrivals,
        "ev_residual_frac": ev_residual_frac,
        "planner_forecast": planner_forecast,
    }
    evaluate = SiteEnv(dataset, reward, backend=eval_backend, safety_layer=safety_layer, **levers)
    if data_dir is None:
        raise ValueError("build_envs needs data_dir to build the training years")
    years = [ds_module.build(replace(dataset.site, seed=int(s)), data_dir) for s in train_seeds]
    tags |= {
        "train_seeds": ",".join(str(s) for s in train_seeds),
        "train_data_hashes": ",".join(y.data_hash for y in years),
        "eval_on_training_data": str(dataset.data_hash in {y.data_hash for y in years}).lower(),
        "env_levers": levers_label(
            obs,
            action_mode,
            reward_baseline,
            normalize,
            battery_action,
            residual_frac,
            ev_action,
            planner_arrivals,
            ev_residual_frac,
            planner_forecast,
        ),
    }
    if n_envs > 1:
        train: Any = TwinVecEnv(
            years, reward, n_envs=n_envs, safety_layer=safety_layer, seed=seed, **levers
        )
        steps = train.steps
    else:
        year_envs = [
            SiteEnv(y, reward, backend=backend, safety_layer=safety_layer, **levers) for y in years
        ]
        train = Monitor(YearCycle(year_envs))
        steps = [e.core for e in year_envs]
    low, span = shared_obs_bounds(steps)
    for step in steps:
        step.set_obs_bounds(low, span)
    if normalize:
        from stable_baselines3.common.vec_env import DummyVecEnv, VecEnv, VecNormalize

        venv = train if isinstance(train, VecEnv) else DummyVecEnv([lambda: train])
        train = VecNormalize(venv, norm_obs=True, norm_reward=True, gamma=gamma)
    if reward_baseline in ("uncontrolled", "mpc"):
        # mpc: the uncontrolled actions in the residual learner's env, i.e. the MPC's
        # battery (correction 0) with the site's own charging.
        under = levers if reward_baseline == "mpc" else {}
        for step, year in zip(steps, years, strict=True):
            step.set_reward_baseline(uncontrolled_rewards(year, reward, safety_layer, **under))
    elif reward_baseline != "none":
        raise ValueError(
            f"env.reward_baseline={reward_baseline!r}: choose none, uncontrolled or mpc"
        )
    evaluate.core.set_obs_bounds(low, span)
    curve = None
    if learning_curve:
        curve = _curve_env(dataset, reward, safety_layer, **levers)
        curve.core.set_obs_bounds(low, span)
    validation = None
    if validation_seed is not None:
        year = ds_module.build(replace(dataset.site, seed=int(validation_seed)), data_dir)
        validation = _curve_env(year, reward, safety_layer, **levers)
        validation.core.set_obs_bounds(low, span)
        tags |= {"validation_seed": str(validation_seed), "validation_data_hash": year.data_hash}
    return Envs(train, evaluate, curve, years, tags, validation)


def levers_label(
    obs: ObservationConfig,
    action_mode: str,
    reward_baseline: str,
    normalize: bool,
    battery_action: str = "power",
    residual_frac: float = 0.5,
    ev_action: str = "intensity",
    planner_arrivals: str = "none",
    ev_residual_frac: float = 1.0,
    planner_forecast: str = "persistence",
) -> str:
    """A short label of a learner's env levers, e.g. ``obs=time+tariff+fc:perfect act=fleet
    base=uncontrolled norm`` (``sockets`` dropped: ``-sockets``); ``default`` when none."""
    feats = [name for name in ("time", "tariff", "peak", "fleet") if getattr(obs, name)]
    if obs.forecast != "none":
        feats.append(f"fc:{obs.forecast}:{','.join(str(h) for h in obs.forecast_leads_h)}")
        if obs.forecast == "noisy":
            feats[-1] += f":{obs.noise_frac_at_24h:g}"
    if not obs.sockets:
        feats.append("-sockets")
    parts = [f"obs={'+'.join(feats)}"] if feats else []
    if action_mode != "per_socket":
        parts.append(f"act={action_mode}")
    if battery_action == "mpc_residual":
        parts.append(f"bess={battery_action}:{residual_frac:g}")
    elif battery_action != "power":
        parts.append(f"bess={battery_action}")
    if ev_action != "intensity":
        parts.append(f"ev={ev_action}")
        if ev_residual_frac != 1.0:
            parts[-1] += f":{ev_residual_frac:g}"
    planner = {"arrivals": (planner_arrivals, "none"), "planner": (planner_forecast, "persistence")}
    parts += [f"{key}={value}" for key, (value, default) in planner.items() if value != default]
    if reward_baseline != "none":
        parts.append(f"base={reward_baseline}")
    if normalize:
        parts.append("norm")
    return " ".join(parts) or "default"


def uncontrolled_rewards(
    dataset: SiteDataset, reward: RewardConfig, safety_layer: bool = True, **levers: Any
) -> np.ndarray:
    """The uncontrolled site's reward at every step of ``dataset``'s year [n_steps] (the
    twin when it models the schema, else CityLearn): the reward baseline.

    With a learner's ``levers``: the reward of the env's neutral action
    (``pvbess.sim.step.neutral_action``): battery 0 and full charging (fleet: intensity 1
    per class, the uncontrolled charging; ``mpc_residual``: battery 0 is the MPC's
    battery; ``ev_action=mpc_residual``: EV 0 is the MPC's charging plan). Any fixed
    series leaves the optimal policy unchanged.
    """
    from pvbess.control.controllers import Uncontrolled

    env = _curve_env(dataset, reward, safety_layer, **levers)
    controller = Uncontrolled(env) if not levers else None
    full = neutral_action(env.action_space)
    obs, _ = env.reset(seed=dataset.site.seed)
    done = False
    while not done:
        action = full if controller is None else controller.predict(obs)[0]
        obs, _, done, _, _ = env.step(action)
    return env.history()["reward_total"].to_numpy()


def _curve_env(
    dataset: SiteDataset, reward: RewardConfig, safety_layer: bool, **levers: Any
) -> SiteEnv:
    """The env of the learning curve: the twin when it models the schema (bit-exact with
    CityLearn, ~30x faster, seconds per point), else CityLearn."""
    try:
        return SiteEnv(dataset, reward, backend="twin", safety_layer=safety_layer, **levers)
    except NotImplementedError as exc:
        log.info("learning curve on CityLearn (the twin does not model this schema: %s)", exc)
        return SiteEnv(dataset, reward, backend="citylearn", safety_layer=safety_layer, **levers)
