"""Where a search's trials run and where its study lives, for ``pvbess.tune``.

A trial is ``python -m pvbess.train`` with the trial's overrides. Without a launcher it is
a plain run in a local process. With ``hydra/launcher=<name>`` (and ``hydra.launcher.*``
settings) on the search's command line it is a one-job ``--multirun`` through that Hydra
launcher, the same one sweeps use: on Ray (``hydra/launcher=ray
hydra.launcher.ray.init.address=<head>:<port>``) the job runs on a cluster node. The
multirun opens no sweep parent run of its own (the search's parent is the trial's parent,
passed in ``hydra.job.env_set`` so it reaches a job on another node), and the objective is
read from the trial's ``result.json`` or, when the job ran where that file is not
visible, from its MLflow run's ``eval/<objective>``.

The study lives in Optuna's RDB storage (a SQLAlchemy URL: SQLite for one machine,
PostgreSQL or MySQL for several). With a heartbeat, a trial whose process was killed
(``kill -9``, a lost node) is failed by the next process that opens the study and run
again with the same parameters once; finished trials are never run again.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import optuna

from pvbess.experiment import sweep, tracking


def is_launcher_override(key: str) -> bool:
    """``hydra/launcher=<name>`` and ``hydra.launcher.<setting>=<value>``."""
    return key == "hydra/launcher" or key.startswith("hydra.launcher.")


def trial_command(
    launcher: list[str], overrides: list[str], trial_dir: str, run_name: str, parent_id: str, n: int
) -> list[str]:
    """The command of trial ``n``: its overrides, its folder and MLflow run name.

    ``trial_dir`` and ``run_name`` are already written for the override grammar.
    """
    train = [sys.executable, "-m", "pvbess.train"]
    named = [f"tracking.run_name={run_name}"]
    if not launcher:
        return [*train, *overrides, f"hydra.run.dir={trial_dir}", *named]
    env_set = {tracking.PARENT_ENV: parent_id, tracking.JOB_ENV: str(n)}
    return [
        *train,
        "--multirun",
        *launcher,
        *overrides,
        *named,
        f"hydra.sweep.dir={trial_dir}",
        "hydra.sweep.subdir=.",
        "~hydra.callbacks.mlflow_sweep",  # the search's parent run is the trial's parent
        *(f"++hydra.job.env_set.{k}='{v}'" for k, v in env_set.items()),
    ]


def objective_value(trial_dir: Path, objective: str, parent_id: str, n: int, exp_id: str) -> float:
    """The trial's ``objective`` KPI: its result.json, else its MLflow run's eval/ metric.

    Raises LookupError when neither has it, ValueError when it is not finite.
    """
    result = trial_dir / "result.json"
    if result.is_file():
        kpis = json.loads(result.read_text())["kpis"]
        if objective not in kpis:
            raise LookupError(f"no KPI {objective!r} (known: {', '.join(sorted(kpis))})")
        value = float(kpis[objective])
    else:  # the job ran on another node: its files are there, its metrics in MLflow
        runs = [
            r
            for r in sweep.children(parent_id, [exp_id])
            if r.data.tags.get(tracking.JOB_TAG) == str(n) and r.info.status == "FINISHED"
        ]
        metrics = runs[0].data.metrics if runs else {}
        if f"eval/{objective}" not in metrics:
            raise LookupError(f"no {result} and no eval/{objective} in MLflow for trial {n}")
        value = metrics[f"eval/{objective}"]
    if not math.isfinite(value):
        raise ValueError(f"{objective} = {value}")
    return value


def storage(url: str, heartbeat_s: int | None) -> optuna.storages.BaseStorage:
    """Optuna's RDB storage at ``url``; with a heartbeat every ``heartbeat_s`` seconds a
    trial silent for twice that is failed and retried once with its parameters."""
    if heartbeat_s is None:
        return optuna.storages.RDBStorage(url)
    return optuna.storages.RDBStorage(
        url,
        heartbeat_interval=heartbeat_s,
        grace_period=2 * heartbeat_s,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(1),
    )
