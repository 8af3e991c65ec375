"""Speed measurements (env steps/s, PPO steps/s, the LP), for ``make bench`` and the
study's machine-speed reference. Printed, never asserted."""

import time
from pathlib import Path

import numpy as np

from pvbess import config
from pvbess.config import RewardConfig, RewardWeights
from pvbess.site import dataset


def compose(site: str):
    from hydra import compose, initialize_config_dir

    config.register()
    conf_dir = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"site={site}", "paths.root_dir=/unused", "paths.output_dir=/unused"],
        )
    return config.validate(cfg)


def raw_citylearn_steps_per_s(schema: Path, actions: np.ndarray) -> float:
    from citylearn.citylearn import CityLearnEnv

    env = CityLearnEnv(str(schema), central_agent=True, random_seed=0)
    env.reset()
    start = time.perf_counter()
    for a in actions:
        env.step([a.tolist()])
    return len(actions) / (time.perf_counter() - start)


def pvbess_steps_per_s(
    ds: dataset.SiteDataset, actions: np.ndarray, safety: bool, backend: str = "citylearn"
) -> float:
    from pvbess.sim.env import SiteEnv

    reward = RewardConfig(name="balanced", weights=RewardWeights())
    env = SiteEnv(ds, reward, backend=backend, safety_layer=safety)
    env.reset(seed=0)
    start = time.perf_counter()
    for a in actions:
        env.step(a)
    return len(actions) / (time.perf_counter() - start)


def twin_vec_steps_per_s(ds: dataset.SiteDataset, n_envs: int, steps: int) -> float:
    """Env steps/s of the twin's VecEnv under random actions, summed over the copies."""
    from pvbess.sim.twin import TwinVecEnv

    env = TwinVecEnv(ds, RewardConfig(name="balanced", weights=RewardWeights()), n_envs=n_envs)
    env.reset()
    rng = np.random.default_rng(0)
    n_calls = max(steps // n_envs, 1)
    actions = rng.uniform(0, 1, (n_calls, n_envs, ds.n_sockets + 1)).astype(np.float32)
    actions[:, :, 0] = 2 * actions[:, :, 0] - 1
    start = time.perf_counter()
    for a in actions:
        env.step(a)
    return n_calls * n_envs / (time.perf_counter() - start)


def ppo_steps_per_s(
    ds: dataset.SiteDataset, steps: int, backend: str = "citylearn", n_envs: int = 1
) -> float:
    """PPO end to end; n_envs > 1: on the twin's VecEnv (the same rollout size in steps)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.monitor import Monitor

    from pvbess.sim.env import SiteEnv
    from pvbess.sim.twin import TwinVecEnv

    reward = RewardConfig(name="balanced", weights=RewardWeights())
    env = (
        TwinVecEnv(ds, reward, n_envs=n_envs)
        if n_envs > 1
        else Monitor(SiteEnv(ds, reward, backend=backend))
    )
    rollout = max(min(2048, steps) // n_envs, 1)
    model = PPO("MlpPolicy", env, n_steps=rollout, batch_size=256, seed=0, device="cpu")
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    return model.num_timesteps / (time.perf_counter() - start)


def lp_figures(ds: dataset.SiteDataset) -> dict[str, float]:
    """The perfect-foresight LP over the whole period: solve time, size, memory."""
    from pvbess.control import optimal
    from pvbess.sim.step import reward_scales

    reward = RewardConfig(name="balanced", weights=RewardWeights())
    problem = optimal.Problem.from_dataset(ds, reward.weights, reward_scales(ds, reward))
    return optimal.solve(problem).metrics()


def random_actions(ds: dataset.SiteDataset, steps: int) -> np.ndarray:
    """``steps`` (at most the period) random actions: battery in [-1, 1], sockets in [0, 1]."""
    rng = np.random.default_rng(0)
    n = min(steps, len(ds.index))
    return np.concatenate(
        [rng.uniform(-1, 1, (n, 1)), rng.uniform(0, 1, (n, ds.n_sockets))], axis=1
    ).astype(np.float32)
