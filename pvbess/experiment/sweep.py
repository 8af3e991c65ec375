"""Sweeps in MLflow: one parent run per ``--multirun``, every job a child run of it.

``MlflowSweepCallback`` (a Hydra callback, configured under ``hydra.callbacks``)
runs in the process that starts the sweep, before any job and after the last:

- it prepares the store: creates its tables and every experiment the jobs will
  write to. Parallel jobs hitting a fresh SQLite store race through its schema
  migration (tables half made, runs lost) and two jobs creating the same
  experiment collide; once the store exists, MLflow's 20 s ``busy_timeout`` on
  every session serialises the jobs' writes;
- it creates the parent run (the sweep's overrides and its size as params) and
  passes its id to every job as ``PVBESS_PARENT_RUN_ID``: exported here for jobs
  in this process or its children (basic, joblib, local Ray) and added to each
  job's ``hydra.job.env_set`` for launchers that compose jobs here and run them
  elsewhere (a Ray cluster, SLURM);
- at the end it counts the children, logs the counts and ends the parent:
  FINISHED, or FAILED if a child failed or a job's error stopped the sweep,
  KILLED on Ctrl-C.

A job's run becomes a child through ``parent_tags()``, which
``tracking.start_run`` adds to the run's tags. ``pvbess.tune`` uses the same
functions for its search's parent run.
"""

from __future__ import annotations

import atexit
import itertools
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, open_dict, read_write

import pvbess

if TYPE_CHECKING:
    from mlflow.entities import Metric, Run

# Hydra builds the callback for single runs too: MLflow, torch and SB3 (about 3 s to
# import) are imported only when a sweep starts, so a bad value fails at once.
log = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000
MAX_PARAMS_PER_CALL = 100
# What a sweep leaves in its folder so that ``resume=<sweep dir>`` can finish it.
SWEEP_FILE = "sweep_run.json"
# Set by resume_sweep for the relaunched sweep: the parent run it continues.
RESUME_ENV = "PVBESS_RESUME_SWEEP"
# The override keys that decide which experiment a job writes to.
EXPERIMENT_KEYS = ("site", "tracking.experiment")


def experiment_name(cfg: DictConfig) -> str:
    return str(cfg.tracking.experiment or cfg.site.name)


def prepare_store(cfg: DictConfig, experiments: Iterable[str]) -> dict[str, str]:
    """Create the store's tables and these experiments now; return name -> experiment id.

    Ends with the first experiment selected (``mlflow.set_experiment``).
    """
    from pvbess.experiment import tracking

    names = list(dict.fromkeys(experiments))
    ids = {}
    for name in reversed(names):
        ids[name] = tracking.configure(
            cfg.tracking.uri, cfg.paths.root_dir, name, cfg.tracking.artifact_location
        )
    return {name: ids[name] for name in names}


def start_parent(
    cfg: DictConfig, experiment_id: str, run_name: str, params: dict[str, Any], tags: dict[str, str]
) -> str:
    """Create the parent run (not the active run of this process); return its id."""
    from mlflow.tracking import MlflowClient

    from pvbess.experiment import tracking

    client = MlflowClient()
    base = {
        "kind": "sweep",
        "site": str(cfg.site.name),
        # The code's commit, wherever the outputs go ($PVBESS_ROOT may be elsewhere).
        "git_commit": tracking.git_commit(Path(pvbess.__file__).resolve().parent),
        "pvbess_version": pvbess.__version__,
    } | tracking.process_tags()
    run = client.create_run(experiment_id, run_name=run_name, tags=base | tags)
    log_params(run.info.run_id, params)
    return run.info.run_id


def log_params(run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    items = sorted((k, str(v)[:MAX_PARAM_CHARS]) for k, v in params.items())
    for i in range(0, len(items), MAX_PARAMS_PER_CALL):
        client.log_batch(
            run_id,
            params=[Param(k, v) for k, v in items[i : i + MAX_PARAMS_PER_CALL]],
            synchronous=True,
        )


def children(parent_id: str, experiment_ids: Iterable[str]) -> list[Run]:
    """Every run tagged as a child of ``parent_id`` in these experiments."""
    from mlflow.tracking import MlflowClient

    from pvbess.experiment.tracking import PARENT_TAG

    return MlflowClient().search_runs(
        list(experiment_ids), f"tags.{PARENT_TAG} = '{parent_id}'", max_results=50_000
    )


def end_parent(parent_id: str, experiment_ids: Iterable[str], status: str | None = None) -> None:
    """Log the children's counts on the parent and end it.

    ``status=None``: FINISHED when every child finished, else FAILED.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    runs = children(parent_id, experiment_ids)
    counts = {s: sum(r.info.status == s for r in runs) for s in ("FINISHED", "FAILED", "KILLED")}
    client.log_batch(
        parent_id,
        metrics=[metric("sweep/jobs", len(runs))]
        + [metric(f"sweep/jobs_{s.lower()}", n) for s, n in counts.items()],
        synchronous=True,
    )
    if status is None:
        status = "FINISHED" if runs and counts["FINISHED"] == len(runs) else "FAILED"
    client.set_terminated(parent_id, status=status)
    log.info(
        "sweep parent run %s %s: %d jobs (%s)",
        parent_id,
        status,
        len(runs),
        ", ".join(f"{n} {s.lower()}" for s, n in counts.items() if n),
    )


def reopen_parent(run_id: str) -> str:
    """A resumed sweep's parent: RUNNING again, owned by this process, its error cleared."""
    from mlflow.tracking import MlflowClient

    from pvbess.experiment import tracking

    client = MlflowClient()
    client.update_run(run_id, status="RUNNING")
    for key, value in tracking.process_tags().items():
        client.set_tag(run_id, key, value)
    if "error" in client.get_run(run_id).data.tags:
        client.delete_tag(run_id, "error")
    return run_id


def is_sweep_dir(path: Path) -> bool:
    return (path / SWEEP_FILE).is_file()


def resume_sweep(sweep_dir: Path) -> int:
    """Finish a sweep that was killed: relaunch it in its own folder under its parent run.

    Each job whose folder holds a run resumes it (a FINISHED one returns at once), the
    others start; the parent is closed with the children's counts. Returns the exit code.
    """
    saved = json.loads((sweep_dir / SWEEP_FILE).read_text())
    command = [
        sys.executable,
        "-m",
        "pvbess.train",
        "--multirun",
        *saved["overrides"],
        *saved["hydra_overrides"],
        f"hydra.sweep.dir={sweep_dir.resolve()}",
    ]
    env = os.environ | {RESUME_ENV: saved["parent_run_id"]}
    if saved.get("tracking_uri"):
        env["MLFLOW_TRACKING_URI"] = saved["tracking_uri"]
    log.info("resuming sweep %s: %s", sweep_dir, " ".join(command[2:]))
    return subprocess.run(command, env=env, check=False).returncode


def metric(key: str, value: float, step: int = 0) -> Metric:
    from mlflow.entities import Metric

    return Metric(key, float(value), int(time.time() * 1000), step)


def sweep_size(cfg: DictConfig, overrides: list[str]) -> int | None:
    """How many jobs the sweep launches: the product of the sweeps, or ``n_trials``."""
    sweeper = cfg.hydra.sweeper
    if str(sweeper.get("_target_", "")).endswith("BasicSweeper"):
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

        params = sweeper.get("params") or {}
        args = [f"{k}={v}" for k, v in params.items()] + list(overrides)
        try:
            parsed = OverridesParser.create().parse_overrides(args)
            batches = BasicSweeper.split_arguments(parsed, None)
        except Exception as exc:  # e.g. glob() needs the config loader
            log.warning("cannot count the sweep's jobs: %s", exc)
            return None
        return sum(len(b) for b in batches)
    n = sweeper.get("n_trials")
    return None if n is None else int(n)


def job_experiments(cfg: DictConfig, overrides: list[str]) -> list[str]:
    """The experiments the jobs write to; more than one when ``site`` is swept.

    Composes the config once per swept value of ``site`` / ``tracking.experiment``.
    """
    parsed = OverridesParser.create().parse_overrides(list(overrides))
    swept = [o for o in parsed if o.is_sweep_override() and o.key_or_group in EXPERIMENT_KEYS]
    if not swept:
        return [experiment_name(cfg)]
    from hydra import compose

    fixed = [str(o.input_line) for o in parsed if not o.is_sweep_override()]
    options = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] for o in swept]
    names = [experiment_name(cfg)]
    for combo in itertools.product(*options):
        job_cfg = compose(cfg.hydra.job.config_name, overrides=[*fixed, *combo])
        names.append(experiment_name(job_cfg))
    return list(dict.fromkeys(names))


def _override_params(overrides: list[str]) -> dict[str, str]:
    out = {"overrides": " ".join(overrides)}
    for line in overrides:
        key, _, value = line.partition("=")
        out[f"override.{key.lstrip('+~')}"] = value
    return out


class MlflowSweepCallback(Callback):
    """One MLflow parent run per Hydra multirun; see the module's docstring."""

    def __init__(self) -> None:
        self.run_id: str | None = None
        self.experiment_ids: list[str] = []
        self.tracking_uri = ""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        import mlflow

        from pvbess.experiment.tracking import PARENT_ENV

        overrides = [str(o) for o in config.hydra.overrides.task]
        hydra_overrides = [
            str(o)
            for o in config.hydra.overrides.hydra
            if not str(o).startswith("hydra.sweep.dir=")
        ]
        ids = prepare_store(config, job_experiments(config, overrides))
        self.experiment_ids = list(ids.values())
        self.tracking_uri = mlflow.get_tracking_uri()
        size = sweep_size(config, overrides)
        sweep_dir = Path(str(config.hydra.sweep.dir))
        resumed = os.environ.get(RESUME_ENV, "").strip()
        if resumed:
            self.run_id = reopen_parent(resumed)
            log.info("resuming sweep %s: MLflow parent run %s", sweep_dir, resumed)
        else:
            self.run_id = self._start(config, overrides, sweep_dir, size)
            log.info("sweep of %s jobs: MLflow parent run %s", size, self.run_id)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_FILE).write_text(
            json.dumps(
                {
                    "parent_run_id": self.run_id,
                    "tracking_uri": self.tracking_uri,
                    "overrides": overrides,
                    "hydra_overrides": hydra_overrides,
                },
                indent=1,
            )
        )
        os.environ[PARENT_ENV] = self.run_id
        # Jobs composed here and run elsewhere get it through their own config.
        with read_write(config.hydra), open_dict(config.hydra):
            config.hydra.overrides.hydra.append(f"++hydra.job.env_set.{PARENT_ENV}='{self.run_id}'")
        atexit.register(self._died)

    def _start(
        self, config: DictConfig, overrides: list[str], sweep_dir: Path, size: int | None
    ) -> str:
        choices = config.hydra.runtime.choices
        params: dict[str, Any] = _override_params(overrides)
        params["size"] = size if size is not None else "unknown"
        tags = {
            "sweep_dir": str(sweep_dir),
            "launcher": str(choices.get("hydra/launcher", "")),
            "sweeper": str(choices.get("hydra/sweeper", "")),
            "mlflow.note.content": "python -m pvbess.train --multirun " + " ".join(overrides),
        }
        name = f"sweep-{sweep_dir.parent.name}_{sweep_dir.name}"
        return start_parent(config, self.experiment_ids[0], name, params, tags)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.run_id is None:
            return
        import mlflow

        atexit.unregister(self._died)
        mlflow.set_tracking_uri(self.tracking_uri)  # in-process jobs may have moved it
        end_parent(self.run_id, self.experiment_ids)
        self._forget()

    def _died(self) -> None:
        """The sweep ended without on_multirun_end: FAILED (a job raised) or KILLED (Ctrl-C)."""
        if self.run_id is None:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        interrupted = getattr(sys, "last_type", None) is KeyboardInterrupt
        try:
            mlflow.set_tracking_uri(self.tracking_uri)
            MlflowClient().set_tag(self.run_id, "error", "the sweep stopped before its end")
            end_parent(
                self.run_id, self.experiment_ids, status="KILLED" if interrupted else "FAILED"
            )
        except Exception as exc:  # at exit: report, never raise
            log.warning("could not end sweep parent run %s: %s", self.run_id, exc)
        self._forget()

    def _forget(self) -> None:
        from pvbess.experiment.tracking import PARENT_ENV

        if os.environ.get(PARENT_ENV) == self.run_id:
            del os.environ[PARENT_ENV]
        self.run_id = None
