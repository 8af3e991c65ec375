"""Every option of every config group composes and validates; bad input fails early, by name."""

from __future__ import annotations

import pytest
from hydra.utils import instantiate

from pvbess import config
from pvbess.experiment.run import check_agent_keys

from .conftest import CONF, compose_cfg, run_module

GROUPS = {
    group: sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    for group in ("agent", "reward", "site", "device", "env", "experiment", "levers")
}


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, opts in GROUPS.items() for o in opts])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose_cfg([f"{group}={option}"])
    typed = config.validate(cfg)
    if group == "levers":  # '# @package env': it sets env.*
        assert typed.env.normalize == (option not in ("none", "no_normalize"))
    elif group != "experiment":  # '# @package _global_': no key of its own
        assert cfg[group] is not None
    if group == "agent":
        assert callable(instantiate(cfg.agent))
        check_agent_keys(cfg)  # every key is one its class takes
    if group == "env":
        assert typed.env.backend == option
    if group == "site":
        assert typed.site.name == option
        assert sum(c.sockets for c in typed.site.ev.classes.values()) > 0


def test_groups_are_complete() -> None:
    assert {"ppo", "sac", "a2c", "uncontrolled", "rbc", "optimal"} <= set(GROUPS["agent"])
    assert {"balanced", "co2_heavy", "cost_heavy", "solar_heavy", "ev_first"} <= set(
        GROUPS["reward"]
    )
    assert {"tiny", "iquitos_mall", "iquitos_mall_128"} <= set(GROUPS["site"])
    assert set(GROUPS["device"]) == {"auto", "cpu", "cuda"}


def test_defaults_are_the_documented_ones() -> None:
    cfg = compose_cfg([])
    assert cfg.site.name == "iquitos_mall"
    assert cfg.agent._target_ == "stable_baselines3.PPO"
    assert cfg.reward.name == "balanced"
    w = cfg.reward.weights
    assert (w.co2, w.solar, w.cost, w.ev, w.grid) == (0.5, 0.2, 0.15, 0.1, 0.05)
    assert cfg.site.bess.capacity_kwh == 1700.0 and cfg.site.bess.power_kw == 400.0
    n = sum(c.sockets for c in cfg.site.ev.classes.values())
    assert n == 38


def test_override_reaches_nested_site_value() -> None:
    cfg = compose_cfg(["site.bess.capacity_kwh=2000", "reward.weights.co2=0.6"])
    typed = config.validate(cfg)
    assert typed.site.bess.capacity_kwh == 2000.0
    assert typed.reward.weights.co2 == 0.6


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("site.bess.capacity_kwh=-5", "site.bess.capacity_kwh"),
        ("site.bess.power_kw=5000", "site.bess.power_kw"),
        ("site.ev.socket_power_kw=0", "site.ev.socket_power_kw"),
        ("site.bess.soc_min_frac=1.2", "site.bess.soc_min_frac"),
        ("site.bess.initial_soc_frac=0.1", "site.bess.initial_soc_frac"),
        ("reward.weights.co2=-1", "reward.weights.co2"),
        ("eval_episodes=0", "eval_episodes"),
        ("select_every=-1", "select_every"),
        ("critic_warmup_steps=-1", "critic_warmup_steps"),
        # The policy is chosen on a year that is neither trained on nor reported.
        ("env.validation_seed=1", "env.validation_seed"),
        ("env.validation_seed=0", "env.validation_seed"),
        ("env.validation_seed=-4", "env.validation_seed"),
    ],
)
def test_physically_invalid_values_name_the_key(override: str, key: str) -> None:
    cfg = compose_cfg([override])
    with pytest.raises(config.ConfigError, match=key.replace(".", r"\.")):
        config.validate(cfg)


def test_all_zero_weights_rejected() -> None:
    cfg = compose_cfg([f"reward.weights.{k}=0" for k in ("co2", "solar", "cost", "ev", "grid")])
    with pytest.raises(config.ConfigError, match="must not all be zero"):
        config.validate(cfg)


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("total_timesteps=abc", "total_timesteps"),
        ("agent=nonexistent", "agent/nonexistent"),
        ("site.bess.capacity_kwh=-5", "site.bess.capacity_kwh"),
    ],
)
def test_bad_override_exits_nonzero_naming_the_key(override: str, needle: str, tmp_path) -> None:
    proc = run_module("pvbess.train", [override, "site=tiny"], tmp_path, timeout=120)
    assert proc.returncode != 0
    assert needle in proc.stderr + proc.stdout
    # Failed before any work: no dataset was built.
    assert not (tmp_path / "data").exists()


def test_study_presets_sweep_what_make_compare_all_runs() -> None:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    def leaves(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out |= leaves(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v}
        return out

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        base = leaves(OmegaConf.to_container(compose("train")))
        swept = {}
        for name in GROUPS["experiment"]:
            cfg = compose("train", overrides=[f"experiment={name}"], return_hydra_config=True)
            swept[name] = {k: v.split(",") for k, v in cfg.hydra.sweeper.params.items()}
            preset = OmegaConf.load(CONF / "experiment" / f"{name}.yaml")
            # A group the preset overrides in its defaults list ('override /agent: mpc')
            # is part of what it changes: its keys are compared with that group's.
            groups = [
                f"{g.removeprefix('override /')}={v}"
                for entry in preset.get("defaults", [])
                for g, v in entry.items()
            ]
            own_base = leaves(OmegaConf.to_container(compose("train", groups))) if groups else base
            own = set(leaves(OmegaConf.to_container(preset))) - {"hydra.sweeper.params", "defaults"}
            own = {k for k in own if not k.startswith("hydra.")}
            composed = leaves(OmegaConf.to_container(compose("train", [f"experiment={name}"])))
            # A preset holds only what it changes: every other key is the default.
            keys = set(own_base) | set(composed)
            changed = {k for k in keys if composed.get(k) != own_base.get(k)}
            assert changed == {k for k in own if composed[k] != own_base.get(k)}, name
    assert swept["study_baselines"]["agent"] == [
        "uncontrolled",
        "rbc",
        "optimal",
        "mpc",
        "mpc_persistence",
        "mpc_average",
        "mpc_learned",
    ]
    assert swept["study_baselines"]["reward"] == ["balanced", "cost_heavy"]
    assert swept["study_co2_only"]["reward"] == ["co2_only"]
    assert swept["study_learners"]["agent"] == ["ppo", "a2c"]
    assert swept["study_sac"]["agent"] == ["sac"]
    assert swept["study_residual"]["agent"] == ["ppo_residual"]
    assert swept["study_residual"]["levers"] == ["mpc_residual_average"]
    assert swept["mpc_forecasts"] == {
        **{
            f"agent.forecast_{k}": ["perfect", "persistence", "average", "learned"]
            for k in ("pv", "load")
        },
        "agent.forecast_arrivals": ["perfect", "persistence"],
        "reward": ["balanced", "cost_heavy"],
    }
    for name in ("study_learners", "study_sac", "study_residual"):
        assert swept[name]["seed"] == ["0", "1", "2"]
        assert swept[name]["reward"] == ["balanced", "cost_heavy"]
