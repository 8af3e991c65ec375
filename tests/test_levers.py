"""The learner's levers (issue 15) on the tiny site: observation features, fleet actions,
the reward baseline and normalization; hand-computed values, parity on both simulators."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from pvbess import config
from pvbess.config import ConfigError, ObservationConfig, RewardConfig, RewardWeights
from pvbess.control.controllers import Uncontrolled
from pvbess.experiment import evaluation
from pvbess.sim import features, fleet
from pvbess.sim.env import SiteEnv, build_envs, levers_label, uncontrolled_rewards
from pvbess.sim.step import forecast_column
from pvbess.site import forecast

ALL_ON = ObservationConfig(
    time=True, tariff=True, forecast="noisy", peak=True, fleet=True, sockets=False
)


def _reward() -> RewardConfig:
    return RewardConfig(name="balanced", weights=RewardWeights())


def test_needs_and_laxity_by_hand() -> None:
    # 0.4 SOC missing of 10 kWh = 4 kWh; 3 steps left at 2 kWh/step -> laxity 3 - 2 = 1 h.
    need, lax = fleet.needs(
        np.array([[0.5, 0.9]]),
        np.array([[10.0, 10.0]]),
        np.array([0.9, 0.9]),
        np.array([3, 1]),
        step_kwh=2.0,
    )
    np.testing.assert_allclose(need, [[4.0, 0.0]])
    np.testing.assert_allclose(lax, [[1.0, 1.0]])


def test_allocate_least_laxity_first_within_each_class() -> None:
    step = 2.0
    need = np.array([[4.0, 1.0, 3.0, 5.0]])
    lax = np.array([[5.0, 0.5, 2.0, 1.0]])
    group = np.array([0, 0, 0, 1])
    # Class 0: 3 sockets x 2 kWh x 0.5 = 3 kWh: least laxity first (socket 1 wants 1,
    # socket 2 wants 2) -> 1, 2, 0. Class 1: intensity 1 -> one full step.
    out = fleet.allocate(np.array([[0.5, 1.0]]), group, need, lax, step)
    np.testing.assert_allclose(out * step, [[0.0, 1.0, 2.0, 2.0]])
    # Intensity 1 gives every vehicle min(need, one step); 0 gives nothing.
    full = fleet.allocate(np.array([[1.0, 1.0]]), group, need, lax, step)
    np.testing.assert_allclose(full * step, np.minimum(need, step))
    assert not fleet.allocate(np.zeros((1, 2)), group, need, lax, step).any()


def test_aggregates_in_unit_range() -> None:
    out = fleet.aggregates(np.array([[2.0, 4.0]]), np.array([[30.0, 6.0]]), 4, 12.0)
    np.testing.assert_allclose(out, [[0.5, 0.5, 0.25]])
    empty = fleet.aggregates(np.zeros((2, 0)), np.zeros((2, 0)), 4, 12.0)
    np.testing.assert_allclose(empty, [[0.0, 0.0, 1.0]] * 2)


def test_steps_to_change_and_persistence_by_hand() -> None:
    price = np.array([1, 1, 2, 2, 2, 1])
    np.testing.assert_array_equal(features.steps_to_change(price, 24), [2, 1, 3, 2, 1, 24])
    # Lead 1 at step 30: the same hour a day earlier (step 7); lead 25: two days back.
    np.testing.assert_array_equal(
        forecast.persistence_source(30, np.array([0, 1, 25]), 100), [30, 7, 7]
    )
    # Before the first day, the first day's value at that hour.
    assert forecast.persistence_source(0, np.array([1]), 100)[0] == 1
    values = np.arange(10.0)
    np.testing.assert_array_equal(forecast.table(values, [1, 3], "perfect")[8], [9.0, 9.0])
    with pytest.raises(ValueError, match="unknown forecast"):
        forecast.table(values, [1], "psychic")


def test_noisy_forecast_error_grows_with_lead() -> None:
    values = np.full(20_000, 100.0)
    table = forecast.table(values, [1, 24], "noisy", noise_frac_at_24h=0.2, seed=3)
    rel_std = (table / 100.0 - 1).std(axis=0)
    # std 0.2 x sqrt(lead/24): 0.041 at 1 h, 0.2 at 24 h (sampling error < 3 %).
    np.testing.assert_allclose(rel_std, [0.2 * np.sqrt(1 / 24), 0.2], rtol=0.03)
    np.testing.assert_array_equal(
        table, forecast.table(values, [1, 24], "noisy", noise_frac_at_24h=0.2, seed=3)
    )


def test_features_by_hand(tiny_dataset) -> None:
    obs = ObservationConfig(time=True, tariff=True, forecast="perfect", forecast_leads_h=[1])
    f = features.Features(obs, tiny_dataset, ["hour"])
    table = dict(zip(f.names[1:], f.table.T, strict=True))
    hours = tiny_dataset.index.hour
    six = int(np.flatnonzero(hours == 6)[0])
    assert table["hour_sin"][six] == pytest.approx(1.0)  # sin(2 pi 6/24) = 1 -> (1 + 1)/2
    assert table["hour_cos"][six] == pytest.approx(0.5)
    tariff = tiny_dataset.site.tariff
    before_peak = int(np.flatnonzero(hours == tariff.peak_start_hour - 1)[0])
    assert table["price_change_in_frac"][before_peak] == pytest.approx(1 / 24)
    peak = tiny_dataset.series["price_per_kwh"].max()
    assert table["price_frac"][before_peak + 1] == pytest.approx(1.0)
    assert peak == pytest.approx(tariff.peak_price_per_kwh)
    pv = tiny_dataset.series["pv_kwh"].to_numpy()
    np.testing.assert_allclose(
        table["pv_forecast_1h_frac"][: pv.size - 1], pv[1:] / tiny_dataset.site.pv.ac_kw, rtol=1e-6
    )
    assert f.table.shape == (len(tiny_dataset.index) + 1, 6 + 2 + 2)


@pytest.mark.parametrize(
    ("battery_action", "ev_action"),
    [
        ("power", "intensity"),
        ("grid_target", "intensity"),
        ("mpc_residual", "intensity"),
        ("mpc_residual", "mpc_residual"),
    ],
)
def test_all_levers_identical_on_both_simulators(
    tiny_dataset, battery_action: str, ev_action: str
) -> None:
    """Every feature, the fleet allocation, the battery's grid target and the corrections
    to the MPC run in the one step: CityLearn and the twin give the same observations,
    rewards and history."""
    runs = {}
    for backend in ("twin", "citylearn"):
        env = SiteEnv(
            tiny_dataset,
            _reward(),
            backend=backend,
            observations=ALL_ON,
            action_mode="fleet",
            battery_action=battery_action,
            ev_action=ev_action,
        )
        assert env.action_space.shape == (3,)  # battery + 2 vehicle classes
        # No sockets, 22 features (+ the MPC's battery action a residual learner adds to,
        # + the mean of its charging plan when the learner corrects that too).
        n_base = (battery_action == "mpc_residual") + (ev_action == "mpc_residual")
        assert env.observation_space.shape == (9 + 22 + n_base,)
        rng = np.random.default_rng(0)
        obs, _ = env.reset(seed=3)
        seen, rewards, done = [obs], [], False
        while not done:
            obs, r, done, _, _ = env.step(rng.uniform(env.action_space.low, 1.0))
            seen.append(obs)
            rewards.append(r)
        runs[backend] = (np.array(seen), np.array(rewards), env.history())
        assert np.all((runs[backend][0] >= 0) & (runs[backend][0] <= 1))
    (o1, r1, h1), (o2, r2, h2) = runs["twin"], runs["citylearn"]
    np.testing.assert_array_equal(o1, o2)
    np.testing.assert_array_equal(r1, r2)
    assert h1.equals(h2)
    assert h1["ev_unmet_kwh"].sum() == 0  # the safety layer stays underneath


def test_fleet_at_full_intensity_is_the_uncontrolled_site(tiny_dataset) -> None:
    unc = SiteEnv(tiny_dataset, _reward(), backend="twin")
    ref = evaluation.rollout(unc, Uncontrolled(unc), seed=0, progress=False)
    env = SiteEnv(tiny_dataset, _reward(), backend="twin", action_mode="fleet")
    full = np.array([0.0, 1.0, 1.0])
    ts = evaluation.rollout(env, _Constant(full), seed=0, progress=False)
    np.testing.assert_allclose(ts["ev_charging_kwh"], ref["ev_charging_kwh"], atol=1e-4)
    np.testing.assert_allclose(ts["reward_total"], ref["reward_total"], atol=1e-7)


def test_zero_residual_is_the_served_mpc(tiny_dataset) -> None:
    """A residual learner that adds nothing acts as the MPC planner (``agent=mpc``'s served
    decision, on persistence forecasts) would at the same state, step after step; it
    observes that action as its last feature, and its correction moves the battery."""
    from pvbess.control.mpc import Mpc

    plain = SiteEnv(tiny_dataset, _reward(), backend="twin")
    mpc = Mpc(plain, forecast="persistence", full_period_bound=False)
    resid = SiteEnv(tiny_dataset, _reward(), backend="twin", battery_action="mpc_residual")
    assert resid.core.residual is not None and resid.core.residual.frac == 0.5
    pv = tiny_dataset.series["pv_kwh"].to_numpy()
    load = tiny_dataset.series["load_kwh"].to_numpy()
    obs, _ = plain.reset(seed=0)
    robs, _ = resid.reset(seed=0)
    ev = np.ones(plain.n_sockets)
    actions = []
    for _ in range(48):
        t = plain._t
        src = forecast.persistence_source(t, np.arange(1, mpc.horizon), len(pv))
        bess = mpc.policy.act(mpc.measure(obs), pv[src], load[src])[0]
        assert robs[-1] == pytest.approx((bess + 1) / 2, abs=1e-6)
        actions.append(bess)
        obs, r, *_ = plain.step(np.concatenate([[bess], ev]))
        robs, rr, *_ = resid.step(np.concatenate([[0.0], ev]))
        assert rr == pytest.approx(r, abs=1e-6)
    assert np.ptp(actions) > 0.1  # the planner moved the battery
    np.testing.assert_allclose(
        resid.history()["battery_soc_frac"], plain.history()["battery_soc_frac"], atol=1e-6
    )
    # The correction: a full +1 adds residual_frac of the rating to the planner's action.
    t = resid._t
    base = resid.core._base[0, 0]
    resid.step(np.concatenate([[1.0], ev]))
    assert resid.history()["action_bess"].iloc[t] == pytest.approx(min(base + 0.5, 1.0))


@pytest.mark.parametrize("action_mode", ["per_socket", "fleet"])
def test_zero_residual_on_the_plan_is_the_served_mpcs_whole_decision(
    tiny_dataset, action_mode
) -> None:
    """With ``ev_action=mpc_residual`` the zero action is the planner's battery and its
    charging plan, step after step (the planner asked on a plain env's measured state);
    an EV correction of +1 / -1 (per socket, or per class to each of its sockets) asks
    for full power / none whatever the plan."""
    from pvbess.control.mpc import Mpc

    plain = SiteEnv(tiny_dataset, _reward(), backend="twin")
    mpc = Mpc(plain, forecast="persistence", full_period_bound=False)
    levers = {"action_mode": action_mode, "battery_action": "mpc_residual"}
    resid = SiteEnv(tiny_dataset, _reward(), backend="twin", ev_action="mpc_residual", **levers)
    n_ev = resid.action_space.shape[0] - 1
    assert resid.action_space.low.tolist() == [-1.0] * (1 + n_ev)
    assert resid.observation_space.shape[0] == (
        SiteEnv(tiny_dataset, _reward(), backend="twin", **levers).observation_space.shape[0] + 1
    )
    pv = tiny_dataset.series["pv_kwh"].to_numpy()
    load = tiny_dataset.series["load_kwh"].to_numpy()
    obs, _ = plain.reset(seed=0)
    robs, _ = resid.reset(seed=0)
    charged = []
    for _ in range(72):
        t = plain._t
        src = forecast.persistence_source(t, np.arange(1, mpc.horizon), len(pv))
        planned = mpc.policy.act(mpc.measure(obs), pv[src], load[src])
        assert robs[-2] == pytest.approx((planned[0] + 1) / 2, abs=1e-6)
        assert robs[-1] == pytest.approx(planned[1:].mean(), abs=1e-6)
        charged.append(planned[1:].sum())
        obs, r, *_ = plain.step(planned)
        robs, rr, *_ = resid.step(np.zeros(1 + n_ev))
        assert rr == pytest.approx(r, abs=1e-6)
    assert np.ptp(charged) > 0.1  # the plan charged at some steps and not at others
    for col in ("battery_soc_frac", "ev_charging_kwh", "grid_import_kwh"):
        np.testing.assert_allclose(resid.history()[col], plain.history()[col], atol=1e-6)
    # Corrections, before the safety layer: +1 asks every socket for full power, -1 for none.
    core = resid.core
    up = core.on_base(np.concatenate([[0.0], np.ones(n_ev)])[None, :])
    down = core.on_base(np.concatenate([[0.0], -np.ones(n_ev)])[None, :])
    assert up[0, 1:].tolist() == [1.0] * core.n_sockets
    assert down[0, 1:].tolist() == [0.0] * core.n_sockets
    np.testing.assert_array_equal(up[:, 0], core._base[:, 0])


def test_zero_residual_with_arrivals_is_the_evaluated_mpc_persistence(tiny_dataset) -> None:
    """With ``env.planner_arrivals=persistence`` (``levers=mpc_residual_arrivals``) the
    zero action is ``agent=mpc_persistence``'s decision (replanned every step, yesterday's
    arrivals forecast), step after step; without it the planner decides otherwise."""
    from pvbess.control.mpc import Mpc

    plain = SiteEnv(tiny_dataset, _reward(), backend="twin")
    mpc = Mpc(plain, forecast="persistence", full_period_bound=False)
    levers = {"battery_action": "mpc_residual", "ev_action": "mpc_residual"}
    resid = SiteEnv(
        tiny_dataset, _reward(), backend="twin", planner_arrivals="persistence", **levers
    )
    blind = SiteEnv(tiny_dataset, _reward(), backend="twin", **levers)
    assert 96 < plain.n_steps  # every window below is whole, as the planner's always are
    obs, _ = plain.reset(seed=0)
    resid.reset(seed=0)
    blind.reset(seed=0)
    zero = np.zeros(resid.action_space.shape[0])
    differs = 0
    for _ in range(72):
        action = mpc.predict(obs)[0]
        obs, r, *_ = plain.step(action)
        _, rr, *_ = resid.step(zero)
        assert rr == pytest.approx(r, abs=1e-6)
        blind.step(zero)
        differs += int(not np.allclose(blind.core._base, resid.core._base, atol=1e-6))
    for col in ("battery_soc_frac", "ev_charging_kwh", "grid_import_kwh"):
        np.testing.assert_allclose(resid.history()[col], plain.history()[col], atol=1e-6)
    assert differs > 0  # the arrival forecast changed some decision


def test_zero_residual_on_the_average_planner_is_the_evaluated_mpc_average(tiny_dataset) -> None:
    """``levers=mpc_residual_average``: with the planner forecasting PV and load as each
    hour's mean over the last 7 days, the zero action is ``agent=mpc_average``'s decision,
    step after step (rewards and the year's records to 1e-6); the persistence planner
    decides otherwise on the same days."""
    from pvbess.control.mpc import Mpc

    plain = SiteEnv(tiny_dataset, _reward(), backend="twin")
    mpc = Mpc(plain, forecast="average", full_period_bound=False)
    levers = {
        "battery_action": "mpc_residual",
        "ev_action": "mpc_residual",
        "planner_arrivals": "persistence",
        "ev_residual_frac": 0.0,
    }
    resid = SiteEnv(tiny_dataset, _reward(), backend="twin", planner_forecast="average", **levers)
    persistence = SiteEnv(tiny_dataset, _reward(), backend="twin", **levers)
    assert 6 * 24 + 24 <= plain.n_steps  # every window below is whole
    obs, _ = plain.reset(seed=0)
    resid.reset(seed=0)
    persistence.reset(seed=0)
    zero = np.zeros(resid.action_space.shape[0])
    differs = 0
    for _ in range(6 * 24):
        action = mpc.predict(obs)[0]
        obs, r, *_ = plain.step(action)
        _, rr, *_ = resid.step(zero)
        assert rr == pytest.approx(r, abs=1e-6)
        persistence.step(zero)
        differs += int(not np.allclose(persistence.core._base, resid.core._base, atol=1e-6))
    for col in ("battery_soc_frac", "ev_charging_kwh", "grid_import_kwh"):
        np.testing.assert_allclose(resid.history()[col], plain.history()[col], atol=1e-6)
    assert differs > 24  # the forecast changed decisions on more than a day's steps


def test_the_average_planner_forecast_by_hand(tiny_dataset) -> None:
    """Its load forecast for step t + lead (lead <= 24 h, hourly steps) is the mean of the
    load at t + lead - 24 h, - 48 h, .. - 168 h, a day before the first one standing for
    the first day's same hour: checked at one step and lead by hand (tiny: 7 days)."""
    from pvbess.control.residual import MpcBase

    scales = SiteEnv(tiny_dataset, _reward(), backend="twin").scales
    weights = _reward().weights
    base = MpcBase(tiny_dataset, weights, scales, forecast="average")
    t, lead = 150, 5
    load_kwh = tiny_dataset.series["load_kwh"].to_numpy()
    want_kwh = np.mean(load_kwh[[131, 107, 83, 59, 35, 11, 11]])  # 155 - 168 -> hour 11
    assert base.forecasts(t)["load_kwh"][lead - 1] == pytest.approx(want_kwh, rel=1e-12)
    with pytest.raises(ValueError, match=r"env\.planner_forecast"):
        MpcBase(tiny_dataset, weights, scales, forecast="learned")


def test_with_ev_residual_frac_0_the_charging_is_the_plan(tiny_dataset) -> None:
    """``env.ev_residual_frac=0`` (``levers=mpc_residual_battery``): whatever the learner's
    EV actions, the sockets charge as the planner planned, so a learner that corrects
    only its battery acts as the planner with zero battery corrections; with the default
    scale 1 the same EV actions change the charging."""
    levers = {
        "battery_action": "mpc_residual",
        "ev_action": "mpc_residual",
        "planner_arrivals": "persistence",
    }
    planner = SiteEnv(tiny_dataset, _reward(), backend="twin", **levers)
    battery_only = SiteEnv(tiny_dataset, _reward(), backend="twin", ev_residual_frac=0.0, **levers)
    corrected = SiteEnv(tiny_dataset, _reward(), backend="twin", **levers)
    for env in (planner, battery_only, corrected):
        env.reset(seed=0)
    rng = np.random.default_rng(0)
    zero = np.zeros(planner.action_space.shape[0])
    for _ in range(48):
        ev = zero.copy()
        ev[1:] = rng.uniform(-1.0, 1.0, size=zero.size - 1)
        planner.step(zero)
        battery_only.step(ev)
        corrected.step(ev)
    for col in ("battery_soc_frac", "ev_charging_kwh", "grid_import_kwh"):
        np.testing.assert_array_equal(battery_only.history()[col], planner.history()[col])
    assert not np.allclose(
        corrected.history()["ev_charging_kwh"], planner.history()["ev_charging_kwh"]
    )
    with pytest.raises(ValueError, match=r"env\.ev_residual_frac"):
        SiteEnv(tiny_dataset, _reward(), backend="twin", ev_residual_frac=0.5)


def test_planner_forecast_needs_the_mpc_battery(tiny_dataset, make_cfg) -> None:
    with pytest.raises(ValueError, match="battery_action=mpc_residual"):
        SiteEnv(tiny_dataset, _reward(), backend="twin", planner_forecast="average")
    with pytest.raises(ConfigError, match=r"env\.planner_forecast"):
        config.validate(make_cfg("site=tiny", "env.planner_forecast=average"))
    with pytest.raises(ConfigError, match=r"env\.planner_forecast"):
        config.validate(
            make_cfg("site=tiny", "levers=mpc_residual", "env.planner_forecast=perfect")
        )
    config.validate(make_cfg("site=tiny", "levers=mpc_residual_average"))


def test_planner_arrivals_need_the_mpc_battery(tiny_dataset, make_cfg) -> None:
    with pytest.raises(ValueError, match="battery_action=mpc_residual"):
        SiteEnv(tiny_dataset, _reward(), backend="twin", planner_arrivals="persistence")
    with pytest.raises(ConfigError, match=r"env\.planner_arrivals"):
        config.validate(make_cfg("site=tiny", "env.planner_arrivals=persistence"))
    with pytest.raises(ConfigError, match=r"env\.planner_arrivals"):
        config.validate(
            make_cfg("site=tiny", "levers=mpc_residual", "env.planner_arrivals=perfect")
        )


def test_ev_corrections_need_the_mpc_battery(tiny_dataset) -> None:
    with pytest.raises(ValueError, match="battery_action=mpc_residual"):
        SiteEnv(tiny_dataset, _reward(), backend="twin", ev_action="mpc_residual")
    with pytest.raises(ValueError, match=r"env\.ev_action"):
        SiteEnv(tiny_dataset, _reward(), backend="twin", ev_action="plan")


def test_grid_target_by_hand(tiny_dataset) -> None:
    """The battery action that aims at a grid import: none when the target is the step's
    net load, charging above it, discharging below, bounded by the battery's power."""
    env = SiteEnv(tiny_dataset, _reward(), backend="twin", battery_action="grid_target")
    core = env.core
    t = 12
    ev = np.zeros((1, env.n_sockets))
    net_kwh = core._load[t] - core._pv[t]
    as_target = 2 * net_kwh / core.scales.max_import_kwh - 1
    power_kwh = tiny_dataset.site.bess.power_kw
    np.testing.assert_allclose(core.battery_for_target(np.array([as_target]), ev, t), [0.0])
    half_up = as_target + power_kwh / core.scales.max_import_kwh  # target = net + power / 2
    np.testing.assert_allclose(core.battery_for_target(np.array([half_up]), ev, t), [0.5])
    assert core.battery_for_target(np.array([-1.0]), ev, t)[0] == max(-1.0, -net_kwh / power_kwh)
    # A socket drawing full power raises the net load the target is measured against.
    ev[0, 0] = 1.0
    socket_kwh = tiny_dataset.site.ev.socket_power_kw
    np.testing.assert_allclose(
        core.battery_for_target(np.array([as_target]), ev, t), [-socket_kwh / power_kwh]
    )


def test_reward_baseline_leaves_the_objective_and_zeroes_the_reference(tiny_dataset) -> None:
    base = uncontrolled_rewards(tiny_dataset, _reward())
    env = SiteEnv(tiny_dataset, _reward(), backend="twin")
    env.core.set_reward_baseline(base)
    controller = Uncontrolled(env)
    obs, _ = env.reset(seed=tiny_dataset.site.seed)
    rewards, done = [], False
    while not done:
        obs, r, done, _, _ = env.step(controller.predict(obs)[0])
        rewards.append(r)
    assert np.abs(rewards).max() == 0.0
    np.testing.assert_allclose(env.core.returns[0], base.sum(), rtol=1e-12)
    with pytest.raises(ValueError, match="baseline"):
        env.core.set_reward_baseline(base[:-1])


def test_mpc_baseline_is_the_residual_learners_zero_correction(tiny_dataset) -> None:
    """``reward_baseline=mpc``: the reward of correction 0 and full charging, i.e. the MPC's
    battery and the uncontrolled charging (fleet intensity 1); it zeroes that policy's
    reward and differs from the uncontrolled baseline (the MPC moves the battery)."""
    levers = {"action_mode": "fleet", "battery_action": "mpc_residual"}
    base = uncontrolled_rewards(tiny_dataset, _reward(), **levers)
    assert np.abs(base - uncontrolled_rewards(tiny_dataset, _reward())).max() > 1e-3
    env = SiteEnv(tiny_dataset, _reward(), backend="twin", **levers)
    env.core.set_reward_baseline(base)
    env.reset(seed=tiny_dataset.site.seed)
    rewards, done = [], False
    while not done:
        _, r, done, _, _ = env.step(np.array([0.0, 1.0, 1.0]))
        rewards.append(r)
    assert np.abs(rewards).max() == 0.0


def test_build_envs_with_levers(tiny_dataset, tiny_cfg) -> None:
    from stable_baselines3.common.vec_env import VecNormalize

    envs = build_envs(
        dataset=tiny_dataset,
        reward=_reward(),
        learns=True,
        seed=0,
        data_dir=tiny_cfg.paths.data_dir,
        n_envs=2,
        train_seeds=[1],
        observations={"time": True, "fleet": True},
        action_mode="fleet",
        reward_baseline="uncontrolled",
        normalize=True,
        learning_curve=False,
    )
    assert isinstance(envs.train, VecNormalize)
    assert envs.tags["env_levers"] == "obs=time+fleet act=fleet base=uncontrolled norm"
    assert envs.train.observation_space == envs.evaluate.observation_space
    assert envs.train.action_space.shape == (3,)
    assert envs.train.venv.steps[0].reward_baseline.any()
    assert not envs.evaluate.core.reward_baseline.any()


def test_levers_label() -> None:
    assert levers_label(ObservationConfig(), "per_socket", "none", False) == "default"
    assert levers_label(ALL_ON, "fleet", "none", False) == (
        "obs=time+tariff+peak+fleet+fc:noisy:1,3,6,12,24:0.2+-sockets act=fleet"
    )
    assert levers_label(ObservationConfig(), "fleet", "none", False, "mpc_residual", 0.25) == (
        "act=fleet bess=mpc_residual:0.25"
    )
    residual = (ObservationConfig(), "fleet", "none", False, "mpc_residual", 0.5, "mpc_residual")
    assert levers_label(*residual, "persistence") == (
        "act=fleet bess=mpc_residual:0.5 ev=mpc_residual arrivals=persistence"
    )
    assert levers_label(*residual, "persistence", 0.0) == (
        "act=fleet bess=mpc_residual:0.5 ev=mpc_residual:0 arrivals=persistence"
    )


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("env.action_mode=per_vehicle", "env.action_mode"),
        ("env.battery_action=soc_target", "env.battery_action"),
        ("env.residual_frac=0", "env.residual_frac"),
        ("env.residual_frac=2.5", "env.residual_frac"),
        ("env.ev_residual_frac=0", "env.ev_residual_frac"),  # needs ev_action=mpc_residual
        ("levers=mpc_residual_plan env.ev_residual_frac=1.5", "env.ev_residual_frac"),
        ("env.reward_baseline=median", "env.reward_baseline"),
        ("env.reward_baseline=mpc", "env.reward_baseline"),  # needs mpc_residual
        ("env.observations.forecast=psychic", "env.observations.forecast"),
        ("env.observations.forecast_leads_h=[0,3]", "env.observations.forecast_leads_h"),
    ],
)
def test_bad_lever_values_name_the_key(make_cfg, override: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        config.validate(make_cfg("site=tiny", *override.split()))


class _Constant:
    def __init__(self, action: np.ndarray) -> None:
        self.action = action

    def predict(self, observation, deterministic: bool = True):
        return self.action, None


def test_vec_normalize_statistics_come_back_on_resume(tiny_dataset, tiny_cfg, tmp_path) -> None:
    """The statistics a normalizing learner trained with are saved with its checkpoint and
    restored into the resumed run's env (not restarted from scratch)."""
    from stable_baselines3 import PPO

    from pvbess.experiment import checkpoints

    def envs():
        return build_envs(
            dataset=tiny_dataset,
            reward=_reward(),
            learns=True,
            seed=0,
            data_dir=tiny_cfg.paths.data_dir,
            n_envs=2,
            train_seeds=[1],
            normalize=True,
            learning_curve=False,
        ).train

    first = envs()
    model = PPO("MlpPolicy", first, n_steps=64, batch_size=64, n_epochs=1, seed=0)
    model.learn(256)
    model.save(tmp_path / "ppo_256_steps.zip")
    first.save(str(tmp_path / "ppo_vecnormalize_256_steps.pkl"))
    ckpt = checkpoints.Checkpoint(
        256, tmp_path / "ppo_256_steps.zip", None, tmp_path / "ppo_vecnormalize_256_steps.pkl"
    )
    second = envs()
    assert not np.array_equal(second.obs_rms.mean, first.obs_rms.mean)
    resumed = checkpoints.load("stable_baselines3.PPO", ckpt, second, "cpu")
    assert resumed.get_vec_normalize_env() is second
    np.testing.assert_array_equal(second.obs_rms.mean, first.obs_rms.mean)
    np.testing.assert_array_equal(second.ret_rms.var, first.ret_rms.var)
    # A checkpoint without them is refused: the statistics would restart from nothing.
    bare = checkpoints.Checkpoint(256, tmp_path / "ppo_256_steps.zip", None, None)
    with pytest.raises(checkpoints.CheckpointError, match="VecNormalize"):
        checkpoints.load("stable_baselines3.PPO", bare, envs(), "cpu")
    # Evaluation sees observations through the frozen statistics.
    policy = evaluation.policy(resumed)
    assert isinstance(policy, evaluation.Normalized)
    count = second.obs_rms.count
    policy.predict(np.zeros(second.observation_space.shape, dtype=np.float32))
    assert second.obs_rms.count == count


@pytest.mark.parametrize(
    ("action_mode", "ev_action", "arrivals", "ev_frac", "forecast"),
    [
        ("per_socket", "intensity", "none", 1.0, "persistence"),
        ("fleet", "intensity", "none", 1.0, "persistence"),
        ("per_socket", "mpc_residual", "none", 1.0, "persistence"),
        ("fleet", "mpc_residual", "none", 1.0, "persistence"),
        ("fleet", "mpc_residual", "persistence", 1.0, "persistence"),
        ("per_socket", "mpc_residual", "none", 0.0, "persistence"),  # the battery only
        ("fleet", "mpc_residual", "persistence", 0.0, "average"),  # mpc_residual_average
    ],
)
def test_a_residual_learner_is_served_as_evaluated(
    tiny_dataset, action_mode, ev_action, arrivals, ev_frac, forecast
) -> None:
    """The served model carries the planner under the learner: the states a residual PPO
    met over two days, asked of ``pvbess.deploy.answer``, get the battery and socket powers
    it took. Not bit for bit: the env's planner reads the grid import and the SOC it knows,
    the served one the request's net use and SOC (float32): the powers agree to 1e-6 kW
    (measured: 2.4e-8). With ``planner_arrivals=persistence`` the request carries the
    sessions it expects, and the larger LP turns the same input differences into up to
    1.3e-6 kW at a socket (measured, one step of 48): 1e-5 kW there. So with
    ``ev_residual_frac=0``, where the plan's socket actions reach the sockets as they are
    (not pushed to 0 or 1 by a correction): 6.0e-6 kW at one value of 240 measured in a
    full-suite run (below 1e-6 when run alone)."""
    from stable_baselines3 import PPO

    from pvbess import deploy
    from pvbess.control.residual import ResidualPolicy

    # levers=default's observations; per-socket ones differ by design (README: a just-plugged
    # vehicle's SOC), so they are off as there.
    observations = ObservationConfig(
        sockets=False, time=True, tariff=True, forecast=forecast, peak=True, fleet=True
    )
    levers = {"action_mode": action_mode, "battery_action": "mpc_residual", "ev_action": ev_action}
    levers |= {"planner_arrivals": arrivals, "ev_residual_frac": ev_frac}
    levers |= {"planner_forecast": forecast}
    env = SiteEnv(tiny_dataset, _reward(), backend="twin", observations=observations, **levers)
    model = PPO(ResidualPolicy, env, seed=0)
    with torch.no_grad():  # a policy that corrects: the untrained one answers the plan alone
        net = model.policy.action_net
        net.weight.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
        net.bias.zero_()
    obs, _ = env.reset(seed=tiny_dataset.site.seed)
    for _ in range(48):
        obs, *_ = env.step(model.predict(obs, deterministic=True)[0])
    spec = deploy.build_spec(model, env, "stable_baselines3.PPO", "ppo_residual")
    assert "pv_forecast_23h_kw" in spec.input_columns()  # the planner's leads, 1 .. 23 h
    assert "pv_forecast_24h_kw" in spec.input_columns()  # the learner's longest
    assert ("expected_sessions" in spec.input_columns()) == (arrivals != "none")
    spec = pickle.loads(pickle.dumps(spec))  # as the logged model carries it
    taken = env.core.state_frame()
    got = deploy.answer(spec, model, None, deploy.request_frame(taken.rename_axis("time"), spec))
    want = taken[deploy.output_columns(env.n_sockets)].reset_index(drop=True)
    atol_kw = 1e-6 if arrivals == "none" and ev_frac == 1.0 else 1e-5
    np.testing.assert_allclose(got.to_numpy(), want.to_numpy(), rtol=0, atol=atol_kw)
    # The learner's corrections count: the plan alone answers otherwise.
    assert not np.allclose(want["battery_kw"], _plan_alone(env, taken, spec), atol=1.0)
    if arrivals != "none":
        # The expected sessions count: without them the served answers differ.
        frame = deploy.request_frame(taken.rename_axis("time"), spec)
        frame["expected_sessions"] = "[]"
        blind = deploy.answer(spec, model, None, frame)
        assert not np.allclose(blind.to_numpy(), want.to_numpy(), atol=1e-3)


def _plan_alone(env: SiteEnv, taken, spec) -> np.ndarray:
    """What the planner alone would tell the battery in the same states [kW]."""
    from pvbess import deploy

    frame = deploy.request_frame(taken.rename_axis("time"), spec)
    times = deploy.validate(frame, spec)
    out = []
    for k in range(len(frame)):
        s = deploy.step_state(frame.iloc[k], times[k], spec)
        scaled, _ = deploy.observation(s, spec)
        out.append(deploy.planned(spec, s, deploy.measured(s, scaled, spec))[0])
    return np.asarray(out) * env.site.bess.power_kw


@pytest.mark.parametrize(
    ("observed", "planned"), [("perfect", "persistence"), ("persistence", "average")]
)
def test_a_residual_learner_on_other_forecasts_is_not_served(
    tiny_dataset, observed, planned
) -> None:
    """Its request would need two forecasts at one lead (the learner's, the planner's):
    refused by name, where the run would log ``controller=not deployable``."""
    from pvbess import deploy

    env = SiteEnv(
        tiny_dataset,
        _reward(),
        backend="twin",
        observations=ObservationConfig(forecast=observed),
        battery_action="mpc_residual",
        planner_forecast=planned,
    )
    with pytest.raises(
        deploy.NotDeployable,
        match=f"observes {observed} forecasts while its planner is given {planned}",
    ):
        deploy.build_spec(object(), env, "stable_baselines3.PPO", "ppo_residual")


@pytest.mark.parametrize(
    ("ev_action", "neutral"), [("intensity", [0.0, 1.0, 1.0]), ("mpc_residual", [0.0, 0.0, 0.0])]
)
def test_an_untrained_residual_policy_is_the_neutral_action(
    tiny_dataset, ev_action, neutral
) -> None:
    """``agent=ppo_residual``'s policy starts exactly where ``reward_baseline=mpc`` is zero
    in every state (the MPC's battery with full charging, or with the MPC's charging
    plan), and learns away from it."""
    from stable_baselines3 import PPO

    from pvbess.control.residual import ResidualPolicy

    levers = {"action_mode": "fleet", "battery_action": "mpc_residual", "ev_action": ev_action}
    env = SiteEnv(tiny_dataset, _reward(), backend="twin", **levers)
    env.core.set_reward_baseline(uncontrolled_rewards(tiny_dataset, _reward(), **levers))
    model = PPO(ResidualPolicy, env, n_steps=32, batch_size=32, n_epochs=2, seed=0)
    obs, _ = env.reset(seed=tiny_dataset.site.seed)
    rewards, done = [], False
    while not done:
        action, _ = model.predict(obs, deterministic=True)
        assert action.tolist() == neutral
        obs, r, done, _, _ = env.step(action)
        rewards.append(r)
    assert np.abs(rewards).max() == 0.0
    model.learn(64)
    means = [model.predict(o, deterministic=True)[0][0] for o in np.random.rand(20, obs.size)]
    assert np.ptp(means) > 0.0  # the last layer left zero: the battery's mean now varies


def test_the_served_mpc_on_expected_sessions_is_the_evaluated_mpc_persistence(
    tiny_dataset,
) -> None:
    """``agent=mpc_persistence`` (replanned every step) served: given the forecasts and the
    sessions it expected at each state (``expected_sessions``), the answers are the
    run's actions to 1e-5 kW; without the sessions ("[]") they differ."""
    from pvbess import deploy
    from pvbess.control.mpc import Mpc, sessions_json

    env = SiteEnv(tiny_dataset, _reward(), backend="twin")
    mpc = Mpc(env, forecast="persistence", full_period_bound=False)
    obs, _ = env.reset(seed=0)
    expected = []
    for _ in range(48):
        t = env._t
        f = mpc.sessions.persistence(t, mpc.horizon, mpc.problem.n_steps)
        f.arrival, f.departure = f.arrival - t, f.departure - t
        expected.append(sessions_json(f))
        obs, *_ = env.step(mpc.predict(obs)[0])
    spec = pickle.loads(pickle.dumps(deploy.build_spec(mpc, env, "", "mpc_persistence")))
    assert spec.expects_arrivals
    taken = env.core.state_frame()
    src = forecast.persistence_source(np.arange(48), np.arange(1, mpc.horizon), env.n_steps)
    for name in ("pv_kwh", "load_kwh"):
        for j, h in enumerate(spec.planner_leads_h):
            taken[forecast_column(name, h)] = tiny_dataset.series[name].to_numpy()[src[:, j]]
    taken["expected_sessions"] = expected
    frame = deploy.request_frame(taken.rename_axis("time"), spec)
    want = taken[deploy.output_columns(env.n_sockets)].reset_index(drop=True).to_numpy()
    got = deploy.answer(spec, None, None, frame).to_numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    frame["expected_sessions"] = "[]"
    assert not np.allclose(deploy.answer(spec, None, None, frame).to_numpy(), want, atol=1e-3)


@pytest.mark.parametrize(
    ("sessions", "message"),
    [
        ("[[1, 2, 3.0", "not JSON"),
        ('{"a": 1}', "must be a JSON array"),
        ("[[1, 2, 3.0]]", "must be a JSON array"),
        ("[[0, 2, 3.0, 1]]", "hours_to_arrival must be >= 1"),
        ("[[2, 2, 3.0, 1]]", "hours_to_departure must exceed"),
        ("[[1.5, 3, 3.0, 1]]", "whole 1 h steps"),
        ("[[1, 2, -3.0, 1]]", "energy_kwh is negative"),
        ("[[1, 2, 3.0, 1], [1, 2, 3.0, 99]]", "session 1: socket is not 1..n"),
    ],
)
def test_bad_expected_sessions_are_refused_by_name(tiny_dataset, sessions, message) -> None:
    from mlflow.exceptions import MlflowException

    from pvbess import deploy
    from pvbess.control.mpc import Mpc

    env = SiteEnv(tiny_dataset, _reward(), backend="twin")
    mpc = Mpc(env, forecast="persistence", full_period_bound=False)
    obs, _ = env.reset(seed=0)
    for _ in range(2):
        obs, *_ = env.step(mpc.predict(obs)[0])
    spec = deploy.build_spec(mpc, env, "", "mpc_persistence")
    taken = env.core.state_frame()
    for col in spec.input_columns():
        if "forecast" in col:
            taken[col] = 1.0
    taken["expected_sessions"] = ["[]", sessions]
    frame = deploy.request_frame(taken.rename_axis("time"), spec)
    with pytest.raises(MlflowException, match=rf"expected_sessions: .*{message}.*\(row 1\)"):
        deploy.answer(spec, None, None, frame)
