"""Speed measurements (env steps/s, PPO steps/s, the LP), for ``make bench`` and the
study's machine-speed reference. Printed, never asserted."""

import time
from pathlib import Path

import numpy as np

from pvbess import config
from pvbess.config import RewardConfig, RewardWeights
from pvbess.site import dataset


def compose(site: str, with_agent: bool = False):
    """The default training config for ``site``, validated (and the agent's node)."""
    from hydra import compose, initialize_config_dir

    config.register()
    conf_dir = Path(__file__).resolve().parents[2] / "conf"
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"site={site}", "paths.root_dir=/unused", "paths.output_dir=/unused"],
        )
    typed = config.validate(cfg)
    return (typed, cfg.agent) if with_agent else typed


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


def controller_objective(env, controller_cls) -> float:
    """J = -(summed reward) of one deterministic episode of a controller on ``env``."""
    from pvbess.experiment.evaluation import rollout

    ts = rollout(env, controller_cls(env), seed=0, progress=False)
    return -float(ts["reward_total"].sum())


def time_to_share(
    typed: config.TrainConfig,
    agent_cfg,
    data_dir: str,
    target_pct: float = 90.0,
    budget: int = 1_000_000,
    every: int = 50_000,
) -> dict[str, float]:
    """Train the configured learner (its env levers, on its training years) until its
    deterministic evaluation on the held-out year (twin) reaches ``target_pct`` of the
    optimum's gain in the reward's objective, or ``budget`` steps; evaluations every
    ``every`` steps. Returns the wall time [s] and steps to the target (nan if not
    reached), the best share [%] and the steps/time it took; evaluation time excluded."""
    import dataclasses

    from hydra.utils import instantiate
    from stable_baselines3.common.callbacks import BaseCallback

    from pvbess.control.controllers import Optimal, Uncontrolled
    from pvbess.experiment.evaluation import policy, rollout
    from pvbess.sim.env import SiteEnv, build_envs

    ds = dataset.build(typed.site, data_dir)
    env_kwargs = {k: v for k, v in dataclasses.asdict(typed.env).items() if not k.startswith("_")}
    env_kwargs.pop("eval_backend")
    envs = build_envs(
        dataset=ds,
        reward=typed.reward,
        learns=True,
        seed=typed.seed,
        data_dir=data_dir,
        eval_backend="twin",
        gamma=float(agent_cfg.get("gamma", 0.99)),
        **env_kwargs,
    )
    plain = SiteEnv(ds, typed.reward, backend="twin", safety_layer=typed.env.safety_layer)
    j_unc = controller_objective(plain, Uncontrolled)
    j_opt = controller_objective(plain, Optimal)
    curve = envs.curve
    out = {"steps_to_target": float("nan"), "seconds_to_target": float("nan")}
    best = {"share": -float("inf"), "steps": 0.0, "seconds": 0.0}
    clock = {"train_s": 0.0, "since": time.perf_counter()}

    class Watch(BaseCallback):
        def _on_step(self) -> bool:
            if self.num_timesteps % every >= self.training_env.num_envs:
                return True
            clock["train_s"] += time.perf_counter() - clock["since"]
            ts = rollout(curve, policy(self.model), seed=0, progress=False)
            share = 100.0 * (j_unc + float(ts["reward_total"].sum())) / (j_unc - j_opt)
            print(f"    {self.num_timesteps:>9,d} steps  {clock['train_s']:7.1f} s  {share:6.1f} %")
            if share > best["share"]:
                best.update(share=share, steps=self.num_timesteps, seconds=clock["train_s"])
            clock["since"] = time.perf_counter()
            if share >= target_pct:
                out.update(steps_to_target=self.num_timesteps, seconds_to_target=clock["train_s"])
                return False
            return True

    model = instantiate(agent_cfg, _convert_="all")(env=envs.train, seed=typed.seed, device="cpu")
    clock["since"] = time.perf_counter()
    model.learn(total_timesteps=budget, callback=Watch())
    return out | {
        "best_share_pct": best["share"],
        "best_steps": best["steps"],
        "best_seconds": best["seconds"],
    }
