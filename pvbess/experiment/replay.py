"""Replay a finished run's evaluation in CityLearn and check its KPIs are identical.

A study may evaluate on the twin (``env.eval_backend=twin``, ~30x faster). Its
figures are only as good as the twin's parity, so the study replays runs in
CityLearn: the same controller (the run's saved model, or the controller rebuilt
from the run's config), the same evaluation year, the same observation scaling.
Every KPI must be equal to the last bit; the run gets the tag
``replayed_in_citylearn=identical|differs`` and the metric
``replay/kpi_max_abs_diff``, and a difference fails the ``twin_replay`` check.

``verify_kinds`` replays several runs in parallel processes (from a fork server or
spawned, never forked from the caller: each opens the MLflow store itself from the
tracking URI it is given, and gets run ids and paths only); the results come back in
the order the runs were picked.
"""

from __future__ import annotations

import logging
import math
import multiprocessing
import os
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import mlflow
from hydra.utils import get_class, instantiate
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf, open_dict

from pvbess import config
from pvbess.experiment import checks, evaluation
from pvbess.site import dataset

log = logging.getLogger(__name__)

REPLAY_TAG = "replayed_in_citylearn"
# KPIs only CityLearn has (its own totals and ratios): not part of the comparison.
CITYLEARN_ONLY = ("citylearn_co2_kg", "co2_vs_citylearn_rel")


class ReplayError(RuntimeError):
    """A replay failed; the message names the run (and its error, with the traceback)."""


@dataclass
class Replay:
    run_id: str
    agent: str
    kpis_compared: int
    max_abs_diff: float
    differing: list[str]

    @property
    def identical(self) -> bool:
        return not self.differing


def verify(run_id: str, data_dir: str) -> Replay:
    """Re-evaluate run ``run_id`` (evaluated on the twin) in CityLearn; compare, tag, return."""
    client = MlflowClient()
    run = client.get_run(run_id)
    with tempfile.TemporaryDirectory() as tmp:
        path = client.download_artifacts(run_id, "config.yaml", tmp)
        cfg = OmegaConf.merge(OmegaConf.structured(config.TrainConfig), OmegaConf.load(path))
        model_path = None
        if run.data.metrics.get("time/train_steps", 0) > 0:
            model_path = Path(client.download_artifacts(run_id, "model/model.zip", tmp))
        with open_dict(cfg):
            cfg.paths.data_dir = data_dir
        typed = config.validate(cfg)
        site_data = dataset.build(typed.site, data_dir)
        learns = model_path is not None
        env_cfg = OmegaConf.to_container(cfg.env, resolve=True)
        assert isinstance(env_cfg, dict)
        env_cfg["eval_backend"] = "citylearn"
        # The training reward's baseline changes nothing the evaluation sees.
        env_cfg["reward_baseline"] = "none"
        envs = instantiate(env_cfg)(
            dataset=site_data,
            reward=typed.reward,
            learns=learns,
            seed=cfg.seed,
            data_dir=data_dir,
            learning_curve=False,
        )
        if learns:
            policy = get_class(cfg.agent["_target_"]).load(str(model_path), device="cpu")
            if cfg.env.get("normalize"):  # the statistics the run was evaluated with, frozen
                from stable_baselines3.common.vec_env import VecNormalize

                stats = client.download_artifacts(run_id, "model/vecnormalize.pkl", tmp)
                saved = VecNormalize.load(stats, envs.train.venv)
                policy = evaluation.Normalized(policy, saved)
        else:
            builder = instantiate(cfg.agent, _convert_="all")
            policy = builder(env=envs.train, seed=cfg.seed, device="cpu")
        result = evaluation.evaluate(
            envs.evaluate, policy, seed=cfg.seed, episodes=cfg.eval_episodes, progress=False
        )
    logged = {k[5:]: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    differing, worst = [], 0.0
    compared = 0
    for key, value in result.kpis.items():
        if key in CITYLEARN_ONLY or key not in logged:
            continue
        compared += 1
        if not (value == logged[key] or (math.isnan(value) and math.isnan(logged[key]))):
            differing.append(key)
            worst = max(worst, abs(value - logged[key]))
    replay = Replay(run_id, run.data.tags.get("agent", "?"), compared, worst, differing)
    client.set_tag(run_id, REPLAY_TAG, "identical" if replay.identical else "differs")
    # NaN when a KPI differs only by NaN-ness: the check fails on it too.
    diff = worst if not differing or worst > 0 else math.nan
    client.log_metric(run_id, "replay/kpi_max_abs_diff", diff)
    if checks.failed({"replay/kpi_max_abs_diff": diff}):
        log.warning("run %s: %d KPIs differ in CityLearn: %s", run_id, len(differing), differing)
        failed = run.data.tags.get(checks.CHECK_TAG, "")
        names = sorted({*filter(None, failed.split(",")), "twin_replay"})
        client.set_tag(run_id, checks.CHECK_TAG, ",".join(names))
    return replay


def _init_worker(tracking_uri: str) -> None:
    """A replay process: the parent's MLflow store; schemas; one torch thread (the
    processes share the cores, and runs evaluate with ``device.torch_threads=1``)."""
    import torch

    mlflow.set_tracking_uri(tracking_uri)
    config.register()
    torch.set_num_threads(1)


def _context() -> multiprocessing.context.BaseContext:
    """Fresh processes, never a fork of this one (its MLflow and SQLite state): a fork
    server that has imported this module once (workers start without the ~4 s of
    imports), else spawn."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


def _verify_or_say_which(run_id: str, data_dir: str) -> Replay:
    """``verify``; an error becomes a ``ReplayError`` naming the run (plain text, so it
    crosses a process boundary whatever the original exception was)."""
    try:
        return verify(run_id, data_dir)
    except Exception as exc:
        raise ReplayError(
            f"run {run_id}: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"
        ) from None


def replay_runs(run_ids: list[str], data_dir: str, jobs: int | None = None) -> list[Replay]:
    """``verify`` each run, in up to ``jobs`` processes (None: one per core); results in
    the order of ``run_ids``. Every run is replayed even if one fails; then a
    ``ReplayError`` names each failed run."""
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be >= 1 or None, got {jobs}")
    workers = min(len(run_ids), jobs or os.cpu_count() or 1)
    outcomes: list[Replay | ReplayError] = []
    if workers <= 1:
        for run_id in run_ids:
            try:
                outcomes.append(_verify_or_say_which(run_id, data_dir))
            except ReplayError as exc:
                outcomes.append(exc)
    else:
        log.info("replaying %d runs in %d processes", len(run_ids), workers)
        with ProcessPoolExecutor(
            max_workers=workers,
            mp_context=_context(),
            initializer=_init_worker,
            initargs=(mlflow.get_tracking_uri(),),
        ) as pool:
            futures = [pool.submit(_verify_or_say_which, r, data_dir) for r in run_ids]
            for run_id, future in zip(run_ids, futures, strict=True):
                try:
                    outcomes.append(future.result())
                except ReplayError as exc:
                    outcomes.append(exc)
                except Exception as exc:  # the process died (e.g. out of memory)
                    outcomes.append(ReplayError(f"run {run_id}: {type(exc).__name__}: {exc}"))
    failed = [str(o) for o in outcomes if isinstance(o, ReplayError)]
    if failed:
        raise ReplayError(
            f"{len(failed)} of {len(run_ids)} replays in CityLearn failed:\n" + "\n".join(failed)
        )
    return outcomes  # type: ignore[return-value]


def controller_kind(run: mlflow.entities.Run) -> str:
    """What one replay in CityLearn stands for: the agent, with a learner's battery action
    when it is not a power and its EV action when it is not an intensity (``ppo
    bess=mpc_residual:0.5 ev=mpc_residual``: other paths through the step)."""
    agent = run.data.tags.get("agent", "?")
    levers = run.data.tags.get("env_levers", "").split()
    paths = [p for p in levers if p.startswith(("bess=", "ev="))]
    return " ".join([agent, *paths])


def verify_kinds(runs: list, data_dir: str, jobs: int | None = None) -> dict[str, str]:
    """Per controller kind (``controller_kind``) evaluated on the twin: one run replayed in
    CityLearn (reusing an earlier replay); {kind: 'identical (run <id>)' | 'differs (...)'}.
    The replays run in up to ``jobs`` processes (None: min(replays, cores))."""
    out: dict[str, str] = {}
    todo: list[tuple[str, str]] = []  # (kind, run id) to replay
    for run in sorted(runs, key=lambda r: r.data.tags.get(REPLAY_TAG) is None):
        agent = controller_kind(run)
        if run.data.tags.get("eval_backend") != "twin" or agent in out:
            continue
        status = run.data.tags.get(REPLAY_TAG)
        out[agent] = "" if status is None else f"{status}, run {run.info.run_id}"
        if status is None:
            log.info("replaying %s (%s) in CityLearn", run.info.run_id, agent)
            todo.append((agent, run.info.run_id))
    replays = replay_runs([run_id for _, run_id in todo], data_dir, jobs)
    for (agent, run_id), r in zip(todo, replays, strict=True):
        status = "identical" if r.identical else f"differs in {', '.join(r.differing)}"
        out[agent] = f"{status} ({r.kpis_compared} KPIs), run {run_id}"
    return out


__all__ = ["Replay", "ReplayError", "replay_runs", "verify", "verify_kinds"]
