"""Sweeps: a parent MLflow run per multirun, jobs as its children; parallel jobs lose nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pvbess.experiment import sweep, tracking

from .conftest import CONF, artifact_paths, run_module, store_client, store_runs

# Two PPO/A2C iterations of 32 steps each on the one-week site.
# One env copy: the checks count steps per env step (64 / 32 = 2 updates).
TINY = ["site=tiny", "env.n_envs=1", "total_timesteps=64", "agent.n_steps=32"]
ARTIFACTS = {
    "config.yaml",
    "dashboard.png",
    "eval_timeseries.csv",
    "model/model.zip",
    "model/vecnormalize.pkl",  # levers=default normalizes
    "result.json",
    "site/site.png",
    "site/summary.json",
}


def family(root: Path) -> tuple[Run, list[Run]]:
    """The tiny experiment's one parent run (kind sweep or search) and every other run."""
    runs = store_runs(root)
    parents = [r for r in runs if r.data.tags.get("kind") in ("sweep", "search")]
    assert len(parents) == 1, [r.info.run_name for r in runs]
    return parents[0], [r for r in runs if r is not parents[0]]


def check_sweep(root: Path, n_jobs: int, overrides: str) -> list[Run]:
    """The parent and its n_jobs complete children; returns the children."""
    parent, kids = family(root)
    pid = parent.info.run_id
    assert parent.info.status == "FINISHED"
    assert parent.data.params["size"] == str(n_jobs)
    assert parent.data.params["overrides"] == overrides
    assert parent.data.metrics["sweep/jobs_finished"] == n_jobs
    assert len(kids) == n_jobs
    assert sorted(int(k.data.tags[tracking.JOB_TAG]) for k in kids) == list(range(n_jobs))
    for kid in kids:
        assert kid.data.tags[tracking.PARENT_TAG] == pid
        assert kid.info.status == "FINISHED"
        assert "MLFLOW_RUN_ID" not in kid.data.tags
    return kids


def check_complete(client: MlflowClient, kids: list[Run]) -> None:
    """Every child has every metric, step and artifact, matching its job's own files."""
    keys_by_agent: dict[str, set[str]] = {}
    for kid in kids:
        rid, metrics = kid.info.run_id, kid.data.metrics
        expected = keys_by_agent.setdefault(kid.data.tags["agent"], set(metrics))
        assert set(metrics) == expected, kid.info.run_name
        assert any(k.startswith("train/") for k in metrics)
        assert len(client.get_metric_history(rid, "time/total_timesteps")) == 2  # 64 / 32
        result = json.loads((Path(kid.data.tags["output_dir"]) / "result.json").read_text())
        assert {f"eval/{k}": v for k, v in result["kpis"].items()}.items() <= metrics.items()
        assert artifact_paths(client, rid) == ARTIFACTS
        assert kid.data.params["total_timesteps"] == "64"


def test_parent_tags_only_inside_a_sweep(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(tracking.PARENT_ENV, raising=False)
    monkeypatch.delenv(tracking.JOB_ENV, raising=False)
    assert tracking.parent_tags() == {}
    monkeypatch.setenv(tracking.PARENT_ENV, "abc123")
    monkeypatch.setenv(tracking.JOB_ENV, "7")
    assert tracking.parent_tags() == {"mlflow.parentRunId": "abc123", "sweep_job": "7"}


def test_experiments_are_tagged_when_next_used(tmp_path: Path) -> None:
    """An experiment made before the tag existed gets it when a run next uses it."""
    client = store_client(tmp_path)
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    client.create_experiment("tiny", artifact_location=f"{tmp_path}/mlruns/artifacts/tiny")
    assert "mlflow.experimentKind" not in client.get_experiment_by_name("tiny").tags
    tracking.configure(None, tmp_path, "tiny")
    tags = MlflowClient().get_experiment_by_name("tiny").tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def _hydra_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=list(overrides), return_hydra_config=True)


def test_sweep_size_is_the_product_of_the_sweeps() -> None:
    cfg = _hydra_cfg()
    overrides = ["agent=ppo,sac,a2c", "reward=balanced,co2_heavy", "seed=0,1,2", "site=tiny"]
    assert sweep.sweep_size(cfg, overrides) == 18
    assert sweep.sweep_size(cfg, ["seed=range(0,4)"]) == 4


def test_experiments_of_a_sweep_over_sites(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PVBESS_ROOT", str(tmp_path))
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["site=tiny"], return_hydra_config=True)
        names = sweep.job_experiments(cfg, ["site=tiny,iquitos_mall", "agent=ppo,a2c"])
        assert names == ["tiny", "iquitos_mall"]
        assert sweep.job_experiments(cfg, ["site=tiny", "seed=0,1"]) == ["tiny"]


def test_launchers_compose() -> None:
    default = _hydra_cfg().hydra
    assert default.launcher._target_.endswith("JoblibLauncher")
    assert default.callbacks.mlflow_sweep._target_ == "pvbess.experiment.sweep.MlflowSweepCallback"
    assert _hydra_cfg("hydra/launcher=joblib", "hydra.launcher.n_jobs=2").hydra.launcher.n_jobs == 2
    assert _hydra_cfg("hydra/launcher=basic").hydra.launcher._target_.endswith("BasicLauncher")
    ray = _hydra_cfg("hydra/launcher=ray").hydra.launcher
    assert ray._target_ == "hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher"
    assert ray.ray.init.address is None and ray.ray.init.include_dashboard is False
    cluster = _hydra_cfg("hydra/launcher=ray", "hydra.launcher.ray.init.address=10.0.0.5:6379")
    assert cluster.hydra.launcher.ray.init.address == "10.0.0.5:6379"
    slurm = _hydra_cfg("hydra/launcher=submitit_slurm", "hydra.launcher.partition=cpu")
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    assert slurm.hydra.launcher.partition == "cpu"


def test_two_job_multirun_basic_launcher(tmp_path: Path) -> None:
    args = ["agent=ppo,a2c", *TINY]
    proc = run_module("pvbess.train", ["--multirun", "hydra/launcher=basic", *args], tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    kids = check_sweep(tmp_path, 2, " ".join(args))
    assert sorted(k.data.tags["agent"] for k in kids) == ["a2c", "ppo"]
    assert len(list((tmp_path / "multirun").glob("*/*/*_*-balanced-s0"))) == 2


def test_four_jobs_on_two_parallel_workers_lose_nothing(tmp_path: Path) -> None:
    """joblib, the default launcher, with 2 worker processes writing to one SQLite store."""
    args = ["agent=ppo,a2c", "seed=0,1", *TINY]
    proc = run_module("pvbess.train", ["--multirun", "hydra.launcher.n_jobs=2", *args], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Joblib.Parallel(n_jobs=2" in out
    kids = check_sweep(tmp_path, 4, " ".join(args))
    check_complete(store_client(tmp_path), kids)
    assert sorted((k.data.tags["agent"], k.data.tags["seed"]) for k in kids) == [
        ("a2c", "0"),
        ("a2c", "1"),
        ("ppo", "0"),
        ("ppo", "1"),
    ]
    # The levers preset each job composed (conf/levers/, the default here).
    assert {k.data.tags["levers_preset"] for k in kids} == {"default"}


def test_a_sweep_that_dies_fails_its_parent(tmp_path: Path) -> None:
    # Both jobs fail their config check before any run starts; Hydra stops the sweep.
    args = ["hydra/launcher=basic", "site=tiny", "site.bess.capacity_kwh=-5,-6"]
    proc = run_module("pvbess.train", ["--multirun", *args], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "site.bess.capacity_kwh" in out
    parent, kids = family(tmp_path)
    assert parent.info.status == "FAILED" and kids == []
    assert parent.data.tags["error"] == "the sweep stopped before its end"
    assert parent.data.params["size"] == "2"
