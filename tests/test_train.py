"""End to end on the tiny site: each agent trains, evaluates and is found in MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest

from pvbess import train

from .conftest import (
    artifact_paths,
    compose_cfg,
    metric_steps,
    run_module,
    store_client,
    store_runs,
    the_run,
)

SMALL = {
    "ppo": ["agent.n_steps=64", "agent.batch_size=32", "agent.n_epochs=2"],
    "sac": ["agent.learning_starts=50", "agent.buffer_size=1000", "agent.batch_size=32"],
    "a2c": [],
}


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

    client = store_client(cfg.paths.root_dir)
    run = the_run(cfg.paths.root_dir)
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
        logged = metric_steps(run.info.run_id, key)
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

    files = artifact_paths(client, run.info.run_id)
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


# Slow (15-42 s): test_sweep's multiruns check one store for every job in the fast suite.
@pytest.mark.slow
def test_multirun_writes_every_job_to_one_store(tmp_path) -> None:
    args = ["--multirun", "agent=ppo,a2c", "site=tiny", "total_timesteps=100", "agent.n_steps=32"]
    proc = run_module("pvbess.train", args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "multirun").glob("*/*/*_*-balanced-s0"))) == 2
    runs = store_runs(tmp_path, without=("sweep",))  # not the sweep's parent run
    assert sorted(r.data.tags["agent"] for r in runs) == ["a2c", "ppo"]
    assert all(r.info.status == "FINISHED" and "eval/co2_kg" in r.data.metrics for r in runs)


def test_learners_train_on_other_years_and_are_evaluated_on_site_seed(make_cfg) -> None:
    cfg = make_cfg(
        "agent=ppo",
        "site=tiny",
        "env.train_seeds=[1,2]",
        "total_timesteps=256",
        "checkpoint_every=1000",
        "eval_every=0",
        *SMALL["ppo"],
    )
    train.train(cfg)
    tags = the_run(cfg.paths.root_dir).data.tags
    train_hashes = tags["train_data_hashes"].split(",")
    # Three different years: the evaluation year (site.seed=0) and two training years.
    assert tags["train_seeds"] == "1,2" and len(set(train_hashes)) == 2
    assert tags["eval_data_hash"] == tags["site_data_hash"] not in train_hashes
    assert tags["eval_on_training_data"] == "false"


def test_training_on_the_evaluation_year_is_refused_unless_asked(make_cfg) -> None:
    from pvbess import config

    with pytest.raises(config.ConfigError, match=r"env.train_seeds.*evaluation year"):
        config.validate(make_cfg("site=tiny", "env.train_seeds=[0,1]"))
    cfg = make_cfg(
        "agent=a2c",
        "site=tiny",
        "env.train_seeds=[0]",
        "env.eval_on_training_data=true",
        "total_timesteps=64",
        "eval_every=0",
        "env.n_envs=1",
    )
    train.train(cfg)
    run = the_run(cfg.paths.root_dir)
    assert run.data.tags["eval_on_training_data"] == "true"
    assert run.data.tags["train_data_hashes"] == run.data.tags["eval_data_hash"]


def test_no_validation_year_is_built_when_nothing_is_chosen_on_it(make_cfg) -> None:
    cfg = make_cfg(
        "agent=ppo",
        "site=tiny",
        "env.validation_seed=4",
        "select_every=0",
        "env.eval_backend=twin",
        "total_timesteps=64",
        "eval_every=0",
        "agent.n_steps=8",
        "agent.batch_size=8",
    )
    train.train(cfg)
    tags = the_run(cfg.paths.root_dir).data.tags
    assert "validation_seed" not in tags and "selected_at_steps" not in tags
    assert "select=" not in tags["env_levers"]


def test_the_policy_best_on_the_validation_year_is_the_one_evaluated(make_cfg, tmp_path) -> None:
    import gymnasium as gym
    import numpy as np
    from stable_baselines3 import PPO

    from pvbess.experiment import checkpoints, selection

    cfg = make_cfg(
        "agent=ppo",
        "site=tiny",
        "env.validation_seed=4",
        "env.eval_backend=twin",
        "select_every=256",  # 8 copies x 32 steps: once per update, and at step 0
        "total_timesteps=768",
        "eval_every=0",
        "agent.n_steps=32",
        "agent.batch_size=32",
        "agent.n_epochs=2",
    )
    train.train(cfg)
    client = store_client(cfg.paths.root_dir)
    run = the_run(cfg.paths.root_dir)
    best_dir = Path(cfg.paths.output_dir) / selection.BEST_DIR
    scores = np.load(best_dir / selection.EVALUATIONS_FILE)
    assert list(scores["timesteps"]) == [0, 256, 512, 768]
    best_steps = int(scores["timesteps"][int(np.argmax(scores["results"][:, 0]))])
    assert run.data.tags["selected_at_steps"] == str(best_steps)
    assert run.data.tags["validation_seed"] == "4"
    assert run.data.tags["env_levers"].endswith(" select=seed4")  # its own row in compare
    assert run.data.tags["validation_data_hash"] not in run.data.tags["train_data_hashes"]
    assert run.data.tags["validation_data_hash"] != run.data.tags["eval_data_hash"]
    assert run.data.metrics["validation/best_reward"] == pytest.approx(scores["results"].max())
    # SB3's eval/mean_reward is filed as the validation year's, not as an evaluation KPI.
    assert "eval/mean_reward" not in run.data.metrics
    assert metric_steps(run.info.run_id, "validation/mean_reward") == [0, 256, 512, 768]
    # The model the run logged (and evaluated) is the chosen one.
    logged = client.download_artifacts(run.info.run_id, "model/model.zip", str(tmp_path))
    digest = checkpoints.policy_digest
    assert digest(PPO.load(logged)) == digest(PPO.load(best_dir / selection.MODEL_FILE))
    assert "validation/best.json" in artifact_paths(client, run.info.run_id, "validation")

    # A resumed run competes with the best already saved, not from scratch.
    resumed = selection.callback(gym.make("Pendulum-v1"), PPO.load(logged), 256, best_dir)
    assert resumed.best_mean_reward == pytest.approx(scores["results"].max())

    # A score that does not belong to the saved zip (a kill between the two) is refused.
    score = json.loads((best_dir / selection.SCORE_FILE).read_text())
    (best_dir / selection.SCORE_FILE).write_text(json.dumps(score | {"steps": 7}))
    with pytest.raises(checkpoints.CheckpointError, match="not the policy scored"):
        selection.restore_best(PPO.load(logged), best_dir)
