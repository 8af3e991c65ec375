"""MLflow tracking: the store, runs with tags and params, SB3 logging and checkpoints.

Every run directory and multirun job writes to one store, resolved to an
absolute path under the project root (MLflow 3.13+ refuses a bare ./mlruns).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import HumanOutputFormat, KVWriter, Logger

import pvbess

log = logging.getLogger(__name__)

MAX_PARAMS_PER_CALL = 100


def store_uri(root_dir: str | Path) -> str:
    """The project's store: sqlite under <root>/mlruns [absolute]."""
    path = Path(root_dir).resolve() / "mlruns"
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


def artifact_root(root_dir: str | Path) -> str:
    return (Path(root_dir).resolve() / "mlruns" / "artifacts").as_uri()


def configure(
    uri: str | None, root_dir: str | Path, experiment: str, artifact_location: str | None = None
) -> str:
    """Point MLflow at the store and select (or create) the experiment; return its id."""
    tracking_uri = uri or store_uri(root_dir)
    mlflow.set_tracking_uri(tracking_uri)
    if artifact_location is None and tracking_uri.startswith("sqlite:"):
        artifact_location = artifact_root(root_dir)
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is not None:
        exp_id = found.experiment_id
    else:
        location = None
        if artifact_location is not None:
            location = f"{artifact_location.rstrip('/')}/{experiment}"
        exp_id = client.create_experiment(experiment, artifact_location=location)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become JSON strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, f"{key}.")
        elif isinstance(v, list | tuple):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def log_config(cfg: DictConfig) -> None:
    """The whole resolved config: flattened params (in batches) and a YAML artifact."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    params = {k: str(v)[:6000] for k, v in flatten(resolved).items()}
    items = sorted(params.items())
    for i in range(0, len(items), MAX_PARAMS_PER_CALL):
        mlflow.log_params(dict(items[i : i + MAX_PARAMS_PER_CALL]))
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


def git_commit(root_dir: str | Path) -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root_dir,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def start_run(
    cfg: DictConfig, data_hash: str, agent_name: str, run_id: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """A run named <agent>-<reward>-s<seed>, tagged so runs can be selected and compared.

    ``run_id`` continues an existing run (resume). A run that raises is marked
    FAILED with the error as a tag; an interrupt (Ctrl-C, SIGTERM) marks it KILLED.
    """
    experiment = cfg.tracking.experiment or cfg.site.name
    configure(cfg.tracking.uri, cfg.paths.root_dir, experiment, cfg.tracking.artifact_location)
    name = cfg.tracking.run_name or f"{agent_name}-{cfg.reward.name}-s{cfg.seed}"
    tags = {
        "agent": agent_name,
        "reward": cfg.reward.name,
        "site": cfg.site.name,
        "seed": str(cfg.seed),
        "git_commit": git_commit(cfg.paths.root_dir),
        "site_data_hash": data_hash,
        "pvbess_version": pvbess.__version__,
        "currency": cfg.site.tariff.currency,
        "env_backend": cfg.env.backend,
        "output_dir": str(Path(cfg.paths.output_dir).resolve()),
    }
    kwargs = {"run_id": run_id} if run_id else {"run_name": name, "tags": tags}
    with mlflow.start_run(**kwargs) as run:
        try:
            yield run
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            if not interrupted:
                mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
            mlflow.end_run(status="KILLED" if interrupted else "FAILED")
            raise


class MetricBuffer:
    """Training metrics held until the next checkpoint, then written in one batch.

    After a crash the metrics logged since the last checkpoint are lost along
    with the model state they describe, so a resumed run logs those steps once:
    no duplicated and no missing steps.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[dict[str, float], int]] = []

    def add(self, metrics: dict[str, float], step: int) -> None:
        if metrics:
            self._pending.append((metrics, int(step)))

    def flush(self) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [
            Metric(key, float(value), now, step)
            for metrics, step in self._pending
            for key, value in metrics.items()
        ]
        run = mlflow.active_run()
        if batch and run is not None:
            client = MlflowClient()
            for i in range(0, len(batch), 1000):  # MLflow's batch limit
                client.log_batch(run.info.run_id, metrics=batch[i : i + 1000], synchronous=True)
        self._pending.clear()


class MLflowOutputFormat(KVWriter):
    """SB3 logger output that writes numeric values as MLflow metrics (SB3 docs' recipe)."""

    def __init__(self, buffer: MetricBuffer) -> None:
        self.buffer = buffer

    def write(
        self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0
    ) -> None:
        metrics = {}
        for key, value in key_values.items():
            excluded = key_excluded.get(key)
            if excluded is not None and "mlflow" in excluded:
                continue
            if isinstance(value, int | float | np.floating | np.integer) and not isinstance(
                value, bool
            ):
                metrics[key] = float(value)
        self.buffer.add(metrics, step)

    def close(self) -> None:
        pass


def sb3_logger(buffer: MetricBuffer, verbose: bool = False) -> Logger:
    formats: list[KVWriter] = [MLflowOutputFormat(buffer)]
    if verbose:
        formats.append(HumanOutputFormat(sys.stdout))
    return Logger(folder=None, output_formats=formats)


class EpisodeMetricsCallback(BaseCallback):
    """Logs each finished episode's return and reward components (summed over the episode)."""

    def __init__(self, buffer: MetricBuffer) -> None:
        super().__init__()
        self.buffer = buffer

    def _on_step(self) -> bool:
        infos = self.locals.get("infos", [])
        dones = self.locals.get("dones", [])
        for info, done in zip(infos, dones, strict=False):
            if not done:
                continue
            metrics = {}
            if "episode" in info:
                metrics["episode/return"] = float(info["episode"]["r"])
                metrics["episode/length"] = float(info["episode"]["l"])
            for k, v in info.get("episode_components", {}).items():
                metrics[f"episode/reward_{k}"] = float(v)
            self.buffer.add(metrics, self.num_timesteps)
        return True


def log_model(model: Any, name: str = "model") -> None:
    """The final model (and VecNormalize statistics, if any) as reloadable artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.zip"
        model.save(path)
        mlflow.log_artifact(str(path), artifact_path="model")
        get_vn = getattr(model, "get_vec_normalize_env", None)
        vec_normalize = get_vn() if get_vn else None
        if vec_normalize is not None:
            vn_path = Path(tmp) / "vecnormalize.pkl"
            vec_normalize.save(str(vn_path))
            mlflow.log_artifact(str(vn_path), artifact_path="model")
