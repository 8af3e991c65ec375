"""Hyperparameter search: the search grammar, the plan's checks, a two-trial Optuna search."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from pvbess import config
from pvbess.experiment import launch, tracking, tune

from .conftest import CONF, ROOT, artifact_paths, child_env, run_module, store_client, store_runs
from .services import start_group, wait_for
from .test_sweep import TINY, check_complete, family

PARSER = OverridesParser.create()


def _dim(line: str) -> tune.Dimension:
    return tune.dimension(PARSER.parse_override(line))


@pytest.mark.parametrize(
    "value", [1e-5, 0.25, 3, True, None, "MlpPolicy", "it's a b", [64, 64], {"pi": [32]}]
)
def test_values_pass_through_the_override_grammar(value: object) -> None:
    assert PARSER.parse_override(f"k={tune.format_value(value)}").value() == value


def test_dimensions_from_the_sweep_grammar() -> None:
    lr = _dim("agent.learning_rate=tag(log, interval(1e-5, 1e-3))")
    assert lr.distribution == FloatDistribution(1e-5, 1e-3, log=True)
    assert _dim("agent.n_epochs=int(interval(3, 20))").distribution == IntDistribution(3, 20)
    assert _dim("agent.gamma=interval(0.9, 1)").distribution == FloatDistribution(0.9, 1.0)
    assert _dim("agent.n_steps=range(8,33,8)").distribution == IntDistribution(8, 32, step=8)
    assert _dim("agent.n_steps=range(32,7,-8)").distribution == IntDistribution(8, 32, step=8)
    arch = _dim("+agent.policy_kwargs=choice({net_arch:[64,64]},{net_arch:[256]})")
    assert isinstance(arch.distribution, CategoricalDistribution)
    assert arch.name == "agent.policy_kwargs" and arch.key == "+agent.policy_kwargs"
    label = arch.distribution.choices[1]
    assert isinstance(label, str) and arch.value(label) == {"net_arch": [256]}
    assert arch.override(label) == "+agent.policy_kwargs={net_arch:[256]}"
    with pytest.raises(tune.TuneError):
        _dim("agent.gamma=glob(*)")


def test_plan_merges_the_search_file_and_the_command_line(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PVBESS_ROOT", str(tmp_path))
    plan = tune.make_plan(
        [
            "hparams_search=ppo_optuna",
            *TINY,
            "agent.gamma=choice(0.9,0.99)",
            "tune.n_trials=3",
            "tune.objective=co2_kg",
            "tune.direction=minimize",
        ]
    )
    # Trials are evaluated on the validation year, not the evaluation year (site.seed 0).
    assert plan.fixed == ["agent=ppo", "site.seed=4", *TINY]
    assert plan.cfg.site.seed == 4 and 4 not in plan.cfg.env.train_seeds
    assert plan.search.n_trials == 3 and plan.search.direction == "minimize"
    assert "agent.n_steps" not in plan.dimensions  # fixed on the command line
    assert plan.dimensions["agent.gamma"].distribution == CategoricalDistribution([0.9, 0.99])
    assert "agent.learning_rate" in plan.dimensions
    assert plan.cfg.site.name == "tiny" and plan.preset_name == "ppo_tuned"
    assert plan.study_dir.parent.parent == tmp_path / "multirun"


def test_the_validation_year_gives_way_to_an_explicit_site_seed(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PVBESS_ROOT", str(tmp_path))
    plan = tune.make_plan(["hparams_search=ppo_optuna", "site.seed=7"])
    assert plan.fixed == ["agent=ppo", "site.seed=7"] and plan.cfg.site.seed == 7
    plan = tune.make_plan(["hparams_search=ppo_optuna", "tune.validation_seed=null"])
    assert plan.fixed == ["agent=ppo"]


@pytest.mark.parametrize("agent", ["ppo", "sac", "a2c"])
def test_every_search_file_plans(agent: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PVBESS_ROOT", str(tmp_path))
    plan = tune.make_plan([f"hparams_search={agent}_optuna"])
    assert plan.search.agent == agent and plan.fixed == [f"agent={agent}", "site.seed=4"]
    assert plan.search.objective == "reward_total_mean" and plan.search.direction == "maximize"
    assert len(plan.dimensions) >= 5


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["site=tiny"], "name the search"),
        (["hparams_search=nope"], "no such file"),
        (["hparams_search=ppo_optuna", "agent=sac"], "searches agent=ppo"),
        (["hparams_search=ppo_optuna", "agent.learnin_rate=interval(0,1)"], "does not compose"),
        (["hparams_search=ppo_optuna", "tune.direction=up"], "maximize or minimize"),
        (["hparams_search=ppo_optuna", "hydra.run.dir=/x"], "set by pvbess.tune"),
        (["hparams_search=ppo_optuna", "agent.gamma=interval(0.9"], "interval\\(0.9"),
        (["hparams_search=ppo_optuna", "agent.n_steps=range(5,1)"], "the range is empty"),
    ],
)
def test_plan_refuses_bad_input(args: list[str], message: str, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PVBESS_ROOT", str(tmp_path))
    with pytest.raises(tune.TuneError, match=message):
        tune.make_plan(args)


def test_launcher_overrides_choose_where_trials_run_not_the_study(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PVBESS_ROOT", str(tmp_path))
    ray = ["hydra/launcher=ray", "hydra.launcher.ray.init.address=10.0.0.1:6379"]
    plan = tune.make_plan(["hparams_search=ppo_optuna", *ray])
    assert plan.launcher == ray and plan.fixed == ["agent=ppo", "site.seed=4"]
    command = launch.trial_command(plan.launcher, plan.fixed, "'/t/3'", "'ppo-t3'", "abc", 3)
    assert command[3:6] == ["--multirun", *ray]
    assert "~hydra.callbacks.mlflow_sweep" in command  # no sweep parent run of its own
    assert "++hydra.job.env_set.PVBESS_PARENT_RUN_ID='abc'" in command
    assert "++hydra.job.env_set.PVBESS_SWEEP_JOB='3'" in command
    assert "hydra.sweep.dir='/t/3'" in command and "hydra.sweep.subdir=." in command
    local = launch.trial_command([], plan.fixed, "'/t/3'", "'ppo-t3'", "abc", 3)
    assert "--multirun" not in local and "hydra.run.dir='/t/3'" in local


def test_a_study_continues_only_with_the_same_overrides(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PVBESS_ROOT", str(tmp_path))
    common = ["hparams_search=a2c_optuna", "tune.study_name=s", "site=tiny"]
    storage = f"sqlite:///{tmp_path}/optuna.db"
    first = tune.open_study(tune.make_plan([*common, "seed=1"]), storage)
    assert first.user_attrs["fixed_overrides"] == [
        "agent=a2c",
        "site.seed=4",
        "site=tiny",
        "seed=1",
    ]
    again = tune.open_study(tune.make_plan([*common, "seed=1"]), storage)
    assert again.study_name == "s"
    with pytest.raises(tune.TuneError, match="not comparable"):
        tune.open_study(tune.make_plan([*common, "seed=2"]), storage)


def test_two_trial_search(tmp_path: Path) -> None:
    proc = run_module(
        "pvbess.tune",
        [
            "hparams_search=ppo_optuna",
            *TINY,
            "agent.batch_size=32",
            "tune.n_trials=2",
            "tune.n_jobs=2",
            # Not ppo_tuned: the checkout's own conf/agent/ppo_tuned.yaml would shadow it.
            "tune.preset=ppo_test_tuned",
        ],
        tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "best parameters written to" in out

    # The study, beside the MLflow store: two finished trials.
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    best = study.best_trial

    # MLflow: the parent carries the best parameters; each trial is a complete child run.
    client = store_client(tmp_path)
    parent, kids = family(tmp_path)
    assert parent.info.status == "FINISHED" and parent.data.tags["kind"] == "search"
    assert parent.data.params["size"] == "2"
    assert len(kids) == 2
    assert all(k.data.tags[tracking.PARENT_TAG] == parent.info.run_id for k in kids)
    check_complete(client, kids)
    for key, value in best.params.items():
        assert float(parent.data.params[f"best.{key}"]) == pytest.approx(value)
    assert parent.data.metrics["best/reward_total_mean"] == pytest.approx(best.value)
    best_run = client.get_run(parent.data.tags["best_run_id"])
    assert best_run.data.tags[tracking.JOB_TAG] == str(best.number)
    assert best_run.data.metrics["eval/reward_total_mean"] == pytest.approx(best.value)
    assert artifact_paths(client, parent.info.run_id, "preset") == {"preset/ppo_test_tuned.yaml"}

    # The preset, under the project root: agent=ppo_test_tuned composes, validates, builds.
    preset = tmp_path / "conf" / "agent" / "ppo_test_tuned.yaml"
    assert preset.is_file()
    # The search's record beside it: one row per trial, the best one's value in it.
    record = pd.read_csv(preset.with_name("ppo_test_tuned.trials.csv"))
    assert len(record) == 2
    assert record["value"].to_numpy() == pytest.approx([t.value for t in study.trials])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"hydra.searchpath=[file://{tmp_path}/conf]", "agent=ppo_test_tuned"],
        )
    for key, value in best.params.items():
        assert cfg.agent[key.removeprefix("agent.")] == pytest.approx(value)
    assert cfg.agent.n_steps == 274  # not searched here: ppo's own value
    cfg.paths.output_dir = str(tmp_path / "out")
    config.validate(cfg)
    assert callable(instantiate(cfg.agent))


@pytest.mark.slow
def test_ctrl_c_stops_the_trials(tmp_path: Path) -> None:
    """Ctrl-C (SIGINT to the process group): the trials stop, the parent is KILLED, exit 130."""
    args = ["hparams_search=ppo_optuna", "site=tiny", "env.n_envs=1", "agent.n_steps=32"]
    args += ["agent.batch_size=32", "total_timesteps=100000", "tune.n_trials=4", "tune.n_jobs=2"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvbess.tune", *args],
        cwd=ROOT,
        env=child_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as a terminal's Ctrl-C reaches it
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # until both trials train
        logs = list(tmp_path.glob("multirun/*/*/*/stdout.log"))
        if len(logs) == 2 and all("MLflow run" in f.read_text(errors="replace") for f in logs):
            break
        time.sleep(1)
    os.killpg(proc.pid, signal.SIGINT)
    out = proc.communicate(timeout=120)[0].decode(errors="replace")
    assert proc.returncode == 130, out[-3000:]
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    (name,) = optuna.get_all_study_names(storage)
    study = optuna.load_study(study_name=name, storage=storage)
    assert [t.state.name for t in study.trials] == ["FAIL", "FAIL"]  # no trial started after
    parent, kids = family(tmp_path)
    assert parent.info.status == "KILLED"
    assert sorted(k.info.status for k in kids) == ["KILLED", "KILLED"]


# Slow (34-92 s): test_a_study_continues_only_with_the_same_overrides checks resuming fast.
@pytest.mark.slow
def test_a_killed_search_resumes_without_losing_or_repeating_trials(tmp_path: Path) -> None:
    """kill -9 of the search (and its running trial) after a trial completed; the same
    command with its study name runs only the missing trials up to tune.n_trials."""
    args = ["hparams_search=ppo_optuna", *TINY, "agent.batch_size=32", "env.eval_backend=twin"]
    # A heartbeat of 1 s: the killed trial is found stale 2 s after the kill, and retried.
    args += ["tune.n_trials=3", "tune.study_name=resumed", "tune.heartbeat_s=1", "tune.preset=''"]
    storage = f"sqlite:///{tmp_path}/mlruns/optuna.db"
    log = tmp_path / "first.log"
    first = start_group(
        [sys.executable, "-m", "pvbess.tune", *args], child_env(tmp_path), log, ROOT
    )
    try:
        wait_for(lambda: _complete(tmp_path, storage) >= 1, "a complete trial", log, 300)
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # the search and its running trial, at once
        first.wait()
    before = {t.number: t for t in _trials(storage) if t.state.name == "COMPLETE"}
    assert 1 <= len(before) < 3

    proc = run_module("pvbess.tune", args, tmp_path, 600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    trials = _trials(storage)
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == 3  # the total, not 3 more
    for number, old in before.items():  # kept as they were, not run again
        new = trials[number]
        assert (new.state, new.value, new.datetime_complete) == (
            old.state,
            old.value,
            old.datetime_complete,
        )
    assert all(t.state.name != "RUNNING" for t in trials)  # the killed one failed as stale
    # One finished MLflow run per complete trial, none twice.
    runs = store_runs(tmp_path, without=("search",))
    finished = sorted(
        int(r.data.tags[tracking.JOB_TAG]) for r in runs if r.info.status == "FINISHED"
    )
    assert finished == sorted(t.number for t in complete)


def _trials(storage: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name="resumed", storage=storage).trials


def _complete(root: Path, storage: str) -> int:
    """Complete trials so far; 0 before the first trial starts (the study exists then)."""
    if not list(root.glob("multirun/*/*/*/stdout.log")):
        return 0
    return sum(t.state.name == "COMPLETE" for t in _trials(storage))
