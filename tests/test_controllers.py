"""The non-learning controllers on the tiny site: ranking on CO2, equal service, LP replay."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from hydra.utils import instantiate
from stable_baselines3.common.monitor import Monitor

from pvbess import train
from pvbess.config import RewardConfig, RewardWeights
from pvbess.control import optimal
from pvbess.control.controllers import Optimal, RuleBased, Uncontrolled
from pvbess.experiment import evaluation
from pvbess.sim.env import SiteEnv

from .conftest import compose_cfg

CO2_ONLY = RewardConfig(
    name="co2_only", weights=RewardWeights(co2=1.0, solar=0.0, cost=0.0, ev=0.0, grid=0.0)
)
CONTROLLERS = {"uncontrolled": Uncontrolled, "rbc": RuleBased, "optimal": Optimal}


class Random:
    def __init__(self, space, seed: int) -> None:
        self.space = space
        self.space.seed(seed)

    def predict(self, observation, deterministic: bool = True):
        return self.space.sample(), None


@pytest.fixture(scope="module")
def env(tiny_dataset) -> SiteEnv:
    return SiteEnv(tiny_dataset, CO2_ONLY)


@pytest.fixture(scope="module")
def controllers(env: SiteEnv) -> dict:
    return {name: cls(env) for name, cls in CONTROLLERS.items()}


@pytest.fixture(scope="module")
def results(env: SiteEnv, controllers: dict) -> dict[str, evaluation.EvalResult]:
    return {
        name: evaluation.evaluate(env, c, seed=0, progress=False) for name, c in controllers.items()
    }


def _required_kwh(dataset) -> float:
    s = dataset.sessions
    return float(((s.required_soc_frac - s.arrival_soc_frac).clip(lower=0) * s.battery_kwh).sum())


@pytest.mark.parametrize("name", list(CONTROLLERS))
def test_builds_from_its_config_like_an_sb3_agent(name: str, env: SiteEnv) -> None:
    cfg = compose_cfg([f"agent={name}", "site=tiny"])
    model = instantiate(cfg.agent, _convert_="all")(env=Monitor(env), seed=0, device="cpu")
    assert model.learns is False
    obs, _ = env.reset(seed=0)
    action, state = model.predict(obs, deterministic=True)
    assert state is None
    assert action.dtype == np.float32 and action.shape == env.action_space.shape
    assert env.action_space.contains(action)


def test_optimal_has_the_lowest_co2(results, controllers) -> None:
    co2 = {name: r.kpis["co2_kg"] for name, r in results.items()}
    # The LP's own figure is a lower bound for every controller; the replay sits within the
    # safety layer's float32 margin (~1e-6) of it.
    lp_co2 = controllers["optimal"].metrics()["lp/co2_kg"]
    assert all(lp_co2 <= v * (1 + 1e-9) for v in co2.values()), co2
    assert all(co2["optimal"] <= v * (1 + 1e-5) for v in co2.values()), co2
    assert co2["optimal"] < co2["uncontrolled"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_no_random_policy_beats_optimal(env: SiteEnv, results, seed: int) -> None:
    ts = evaluation.rollout(env, Random(env.action_space, seed), seed=0, progress=False)
    assert ts["co2_kg"].sum() > results["optimal"].kpis["co2_kg"]
    assert ts["reward_total"].sum() < results["optimal"].timeseries["reward_total"].sum()


def test_rbc_not_worse_than_uncontrolled_on_co2(results) -> None:
    assert results["rbc"].kpis["co2_kg"] <= results["uncontrolled"].kpis["co2_kg"]


def test_equal_service(results, tiny_dataset) -> None:
    eff = tiny_dataset.site.ev.charger_efficiency_frac
    required = _required_kwh(tiny_dataset)
    n_sessions = len(tiny_dataset.sessions)
    for name, r in results.items():
        ts = r.timeseries
        assert ts["ev_unmet_kwh"].sum() == 0.0, name
        assert ts["ev_departures_met"].sum() == ts["ev_departures"].sum() == n_sessions, name
        # Battery side = grid side x charger efficiency: exactly what the sessions require.
        battery_side = ts["ev_charging_kwh"].sum() * eff
        assert battery_side == pytest.approx(required, rel=1e-4), name


def test_uncontrolled_never_uses_the_battery(results) -> None:
    ts = results["uncontrolled"].timeseries
    assert (ts["bess_charge_kwh"] == 0).all() and (ts["bess_discharge_kwh"] == 0).all()
    assert (ts["action_bess"] == 0).all()
    # Full power until the target: nothing is left for the safety layer beyond float32 rounding.
    assert ts["ev_forced_kwh"].sum() < 1e-3 * ts["ev_charging_kwh"].sum()


def test_rbc_follows_its_rules(results, tiny_dataset) -> None:
    ts = results["rbc"].timeseries
    tol = 1e-4
    charging = ts["bess_charge_kwh"] > tol
    discharging = ts["bess_discharge_kwh"] > tol
    assert charging.any() and discharging.any()
    # It charges only from PV surplus and discharges only while the site imports.
    assert (ts.loc[charging, "grid_import_kwh"] < tol).all()
    assert (ts.loc[discharging, "pv_curtailed_kwh"] < tol).all()
    # Outside the peak hours it keeps the reserve.
    bess = tiny_dataset.site.bess
    site = tiny_dataset.site
    hours = ts.index.hour
    offpeak = (hours < site.tariff.peak_start_hour) | (hours >= site.tariff.peak_end_hour)
    soc_kwh = ts["bess_soc_frac"] * bess.capacity_kwh * bess.soc_max_frac
    assert (soc_kwh[discharging & offpeak] >= 0.5 * bess.capacity_kwh - 1e-3).all()


def test_lp_replay_reproduces_the_lp(results, controllers) -> None:
    c = controllers["optimal"]
    m = c.metrics(results["optimal"].timeseries)
    assert m["lp/steps_realized"] == 0 and m["lp/relaxation_gap"] == pytest.approx(0, abs=1e-9)
    # The only differences: the safety layer's upward margin (1e-5 of a forced step) and
    # CityLearn's float32 SOC.
    assert m["lp/replay_co2_gap_rel"] < 1e-5
    assert m["lp/replay_import_max_abs_kwh"] < 1e-3
    assert m["lp/replay_soc_max_abs_frac"] < 1e-6
    assert m["lp/replay_objective_gap_rel"] < 1e-5


@pytest.mark.parametrize("weights", [CO2_ONLY.weights, RewardWeights()], ids=["co2", "balanced"])
def test_lp_replay_without_safety_layer_is_exact_to_float32(tiny_dataset, weights) -> None:
    env = SiteEnv(tiny_dataset, RewardConfig(name="x", weights=weights), safety_layer=False)
    c = Optimal(env)
    ts = evaluation.rollout(env, c, seed=0, progress=False)
    m = optimal.compare_with_history(c.solution, ts, c.problem)
    assert m["lp/replay_co2_gap_rel"] < 1e-7
    assert m["lp/replay_import_max_abs_kwh"] < 1e-4
    assert m["lp/replay_soc_max_abs_frac"] < 1e-6
    assert ts["ev_unmet_kwh"].sum() == 0.0


@pytest.mark.parametrize("name", list(CONTROLLERS))
def test_runs_through_the_entrypoint(name: str, make_cfg) -> None:
    cfg = make_cfg(f"agent={name}", "site=tiny")
    kpis = train.train(cfg)
    assert kpis["ev_unmet_kwh"] == 0.0
    mlflow.set_tracking_uri(f"sqlite:///{cfg.paths.root_dir}/mlruns/mlflow.db")
    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == f"{name}-balanced-s0"
    assert run.data.metrics["eval/co2_kg"] == pytest.approx(kpis["co2_kg"])
