"""Replay a finished run's evaluation in CityLearn and check its KPIs are identical.

A study may evaluate on the twin (``env.eval_backend=twin``, ~30x faster). Its
figures are only as good as the twin's parity, so the study replays runs in
CityLearn: the same controller (the run's saved model, or the controller rebuilt
from the run's config), the same evaluation year, the same observation scaling.
Every KPI must be equal to the last bit; the run gets the tag
``replayed_in_citylearn=identical|differs`` and the metric
``replay/kpi_max_abs_diff``, and a difference fails the ``twin_replay`` check.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

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


def verify_kinds(runs: list, data_dir: str) -> dict[str, str]:
    """Per controller kind (agent) evaluated on the twin: one run replayed in CityLearn
    (reusing an earlier replay); {agent: 'identical (run <id>)' | 'differs (...)'}."""
    out: dict[str, str] = {}
    for run in sorted(runs, key=lambda r: r.data.tags.get(REPLAY_TAG) is None):
        agent = run.data.tags.get("agent", "?")
        if run.data.tags.get("eval_backend") != "twin" or agent in out:
            continue
        status = run.data.tags.get(REPLAY_TAG)
        if status is None:
            log.info("replaying %s (%s) in CityLearn", run.info.run_id, agent)
            r = verify(run.info.run_id, data_dir)
            status = "identical" if r.identical else f"differs in {', '.join(r.differing)}"
            status += f" ({r.kpis_compared} KPIs)"
        out[agent] = f"{status}, run {run.info.run_id}"
    return out


__all__ = ["Replay", "verify", "verify_kinds"]
