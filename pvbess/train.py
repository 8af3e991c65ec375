"""Entry point: ``python -m pvbess.train agent=ppo reward=co2_heavy``.

Only composes: site dataset -> env -> agent -> callbacks -> learn -> evaluate -> log.
``resume=<run dir | run id>`` continues an interrupted run from its last checkpoint.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import hydra
import mlflow
from hydra.utils import instantiate
from omegaconf import DictConfig
from stable_baselines3.common.callbacks import CallbackList
from stable_baselines3.common.monitor import Monitor

from pvbess import checkpoints, config, dataset, device, evaluation, plots, tracking

log = logging.getLogger(__name__)

config.register()


def agent_name(cfg: DictConfig) -> str:
    """'stable_baselines3.PPO' -> 'ppo'; 'pvbess.controllers.RuleBased' -> 'rulebased'."""
    return str(cfg.agent.get("name") or cfg.agent["_target_"].rsplit(".", 1)[-1]).lower()


def train(cfg: DictConfig) -> dict[str, float]:
    """Run (or resume) one experiment; return the evaluation KPIs."""
    run_id = None
    if cfg.get("resume"):
        target = checkpoints.resume_target(str(cfg.resume), cfg)
        if target.finished_kpis is not None:
            log.info("run %s already finished: nothing to resume", target.run_id)
            return target.finished_kpis
        cfg, run_id = target.cfg, target.run_id
    typed = config.validate(cfg)
    site_data = dataset.build(typed.site, cfg.paths.data_dir)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = agent_name(cfg)
    with tracking.start_run(cfg, site_data.data_hash, name, run_id=run_id) as run:
        log.info("MLflow run %s (%s) in %s", run.info.run_id, name, mlflow.get_tracking_uri())
        if run_id is None:
            checkpoints.write_run_files(out_dir, run.info.run_id, cfg)
            tracking.log_config(cfg)
            mlflow.log_artifacts(str(site_data.root / "report"), artifact_path="site")
        env = instantiate(cfg.env)(dataset=site_data, reward=typed.reward)
        start = time.perf_counter()
        model = build_agent(cfg, env, name, out_dir, resuming=run_id is not None)
        if getattr(model, "learns", True) and cfg.total_timesteps > 0:
            learn(cfg, model, name, out_dir, run.info.run_id)
            tracking.log_model(model)
        # Setup and training (for a controller: its planning, e.g. the LP solve).
        mlflow.log_metrics(
            {
                "time/train_seconds": time.perf_counter() - start,
                "time/train_steps": float(getattr(model, "num_timesteps", 0)),
            }
        )
        start = time.perf_counter()
        result = evaluation.evaluate(env, model, seed=cfg.seed, episodes=cfg.eval_episodes)
        mlflow.log_metric("time/eval_seconds", time.perf_counter() - start)
        if hasattr(model, "metrics"):  # a controller's own figures, and its replay's gaps
            mlflow.log_metrics(model.metrics(result.timeseries))
        title = f"{name} / {cfg.reward.name} / {cfg.site.name} / seed {cfg.seed}"
        log_evaluation(result, out_dir, title=title)
        return result.kpis


def build_agent(cfg: DictConfig, env: Any, name: str, out_dir: Path, resuming: bool) -> Any:
    """A new agent from its ``_target_`` partial, or the last checkpoint when resuming."""
    dev = device.resolve(cfg.device.name)
    ckpt = checkpoints.latest(out_dir / "checkpoints", name) if resuming else None
    if ckpt is None:
        if resuming:
            log.warning("no checkpoint in %s: training again from step 0", out_dir)
        builder = instantiate(cfg.agent, _convert_="all")
        return builder(env=Monitor(env), seed=cfg.seed, device=dev)
    model = checkpoints.load(cfg.agent["_target_"], ckpt, Monitor(env), dev)
    digest = checkpoints.policy_digest(model)
    log.info("resuming from %s (%d steps, policy %s)", ckpt.model_path, ckpt.steps, digest)
    mlflow.set_tags({"resumed_from_steps": str(ckpt.steps), "resumed_policy_digest": digest})
    return model


def learn(cfg: DictConfig, model: Any, name: str, out_dir: Path, run_id: str) -> None:
    """SB3's learn with MLflow logging and checkpoints; an interrupt saves one first."""
    buffer = tracking.MetricBuffer()
    model.set_logger(tracking.sb3_logger(buffer))
    saver = checkpoints.AtomicCheckpointCallback(
        buffer=buffer,
        save_freq=cfg.checkpoint_every,
        save_path=str(out_dir / "checkpoints"),
        name_prefix=name,
        save_replay_buffer=True,
        save_vecnormalize=True,
    )
    remaining = cfg.total_timesteps - model.num_timesteps
    try:
        with checkpoints.sigterm_as_interrupt():
            model.learn(
                total_timesteps=max(remaining, 0),
                callback=CallbackList([tracking.EpisodeMetricsCallback(buffer), saver]),
                log_interval=cfg.log_interval,
                progress_bar=True,
                reset_num_timesteps=model.num_timesteps == 0,
            )
    except KeyboardInterrupt:
        saver.save_now()
        log.warning(
            "interrupted at %d steps; checkpoint saved. Resume with:\n"
            "  python -m pvbess.train resume=%s",
            model.num_timesteps,
            run_id,
        )
        raise
    buffer.flush()


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
