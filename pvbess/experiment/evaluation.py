"""Deterministic evaluation over the whole simulated period, with its checks.

The KPIs come from the episode's hourly timeseries; the energy balance must
close at every step, and CO2 is cross-checked against CityLearn's own figure.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from pvbess.sim import kpis
from pvbess.sim.env import SiteEnv

log = logging.getLogger(__name__)


class Policy(Protocol):
    def predict(
        self, observation: np.ndarray, deterministic: bool = True
    ) -> tuple[np.ndarray, Any]: ...


class Normalized:
    """A learner that trained behind SB3's VecNormalize, seeing observations scaled by its
    running statistics, frozen here (``normalize_obs`` does not update them)."""

    def __init__(self, model: Any, vec_normalize: Any = None) -> None:
        self.model = model
        self.vec_normalize = vec_normalize or model.get_vec_normalize_env()

    def predict(
        self, observation: np.ndarray, deterministic: bool = True
    ) -> tuple[np.ndarray, Any]:
        scaled = self.vec_normalize.normalize_obs(observation)
        return self.model.predict(scaled, deterministic=deterministic)


def policy(model: Any) -> Policy:
    """What acts in an evaluation: the model, behind its frozen observation normalization
    when it trained with one (``env.normalize``)."""
    getter = getattr(model, "get_vec_normalize_env", None)
    return model if getter is None or getter() is None else Normalized(model)


@dataclass
class EvalResult:
    """KPIs (mean over episodes), their std, the first episode's timeseries and CityLearn's KPIs."""

    kpis: dict[str, float]
    kpis_std: dict[str, float]
    timeseries: pd.DataFrame
    citylearn_kpis: dict[str, float] = field(default_factory=dict)


def rollout(env: SiteEnv, policy: Policy, seed: int, progress: bool = True) -> pd.DataFrame:
    """One deterministic episode; returns ``env.history()``."""
    obs, _ = env.reset(seed=seed)
    done = False
    with tqdm(
        total=env.n_steps, desc="evaluate", unit="step", disable=not progress, mininterval=1.0
    ) as bar:
        while not done:
            action, _ = policy.predict(obs, deterministic=True)
            obs, _, done, _, _ = env.step(action)
            bar.update(1)
    return env.history()


def citylearn_kpis(env: SiteEnv) -> dict[str, float]:
    """CityLearn's own evaluate() (ratios to its no-battery baseline), district level."""
    frame = env.citylearn.evaluate()
    district = frame[frame["level"] == "district"] if "level" in frame else frame
    out = {}
    for row in district.itertuples(index=False):
        value = float(row.value)
        if np.isfinite(value):
            out[str(row.cost_function)] = value
    return out


def citylearn_co2_kg(env: SiteEnv) -> float:
    """CityLearn's own absolute control emissions of the episode [kg] (``evaluate_v2``)."""
    frame = env.citylearn.evaluate_v2(include_business_as_usual=False)
    row = frame[frame["cost_function"] == "district_emissions_total_control_kgco2"]
    return float(row["value"].iloc[0])


def evaluate(
    env: SiteEnv, policy: Policy, seed: int, episodes: int = 1, progress: bool = True
) -> EvalResult:
    """Run ``episodes`` deterministic episodes (env seeds seed, seed+1, ...) and check them."""
    usable_kwh = env.site.bess.capacity_kwh * (
        env.site.bess.soc_max_frac - env.site.bess.soc_min_frac
    )
    per_episode = []
    first_ts: pd.DataFrame | None = None
    cl_kpis: dict[str, float] = {}
    for k in range(episodes):
        ts = rollout(env, policy, seed=seed + k, progress=progress)
        kpis.check_energy_balance(ts)
        values = kpis.compute(ts, usable_capacity_kwh=usable_kwh)
        on_citylearn = env.backend_name == "citylearn"
        if on_citylearn:  # the twin has no CityLearn to ask: replay in it to check
            values["citylearn_co2_kg"] = citylearn_co2_kg(env)
            values["co2_vs_citylearn_rel"] = abs(
                values["co2_kg"] - values["citylearn_co2_kg"]
            ) / max(values["citylearn_co2_kg"], 1e-9)
        per_episode.append(values)
        if first_ts is None:
            first_ts = ts
            cl_kpis = citylearn_kpis(env) if on_citylearn else {}
    frame = pd.DataFrame(per_episode)
    assert first_ts is not None
    return EvalResult(
        kpis=frame.mean().to_dict(),
        kpis_std=frame.std(ddof=0).to_dict(),
        timeseries=first_ts,
        citylearn_kpis=cl_kpis,
    )


LEARNING_CURVE_KPIS = ("co2_kg", "grid_import_kwh", "cost", "ev_unmet_kwh", "reward_total_mean")


def learning_curve_callback(env: SiteEnv, every_steps: int, log_metrics: Any) -> Any:
    """An SB3 callback: every ``every_steps`` training steps, one deterministic episode.

    Its KPIs go to ``log_metrics({'learning/<kpi>': value}, step)`` (the run's metric
    buffer), giving the evaluation KPI vs. training steps curve the comparison plots.
    """
    from stable_baselines3.common.callbacks import BaseCallback

    usable_kwh = env.site.bess.capacity_kwh * (
        env.site.bess.soc_max_frac - env.site.bess.soc_min_frac
    )

    class LearningCurve(BaseCallback):
        def __init__(self) -> None:
            super().__init__()
            self.next_at = every_steps

        def _on_step(self) -> bool:
            if self.num_timesteps >= self.next_at:
                while self.next_at <= self.num_timesteps:
                    self.next_at += every_steps
                ts = rollout(env, policy(self.model), seed=0, progress=False)
                values = kpis.compute(ts, usable_capacity_kwh=usable_kwh)
                log_metrics(
                    {f"learning/{k}": values[k] for k in LEARNING_CURVE_KPIS}, self.num_timesteps
                )
            return True

    return LearningCurve()
