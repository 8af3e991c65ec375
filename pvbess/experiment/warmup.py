"""Critic warm-up: for its first steps a learner trains its value function only.

A residual learner starts at the MPC's decision, and its first updates move the policy
on advantages from an untrained critic, which are noise: at Iquitos every run's
validation-year score fell after its first updates and none recovered (README, *What
each lever does*). Residual policy learning trains the critic alone first (Silver et
al. 2018, "burn-in"); ``critic_warmup_steps`` does that for SB3's on-policy learners.
"""

from __future__ import annotations

import logging
from typing import Any

from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.policies import ActorCriticPolicy

log = logging.getLogger(__name__)


def actor_parameters(policy: ActorCriticPolicy) -> list[Any]:
    """The parameters that set the action distribution: the policy head and its mean and
    std (the feature extractor is left trainable: SB3's default, a Flatten, has none)."""
    params = [*policy.mlp_extractor.policy_net.parameters(), *policy.action_net.parameters()]
    log_std = getattr(policy, "log_std", None)
    if log_std is not None:
        params.append(log_std)
    return params


class CriticWarmup(BaseCallback):
    """Freezes the actor for the updates whose rollout ended at or before ``until_steps``
    env steps, so PPO or A2C trains only its value function on those steps. Stateless
    across resumes: each update's choice follows the model's step count (the config
    check refuses a negative count)."""

    def __init__(self, until_steps: int) -> None:
        super().__init__()
        self.until_steps = until_steps
        self.frozen = False

    def _on_training_start(self) -> None:
        if not isinstance(self.model.policy, ActorCriticPolicy):
            raise TypeError(
                "critic_warmup_steps needs an on-policy actor-critic (PPO, A2C); "
                f"{type(self.model).__name__} has {type(self.model.policy).__name__}"
            )
        if self._warming():
            self._freeze(True)
            log.info("critic warm-up: actor frozen until step %d", self.until_steps)

    def _on_rollout_end(self) -> None:
        # Called after each rollout, before the update that learns from it. Steps only
        # grow, so a thawed actor stays thawed.
        if self.frozen and not self._warming():
            self._freeze(False)
            log.info("critic warm-up over: actor trained from step %d", self.model.num_timesteps)

    def _on_training_end(self) -> None:
        if self.frozen:
            self._freeze(False)

    def _on_step(self) -> bool:
        return True

    def _warming(self) -> bool:
        return 0 < self.until_steps and self.model.num_timesteps <= self.until_steps

    def _freeze(self, frozen: bool) -> None:
        for p in actor_parameters(self.model.policy):
            p.requires_grad_(not frozen)
        self.frozen = frozen
