"""Critic warm-up: the actor does not move while the value function trains."""

from __future__ import annotations

import gymnasium as gym
import pytest
import torch
from stable_baselines3 import A2C, PPO, SAC
from stable_baselines3.common.callbacks import CallbackList, ConvertCallback

from pvbess.experiment.warmup import CriticWarmup, actor_parameters


def _snapshot(params) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def _moved(before, after) -> bool:
    return any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))


@pytest.mark.parametrize("algo", [PPO, A2C])
@pytest.mark.parametrize("warmup_steps", [0, 64, 128])
def test_the_actor_moves_only_after_the_warmup(algo, warmup_steps):
    """Two 64-step updates: warm-up 0 trains the actor in both, 64 in the second only,
    128 in neither; the critic trains in every case."""
    kwargs = {"n_steps": 64, "batch_size": 64, "n_epochs": 2} if algo is PPO else {"n_steps": 64}
    model = algo("MlpPolicy", gym.make("Pendulum-v1"), seed=0, device="cpu", **kwargs)
    policy = model.policy
    actor0 = _snapshot(actor_parameters(policy))
    critic0 = _snapshot(policy.value_net.parameters())

    after_first = {}

    def first_update(_locals, _globals):
        if model.num_timesteps == 65 and not after_first:
            after_first["actor"] = _snapshot(actor_parameters(policy))
        return True

    model.learn(
        128, callback=CallbackList([CriticWarmup(warmup_steps), ConvertCallback(first_update)])
    )
    actor_end = _snapshot(actor_parameters(policy))
    assert _moved(critic0, _snapshot(policy.value_net.parameters()))
    assert _moved(actor0, after_first["actor"]) == (warmup_steps == 0)
    assert _moved(actor0, actor_end) == (warmup_steps < 128)
    # Left trainable, so a later learn() (a resume) trains the actor unless told not to.
    assert all(p.requires_grad for p in actor_parameters(policy))


def test_warmup_refuses_an_off_policy_learner():
    model = SAC("MlpPolicy", gym.make("Pendulum-v1"), seed=0, device="cpu", learning_starts=8)
    with pytest.raises(TypeError, match="on-policy actor-critic"):
        model.learn(16, callback=CriticWarmup(8))


def test_a_run_warmed_up_all_along_evaluates_its_untrained_policy(tmp_path):
    """End to end on the tiny site: with the whole budget a warm-up, the evaluated policy
    is the one PPO started with (the same held-out reward as the untrained run, whose
    step count is 0), while the same run without warm-up has moved. Without observation
    normalization, whose statistics change in training whatever the policy does."""
    from pvbess import train

    from .conftest import compose_cfg, store_runs

    ppo = ["site=tiny", "agent=ppo", "agent.n_steps=32", "seed=0", "levers=no_normalize"]
    runs = {
        "untrained": ["total_timesteps=0", "allow_untrained=true"],
        "warm": ["total_timesteps=64", "critic_warmup_steps=100000"],
        "trained": ["total_timesteps=64"],
    }
    for k, (name, overrides) in enumerate(runs.items()):
        cfg = compose_cfg([*ppo, *overrides, f"tracking.run_name={name}"], tmp_path)
        cfg.paths.output_dir = str(tmp_path / f"out{k}")
        train.train(cfg)
    reward = {
        r.info.run_name: r.data.metrics["eval/reward_total_mean"] for r in store_runs(tmp_path)
    }
    assert reward["warm"] == reward["untrained"]
    assert reward["trained"] != reward["untrained"]
