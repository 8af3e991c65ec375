"""The numpy twin against CityLearn: the same observations, rewards, SOCs, flows and KPIs.

Exactness. CityLearn stores SOCs, battery and charger energies and the net
consumption in float32 and computes in float64 between stores; the twin rounds
at the same places, in the same order, so its numbers are CityLearn's bit for
bit. The tests hold it to exactly that, with no tolerance: on the same actions
(and in closed loop, on each backend's own controller's actions) every step's
raw and scaled observation, the action the backend receives after the safety
layer, the reward, the plugged-in EVs' SOCs, the chargers' energy, every
history column and every KPI equal CityLearn's, with the same dtypes, NaN where
CityLearn has NaN (``assert_identical``). A twin that rounds anywhere else (a
missing float32 cast, a float64 sum in another order) fails them.

Independence. CityLearn counts its resets and seeds the unplugged EVs' random
SOC drift with ``random seed + episode index``, which shows in the observations.
An env shared between tests would make a test's outcome depend on which tests
ran before it, so every test builds its own envs, and both backends of a
comparison are new and reset the same way (``reset(seed=SEED)``: episode 0 of
both, same stream).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from stable_baselines3 import PPO

from pvbess import config
from pvbess.config import ConfigError, RewardConfig, RewardWeights
from pvbess.control.controllers import Optimal, RuleBased, Uncontrolled
from pvbess.sim import kpis
from pvbess.sim import reward as rw
from pvbess.sim.env import CityLearnBackend, SiteEnv
from pvbess.sim.twin import TwinData, TwinVecEnv
from pvbess.site import dataset

from .conftest import compose_cfg

SEED = 0  # the seed both backends of a comparison are reset with

# A policy maps the env's (scaled) observation to an action; a policy maker builds one for an
# env (a controller reads the env it drives).
Policy = Callable[[np.ndarray], np.ndarray]
PolicyMaker = Callable[[SiteEnv], Policy]


def _reward() -> RewardConfig:
    return RewardConfig(name="balanced", weights=RewardWeights())


def _site_envs(ds: dataset.SiteDataset) -> tuple[SiteEnv, SiteEnv]:
    """New (CityLearn, twin) envs of a dataset: nothing carried over from another test."""
    return SiteEnv(ds, _reward()), SiteEnv(ds, _reward(), backend="twin")


@pytest.fixture()
def envs(tiny_dataset) -> tuple[SiteEnv, SiteEnv]:
    """Function scope on purpose: a test's resets must not shift another test's episodes."""
    return _site_envs(tiny_dataset)


def _actions(kind: str, env: SiteEnv, n_steps: int, seed: int = 0) -> np.ndarray:
    """One action sequence for the whole episode: random, all zeros or all ones."""
    n = env.action_space.shape[0]
    if kind == "random":
        rng = np.random.default_rng(seed)
        bess = rng.uniform(-1.0, 1.0, (n_steps, 1))
        return np.concatenate([bess, rng.uniform(0.0, 1.0, (n_steps, n - 1))], axis=1)
    return np.full((n_steps, n), 0.0 if kind == "zeros" else 1.0)


def _replay(actions: np.ndarray) -> PolicyMaker:
    """The given actions, one per step, whatever the observation."""

    def make(env: SiteEnv) -> Policy:
        steps = iter(actions)
        return lambda obs: next(steps)

    return make


def _controller(cls: type) -> PolicyMaker:
    """A controller built on the env it drives, acting as ``evaluation.rollout`` has it act."""

    def make(env: SiteEnv) -> Policy:
        controller = cls(env)
        return lambda obs: controller.predict(obs, deterministic=True)[0]

    return make


@dataclass
class Episode:
    """What ``_episode`` records of one env's episode."""

    # Per step; observation row t is what the policy reads at step t (one more row: the last
    # observation, after the final step).
    steps: dict[str, np.ndarray]
    history: pd.DataFrame  # env.history()
    chargers_kwh: np.ndarray  # [socket, step] each charger's electricity use


def _episode(env: SiteEnv, make_policy: PolicyMaker, seed: int | None = SEED) -> Episode:
    """``env.reset(seed=seed)``, then the policy to the episode's end, recording every step.

    Per step: the scaled observation the policy reads, the backend's raw observation, the
    action the backend receives (after the safety layer), the reward, and for each plugged-in
    socket its EV's SOC and capacity before the step and its SOC after (NaN elsewhere).
    """
    b = env.backend
    raw: list[np.ndarray] = []
    sent: list[np.ndarray] = []
    reset, step = b.reset, b.step

    def recording_reset(seeds=None) -> np.ndarray:
        obs = reset(seeds)
        raw.append(np.array(obs[0]))
        return obs

    def recording_step(actions: np.ndarray):
        sent.append(np.array(actions[0]))
        obs, quantities, done = step(actions)
        raw.append(np.array(obs[0]))
        return obs, quantities, done

    b.reset, b.step = recording_reset, recording_step
    try:
        policy = make_policy(env)  # built before the reset, as pvbess.train builds its agent
        obs, _ = env.reset(seed=seed)
        observations, rewards = [obs], []
        soc, cap, soc_after = (np.full((env.n_steps, env.n_sockets), np.nan) for _ in range(3))
        done, t = False, 0
        while not done:
            assert t < env.n_steps, "the episode does not end"
            plugged = np.flatnonzero(b.state[:, t] == 1)
            soc[t, plugged], cap[t, plugged] = env.ev_soc_and_capacity(plugged)
            obs, reward, done, _, _ = env.step(policy(obs))
            soc_after[t, plugged] = b.ev_soc_after_step(t, plugged)[0][0]
            observations.append(obs)
            rewards.append(reward)
            t += 1
    finally:
        del b.reset, b.step  # the backend's own methods again
    assert t == env.n_steps
    chargers = np.array([c.electricity_consumption[:t] for c in b.chargers])
    steps = {
        "observation": np.array(observations),
        "raw_observation": np.array(raw),
        "backend_action": np.array(sent),
        "reward": np.array(rewards),
        "ev_soc": soc,
        "ev_capacity_kwh": cap,
        "ev_soc_after": soc_after,
    }
    return Episode(steps=steps, history=env.history(), chargers_kwh=chargers)


def assert_identical(
    what: str, reference: object, twin: object, columns: Sequence[str] | None = None
) -> None:
    """The twin's values are the reference's exactly: same shape, dtype and values, NaN where
    the reference has NaN. Rows are steps: the message names the first step that differs."""
    ref, tw = np.asarray(reference), np.asarray(twin)
    where = ""
    if ref.shape == tw.shape and ref.dtype == tw.dtype:
        same = (ref == tw) | ((ref != ref) & (tw != tw))  # x != x: NaN
        if not same.all():
            first = [int(i) for i in np.argwhere(~same)[0]]
            where = f"first difference at step {first[0]}" if first else "differs"
            if columns is not None and len(first) > 1:
                where += f", {columns[first[1]]}"
    np.testing.assert_array_equal(tw, ref, err_msg=f"{what}: {where}", strict=True)


def assert_episodes_identical(reference: SiteEnv, twin: SiteEnv, ref: Episode, tw: Episode) -> None:
    """Every recorded quantity of the two episodes, and the KPIs, exactly equal."""
    names = reference.backend.observation_names
    sockets = [sid for sid, _ in reference.dataset.sockets]
    actions = ["bess", *sockets]
    columns = {"observation": names, "raw_observation": names, "backend_action": actions}
    assert ref.steps.keys() == tw.steps.keys()
    for name, values in ref.steps.items():
        assert_identical(name, values, tw.steps[name], columns.get(name, sockets))
    assert list(tw.history.columns) == list(ref.history.columns)
    pd.testing.assert_index_equal(tw.history.index, ref.history.index, exact=True)
    for column in ref.history:
        assert_identical(f"history {column}", ref.history[column], tw.history[column])
    # Each charger's use [socket, step]: transposed so that rows are steps.
    assert_identical("charger kWh", ref.chargers_kwh.T, tw.chargers_kwh.T, sockets)
    bess = reference.site.bess
    usable_kwh = bess.capacity_kwh * (bess.soc_max_frac - bess.soc_min_frac)
    ref_kpis, tw_kpis = kpis.compute(ref.history, usable_kwh), kpis.compute(tw.history, usable_kwh)
    assert list(tw_kpis) == list(ref_kpis)
    for name, value in ref_kpis.items():
        assert_identical(f"KPI {name}", value, tw_kpis[name])
    kpis.check_energy_balance(tw.history)


def _drift_stream(env: SiteEnv) -> tuple[int, int]:
    """(episode index, random seed) of a backend, which seed its unplugged EVs' drift."""
    b = env.backend
    if isinstance(b, CityLearnBackend):
        return b.env.episode_tracker.episode, b.env.random_seed
    return b.core.episode, b.random_seed


def _compare(
    reference: SiteEnv, twin: SiteEnv, make_policy: PolicyMaker, seed: int | None = SEED
) -> tuple[Episode, Episode]:
    """One episode on each backend, reset the same way, each driven by its own copy of the
    policy (closed loop for a controller); every recorded quantity must be identical."""
    # Same episode index and seed, so the same drift stream after the reset.
    assert _drift_stream(reference) == _drift_stream(twin), "backends not reset alike"
    ref, tw = _episode(reference, make_policy, seed), _episode(twin, make_policy, seed)
    assert_episodes_identical(reference, twin, ref, tw)
    return ref, tw


def test_same_observation_space_as_citylearn(envs) -> None:
    reference, twin = envs
    assert twin.backend.observation_names == reference.backend.observation_names
    # Bounds computed as CityLearn computes them: the same float32 values exactly.
    assert_identical("obs_low", reference.backend.obs_low, twin.backend.obs_low)
    assert_identical("obs_span", reference.backend.obs_span, twin.backend.obs_span)
    assert twin.observation_space == reference.observation_space
    assert twin.action_space == reference.action_space
    for name in ("state", "departure_steps", "required_soc"):
        assert_identical(name, getattr(reference.backend, name), getattr(twin.backend, name))
    assert len(twin.backend.chargers) == len(reference.backend.chargers) == 4


@pytest.mark.parametrize("kind", ["random", "zeros", "ones"])
def test_parity_with_citylearn_whole_episode(envs, kind: str) -> None:
    reference, twin = envs
    _compare(reference, twin, _replay(_actions(kind, reference, reference.n_steps)))


def test_parity_over_successive_episodes_and_seeds(envs) -> None:
    """Resets as CityLearn counts them: the unplugged EVs' drift stream is seeded with the
    random seed + the episode index, and reset(seed=None) keeps the last seed."""
    reference, twin = envs
    zeros = _replay(_actions("zeros", reference, reference.n_steps))
    first, _ = _compare(reference, twin, zeros, seed=SEED)
    again, _ = _compare(reference, twin, zeros, seed=SEED)  # episode 1: another stream ...
    assert not np.array_equal(first.steps["observation"], again.steps["observation"])
    pd.testing.assert_frame_equal(first.history, again.history)  # ... seen only in observations
    _compare(reference, twin, zeros, seed=SEED + 7)
    _compare(reference, twin, zeros, seed=None)


def test_parity_exercises_the_physics(tiny_dataset) -> None:
    """The sequences above reach every limit the twin reimplements, so parity means something."""
    twin = SiteEnv(tiny_dataset, _reward(), backend="twin")
    bess, ev = twin.site.bess, twin.site.ev
    random_ts = _episode(twin, _replay(_actions("random", twin, twin.n_steps))).history
    # Battery, random actions: both directions, down to the DoD floor (SOC relative to the
    # ceiling), never above the power rating.
    assert random_ts["bess_discharge_kwh"].max() > 0
    assert random_ts["bess_discharge_kwh"].max() <= bess.power_kw * (1 + 1e-9)
    floor = bess.soc_min_frac / bess.soc_max_frac
    assert random_ts["bess_soc_frac"].min() == pytest.approx(floor, abs=1e-6)
    ones = _episode(twin, _replay(_actions("ones", twin, twin.n_steps)))
    ones_ts = ones.history
    # Full power: the power limit binds, then the capacity ceiling (a last partial step);
    # EVs reach their full battery, so a socket asked for full power draws less.
    charged = ones_ts["bess_charge_kwh"].to_numpy()
    assert charged.max() == pytest.approx(bess.power_kw, rel=1e-6)
    assert ((charged > 0) & (charged < bess.power_kw * (1 - 1e-3))).any()
    assert ones_ts["bess_soc_frac"].max() == pytest.approx(1.0, abs=1e-6)
    partial = (ones.chargers_kwh > 0) & (ones.chargers_kwh < ev.socket_power_kw * (1 - 1e-3))
    assert partial.any()
    assert ones_ts["ev_departures_met"].sum() == ones_ts["ev_departures"].sum() > 0
    # Nothing asked: the safety layer forces exactly what the EVs need.
    zeros_ts = _episode(twin, _replay(_actions("zeros", twin, twin.n_steps))).history
    assert zeros_ts["ev_forced_kwh"].sum() > 0 and zeros_ts["ev_unmet_kwh"].sum() == 0


@pytest.mark.parametrize("controller", [Uncontrolled, RuleBased])
def test_parity_closed_loop_with_controllers(envs, controller) -> None:
    """A controller reads observations and EV SOCs to act: the loop closes on each backend,
    and the two episodes still agree step for step, observations included."""
    reference, twin = envs
    ref, _ = _compare(reference, twin, _controller(controller))
    assert ref.history["bess_charge_kwh"].sum() > 0 or controller is Uncontrolled
    assert ref.history["ev_charging_kwh"].sum() > 0


def test_drifting_soc_of_unplugged_evs_is_observed(tiny_dataset) -> None:
    """CityLearn shows a just-plugged EV's previous-step SOC, which for a vehicle that
    follows another at its socket is its random drift: the twin draws the same stream."""
    env = SiteEnv(tiny_dataset, _reward(), backend="twin")
    zeros = _replay(_actions("zeros", env, env.n_steps))
    first = _episode(env, zeros, seed=0).steps  # stream seeded 0 + episode 0
    second = _episode(env, zeros, seed=0).steps  # 0 + episode 1
    assert not np.array_equal(first["observation"], second["observation"])  # it matters ...
    assert_identical("reward", first["reward"], second["reward"])  # ... only there
    other = SiteEnv(tiny_dataset, _reward(), backend="twin")
    third = _episode(other, zeros, seed=1).steps  # 1 + episode 0
    assert_identical("observation", second["observation"], third["observation"])


def test_kpis_of_twin_episode(tiny_dataset) -> None:
    """The twin's episode passes the evaluation's own checks (balance) and has KPIs."""
    twin = SiteEnv(tiny_dataset, _reward(), backend="twin")
    ts = _episode(twin, _replay(_actions("random", twin, twin.n_steps, seed=3))).history
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
    assert_identical("first observation", obs_single, obs_vec[0])
    # The VecEnv sums its return and components step by step: so does the test.
    total, components = 0.0, dict.fromkeys(rw.COMPONENTS, 0.0)
    for t, a in enumerate(actions):
        obs_single, reward, done, _, info = single.step(a)
        obs_vec, rewards, dones, infos = vec.step(np.repeat(a[None, :], n_envs, axis=0))
        total += reward
        for k, v in info["reward_components"].items():
            components[k] += v
        assert np.all(dones == done)
        # SB3's VecEnv rewards are float32: SiteEnv's float64 reward, rounded.
        assert_identical(f"rewards at step {t}", np.full(n_envs, reward, np.float32), rewards)
        if done:
            assert_identical("terminal observation", obs_single, infos[0]["terminal_observation"])
            assert infos[0]["episode"]["l"] == single.n_steps
            assert infos[0]["episode"]["r"] == total
            assert infos[0]["episode_components"] == components
            # SiteEnv's own episode sums add the same numbers in numpy's pairwise order.
            for k, v in info["episode_components"].items():
                assert components[k] == pytest.approx(v, rel=1e-12)
            # Auto-reset: the next episode's first observation.
            assert vec.core.t == 0
            assert_identical("next episode's observation", single.reset(seed=0)[0], obs_vec[0])
        else:
            assert_identical(f"observation after step {t}", obs_single, obs_vec[0])


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
    """New (CityLearn, twin) envs of one site preset's whole year."""
    cfg = compose_cfg([f"site={site}"], session_tmp)
    return _site_envs(dataset.build(config.validate_site(cfg.site), cfg.paths.data_dir))


@pytest.mark.slow
@pytest.mark.parametrize(("site", "seed"), [("iquitos_mall", 1), ("iquitos_mall_128", 2)])
def test_parity_with_citylearn_full_year(session_tmp: Path, site: str, seed: int) -> None:
    reference, twin = _full_year_envs(session_tmp, site)
    _compare(reference, twin, _replay(_actions("random", reference, reference.n_steps, seed=seed)))


@pytest.mark.slow
@pytest.mark.parametrize("controller", [Uncontrolled, RuleBased, Optimal])
def test_parity_full_year_iquitos_baselines(session_tmp: Path, controller) -> None:
    """Each baseline's own actions over the whole Iquitos year, on both backends."""
    reference, twin = _full_year_envs(session_tmp, "iquitos_mall")
    _compare(reference, twin, _controller(controller))


def test_vecenv_cycles_through_the_training_years(tiny_cfg) -> None:
    """Each episode runs the next year; a year's observations are its own data's."""
    from dataclasses import replace

    site = config.validate_site(tiny_cfg.site)
    years = [dataset.build(replace(site, seed=s), tiny_cfg.paths.data_dir) for s in (1, 2)]
    assert years[0].data_hash != years[1].data_hash
    vec = TwinVecEnv(years, _reward(), n_envs=2, seed=0)
    single = [SiteEnv(y, _reward(), backend="twin") for y in years]
    obs = vec.reset()
    for k in (0, 1, 0):
        assert vec.year == k
        reference, _ = single[k].reset(seed=None)
        # Zero actions: the same trajectory as one copy of that year alone.
        assert_identical(f"year {k} first observation", reference, obs[0])
        for _ in range(vec.n_steps):
            obs, _, dones, _ = vec.step(np.zeros((2, vec.action_space.shape[0])))
        assert dones.all()
