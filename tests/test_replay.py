"""Evaluations on the twin are proven by replaying them in CityLearn."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from pvbess import train
from pvbess.experiment import checks, compare, replay

from .conftest import compose_cfg, store_client, store_runs

SMALL_PPO = ["total_timesteps=64", "agent.n_steps=32", "agent.batch_size=32", "eval_every=0"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("replay")
    for k, overrides in enumerate([["agent=ppo", *SMALL_PPO], ["agent=rbc"], ["agent=optimal"]]):
        cfg = compose_cfg(["site=tiny", "env.eval_backend=twin", *overrides], root)
        cfg.paths.output_dir = str(root / f"out{k}")
        train.train(cfg)
    return root


def test_runs_on_the_twin_replay_identically_in_citylearn(store) -> None:
    client = store_client(store)
    runs = store_runs(store)
    assert {r.data.tags["eval_backend"] for r in runs} == {"twin"}
    # The twin has no CityLearn to ask: no CityLearn-only figures were logged.
    assert all("eval/citylearn_co2_kg" not in r.data.metrics for r in runs)
    for run in runs:
        result = replay.verify(run.info.run_id, str(store / "data" / "sites"))
        assert result.identical, (result.agent, result.differing)
        # Every KPI the run logged (eval/*) was compared.
        assert result.kpis_compared == sum(k.startswith("eval/") for k in run.data.metrics)
        tags = client.get_run(run.info.run_id).data.tags
        assert tags[replay.REPLAY_TAG] == "identical" and checks.CHECK_TAG not in tags


def test_runs_replay_in_parallel_as_in_sequence(store) -> None:
    store_client(store)
    data = str(store / "data" / "sites")
    ids = [
        next(r for r in store_runs(store) if r.data.tags["agent"] == a).info.run_id
        for a in ("ppo", "rbc")
    ]
    sequential = replay.replay_runs(ids, data, jobs=1)
    # Two spawned processes, each opening the store from the tracking URI it is given.
    parallel = replay.replay_runs(ids, data, jobs=2)
    assert [r.run_id for r in parallel] == ids
    assert parallel == sequential and all(r.identical for r in parallel)
    # A failing replay names its run; the others still run.
    with pytest.raises(replay.ReplayError, match=r"2 of 2 replays") as failed:
        replay.replay_runs(["no-such-run-1", "no-such-run-2"], data, jobs=2)
    assert "run no-such-run-1:" in str(failed.value) and "run no-such-run-2:" in str(failed.value)


def test_a_kpi_that_differs_fails_the_check(store) -> None:
    client = store_client(store)
    run = next(r for r in store_runs(store) if r.data.tags["agent"] == "rbc")
    # As if the twin had drifted: the logged CO2 is off by one part in a million.
    client.log_metric(run.info.run_id, "eval/co2_kg", run.data.metrics["eval/co2_kg"] * 1.000001)
    result = replay.verify(run.info.run_id, str(store / "data" / "sites"))
    assert result.differing == ["co2_kg"] and result.max_abs_diff > 0
    tags = MlflowClient().get_run(run.info.run_id).data.tags
    assert tags[replay.REPLAY_TAG] == "differs"
    assert "twin_replay" in tags[checks.CHECK_TAG].split(",")


def test_compare_verify_replays_one_run_per_kind_and_says_so(store) -> None:
    store_client(store)
    _, notes = compare.compare(
        compare.Selection(site="tiny"),
        store / "report",
        verify_data_dir=str(store / "data" / "sites"),
    )
    note = next(n for n in notes if n.startswith("Evaluated on the twin"))
    for agent in ("ppo", "rbc", "optimal"):
        assert f"{agent}: " in note
    assert "Replayed in CityLearn" in note


def test_learners_and_baselines_share_one_evaluation_data_hash(store) -> None:
    runs = store_runs(store, without=("comparison",))
    hashes = {r.data.tags["eval_data_hash"] for r in runs}
    assert len(hashes) == 1
    learner = next(r for r in runs if r.data.tags["agent"] == "ppo")
    # ... while the learner trained on other years.
    assert hashes.isdisjoint(learner.data.tags["train_data_hashes"].split(","))
    t, _ = compare.table(compare.runs_frame(runs))
    assert t.site_data.nunique() == 1 and len(t) == 3


def test_a_residual_learner_is_its_own_kind_to_replay() -> None:
    """verify=true replays one run per kind: a learner on the MPC takes another path
    through the step than one acting on the battery's power, so it is replayed too."""
    from types import SimpleNamespace

    def run(tags: dict[str, str]) -> SimpleNamespace:
        return SimpleNamespace(data=SimpleNamespace(tags=tags))

    levers = "obs=time+tariff act=fleet base=uncontrolled norm"
    assert replay.controller_kind(run({"agent": "ppo", "env_levers": levers})) == "ppo"
    residual = levers.replace("act=fleet", "act=fleet bess=mpc_residual:0.5")
    kind = replay.controller_kind(run({"agent": "ppo", "env_levers": residual}))
    assert kind == "ppo bess=mpc_residual:0.5"
    assert replay.controller_kind(run({"agent": "rbc"})) == "rbc"
