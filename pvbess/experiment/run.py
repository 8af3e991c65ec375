"""One experiment: site dataset -> envs -> agent -> learn -> evaluate -> log.

``resume=<run dir | run id>`` continues an interrupted run from its last checkpoint.
The heavy modules (torch, CityLearn, MLflow, SB3: about 4 s to import) are
imported inside the functions, so that a bad override or value fails in a
fraction of a second.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from pvbess import config
from pvbess.experiment import cli

if TYPE_CHECKING:
    from pvbess.experiment.checkpoints import Checkpoint
    from pvbess.experiment.evaluation import EvalResult
    from pvbess.site.dataset import SiteDataset

log = logging.getLogger(__name__)


def agent_name(cfg: DictConfig) -> str:
    """'stable_baselines3.PPO' -> 'ppo'; 'pvbess.control.controllers.RuleBased' -> 'rulebased'."""
    return str(cfg.agent.get("name") or cfg.agent["_target_"].rsplit(".", 1)[-1]).lower()


def train(cfg: DictConfig) -> dict[str, float]:
    """Run (or resume) one experiment; return the evaluation KPIs."""
    run_id = None
    resume_value = cfg.get("resume") or _resumed_sweep_job(cfg)
    if resume_value:
        from pvbess.experiment import resume, sweep

        if sweep.is_sweep_dir(Path(str(resume_value)).expanduser()):
            code = sweep.resume_sweep(Path(str(resume_value)).expanduser())
            if code != 0:
                raise SystemExit(code)
            return {}
        target = resume.resume_target(str(resume_value), cfg)
        if target.finished_kpis is not None:
            log.info("run %s is FINISHED: nothing to resume", target.run_id)
            return target.finished_kpis
        ignored = cli.ignored_overrides()
        if ignored and cfg.get("resume"):  # a resumed sweep's job repeats its own overrides
            log.warning("resuming keeps the run's own config; ignored: %s", " ".join(ignored))
        log.info("resuming run %s (status %s)", target.run_id, target.status)
        cfg, run_id = target.cfg, target.run_id
    # Checks in order of cost, each before the next import: config values (Hydra,
    # then validate), the site data (pandas, pvlib), then the MLflow store
    # (MLflow, torch): a bad value or file fails in a second or two, and no store
    # or experiment is created for a run that cannot start.
    typed = config.validate(cfg)
    from pvbess.site import dataset

    site_data = dataset.build(typed.site, cfg.paths.data_dir)
    check_agent_keys(cfg)
    from pvbess.experiment import resume, signals, tracking

    out_dir = Path(cfg.paths.output_dir)
    with (
        signals.sigterm_as_interrupt(),
        resume.run_lock(out_dir),
        tracking.start_run(cfg, site_data.data_hash, agent_name(cfg), run_id=run_id) as run,
    ):
        return run_experiment(cfg, typed, site_data, run.info.run_id, resuming=bool(run_id))


def check_agent_keys(cfg: DictConfig) -> None:
    """Refuse agent settings its class does not take (``+agent.lerning_rate=...``), naming
    the key and the nearest valid one, before a run starts (SB3 would raise a TypeError)."""
    import difflib
    import inspect

    from hydra.utils import get_class

    target = str(cfg.agent["_target_"])
    params = inspect.signature(get_class(target)).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    # Passed at build time, not from the config.
    known = [k for k in params if k not in ("env", "seed", "device")]
    for key in cfg.agent:
        if key in ("_target_", "_partial_") or key in known:
            continue
        close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
        hint = f"; did you mean agent.{close[0]}?" if close else ""
        raise config.ConfigError(f"agent.{key}: unknown setting for {target}{hint}")


def _resumed_sweep_job(cfg: DictConfig) -> str | None:
    """In a sweep relaunched by ``resume=<sweep dir>``: this job's folder, if it holds a run."""
    import os

    from pvbess.experiment.sweep import RESUME_ENV

    if not os.environ.get(RESUME_ENV):
        return None
    from pvbess.experiment.resume import RUN_ID_FILE

    out_dir = Path(cfg.paths.output_dir)
    return str(out_dir) if (out_dir / RUN_ID_FILE).is_file() else None


def run_experiment(
    cfg: DictConfig,
    typed: config.TrainConfig,
    site_data: SiteDataset,
    run_id: str,
    resuming: bool,
) -> dict[str, float]:
    """Inside the MLflow run: build env and agent, train, evaluate, log."""
    import mlflow
    from hydra.utils import get_class, instantiate

    from pvbess.experiment import checks, evaluation, resume, tracking

    name = agent_name(cfg)
    out_dir = Path(cfg.paths.output_dir)
    log.info("MLflow run %s (%s) in %s", run_id, name, mlflow.get_tracking_uri())
    if not resuming:
        resume.write_run_files(out_dir, run_id, cfg)
        tracking.log_config(cfg)
        mlflow.log_artifacts(str(site_data.root / "report"), artifact_path="site")
    learns = getattr(get_class(cfg.agent["_target_"]), "learns", True)
    envs = instantiate(cfg.env)(
        dataset=site_data,
        reward=typed.reward,
        learns=learns,
        seed=cfg.seed,
        data_dir=cfg.paths.data_dir,
        learning_curve=cfg.eval_every > 0,
        gamma=float(cfg.agent.get("gamma", 0.99)),
        # No validation year to build (a year and its env) when nothing is chosen on it.
        validation_seed=cfg.env.get("validation_seed") if selects(cfg) else None,
    )
    if selects(cfg) and envs.validation is not None:
        # Runs whose policy was chosen on a validation year are their own row in compare.
        envs.tags["env_levers"] += f" select=seed{cfg.env.validation_seed}"
    mlflow.set_tags(envs.tags)
    if config.is_learner(cfg.agent) and cfg.total_timesteps == 0:
        mlflow.set_tag("untrained", "true")  # allowed by allow_untrained=true
    train_env, eval_env = envs.train, envs.evaluate
    start = time.perf_counter()
    model, ckpt = build_agent(cfg, train_env, name, out_dir, resuming=resuming)
    # Training time and pieces summed over the run's pieces: an interrupted attempt's
    # time up to its last checkpoint counts, the work it lost after it does not.
    before = checkpoints_progress(ckpt)

    def progress() -> dict[str, float]:
        return {
            "train_seconds": before.get("train_seconds", 0.0) + time.perf_counter() - start,
            "train_pieces": before.get("train_pieces", 0.0) + 1,
        }

    if getattr(model, "learns", True) and cfg.total_timesteps > 0:
        learn(
            cfg,
            model,
            name,
            out_dir,
            run_id,
            ckpt,
            resuming=resuming,
            curve_env=envs.curve,
            progress=progress,
            validation_env=envs.validation,
        )
        choose_policy(cfg, model, out_dir)
        tracking.log_model(model)
    # Setup and training (for a controller: its planning, e.g. the LP solve).
    done = progress()
    mlflow.log_metrics(
        {
            "time/train_seconds": done["train_seconds"],
            "time/train_pieces": done["train_pieces"],
            "time/train_steps": float(getattr(model, "num_timesteps", 0)),
        }
    )
    start = time.perf_counter()
    result = evaluation.evaluate(
        eval_env, evaluation.policy(model), seed=cfg.seed, episodes=cfg.eval_episodes
    )
    mlflow.log_metric("time/eval_seconds", time.perf_counter() - start)
    checked = {f"eval/{k}": v for k, v in result.kpis.items()}
    if hasattr(model, "metrics"):  # a controller's own figures, and its replay's gaps
        controller_metrics = model.metrics(result.timeseries)
        mlflow.log_metrics(controller_metrics)
        checked |= controller_metrics
    title = f"{name} / {cfg.reward.name} / {cfg.site.name} / seed {cfg.seed}"
    log_evaluation(result, out_dir, title=title)
    from pvbess import deploy

    deploy.log_controller(model, eval_env, str(cfg.agent["_target_"]), name)
    checks.act(checked)
    from pvbess.experiment import compare

    log.info("in context: %s", compare.context(run_id))
    return result.kpis


def checkpoints_progress(ckpt: Checkpoint | None) -> dict[str, float]:
    """The progress a resumed checkpoint carries ({} for a new run)."""
    if ckpt is None:
        return {}
    from pvbess.experiment import checkpoints

    return checkpoints.read_progress(ckpt)


def build_agent(
    cfg: DictConfig, env: Any, name: str, out_dir: Path, resuming: bool
) -> tuple[Any, Checkpoint | None]:
    """A new agent from its ``_target_`` partial, or the last checkpoint when resuming.

    ``env`` is the training env, already wrapped (``pvbess.sim.env.build_envs``).
    """
    import mlflow
    from hydra.utils import instantiate

    from pvbess.experiment import checkpoints, device

    dev = device.resolve(cfg.device.name, cfg.device.torch_threads)
    ckpt = checkpoints.latest(out_dir / "checkpoints", name) if resuming else None
    if ckpt is None:
        if resuming:
            log.warning("no checkpoint in %s: starting again from step 0", out_dir)
        builder = instantiate(cfg.agent, _convert_="all")
        return builder(env=env, seed=cfg.seed, device=dev), None
    model = checkpoints.load(cfg.agent["_target_"], ckpt, env, dev)
    # A fresh random stream per resume point: resuming one checkpoint twice
    # gives the same run, and it does not replay the first stream from step 0.
    model.set_random_seed(cfg.seed + ckpt.steps)
    tags = {
        "resumed_from_steps": str(ckpt.steps),
        "resumed_policy_digest": checkpoints.policy_digest(model),
    }
    buffer_size = checkpoints.replay_buffer_size(model)
    if buffer_size is not None:
        tags["resumed_replay_buffer_size"] = str(buffer_size)
    log.info(
        "resuming from %s (%d steps, policy %s, replay buffer %s)",
        ckpt.model_path,
        ckpt.steps,
        tags["resumed_policy_digest"],
        "n/a" if buffer_size is None else f"{buffer_size} transitions",
    )
    mlflow.set_tags(tags)
    return model, ckpt


def learn(
    cfg: DictConfig,
    model: Any,
    name: str,
    out_dir: Path,
    run_id: str,
    ckpt: Checkpoint | None,
    resuming: bool,
    curve_env: Any = None,
    progress: Callable[[], dict[str, float]] | None = None,
    validation_env: Any = None,
) -> None:
    """SB3's learn with MLflow logging, checkpoints, a learning curve (``eval_every``) and
    the policy's scores on the validation year (``select_every``); a signal saves a
    checkpoint and stops."""
    from stable_baselines3.common.callbacks import CallbackList

    from pvbess.experiment import checkpoints, evaluation, signals, tracking

    remaining = cfg.total_timesteps - model.num_timesteps
    if remaining <= 0:
        log.info("already trained for %d steps", model.num_timesteps)
        return
    # Steps the interrupted attempt already logged are not logged twice.
    buffer = tracking.MetricBuffer(after_step=tracking.last_logged_step(run_id) if resuming else -1)
    model.set_logger(tracking.sb3_logger(buffer))
    if ckpt is not None:
        checkpoints.restore_logger_state(model.logger, checkpoints.read_logger_state(ckpt))
    extra = []
    if cfg.critic_warmup_steps > 0:
        from pvbess.experiment.warmup import CriticWarmup

        extra.append(CriticWarmup(cfg.critic_warmup_steps))
    if cfg.eval_every > 0 and curve_env is not None:
        extra.append(evaluation.learning_curve_callback(curve_env, cfg.eval_every, buffer.add))
    if selects(cfg) and validation_env is not None:
        from pvbess.experiment import selection

        save_dir = out_dir / selection.BEST_DIR
        extra.append(selection.callback(validation_env, model, cfg.select_every, save_dir))
    with signals.graceful_stop() as stop:
        saver = checkpoints.AtomicCheckpointCallback(
            buffer=buffer,
            save_freq=cfg.checkpoint_every,
            save_path=out_dir / "checkpoints",
            name_prefix=name,
            stop=stop,
            progress=progress,
        )
        log.info("training %s from step %d to %d", name, model.num_timesteps, cfg.total_timesteps)
        model.learn(
            total_timesteps=remaining,
            callback=CallbackList([tracking.EpisodeMetricsCallback(buffer), saver, *extra]),
            log_interval=cfg.log_interval,
            progress_bar=True,
            reset_num_timesteps=model.num_timesteps == 0,
        )
    if stop.signum is not None:
        last = saver.last
        log.warning(
            "stopped by %s; last checkpoint: %s",
            signal.Signals(stop.signum).name,
            "none" if last is None else f"{last.model_path} ({last.steps} steps)",
        )
        raise signals.Interrupted(stop.signum)
    buffer.flush()


def selects(cfg: DictConfig) -> bool:
    """Whether the run chooses its policy on a validation year."""
    return cfg.select_every > 0 and cfg.env.get("validation_seed") is not None


def choose_policy(cfg: DictConfig, model: Any, out_dir: Path) -> None:
    """With a validation year: the policy that scored best on it replaces the last one
    (``pvbess.experiment.selection``), tagged ``selected_at_steps``."""
    import mlflow

    from pvbess.experiment import selection

    if not selects(cfg):
        return
    save_dir = out_dir / selection.BEST_DIR
    score = selection.restore_best(model, save_dir)
    if score is None:
        log.warning("no policy was scored on the validation year: evaluating the last one")
        return
    log.info(
        "evaluating the policy of step %d, the best on the validation year (site seed %s)",
        score["steps"],
        cfg.env.validation_seed,
    )
    mlflow.set_tag("selected_at_steps", str(int(score["steps"])))
    mlflow.log_metric("validation/best_reward", float(score["reward"]))
    for name in (selection.SCORE_FILE, selection.EVALUATIONS_FILE):
        if (save_dir / name).is_file():
            mlflow.log_artifact(str(save_dir / name), artifact_path="validation")


def log_evaluation(result: EvalResult, out_dir: Path, title: str) -> None:
    """KPIs as eval/* metrics, CityLearn's as citylearn/*, and the files a user opens."""
    import mlflow

    from pvbess.experiment import plots

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
