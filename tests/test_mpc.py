"""The rolling-horizon MPC on the tiny site: the optimum on a whole-period window, never
better than it, a window's first ramp from the import before it, equal service,
forecasts, bad config, the entrypoint."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate
from stable_baselines3.common.monitor import Monitor

from pvbess import train
from pvbess.config import ConfigError, RewardConfig
from pvbess.control import exact, lp, optimal
from pvbess.control.controllers import Optimal, Uncontrolled
from pvbess.control.mpc import Mpc
from pvbess.experiment import evaluation
from pvbess.sim.env import SiteEnv

from .conftest import compose_cfg, the_run

BALANCED = RewardConfig(name="balanced")


@pytest.fixture(scope="module")
def env(tiny_dataset) -> SiteEnv:
    # The twin: bit-exact with CityLearn, so the fast way to run many episodes.
    return SiteEnv(tiny_dataset, BALANCED, backend="twin")


def _rollout(env: SiteEnv, controller) -> pd.DataFrame:
    return evaluation.rollout(env, controller, seed=0, progress=False)


def _objective(ts: pd.DataFrame) -> float:
    """J = minus the summed reward: what the optimum minimises."""
    return -float(ts["reward_total"].sum())


@pytest.fixture(scope="module")
def optimum(env: SiteEnv) -> tuple[Optimal, float]:
    c = Optimal(env)
    return c, _objective(_rollout(env, c))


def _mpc(env: SiteEnv, seed: int = 0, **kwargs) -> tuple[Mpc, pd.DataFrame]:
    c = Mpc(env, seed=seed, **kwargs)
    return c, _rollout(env, c)


def _assert_every_vehicle_leaves_charged(ts: pd.DataFrame) -> None:
    assert ts["ev_unmet_kwh"].sum() == 0.0
    assert ts["ev_departures_met"].sum() == ts["ev_departures"].sum() > 0


@pytest.mark.parametrize("exact", [False, True], ids=["lp", "exact"])
def test_whole_period_window_reproduces_the_optimum(env, optimum, exact: bool) -> None:
    opt, j_opt = optimum
    n = env.n_steps
    c, ts = _mpc(env, horizon_h=n, replan_every_h=n, terminal="free", exact=exact)
    m = c.metrics(ts)
    assert m["mpc/replans"] == 1.0
    # The window's plan is the optimum's schedule, and so is what the env did with it.
    assert c.last_solution is not None
    assert c.last_solution.objective == pytest.approx(opt.solution.objective, rel=1e-7)
    assert c.last_solution.objective_bound == pytest.approx(opt.solution.objective_bound, rel=1e-7)
    assert _objective(ts) == pytest.approx(j_opt, rel=1e-7)
    assert m["mpc/gap_to_lp_bound_rel"] == pytest.approx(
        (j_opt - m["mpc/lp_bound"]) / m["mpc/lp_bound"], abs=1e-7
    )
    _assert_every_vehicle_leaves_charged(ts)


def test_first_ramp_is_from_the_initial_import(env) -> None:
    p0 = optimal.Problem.from_dataset(env.dataset, env.weights, env.scales)
    s0 = optimal.solve(p0).schedule
    imp0 = float(s0.grid_import_kwh[0])
    # The import before the period: X = 2 import_0 + 1 kWh, so the first ramp |import_0 - X|
    # grows from import_0 (from 0) to import_0 + 1 kWh, at 0.5 x w_grid / max_import per kWh.
    x = 2 * imp0 + 1.0
    per_kwh = 0.5 * p0.weights.grid / p0.scales.max_import_kwh
    assert per_kwh > 0
    px = replace(p0, initial_import_kwh=x)
    # The same actions, scored from X: only the first step's grid term changes.
    sx = lp.schedule_from_actions(px, s0.bess_charge_kwh - s0.bess_discharge_kwh, s0.ev_grid_kwh)
    assert sx.objective - s0.objective == pytest.approx(per_kwh * 1.0, rel=1e-9)
    grid_w = p0.weights.grid
    assert grid_w * (s0.components["grid"][0] - sx.components["grid"][0]) == pytest.approx(
        per_kwh * 1.0, rel=1e-9
    )
    np.testing.assert_array_equal(sx.reward_total[1:], s0.reward_total[1:])
    # The LP's first ramp row and the MILP's start point (``exact._start``) use X too: the
    # schedule as the model's columns satisfies every row and costs its objective.
    cells = lp._cells(px)
    matrix, arrays, offset = lp._build(px, cells)
    lay = lp._Layout(n_steps=px.n_steps, n_cells=len(cells.step), with_grid=True)
    none = np.zeros(0, dtype=np.int64)
    point = exact._start(px, cells, lay, sx, none, none)
    activity = matrix @ point
    assert np.all(activity >= arrays["row_lower"] - 1e-6)
    assert np.all(activity <= arrays["row_upper"] + 1e-6)
    assert float(arrays["cost"] @ point) + offset == pytest.approx(sx.objective, rel=1e-9)
    # Solved from X, the LP is still exact: its bound is the realized schedule's objective,
    # whose first ramp is from X.
    sol = optimal.solve(px)
    assert sol.objective == pytest.approx(sol.objective_bound, rel=1e-7)
    assert sol.objective_bound != pytest.approx(optimal.solve(p0).objective_bound, rel=1e-7)
    s = sol.schedule
    ramp0 = abs(s.grid_import_kwh[0] - x)
    over0 = max(s.grid_import_kwh[0] - p0.scales.peak_threshold_kwh, 0.0)
    headroom = p0.scales.max_import_kwh - p0.scales.peak_threshold_kwh
    assert s.components["grid"][0] == pytest.approx(
        -0.5 * (over0 / headroom + ramp0 / p0.scales.max_import_kwh), rel=1e-12
    )
    with pytest.raises(ValueError, match="initial_import_kwh"):
        optimal.solve(replace(p0, initial_import_kwh=-1.0))


def test_windows_start_from_the_import_the_env_realized(env) -> None:
    c = Mpc(env, horizon_h=12, replan_every_h=6)
    seen: list[tuple[int, float, float]] = []
    window = c.window

    def spy(t: int, stored_kwh: float, prev_import_kwh: float = 0.0):
        w = window(t, stored_kwh, prev_import_kwh)
        seen.append((t, prev_import_kwh, w.problem.initial_import_kwh))
        return w

    c.window = spy  # type: ignore[method-assign]
    ts = _rollout(env, c)
    imports = ts["grid_import_kwh"].to_numpy()
    assert [t for t, _, _ in seen] == list(range(0, env.n_steps, 6))
    for t, prev, initial in seen:
        assert prev == initial == (imports[t - 1] if t > 0 else 0.0)


@pytest.mark.parametrize(
    ("horizon_h", "replan_every_h"), [(12, 1), (24, 6)], ids=["12h-hourly", "24h-every-6h"]
)
def test_short_horizon_is_never_better_than_the_optimum(
    env, optimum, horizon_h: int, replan_every_h: int
) -> None:
    opt, _ = optimum
    c, ts = _mpc(env, horizon_h=horizon_h, replan_every_h=replan_every_h)
    j = _objective(ts)
    bound = opt.solution.objective_bound
    assert j >= bound - 1e-9 * abs(bound)
    # ... and still gains on doing nothing.
    assert j < _objective(_rollout(env, Uncontrolled(env)))
    _assert_every_vehicle_leaves_charged(ts)
    m = c.metrics(ts)
    assert m["mpc/replans"] == -(-env.n_steps // replan_every_h)
    assert m["mpc/solve_seconds_total"] >= m["mpc/solve_seconds_max"] > 0
    assert m["mpc/forecast_mae_pv_kwh"] == 0.0 and m["mpc/forecast_mae_ev_kwh"] == 0.0
    assert m["mpc/gap_to_lp_bound_rel"] >= -1e-9


def test_forecasts_differ_from_perfect_and_noise_is_seeded(env) -> None:
    perfect, ts_perfect = _mpc(env, forecast="perfect")
    runs = {
        "persistence": _mpc(env, forecast="persistence"),
        "noisy": _mpc(env, forecast="noisy"),
        "noisy_again": _mpc(env, forecast="noisy"),
        "noisy_seed_1": _mpc(env, seed=1, forecast="noisy"),
    }
    assert perfect.metrics()["mpc/forecast_mae_load_kwh"] == 0.0
    for name, (c, ts) in runs.items():
        _assert_every_vehicle_leaves_charged(ts)
        m = c.metrics()
        for key in ("pv", "load", "ev"):
            assert m[f"mpc/forecast_mae_{key}_kwh"] > 0, (name, key)
        assert not np.array_equal(ts["action_bess"], ts_perfect["action_bess"]), name
    pd.testing.assert_frame_equal(runs["noisy"][1], runs["noisy_again"][1])
    noisy, again = runs["noisy"][0].metrics(), runs["noisy_again"][0].metrics()
    assert {k: v for k, v in noisy.items() if "seconds" not in k} == {
        k: v for k, v in again.items() if "seconds" not in k
    }
    assert not np.array_equal(
        runs["noisy_seed_1"][1]["action_bess"], runs["noisy"][1]["action_bess"]
    )


def test_persistence_repeats_yesterday(env) -> None:
    c = Mpc(env, forecast="persistence", horizon_h=48)
    p = c.problem
    t = 30
    f = c.forecast_window(t, 48)
    assert f.pv_kwh[0] == p.pv_kwh[t]  # the current hour is measured
    assert np.array_equal(f.pv_kwh[1:25], p.pv_kwh[t - 23 : t + 1])  # leads 1..24: 24 h back
    assert np.array_equal(f.load_kwh[25:], p.load_kwh[t + 25 - 48 : t])  # then 48 h back
    # Before the first day: the first day's values at that hour.
    f0 = c.forecast_window(2, 24)
    assert np.array_equal(f0.pv_kwh[1:], np.concatenate([p.pv_kwh[3:24], p.pv_kwh[0:2]]))
    # Yesterday's arrivals, shifted by a day with their dwell and energy.
    yesterday = (p.session_arrival_step > t - 24) & (p.session_arrival_step <= t)
    assert np.array_equal(
        np.sort(f.arrival[f.arrival <= t + 24]), np.sort(p.session_arrival_step[yesterday] + 24)
    )


SIGNALS = {"pv": ("pv_kwh",), "load": ("load_kwh",)}
SIGNALS["arrivals"] = ("arrival", "departure", "energy_kwh", "home")


@pytest.mark.parametrize("signal", list(SIGNALS))
def test_a_signal_forecast_overrides_forecast_for_that_signal_alone(env, signal: str) -> None:
    kinds = ("perfect", "persistence")
    windows = {kind: Mpc(env, forecast=kind).forecast_window(30, 24) for kind in kinds}
    for base, other in (kinds, kinds[::-1]):
        mixed = Mpc(env, forecast=base, **{f"forecast_{signal}": other}).forecast_window(30, 24)
        for sig, fields in SIGNALS.items():
            want = windows[other if sig == signal else base]
            for name in fields:
                assert np.array_equal(getattr(mixed, name), getattr(want, name)), (base, name)
    # The two kinds differ for every signal here, so the check above can fail.
    a, b = (windows[k] for k in kinds)
    for fields in SIGNALS.values():
        assert any(not np.array_equal(getattr(a, n), getattr(b, n)) for n in fields)


def test_learned_forecasts_pv_and_load_from_other_years(env) -> None:
    c = Mpc(env, forecast="learned", horizon_h=48)
    p, t = c.problem, 30
    f = c.forecast_window(t, 48)
    assert f.pv_kwh[0] == p.pv_kwh[t] and f.load_kwh[0] == p.load_kwh[t]  # measured now
    # Leads 1..24 from the day-ahead model, 25..47 from the two-days-ahead one.
    for key, got in (("pv", f.pv_kwh), ("load", f.load_kwh)):
        np.testing.assert_array_equal(got[1:25], c._learned[key][0, t + 1 : t + 25])
        np.testing.assert_array_equal(got[25:], c._learned[key][1, t + 25 : t + 48])
    assert not np.array_equal(
        f.load_kwh, Mpc(env, forecast="persistence").forecast_window(t, 48).load_kwh
    )
    # Arrivals are not learned: yesterday's.
    yesterday = Mpc(env, forecast="persistence", horizon_h=48).forecast_window(t, 48)
    for name in ("arrival", "departure", "energy_kwh", "home"):
        assert np.array_equal(getattr(f, name), getattr(yesterday, name)), name
    _, ts = _mpc(env, forecast="learned")
    _assert_every_vehicle_leaves_charged(ts)


def test_average_is_the_mean_of_the_last_seven_days_at_that_hour(env) -> None:
    c = Mpc(env, forecast="average")
    p, t = c.problem, 100  # day 5, 04:00: days before the first are the first day's
    f = c.forecast_window(t, 24)
    assert f.load_kwh[0] == p.load_kwh[t]  # measured now
    for lead in (1, 8, 10, 23):  # 05:00, noon, 14:00, 03:00
        days = [(t + lead - 24 * k) for k in range(1, 8)]
        for got, series in ((f.pv_kwh, p.pv_kwh), (f.load_kwh, p.load_kwh)):
            want = np.mean([series[d if d >= 0 else d % 24] for d in days])
            assert got[lead] == pytest.approx(want, rel=1e-12), lead
    assert f.pv_kwh[8] > 0  # a daylight hour, so the check can fail
    yesterday = Mpc(env, forecast="persistence").forecast_window(t, 24)
    assert np.array_equal(f.arrival, yesterday.arrival)  # arrivals: yesterday's
    assert not np.array_equal(f.load_kwh, yesterday.load_kwh)


def test_a_learned_forecast_is_never_fitted_on_the_evaluated_year(env) -> None:
    with pytest.raises(ConfigError, match=r"agent\.forecast_fit_seeds: the year of seed 0"):
        Mpc(env, forecast="learned", forecast_fit_seeds=[1, 0])
    with pytest.raises(ConfigError, match=r"agent\.forecast_fit_seeds"):
        Mpc(env, forecast_load="learned", forecast_fit_seeds=[])
    # Nothing learned, nothing fitted: the seeds are not read.
    assert Mpc(env, forecast="persistence", forecast_fit_seeds=[0])._learned == {}


def test_a_learned_forecast_refuses_fit_years_with_the_evaluated_series(env, monkeypatch) -> None:
    from pvbess.site import dataset as ds_module

    # Another year (another hash, other sessions) with the same load: a site whose load
    # comes from a file gives every seed the same series.
    other_year = replace(env.dataset, data_hash="another-year")
    monkeypatch.setattr(ds_module, "build", lambda site, data_dir: other_year)
    with pytest.raises(ConfigError, match=r"the load series of seed 1's year is the evaluated"):
        Mpc(env, forecast_load="learned", forecast_fit_seeds=[1])


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"horizon_h": 0}, "agent.horizon_h"),
        ({"forecast_arrivals": "learned"}, "agent.forecast_arrivals"),
        ({"forecast_arrivals": "average"}, "agent.forecast_arrivals"),
        ({"horizon_h": 1.5}, "agent.horizon_h"),
        ({"replan_every_h": 0}, "agent.replan_every_h"),
        ({"horizon_h": 6, "replan_every_h": 12}, "agent.replan_every_h"),
        ({"forecast": "oracle"}, "agent.forecast"),
        ({"forecast_load": "oracle"}, "agent.forecast_load"),
        ({"forecast_arrivals": ""}, "agent.forecast_arrivals"),
        ({"terminal": "full"}, "agent.terminal"),
        ({"noise_frac_at_24h": -0.1}, "agent.noise_frac_at_24h"),
    ],
)
def test_bad_config_names_the_key(env, overrides: dict, key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        Mpc(env, **overrides)


def test_bad_config_through_hydra_names_the_key(env) -> None:
    cfg = compose_cfg(["agent=mpc", "site=tiny", "agent.replan_every_h=48"])
    with pytest.raises(ConfigError, match=r"agent\.replan_every_h: 48 h exceeds agent\.horizon_h"):
        instantiate(cfg.agent, _convert_="all")(env=Monitor(env), seed=0, device="cpu")


@pytest.mark.parametrize(
    "preset", ["mpc", "mpc_persistence", "mpc_noisy", "mpc_average", "mpc_learned"]
)
def test_presets_build_like_an_sb3_agent(env, preset: str) -> None:
    cfg = compose_cfg([f"agent={preset}", "site=tiny"])
    model = instantiate(cfg.agent, _convert_="all")(env=Monitor(env), seed=0, device="cpu")
    assert isinstance(model, Mpc) and model.learns is False and model.name == preset
    assert model.forecast == {"mpc": "perfect"}.get(preset, preset.removeprefix("mpc_"))
    obs, _ = env.reset(seed=0)
    action, state = model.predict(obs, deterministic=True)
    assert state is None
    assert action.dtype == np.float32 and env.action_space.contains(action)


def test_runs_through_the_entrypoint_and_logs_its_figures(make_cfg) -> None:
    cfg = make_cfg("agent=mpc", "site=tiny", "agent.horizon_h=12")
    kpis = train.train(cfg)
    assert kpis["ev_unmet_kwh"] == 0.0
    run = the_run(cfg.paths.root_dir)
    assert run.info.status == "FINISHED" and run.info.run_name == "mpc-balanced-s0"
    m = run.data.metrics
    assert m["mpc/replans"] == 168.0
    for key in (
        "mpc/solve_seconds_total",
        "mpc/solve_seconds_mean",
        "mpc/solve_seconds_max",
        "mpc/forecast_mae_pv_kwh",
        "mpc/forecast_mae_load_kwh",
        "mpc/forecast_mae_ev_kwh",
        "mpc/window_gap_rel_max",
        "mpc/lp_bound",
        "mpc/gap_to_lp_bound_rel",
    ):
        assert key in m, key
    assert m["mpc/objective"] == pytest.approx(-m["eval/reward_total_mean"] * m["eval/hours"])
