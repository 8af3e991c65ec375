"""Shared fixtures: composed configs with tmp paths, a tiny site dataset; helpers to run
pvbess as a subprocess and to read its runs back from an MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from pvbess import config
from pvbess.site import dataset

if TYPE_CHECKING:  # mlflow is imported where used: most test files never need it
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_OE2 = ROOT.parent / "shared" / "oe2"

os.environ.setdefault("CITYLEARN_OFFLINE", "1")
config.register()

# Variables that would make a child's runs those of a parent run, or send them elsewhere
# (the first two are pvbess.experiment.sweep's PARENT_ENV and JOB_ENV: importing it loads MLflow).
PARENT_RUN_ENV = (
    "PVBESS_PARENT_RUN_ID",
    "PVBESS_SWEEP_JOB",
    "MLFLOW_RUN_ID",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
)


def compose_cfg(overrides: list[str] | None = None, tmp: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml as the entrypoint would, with paths under ``tmp``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides or [])
    # Outside @hydra.main there is no hydra runtime to resolve the default paths.
    tmp = tmp if tmp is not None else Path("/nonexistent/pvbess-unused")
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp)
        cfg.paths.data_dir = str(tmp / "data")
        cfg.paths.output_dir = str(tmp / "out")
    return cfg


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pvbess")


@pytest.fixture(scope="session")
def tiny_cfg(session_tmp: Path) -> DictConfig:
    return compose_cfg(["site=tiny"], session_tmp)


@pytest.fixture(scope="session")
def tiny_dataset(tiny_cfg: DictConfig) -> dataset.SiteDataset:
    return dataset.build(config.validate_site(tiny_cfg.site), tiny_cfg.paths.data_dir)


@pytest.fixture()
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def _make(*overrides: str) -> DictConfig:
        return compose_cfg(list(overrides), tmp_path)

    return _make


# --- subprocesses ---------------------------------------------------------------------


def child_env(root: Path, env_extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment with PVBESS_ROOT=root, CityLearn offline, no parent run; plus extras."""
    env = {k: v for k, v in os.environ.items() if k not in PARENT_RUN_ENV}
    return env | {"PVBESS_ROOT": str(root), "CITYLEARN_OFFLINE": "1"} | (env_extra or {})


def run_python(
    argv: list[str], root: Path, timeout: int = 300, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python <argv>`` from the project folder in ``child_env(root)``; not checked."""
    return subprocess.run(
        [sys.executable, *argv],
        cwd=ROOT,
        env=child_env(root, env_extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def run_module(
    module: str,
    args: list[str],
    root: Path,
    timeout: int = 300,
    env_extra: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``python -m <module> <args>``, as ``run_python``."""
    return run_python(["-m", module, *args], root, timeout, env_extra)


# --- the MLflow store -----------------------------------------------------------------


def store_client(root: str | Path) -> MlflowClient:
    """A client on the store under ``root``, now also MLflow's tracking URI."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(f"sqlite:///{root}/mlruns/mlflow.db")
    return MlflowClient()


def store_runs(
    root: str | Path, experiment: str | None = "tiny", without: tuple[str, ...] = ()
) -> list[Run]:
    """The experiment's runs (every experiment's if None), newest first; runs whose
    ``kind`` tag is in ``without`` (e.g. "sweep", "search", "comparison") left out."""
    client = store_client(root)
    if experiment is None:
        ids = [e.experiment_id for e in client.search_experiments()]
    else:
        exp = client.get_experiment_by_name(experiment)
        assert exp is not None, f"no experiment {experiment!r} in {root}"
        ids = [exp.experiment_id]
    return [r for r in client.search_runs(ids) if r.data.tags.get("kind") not in without]


def the_run(root: str | Path, experiment: str = "tiny") -> Run:
    """The experiment's one run."""
    found = store_runs(root, experiment)
    assert len(found) == 1, [r.info.run_id for r in found]
    return found[0]


def artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    """Every artifact file of the run under ``path``, folders listed recursively."""
    out: set[str] = set()
    for f in client.list_artifacts(run_id, path):
        out |= artifact_paths(client, run_id, f.path) if f.is_dir else {f.path}
    return out


def metric_steps(run_id: str, key: str) -> list[int]:
    """The steps of a metric's history (current tracking URI), in the order logged."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(run_id, key)
    return [m.step for m in sorted(history, key=lambda m: (m.timestamp, m.step))]
