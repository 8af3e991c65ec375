"""Speed figures, printed (never asserted): ``make bench`` / ``python -m pvbess.bench``.

- raw CityLearn steps/s under random actions vs. the pvbess env under the same
  actions (the wrapper's cost: target ratio >= 0.95);
- the pvbess env on the numpy twin (``env.backend=twin``) under the same actions,
  and the twin's VecEnv stepping ``--n-envs`` copies at once (env steps/s summed
  over the copies);
- PPO training steps/s end to end: through the pvbess env on CityLearn, on the
  twin, and on the twin's VecEnv;
- peak memory of the process.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from pvbess import config, dataset
from pvbess.config import RewardConfig, RewardWeights
from pvbess.twin import TwinData


def _compose(site: str):
    from hydra import compose, initialize_config_dir

    config.register()
    conf_dir = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf_dir), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"site={site}", "paths.root_dir=/unused", "paths.output_dir=/unused"],
        )
    return config.validate(cfg)


def _raw_citylearn_steps_per_s(schema: Path, actions: np.ndarray) -> float:
    from citylearn.citylearn import CityLearnEnv

    env = CityLearnEnv(str(schema), central_agent=True, random_seed=0)
    env.reset()
    start = time.perf_counter()
    for a in actions:
        env.step([a.tolist()])
    return len(actions) / (time.perf_counter() - start)


def _pvbess_steps_per_s(
    ds: dataset.SiteDataset, actions: np.ndarray, safety: bool, backend: str = "citylearn"
) -> float:
    from pvbess.env import SiteEnv

    reward = RewardConfig(name="balanced", weights=RewardWeights())
    env = SiteEnv(ds, reward, backend=backend, safety_layer=safety)
    env.reset(seed=0)
    start = time.perf_counter()
    for a in actions:
        env.step(a)
    return len(actions) / (time.perf_counter() - start)


def _twin_vec_steps_per_s(ds: dataset.SiteDataset, n_envs: int, steps: int) -> float:
    """Env steps/s of the twin's VecEnv under random actions, summed over the copies."""
    from pvbess.twin import TwinVecEnv

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


def _ppo_steps_per_s(
    ds: dataset.SiteDataset, steps: int, backend: str = "citylearn", n_envs: int = 1
) -> float:
    """PPO end to end; n_envs > 1: on the twin's VecEnv (the same rollout size in steps)."""
    from stable_baselines3 import PPO
    from stable_baselines3.common.monitor import Monitor

    from pvbess.env import SiteEnv
    from pvbess.twin import TwinVecEnv

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


def _lp_figures(ds: dataset.SiteDataset) -> dict[str, float]:
    """The perfect-foresight LP over the whole period: solve time, size, memory."""
    from pvbess import optimal
    from pvbess.env import reward_scales

    reward = RewardConfig(name="balanced", weights=RewardWeights())
    problem = optimal.Problem.from_dataset(ds, reward.weights, reward_scales(ds, reward))
    return optimal.solve(problem).metrics()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="iquitos_mall")
    parser.add_argument("--steps", type=int, default=2000, help="env steps per measurement")
    parser.add_argument("--ppo-steps", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-envs", type=int, default=16, help="copies in the twin's VecEnv")
    parser.add_argument("--twin-ppo-steps", type=int, default=32768)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads for PPO (0 = torch's default); with this small MLP on a "
        "few busy cores one thread is several times faster than the default",
    )
    args = parser.parse_args(argv)
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)

    typed = _compose(args.site)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ds = dataset.build(typed.site, tmp)
        build_s = time.perf_counter() - t0
        rng = np.random.default_rng(0)
        n = min(args.steps, len(ds.index))
        actions = np.concatenate(
            [rng.uniform(-1, 1, (n, 1)), rng.uniform(0, 1, (n, ds.n_sockets))], axis=1
        ).astype(np.float32)
        t0 = time.perf_counter()
        TwinData.load(ds)
        twin_load_s = time.perf_counter() - t0
        raw, wrapped, unsafe, twin, vec = [], [], [], [], []
        # Interleaved repeats, best of each: the least disturbed by other load on the machine.
        for _ in range(args.repeats):
            raw.append(_raw_citylearn_steps_per_s(ds.schema_path, actions))
            wrapped.append(_pvbess_steps_per_s(ds, actions, safety=True))
            unsafe.append(_pvbess_steps_per_s(ds, actions, safety=False))
            twin.append(_pvbess_steps_per_s(ds, actions, safety=True, backend="twin"))
            vec.append(_twin_vec_steps_per_s(ds, args.n_envs, 8 * n * args.n_envs // 16))
        lp = _lp_figures(ds)
        ppo = _ppo_steps_per_s(ds, args.ppo_steps)
        ppo_twin = _ppo_steps_per_s(ds, args.ppo_steps, backend="twin")
        ppo_vec = _ppo_steps_per_s(ds, args.twin_ppo_steps, n_envs=args.n_envs)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    threads = args.torch_threads or "default"
    print(
        f"site={args.site}  sockets={ds.n_sockets}  steps/measurement={n}  repeats={args.repeats}"
        f"  torch threads={threads}"
    )
    print(f"  dataset build (uncached)        {build_s:10.2f} s")
    print(f"  CityLearn raw, random actions   {max(raw):10.1f} steps/s")
    print(
        f"  pvbess env, same actions        {max(wrapped):10.1f} steps/s  "
        f"ratio {max(wrapped) / max(raw):.3f} (target >= 0.95)"
    )
    print(
        f"  pvbess env, no safety layer     {max(unsafe):10.1f} steps/s  "
        f"ratio {max(unsafe) / max(raw):.3f}"
    )
    print(
        f"  pvbess env on the twin          {max(twin):10.1f} steps/s  "
        f"x{max(twin) / max(raw):.0f} CityLearn raw (twin data load {twin_load_s:.2f} s)"
    )
    print(f"  twin VecEnv, {args.n_envs:3d} copies         {max(vec):10.1f} env steps/s")
    print(f"  PPO training end to end         {ppo:10.1f} env steps/s ({args.ppo_steps} steps)")
    print(
        f"  PPO on the twin                 {ppo_twin:10.1f} env steps/s ({args.ppo_steps} steps)"
    )
    print(
        f"  PPO on the twin VecEnv ({args.n_envs:3d})   {ppo_vec:10.1f} env steps/s "
        f"({args.twin_ppo_steps} steps)"
    )
    print(
        f"  optimum LP (HiGHS), reward=balanced: solve {lp['lp/solve_seconds']:.2f} s, "
        f"{lp['lp/variables']:,.0f} variables, {lp['lp/constraints']:,.0f} constraints, "
        f"peak memory during the solve {lp.get('lp/peak_memory_mb', float('nan')):,.0f} MB "
        "(target: under 60 s)"
    )
    print(f"  peak memory (RSS)               {peak_mb:10.0f} MB")


if __name__ == "__main__":
    main()
