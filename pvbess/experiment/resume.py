"""Resuming a run: the lock on its directory, the files a resume needs, and finding the run
(its errors are checkpoints.CheckpointError, as a checkpoint's are)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pvbess import config
from pvbess.experiment import tracking
from pvbess.experiment.checkpoints import TMP_PREFIX, CheckpointError

RUN_ID_FILE = "mlflow_run_id"
RESOLVED_CONFIG = "resolved_config.yaml"
LOCK_FILE = ".train.lock"


@contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory while training it.

    The kernel drops the lock when the process dies, even on kill -9, so a
    resume can tell a crashed run from one that another process still trains.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_FILE, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise CheckpointError(
                f"run directory {out_dir} is in use by another training process; wait for it "
                "or stop it before resuming"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class ResumeTarget:
    cfg: DictConfig  # the original run's resolved config
    run_id: str
    status: str  # the run's MLflow status when found: RUNNING after a kill -9
    finished_kpis: dict[str, float] | None  # set when the run already finished


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_run_files(out_dir: Path, run_id: str, cfg: DictConfig) -> None:
    """What a later ``resume=<this dir>`` needs: the run id and the resolved config."""
    _write_atomic(out_dir / RESOLVED_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    _write_atomic(out_dir / RUN_ID_FILE, run_id + "\n")


def _saved_config(out_dir: Path, value: str) -> DictConfig:
    saved = out_dir / RESOLVED_CONFIG
    if not saved.is_file():
        raise CheckpointError(
            f"resume={value}: {saved} is missing; cannot rebuild the run's config"
        )
    merged = OmegaConf.merge(OmegaConf.structured(config.TrainConfig), OmegaConf.load(saved))
    assert isinstance(merged, DictConfig)
    return merged


def resume_target(value: str, cfg: DictConfig) -> ResumeTarget:
    """Find the run to continue from a run directory or an MLflow run id.

    A run directory carries its own store: its saved config's ``tracking.uri``
    (or the project store it was written to) is used unless ``cfg`` sets one.
    """
    path = Path(value).expanduser()
    saved: DictConfig | None = None
    if path.is_dir():
        id_file = path / RUN_ID_FILE
        if not id_file.is_file():
            raise CheckpointError(
                f"resume={value}: not a pvbess run directory (no {RUN_ID_FILE}; the run "
                "directory is the one with checkpoints/ under experiments/)"
            )
        run_id = id_file.read_text().strip()
        saved = _saved_config(path, value)
        if cfg.tracking.uri:  # the store moved: the run continues where it is found
            saved.tracking.uri = cfg.tracking.uri
        uri = saved.tracking.uri
        root = saved.paths.root_dir
    elif os.sep in value or value.startswith("."):
        raise CheckpointError(f"resume={value}: no such run directory")
    else:
        run_id, uri, root = value, cfg.tracking.uri, cfg.paths.root_dir
    tracking_uri = uri or tracking.store_uri(root)
    if tracking_uri.startswith(("http://", "https://")):
        tracking.check_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise CheckpointError(
            f"resume={value}: no run {run_id} in {tracking_uri} (give a run id or a "
            "run directory under experiments/)"
        ) from exc
    if saved is None:
        saved = _saved_config(Path(run.data.tags.get("output_dir", "")), value)
    finished = None
    if run.info.status == "FINISHED":
        finished = {k[5:]: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    return ResumeTarget(cfg=saved, run_id=run_id, status=run.info.status, finished_kpis=finished)
