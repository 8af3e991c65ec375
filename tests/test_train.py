"""End to end on the tiny site: each agent trains, evaluates and is found in MLflow."""

from __future__ import annotations

import json

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pvbess import train

SMALL = {
    "ppo": ["agent.n_steps=64", "agent.batch_size=32", "agent.n_epochs=2"],
    "sac": ["agent.learning_starts=50", "agent.buffer_size=1000", "agent.batch_size=32"],
    "a2c": [],
}


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> list[str]:
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


@pytest.mark.parametrize("agent", ["ppo", "sac", "a2c"])
def test_agent_trains_and_logs_everything(agent: str, make_cfg) -> None:
    cfg = make_cfg(
        f"agent={agent}",
        "site=tiny",
        # The default path: 8 twin copies; 1,400 steps let every copy finish one tiny
        # episode (168 steps), evaluation then runs on CityLearn.
        "total_timesteps=1400",
        "checkpoint_every=512",
        "eval_every=700",
        "seed=3",
        *SMALL[agent],
    )
    kpis = train.train(cfg)
    assert kpis["ev_unmet_kwh"] == pytest.approx(0.0, abs=1e-6)

    mlflow.set_tracking_uri(f"sqlite:///{cfg.paths.root_dir}/mlruns/mlflow.db")
    client = MlflowClient()
    exp = client.get_experiment_by_name("tiny")
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == f"{agent}-balanced-s3"
    tags = run.data.tags
    assert tags["agent"] == agent and tags["reward"] == "balanced" and tags["site"] == "tiny"
    assert tags["seed"] == "3" and tags["site_data_hash"] and tags["pvbess_version"]
    params = run.data.params
    assert params["total_timesteps"] == "1400"
    assert tags["env_backend"] == "twin" and tags["env_n_envs"] == "8"
    assert params["site.bess.capacity_kwh"] == "100.0"
    assert params["agent._target_"].lower().endswith(agent)
    m = run.data.metrics
    for key in (
        "eval/co2_kg",
        "eval/grid_import_kwh",
        "eval/pv_generation_kwh",
        "eval/ev_unmet_kwh",
        "episode/return",
        "episode/reward_co2",
    ):
        assert key in m, key
    assert m["eval/co2_kg"] == pytest.approx(kpis["co2_kg"])
    # 8 copies end their episodes at the same step: one value per metric and step,
    # the mean over the copies with its min and max beside it.
    for key in m:
        logged = [h.step for h in client.get_metric_history(run.info.run_id, key)]
        assert len(logged) == len(set(logged)), (key, logged)
    for step_value in client.get_metric_history(run.info.run_id, "episode/return"):
        at = {
            k: next(
                h.value
                for h in client.get_metric_history(run.info.run_id, k)
                if h.step == step_value.step
            )
            for k in ("episode/return_min", "episode/return_max", "episode/count")
        }
        assert at["episode/return_min"] <= step_value.value <= at["episode/return_max"]
        assert at["episode/count"] == 8
    assert any(k.startswith("train/") for k in m), sorted(m)
    assert any(k.startswith("citylearn/") for k in m)
    # The learning curve: a deterministic evaluation every 700 training steps.
    curve = client.get_metric_history(run.info.run_id, "learning/co2_kg")
    assert len(curve) == 2 and all(700 <= h.step <= 1536 and h.value > 0 for h in curve)

    files = _artifacts(client, run.info.run_id)
    assert any(f.startswith("checkpoints/") and f.endswith(".zip") for f in files), files
    for f in (
        "model/model.zip",
        "eval_timeseries.csv",
        "result.json",
        "dashboard.png",
        "config.yaml",
        "site/summary.json",
        "site/site.png",
    ):
        assert f in files, f
    local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="result.json")
    result = json.loads(open(local).read())
    assert result["kpis"]["co2_kg"] == pytest.approx(kpis["co2_kg"])


def test_same_seed_same_results(tmp_path) -> None:
    from .conftest import compose_cfg

    runs = []
    for k in range(2):
        cfg = compose_cfg(
            [
                "agent=ppo",
                "site=tiny",
                "total_timesteps=128",
                "checkpoint_every=1000",
                "device=cpu",
                *SMALL["ppo"],
            ],
            tmp_path / f"run{k}",
        )
        runs.append(train.train(cfg))
    assert runs[0] == runs[1]
    # The trained policy really acted: the battery moved.
    assert runs[0]["battery_throughput_kwh"] > 0


def test_multirun_writes_every_job_to_one_store(tmp_path) -> None:
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    env = dict(os.environ, PVBESS_ROOT=str(tmp_path), CITYLEARN_OFFLINE="1")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pvbess.train",
            "--multirun",
            "agent=ppo,a2c",
            "site=tiny",
            "total_timesteps=100",
            "agent.n_steps=32",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "multirun").glob("*/*/*_*-balanced-s0"))) == 2
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns/mlflow.db")
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    runs = [r for r in runs if r.data.tags.get("kind") != "sweep"]  # the sweep's parent run
    assert sorted(r.data.tags["agent"] for r in runs) == ["a2c", "ppo"]
    assert all(r.info.status == "FINISHED" and "eval/co2_kg" in r.data.metrics for r in runs)
