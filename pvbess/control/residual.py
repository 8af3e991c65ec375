"""The base a residual learner adds to (``env.battery_action=mpc_residual``): the battery
action of the forecast MPC's planner at each env copy's own state, and with
``env.ev_action=mpc_residual`` its charging plan too.

Residual policy learning (Johannink et al. 2019, Silver et al. 2018): the learner's
battery action is a correction to a controller's, so it starts where that
controller is and learns what the controller's forecasts and model miss. The base
is ``Planner`` (what ``agent=mpc`` serves): a 24 h rolling LP on persistence
forecasts of PV and load (the same hour on the last observed day; with
``env.planner_forecast=average`` that hour's mean over the last 7 days, as
``agent=mpc_average`` forecasts), replanned every step from the copy's measured
state. By default it forecasts no arrivals (as the served MPC sent ``[]``); with
``env.planner_arrivals=persistence`` it plans for the vehicles that came the day before
too, shifted a day with their dwell and energy, as ``agent=mpc_persistence`` does.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
from stable_baselines3.common.policies import ActorCriticPolicy
from stable_baselines3.common.type_aliases import Schedule

from pvbess.config import PLANNER_ARRIVALS, PLANNER_FORECASTS, RewardWeights
from pvbess.control import optimal
from pvbess.control.controllers import Measured, Sockets
from pvbess.control.mpc import LP_ONLY, Forecast, Planner, Sessions, planner_template
from pvbess.sim import reward as rw
from pvbess.sim.step import action_space, neutral_action
from pvbess.site import forecast as site_forecast
from pvbess.site.dataset import SiteDataset
from pvbess.units import STEP_HOURS


class MpcBase:
    """The planner's action for n copies of a step: battery [-1, 1] (+ charges, / rating),
    then each socket's [0, 1]."""

    def __init__(
        self,
        dataset: SiteDataset,
        weights: RewardWeights,
        scales: rw.RewardScales,
        horizon_h: float = 24.0,
        arrivals: str = "none",
        forecast: str = "persistence",
    ) -> None:
        if arrivals not in PLANNER_ARRIVALS:
            raise ValueError(
                f"env.planner_arrivals={arrivals!r}: choose {' | '.join(PLANNER_ARRIVALS)}"
            )
        if forecast not in PLANNER_FORECASTS:
            raise ValueError(
                f"env.planner_forecast={forecast!r}: choose {' | '.join(PLANNER_FORECASTS)}"
            )
        self.forecast = forecast
        site = dataset.site
        self.horizon = max(round(horizon_h / STEP_HOURS), 2)
        space = action_space(dataset.n_sockets)
        problem = optimal.Problem.from_dataset(dataset, weights, scales)
        self.arrivals = arrivals
        self.sessions = Sessions.of_problem(problem)
        self.n_steps = problem.n_steps
        self.planner = Planner(
            template=planner_template(problem),
            sockets=Sockets.of_site(site, dataset.n_sockets, space.low, space.high),
            tariff=site.tariff,
            grid=site.grid,
            horizon=self.horizon,
            terminal="start",
            solve_options=LP_ONLY,
            bess_power_kw=site.bess.power_kw,
        )
        self.index: pd.DatetimeIndex = dataset.index
        self.pv_kwh = dataset.series["pv_kwh"].to_numpy()
        self.load_kwh = dataset.series["load_kwh"].to_numpy()

    @property
    def leads_h(self) -> list[float]:
        """The forecast leads the planner is given [h]: 1 step .. horizon - 1 steps."""
        return [h * STEP_HOURS for h in range(1, self.horizon)]

    def forecasts(self, t: int | np.ndarray) -> dict[str, np.ndarray]:
        """The PV and load forecasts [kWh per step] the planner is given at step(s) t,
        each [leads] (or [len(t), leads]): persistence, the same hour on the last day
        observed, or average, that hour's mean over the last 7 days (as ``agent=mpc`` and
        ``agent=mpc_average`` forecast them)."""
        lead, n = np.arange(1, self.horizon), len(self.pv_kwh)
        if self.forecast == "average":
            src = site_forecast.average_source(t, lead, n)
            return {"pv_kwh": self.pv_kwh[src].mean(-1), "load_kwh": self.load_kwh[src].mean(-1)}
        src = site_forecast.persistence_source(t, lead, n)
        return {"pv_kwh": self.pv_kwh[src], "load_kwh": self.load_kwh[src]}

    def expected(self, t: int) -> Forecast | None:
        """The sessions the planner expects at step t (steps relative to t), or None when it
        forecasts no arrivals: persistence, yesterday's shifted a day."""
        if self.arrivals == "none":
            return None
        f = self.sessions.persistence(t, self.horizon, self.n_steps)
        f.arrival, f.departure = f.arrival - t, f.departure - t
        return f

    def plan(
        self,
        t: int,
        battery_soc_frac: np.ndarray,
        prev_import_kwh: np.ndarray,
        plugged: np.ndarray,
        soc: np.ndarray,
        capacity_kwh: np.ndarray,
        required_soc: np.ndarray,
        departure_steps: np.ndarray,
    ) -> np.ndarray:
        """Each copy's planned action [n_envs, 1 + socket] at step t: its SOC [frac] and last
        step's import [kWh] [n_envs], the plugged vehicles' SOC and capacity [n_envs,
        plugged], their required SOC and steps to departure [plugged]."""
        fc = self.forecasts(t)
        pv_fc, load_fc = fc["pv_kwh"], fc["load_kwh"]
        # The same sessions for every copy: the copies of a year share its arrivals.
        expected = self.expected(t)
        out = np.zeros((len(battery_soc_frac), 1 + self.planner.sockets.n_sockets))
        for i in range(len(out)):
            m = Measured(
                time=self.index[t],
                pv_kwh=float(self.pv_kwh[t]),
                load_kwh=float(self.load_kwh[t]),
                battery_soc_frac=float(battery_soc_frac[i]),
                plugged=plugged,
                soc=soc[i],
                capacity_kwh=capacity_kwh[i],
                required_soc=required_soc,
                departure_steps=departure_steps,
                prev_import_kwh=float(prev_import_kwh[i]),
            )
            out[i] = self.planner.act(m, pv_fc, load_fc, expected)
        return out


class ResidualPolicy(ActorCriticPolicy):
    """SB3's MlpPolicy whose untrained mean action is exactly the residual env's neutral
    action (``pvbess.sim.step.neutral_action``, the policy of ``env.reward_baseline=mpc``):
    battery 0 (the MPC's battery) and each EV action 1 (the site's own full charging) or,
    with ``env.ev_action=mpc_residual``, 0 (the MPC's charging plan).

    SB3 initialises the mean's last layer small, not zero (orthogonal, gain 0.01): at
    Iquitos that state-dependent correction of a few kW, with charging intensities near
    0, cost 0.7-1.3 points of the optimum's gain on the held-out year before any update.
    Residual policy learning starts from a zero last layer (Silver et al. 2018); its
    weights still get gradients, so learning moves it from there.
    """

    def _build(self, lr_schedule: Schedule) -> None:
        super()._build(lr_schedule)
        net = self.action_net
        if not isinstance(net, torch.nn.Linear):
            raise TypeError(f"ResidualPolicy needs a Gaussian (Box) action, got {net}")
        with torch.no_grad():
            net.weight.zero_()
            net.bias.copy_(torch.as_tensor(neutral_action(self.action_space)))
