"""Entry point: ``python -m pvbess.train agent=ppo reward=co2_heavy``.

Only composes: site dataset -> env -> agent -> callbacks -> learn -> evaluate -> log.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import hydra
import mlflow
from hydra.utils import instantiate
from omegaconf import DictConfig
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.monitor import Monitor

from pvbess import config, dataset, device, evaluation, plots, tracking

log = logging.getLogger(__name__)

config.register()


def agent_name(cfg: DictConfig) -> str:
    """'stable_baselines3.PPO' -> 'ppo'; 'pvbess.controllers.RuleBased' -> 'rulebased'."""
    return str(cfg.agent.get("name") or cfg.agent["_target_"].rsplit(".", 1)[-1]).lower()


def train(cfg: DictConfig) -> dict[str, float]:
    """Run one experiment; return the evaluation KPIs."""
    typed = config.validate(cfg)
    site_data = dataset.build(typed.site, cfg.paths.data_dir)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = agent_name(cfg)
    with tracking.start_run(cfg, site_data.data_hash, name) as run:
        log.info("MLflow run %s (%s) in %s", run.info.run_id, name, mlflow.get_tracking_uri())
        tracking.log_config(cfg)
        mlflow.log_artifacts(str(site_data.root / "report"), artifact_path="site")
        env = instantiate(cfg.env)(dataset=site_data, reward=typed.reward)
        builder = instantiate(cfg.agent, _convert_="all")
        start = time.perf_counter()
        model = builder(env=Monitor(env), seed=cfg.seed, device=device.resolve(cfg.device.name))
        if getattr(model, "learns", True) and cfg.total_timesteps > 0:
            model.set_logger(tracking.sb3_logger())
            callbacks = CallbackList(
                [
                    tracking.EpisodeMetricsCallback(),
                    tracking.MLflowCheckpointCallback(
                        save_freq=cfg.checkpoint_every,
                        save_path=str(out_dir / "checkpoints"),
                        name_prefix=name,
                        save_replay_buffer=True,
                        save_vecnormalize=True,
                    ),
                ]
            )
            model.learn(
                total_timesteps=cfg.total_timesteps,
                callback=callbacks,
                log_interval=cfg.log_interval,
                progress_bar=True,
            )
            tracking.log_model(model)
        # Setup and training (for a controller: its planning, e.g. the LP solve).
        mlflow.log_metrics(
            {
                "time/train_seconds": time.perf_counter() - start,
                "time/train_steps": float(getattr(model, "num_timesteps", 0)),
            }
        )
        if hasattr(model, "metrics"):  # a controller's own figures (e.g. the LP's objective)
            mlflow.log_metrics(model.metrics())
        start = time.perf_counter()
        result = evaluation.evaluate(env, model, seed=cfg.seed, episodes=cfg.eval_episodes)
        mlflow.log_metric("time/eval_seconds", time.perf_counter() - start)
        log_evaluation(
            result, out_dir, title=f"{name} / {cfg.reward.name} / {cfg.site.name} / seed {cfg.seed}"
        )
        return result.kpis


def log_evaluation(result: evaluation.EvalResult, out_dir: Path, title: str) -> None:
    """KPIs as eval/* metrics, CityLearn's as citylearn/*, and the files a user opens."""
    mlflow.log_metrics({f"eval/{k}": v for k, v in result.kpis.items()})
    mlflow.log_metrics({f"eval_std/{k}": v for k, v in result.kpis_std.items()})
    mlflow.log_metrics({f"citylearn/{k}": v for k, v in result.citylearn_kpis.items()})
    ts_path = out_dir / "eval_timeseries.csv"
    result.timeseries.to_csv(ts_path, index_label="time")
    (out_dir / "result.json").write_text(
        json.dumps(
            {"kpis": result.kpis, "kpis_std": result.kpis_std, "citylearn": result.citylearn_kpis},
            indent=1,
            default=float,
        )
    )
    plots.dashboard(result.timeseries, result.kpis, title, out_dir / "dashboard.png")
    for f in ("eval_timeseries.csv", "result.json", "dashboard.png"):
        mlflow.log_artifact(str(out_dir / f))
    k = result.kpis
    log.info(
        "CO2 %.1f t, grid import %.1f MWh, PV self-consumption %.3f, EV unmet %.2f kWh",
        k["co2_kg"] / 1e3,
        k["grid_import_kwh"] / 1e3,
        k["solar_self_consumption_ratio"],
        k["ev_unmet_kwh"],
    )


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float:
    # The value an optimizing sweeper maximizes: the evaluation's mean reward.
    return train(cfg)["reward_total_mean"]


if __name__ == "__main__":
    main()
