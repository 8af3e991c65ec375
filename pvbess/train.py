"""Entry point: ``python -m pvbess.train agent=ppo reward=co2_heavy``.

Only composes: Hydra builds the config from ``conf/``, ``pvbess.experiment.run``
runs the experiment (dataset, envs, agent, training, evaluation, MLflow), and
``pvbess.experiment.cli`` maps errors and signals to exit codes.
"""

from __future__ import annotations

import math

import hydra
from omegaconf import DictConfig

from pvbess import config
from pvbess.experiment import cli
from pvbess.experiment.run import train

config.register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    kpis = cli.run(lambda: train(cfg))
    # The value an optimizing sweeper maximizes: the evaluation's mean reward.
    return kpis.get("reward_total_mean", math.nan)


__all__ = ["main", "train"]

if __name__ == "__main__":
    main()
