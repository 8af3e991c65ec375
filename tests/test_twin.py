"""The numpy twin against CityLearn: same observations, rewards, SOCs, flows and KPIs.

Tolerances. CityLearn stores SOCs, battery and charger energies and the net
consumption in float32 (about 7 significant digits) and computes in float64
between stores. The twin rounds at the same places, and today its numbers are
CityLearn's bit for bit (max error 0). The contract the tests hold it to is
looser, so that an equivalent float64 implementation would pass: every quantity
within 1e-5 of its own magnitude over the episode (the largest |value| of that
column), i.e. about 100 float32 steps of the largest value, which is far below
anything physical (1e-5 x 1,700 kWh = 0.017 kWh for the Iquitos battery);
elementwise relative errors would be meaningless where a flow crosses zero.
KPIs (sums over the episode) within 1e-6 relative.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from stable_baselines3 import PPO

from pvbess import config, dataset, evaluation, kpis
from pvbess.config import ConfigError, RewardConfig, RewardWeights
from pvbess.controllers import Optimal, RuleBased, Uncontrolled
from pvbess.env import SiteEnv
from pvbess.twin import TwinData, TwinVecEnv

from .conftest import compose_cfg

REL_TOL = 1e-5  # of a quantity's magnitude over the episode (see the module docstring)
KPI_REL_TOL = 1e-6


def _reward() -> RewardConfig:
    return RewardConfig(name="balanced", weights=RewardWeights())


def _actions(kind: str, env: SiteEnv, n_steps: int, seed: int = 0) -> np.ndarray:
    """One action sequence for the whole episode: random, all zeros or all ones."""
    n = env.action_space.shape[0]
    if kind == "random":
        rng = np.random.default_rng(seed)
        bess = rng.uniform(-1.0, 1.0, (n_steps, 1))
        return np.concatenate([bess, rng.uniform(0.0, 1.0, (n_steps, n - 1))], axis=1)
    return np.full((n_steps, n), 0.0 if kind == "zeros" else 1.0)


def _run(env: SiteEnv, actions: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """Step a whole episode; per step: observation, reward, and the plugged EVs' SOC."""
    obs, _ = env.reset(seed=seed)
    b = env.backend
    observations, rewards, ev_soc = [obs], [], []
    done = False
    for t, a in enumerate(actions):
        plugged = np.flatnonzero(b.state[:, t] == 1)
        soc = np.full(env.n_sockets, np.nan)
        soc[plugged] = b.ev_soc_and_capacity(plugged)[0]
        ev_soc.append(soc)
        obs, reward, done, _, _ = env.step(a)
        observations.append(obs)
        rewards.append(reward)
        if done:
            break
    assert done and t == env.n_steps - 1
    return {
        "observation": np.array(observations, dtype=np.float64),
        "reward": np.array(rewards),
        "ev_soc": np.array(ev_soc),
    }


def _errors(reference: np.ndarray, twin: np.ndarray) -> tuple[float, float]:
    """Max abs error and that error relative to the reference's magnitude (NaN = NaN)."""
    ref, tw = np.asarray(reference, dtype=np.float64), np.asarray(twin, dtype=np.float64)
    assert ref.shape == tw.shape
    assert np.array_equal(np.isnan(ref), np.isnan(tw))
    diff = np.abs(np.nan_to_num(ref) - np.nan_to_num(tw))
    abs_err = float(diff.max()) if diff.size else 0.0
    scale = float(np.abs(np.nan_to_num(ref)).max()) if ref.size else 0.0
    return abs_err, abs_err / scale if scale > 0 else abs_err


def assert_parity(reference: dict[str, np.ndarray], twin: dict[str, np.ndarray]) -> None:
    for name, ref in reference.items():
        abs_err, rel_err = _errors(ref, twin[name])
        assert rel_err <= REL_TOL, f"{name}: max abs error {abs_err:.3g} ({rel_err:.3g} of scale)"


def assert_kpi_parity(reference: dict[str, float], twin: dict[str, float]) -> None:
    assert reference.keys() == twin.keys()
    for name, ref in reference.items():
        if np.isnan(ref):
            assert np.isnan(twin[name]), name
        else:
            assert twin[name] == pytest.approx(ref, rel=KPI_REL_TOL, abs=1e-9), name


def _compare(reference: SiteEnv, twin: SiteEnv, actions: np.ndarray) -> None:
    """Both backends through one action sequence: every step, every recorded column, KPIs."""
    ref_steps, twin_steps = _run(reference, actions), _run(twin, actions)
    assert_parity(ref_steps, twin_steps)
    ref_ts, twin_ts = reference.history(), twin.history()
    assert list(ref_ts.columns) == list(twin_ts.columns)
    assert_parity(
        {c: ref_ts[c].to_numpy() for c in ref_ts}, {c: twin_ts[c].to_numpy() for c in twin_ts}
    )
    ref_chargers = np.array([c.electricity_consumption for c in reference.backend.chargers])
    twin_chargers = np.array([c.electricity_consumption for c in twin.backend.chargers])
    n = reference.n_steps
    assert_parity({"charger_kwh": ref_chargers[:, :n]}, {"charger_kwh": twin_chargers[:, :n]})
    usable_kwh = reference.site.bess.capacity_kwh * (
        reference.site.bess.soc_max_frac - reference.site.bess.soc_min_frac
    )
    kpis.check_energy_balance(twin_ts)
    assert_kpi_parity(kpis.compute(ref_ts, usable_kwh), kpis.compute(twin_ts, usable_kwh))


@pytest.fixture(scope="module")
def envs(tiny_dataset) -> tuple[SiteEnv, SiteEnv]:
    return SiteEnv(tiny_dataset, _reward()), SiteEnv(tiny_dataset, _reward(), backend="twin")


def test_same_observation_space_as_citylearn(envs) -> None:
    reference, twin = envs
    assert twin.backend.observation_names == reference.backend.observation_names
    # Bounds computed as CityLearn computes them: the same float32 values exactly.
    np.testing.assert_array_equal(twin.backend.obs_low, reference.backend.obs_low)
    np.testing.assert_array_equal(twin.backend.obs_span, reference.backend.obs_span)
    assert twin.observation_space == reference.observation_space
    assert twin.action_space == reference.action_space
    for name in ("state", "departure_steps", "required_soc"):
        ref, tw = getattr(reference.backend, name), getattr(twin.backend, name)
        assert ref.dtype == tw.dtype
        np.testing.assert_array_equal(tw, ref, err_msg=name)
    assert len(twin.backend.chargers) == len(reference.backend.chargers) == 4


@pytest.mark.parametrize("kind", ["random", "zeros", "ones"])
def test_parity_with_citylearn_whole_episode(envs, kind: str) -> None:
    reference, twin = envs
    _compare(reference, twin, _actions(kind, reference, reference.n_steps))


def test_parity_exercises_the_physics(envs) -> None:
    """The sequences above reach every limit the twin reimplements, so parity means something."""
    _, twin = envs
    bess, ev = twin.site.bess, twin.site.ev
    random_ts, _ = _history(twin, _actions("random", twin, twin.n_steps))
    # Battery, random actions: both directions, down to the DoD floor (SOC relative to the
    # ceiling), never above the power rating.
    assert random_ts["bess_discharge_kwh"].max() > 0
    assert random_ts["bess_discharge_kwh"].max() <= bess.power_kw * (1 + 1e-9)
    floor = bess.soc_min_frac / bess.soc_max_frac
    assert random_ts["bess_soc_frac"].min() == pytest.approx(floor, abs=1e-6)
    ones_ts, ones_chargers = _history(twin, _actions("ones", twin, twin.n_steps))
    # Full power: the power limit binds, then the capacity ceiling (a last partial step);
    # EVs reach their full battery, so a socket asked for full power draws less.
    charged = ones_ts["bess_charge_kwh"].to_numpy()
    assert charged.max() == pytest.approx(bess.power_kw, rel=1e-6)
    assert ((charged > 0) & (charged < bess.power_kw * (1 - 1e-3))).any()
    assert ones_ts["bess_soc_frac"].max() == pytest.approx(1.0, abs=1e-6)
    partial = (ones_chargers > 0) & (ones_chargers < ev.socket_power_kw * (1 - 1e-3))
    assert partial.any()
    assert ones_ts["ev_departures_met"].sum() == ones_ts["ev_departures"].sum() > 0
    # Nothing asked: the safety layer forces exactly what the EVs need.
    zeros_ts, _ = _history(twin, _actions("zeros", twin, twin.n_steps))
    assert zeros_ts["ev_forced_kwh"].sum() > 0 and zeros_ts["ev_unmet_kwh"].sum() == 0


def _history(env: SiteEnv, actions: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
    """The episode's timeseries and the chargers' electricity use [socket, step] in kWh."""
    _run(env, actions)
    chargers = np.array([c.electricity_consumption[: env.n_steps] for c in env.backend.chargers])
    return env.history(), chargers


@pytest.mark.parametrize("controller", [Uncontrolled, RuleBased])
def test_parity_closed_loop_with_controllers(envs, controller) -> None:
    """A controller reads observations and EV SOCs to act: the loop closes on each backend,
    and the two episodes still agree step for step."""
    reference, twin = envs
    ref_ts = evaluation.rollout(reference, controller(reference), seed=0, progress=False)
    twin_ts = evaluation.rollout(twin, controller(twin), seed=0, progress=False)
    assert_parity(
        {c: ref_ts[c].to_numpy() for c in ref_ts}, {c: twin_ts[c].to_numpy() for c in twin_ts}
    )
    assert ref_ts["bess_charge_kwh"].sum() > 0 or controller is Uncontrolled


def test_drifting_soc_of_unplugged_evs_is_observed(tiny_dataset) -> None:
    """CityLearn shows a just-plugged EV's previous-step SOC, which for a vehicle that
    follows another at its socket is its random drift: the twin draws the same stream."""
    env = SiteEnv(tiny_dataset, _reward(), backend="twin")
    actions = _actions("zeros", env, env.n_steps)
    first = _run(env, actions, seed=0)  # stream seeded 0 + episode 0
    second = _run(env, actions, seed=0)  # 0 + episode 1
    assert not np.array_equal(first["observation"], second["observation"])  # it matters ...
    np.testing.assert_array_equal(first["reward"], second["reward"])  # ... only there
    other = SiteEnv(tiny_dataset, _reward(), backend="twin")
    np.testing.assert_array_equal(
        _run(other, actions, seed=1)["observation"], second["observation"]
    )


def test_kpis_of_twin_episode(envs) -> None:
    """The twin's episode passes the evaluation's own checks (balance) and has KPIs."""
    _, twin = envs
    ts, _ = _history(twin, _actions("random", twin, twin.n_steps, seed=3))
    assert kpis.check_energy_balance(ts) <= 1e-6 * ts["load_kwh"].max()
    with pytest.raises(AttributeError, match="citylearn"):
        _ = twin.citylearn


# -- the VecEnv -------------------------------------------------------------------------------


def test_vec_env_copy_matches_site_env(tiny_dataset) -> None:
    """Copy 0 of the VecEnv is SiteEnv on the twin (same safety layer and reward code);
    copies given the same actions differ only in their unplugged EVs' drift."""
    n_envs = 3
    single = SiteEnv(tiny_dataset, _reward(), backend="twin", seed=0)
    vec = TwinVecEnv(tiny_dataset, _reward(), n_envs=n_envs, seed=0)
    assert vec.observation_space == single.observation_space
    assert vec.action_space == single.action_space
    actions = _actions("random", single, single.n_steps, seed=5)
    obs_single, _ = single.reset(seed=0)
    obs_vec = vec.reset()
    np.testing.assert_array_equal(obs_vec[0], obs_single)
    total = 0.0
    for t, a in enumerate(actions):
        obs_single, reward, done, _, info = single.step(a)
        obs_vec, rewards, dones, infos = vec.step(np.repeat(a[None, :], n_envs, axis=0))
        total += reward
        assert np.all(dones == done)
        np.testing.assert_array_equal(rewards, np.float32(reward), err_msg=f"step {t}")
        if done:
            np.testing.assert_array_equal(infos[0]["terminal_observation"], obs_single)
            assert infos[0]["episode"]["l"] == single.n_steps
            assert infos[0]["episode"]["r"] == pytest.approx(total, rel=1e-12)
            for k, v in info["episode_components"].items():
                assert infos[0]["episode_components"][k] == pytest.approx(v, rel=1e-9)
            # Auto-reset: the next episode's first observation.
            assert vec.core.t == 0
            np.testing.assert_array_equal(obs_vec[0], single.reset(seed=0)[0])
        else:
            np.testing.assert_array_equal(obs_vec[0], obs_single, err_msg=f"step {t}")


def test_vec_env_trains_ppo(tiny_dataset) -> None:
    vec = TwinVecEnv(tiny_dataset, _reward(), n_envs=4, seed=0)
    model = PPO("MlpPolicy", vec, n_steps=64, batch_size=64, n_epochs=1, seed=0, device="cpu")
    # Three rollouts of 64 steps per copy: each copy finishes its 168-step episode once.
    model.learn(total_timesteps=3 * 64 * 4)
    assert model.num_timesteps == 768
    assert len(model.ep_info_buffer) == 4
    assert all(np.isfinite(e["r"]) and e["l"] == 168 for e in model.ep_info_buffer)
    obs = vec.reset()
    action, _ = model.predict(obs, deterministic=True)
    assert action.shape == (4, tiny_dataset.n_sockets + 1)


# -- configuration and refusal ----------------------------------------------------------------


def test_config_accepts_twin_and_copies_only_on_twin(make_cfg, tiny_dataset) -> None:
    typed = config.validate(make_cfg("site=tiny", "env.backend=twin", "env.n_envs=16"))
    assert typed.env.backend == "twin" and typed.env.n_envs == 16
    with pytest.raises(ConfigError, match=r"env\.n_envs"):
        config.validate(make_cfg("site=tiny", "env.backend=citylearn", "env.n_envs=4"))
    with pytest.raises(ConfigError, match=r"env\.backend"):
        config.validate(make_cfg("site=tiny", "env.backend=gym"))
    with pytest.raises(ValueError, match="n_envs"):
        SiteEnv(tiny_dataset, _reward(), backend="citylearn", n_envs=2)


@pytest.fixture()
def schema_copy(tiny_dataset, tmp_path: Path) -> Iterator[tuple[dataset.SiteDataset, dict]]:
    """A copy of the tiny dataset whose schema a test may edit."""
    root = tmp_path / "site"
    shutil.copytree(tiny_dataset.root, root)
    schema = json.loads((root / "schema.json").read_text())
    copy = dataset.SiteDataset(**{**tiny_dataset.__dict__, "root": root})
    yield copy, schema


@pytest.mark.parametrize(
    ("edit", "what"),
    [
        (
            lambda s: s["buildings"]["mall"]["electrical_storage"]["attributes"].update(
                loss_coefficient=0.01
            ),
            "standby loss",
        ),
        (
            lambda s: s["buildings"]["mall"]["electrical_storage"]["attributes"].update(
                power_efficiency_curve=[[0, 0.9], [0.5, 0.95], [1, 0.9]]
            ),
            "non-flat",
        ),
        (
            lambda s: s["observations"].update(outdoor_dry_bulb_temperature={"active": True}),
            "observations",
        ),
        (
            lambda s: s["buildings"]["mall"]["chargers"]["moto_000"]["attributes"].update(
                max_discharging_power=7.4
            ),
            "vehicle-to-grid",
        ),
        (lambda s: s.update(seconds_per_time_step=900), "one hour"),
    ],
)
def test_twin_refuses_physics_it_does_not_simulate(schema_copy, edit, what: str) -> None:
    copy, schema = schema_copy
    edit(schema)
    copy.schema_path.write_text(json.dumps(schema))
    with pytest.raises(NotImplementedError, match=what):
        TwinData.load(copy)


# -- the whole year -----------------------------------------------------------------------------


def _full_year_envs(session_tmp: Path, site: str) -> tuple[SiteEnv, SiteEnv]:
    """(CityLearn, twin) envs of one site preset's whole year."""
    cfg = compose_cfg([f"site={site}"], session_tmp)
    ds = dataset.build(config.validate_site(cfg.site), cfg.paths.data_dir)
    return SiteEnv(ds, _reward()), SiteEnv(ds, _reward(), backend="twin")


@pytest.mark.slow
@pytest.mark.parametrize(("site", "seed"), [("iquitos_mall", 1), ("iquitos_mall_128", 2)])
def test_parity_with_citylearn_full_year(session_tmp: Path, site: str, seed: int) -> None:
    reference, twin = _full_year_envs(session_tmp, site)
    _compare(reference, twin, _actions("random", reference, reference.n_steps, seed=seed))


@pytest.mark.slow
@pytest.mark.parametrize("controller", [Uncontrolled, RuleBased, Optimal])
def test_parity_full_year_iquitos_baselines(session_tmp: Path, controller) -> None:
    """Each baseline's own actions over the whole Iquitos year, on both backends."""
    reference, twin = _full_year_envs(session_tmp, "iquitos_mall")
    ref_ts = evaluation.rollout(reference, controller(reference), seed=0, progress=False)
    twin_ts = evaluation.rollout(twin, controller(twin), seed=0, progress=False)
    assert_parity(
        {c: ref_ts[c].to_numpy() for c in ref_ts}, {c: twin_ts[c].to_numpy() for c in twin_ts}
    )
