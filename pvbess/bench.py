"""Speed figures, printed (never asserted): ``make bench`` / ``python -m pvbess.bench``.

- raw CityLearn steps/s under random actions vs. the pvbess env under the same
  actions (the wrapper's cost: target ratio >= 0.95);
- PPO training steps/s end to end through the pvbess env;
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


def _pvbess_steps_per_s(ds: dataset.SiteDataset, actions: np.ndarray, safety: bool) -> float:
    from pvbess.env import SiteEnv

    env = SiteEnv(ds, RewardConfig(name="balanced", weights=RewardWeights()), safety_layer=safety)
    env.reset(seed=0)
    start = time.perf_counter()
    for a in actions:
        env.step(a)
    return len(actions) / (time.perf_counter() - start)


def _ppo_steps_per_s(ds: dataset.SiteDataset, steps: int) -> float:
    from stable_baselines3 import PPO
    from stable_baselines3.common.monitor import Monitor

    from pvbess.env import SiteEnv

    env = Monitor(SiteEnv(ds, RewardConfig(name="balanced", weights=RewardWeights())))
    model = PPO("MlpPolicy", env, n_steps=min(2048, steps), batch_size=256, seed=0, device="cpu")
    start = time.perf_counter()
    model.learn(total_timesteps=steps)
    return model.num_timesteps / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", default="iquitos_mall")
    parser.add_argument("--steps", type=int, default=2000, help="env steps per measurement")
    parser.add_argument("--ppo-steps", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)

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
        raw, wrapped, unsafe = [], [], []
        # Interleaved repeats, best of each: the least disturbed by other load on the machine.
        for _ in range(args.repeats):
            raw.append(_raw_citylearn_steps_per_s(ds.schema_path, actions))
            wrapped.append(_pvbess_steps_per_s(ds, actions, safety=True))
            unsafe.append(_pvbess_steps_per_s(ds, actions, safety=False))
        ppo = _ppo_steps_per_s(ds, args.ppo_steps)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"site={args.site}  sockets={ds.n_sockets}  steps/measurement={n}  repeats={args.repeats}"
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
    print(f"  PPO training end to end         {ppo:10.1f} env steps/s ({args.ppo_steps} steps)")
    print(f"  peak memory (RSS)               {peak_mb:10.0f} MB")


if __name__ == "__main__":
    main()
