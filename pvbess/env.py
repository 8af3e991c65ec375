"""The Gymnasium env: a central agent over the site's simulation.

Action: ``[battery, socket_1 .. socket_n]``; battery in [-1, 1] as a fraction
of its power rating (+ charges), each socket in [0, 1] of its power.
Observation: CityLearn's active observations, scaled to [0, 1] by its own
observation-space bounds. Reward: ``pvbess.reward`` from the step's physical
quantities, which are also recorded as the hourly timeseries (``history``).

The simulator sits behind ``CityLearnBackend``; a faster backend can join
behind the same small interface.
"""

from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np
import pandas as pd

from pvbess import reward as rw
from pvbess.config import RewardConfig
from pvbess.dataset import BUILDING, SiteDataset

os.environ.setdefault("CITYLEARN_OFFLINE", "1")

# Per-step quantities recorded in the timeseries, all [kWh per step] unless named otherwise.
RECORD_FIELDS = (
    "load_kwh",
    "pv_kwh",
    "ev_charging_kwh",
    "bess_charge_kwh",
    "bess_discharge_kwh",
    "bess_soc_frac",
    "net_kwh",
    "grid_import_kwh",
    "pv_curtailed_kwh",
    "pv_used_kwh",
    "solar_direct_kwh",
    "co2_kg",
    "cost",
    "ev_departures",
    "ev_departures_met",
    "ev_departing_required_kwh",
    "ev_unmet_kwh",
    "ev_forced_kwh",
    "action_bess",
    "action_ev_mean",
)


class CityLearnBackend:
    """CityLearn 3 with a central agent, loaded from a local schema."""

    def __init__(self, dataset: SiteDataset, seed: int | None = None) -> None:
        from citylearn.citylearn import CityLearnEnv  # slow import, kept local

        self.dataset = dataset
        self.env = CityLearnEnv(str(dataset.schema_path), central_agent=True, random_seed=seed)
        self.building = self.env.buildings[0]
        chargers = self.building.electric_vehicle_chargers or []
        n_expected = dataset.n_sockets
        n_actions = self.env.action_space[0].shape[0]
        # CityLearn silently drops misspelled keys and unknown EV ids: check the result.
        if len(chargers) != n_expected or n_actions != n_expected + 1:
            raise RuntimeError(
                f"CityLearn built {len(chargers)} chargers and {n_actions} actions from "
                f"{dataset.schema_path}; the site config has {n_expected} sockets "
                f"(expected {n_expected + 1} actions)."
            )
        by_id = {c.charger_id: c for c in chargers}
        self.chargers = [by_id[sid] for sid, _ in dataset.sockets]
        self.n_steps = self.env.time_steps - 1
        space = self.env.observation_space[0]
        self.obs_low = np.asarray(space.low, dtype=np.float64)
        self.obs_span = np.maximum(np.asarray(space.high, dtype=np.float64) - self.obs_low, 1e-9)
        self.observation_names = list(self.env.observation_names[0])
        sims = [c.charger_simulation for c in self.chargers]
        # Session tables as [socket, step] arrays, read once: the safety layer needs them each step.
        self.state = np.stack([s.electric_vehicle_charger_state[: self.n_steps] for s in sims])
        self.departure_steps = np.stack(
            [s.electric_vehicle_departure_time[: self.n_steps] for s in sims]
        )
        self.required_soc = np.stack(
            [s.electric_vehicle_required_soc_departure[: self.n_steps] for s in sims]
        ).astype(np.float64)

    @property
    def t(self) -> int:
        return int(self.env.time_step)

    def reset(self, seed: int | None = None) -> np.ndarray:
        obs, _ = self.env.reset(seed=seed)
        return np.asarray(obs[0], dtype=np.float64)

    def ev_soc_and_capacity(self, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SOC at the start of this step and capacity [kWh] of the EV at each given socket.

        Only the sockets asked for are read: attribute access into CityLearn is the cost here.
        """
        soc = np.zeros(len(sockets))
        cap = np.zeros(len(sockets))
        for j, i in enumerate(sockets):
            ev = self.chargers[i].connected_electric_vehicle
            if ev is not None:
                b = ev.battery
                cap[j] = b.capacity
                soc[j] = b.energy_init / b.capacity
        return soc, cap

    def ev_soc_and_capacity_after_step(
        self, t: int, sockets: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """SOC after step t and capacity [kWh] of the EV that was at each given socket."""
        soc = np.zeros(len(sockets))
        cap = np.zeros(len(sockets))
        for j, i in enumerate(sockets):
            ev = self.chargers[i].past_connected_evs[t]
            if ev is not None:
                soc[j] = ev.battery.soc[t]
                cap[j] = ev.battery.capacity
        return soc, cap

    def step(self, action: np.ndarray) -> tuple[np.ndarray, dict[str, float], bool]:
        t = self.t
        obs, _, terminated, truncated, _ = self.env.step([action.tolist()])
        b = self.building
        storage_kwh = float(b.electrical_storage.electricity_consumption[t])
        quantities = {
            "load_kwh": float(b.non_shiftable_load_device.electricity_consumption[t]),
            "pv_kwh": -float(b.solar_generation[t]),
            "ev_charging_kwh": float(b.chargers_electricity_consumption[t]),
            "bess_charge_kwh": max(storage_kwh, 0.0),
            "bess_discharge_kwh": max(-storage_kwh, 0.0),
            "bess_soc_frac": float(b.electrical_storage.soc[t]),
            "net_kwh": float(b.net_electricity_consumption[t]),
        }
        return np.asarray(obs[0], dtype=np.float64), quantities, bool(terminated or truncated)


class SiteEnv(gym.Env):
    """Central-agent env for SB3: normalised observations, pvbess reward, safety layer."""

    metadata = {"render_modes": []}  # noqa: RUF012 - gymnasium's convention

    def __init__(
        self,
        dataset: SiteDataset,
        reward: RewardConfig,
        backend: str = "citylearn",
        safety_layer: bool = True,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if backend != "citylearn":
            raise ValueError(f"env.backend={backend!r}: only 'citylearn' is available")
        self.dataset = dataset
        self.site = dataset.site
        self.backend = CityLearnBackend(dataset, seed=dataset.site.seed if seed is None else seed)
        self.weights = reward.weights
        self.safety_layer = safety_layer
        self.scales = rw.RewardScales.from_site(
            self.site,
            load_peak_kw=float(dataset.series["load_kwh"].max()),
            peak_threshold_frac=reward.peak_threshold_frac,
        )
        n = dataset.n_sockets
        self.n_sockets = n
        self.n_steps = self.backend.n_steps
        low = np.concatenate([[-1.0], np.zeros(n)]).astype(np.float32)
        self.action_space = gym.spaces.Box(low=low, high=np.ones(n + 1, dtype=np.float32))
        n_obs = len(self.backend.observation_names)
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(n_obs,), dtype=np.float32)
        self.socket_energy_kwh = self.site.ev.socket_power_kw * 1.0  # per hourly step
        self.charger_eff = self.site.ev.charger_efficiency_frac
        price = dataset.series["price_per_kwh"].to_numpy()
        carbon = dataset.series["carbon_kg_per_kwh"].to_numpy()
        self._price, self._carbon = price, carbon
        self._history: dict[str, np.ndarray] = {}
        self._components: dict[str, np.ndarray] = {}
        self._t = 0

    # -- observation -------------------------------------------------------------------------
    def _observe(self, raw: np.ndarray) -> np.ndarray:
        b = self.backend
        return np.clip((raw - b.obs_low) / b.obs_span, 0.0, 1.0).astype(np.float32)

    # -- equal service ---------------------------------------------------------------------
    def apply_safety(self, ev_action: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Raise socket actions so each plugged-in EV can still reach its required SOC.

        A vehicle with L steps left needing E kWh in its battery can receive at
        most (L-1) full steps after this one; the rest must be delivered now.
        Returns the new actions in [0, 1] and the battery-side energy forced [kWh].
        """
        b = self.backend
        new = ev_action.copy()
        forced = np.zeros_like(ev_action)
        plugged = np.flatnonzero(b.state[:, t] == 1)
        if plugged.size == 0:
            return new, forced
        soc, cap = b.ev_soc_and_capacity(plugged)
        need_kwh = np.maximum(b.required_soc[plugged, t] - soc, 0.0) * cap
        step_kwh = self.socket_energy_kwh * self.charger_eff
        later_kwh = np.maximum(b.departure_steps[plugged, t] - 1, 0) * step_kwh
        must_now = np.clip((need_kwh - later_kwh) / step_kwh, 0.0, 1.0)
        # Tiny upward margin: CityLearn stores SOC in float32.
        must_now = np.where(must_now > 0, np.minimum(must_now * (1 + 1e-5) + 1e-7, 1.0), 0.0)
        new[plugged] = np.maximum(ev_action[plugged], must_now)
        forced[plugged] = (new[plugged] - ev_action[plugged]) * step_kwh
        return new, forced

    # -- gym API -------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        raw = self.backend.reset(seed=seed)
        self._t = 0
        self._prev_import = 0.0
        self._history = {k: np.zeros(self.n_steps) for k in RECORD_FIELDS}
        self._components = {k: np.zeros(self.n_steps) for k in (*rw.COMPONENTS, "total")}
        return self._observe(raw), {}

    def step(self, action: np.ndarray):
        t = self._t
        a = np.clip(
            np.asarray(action, dtype=np.float64).reshape(-1),
            self.action_space.low,
            self.action_space.high,
        )
        ev_action = a[1:]
        forced = np.zeros(self.n_sockets)
        if self.safety_layer and self.n_sockets:
            ev_action, forced = self.apply_safety(ev_action, t)
        raw, q, done = self.backend.step(np.concatenate([a[:1], ev_action]))
        rec = self._record(t, q, a, ev_action, forced)
        parts = rw.components(
            grid_import_kwh=np.float64(rec["grid_import_kwh"]),
            prev_grid_import_kwh=np.float64(self._prev_import),
            co2_kg=np.float64(rec["co2_kg"]),
            cost=np.float64(rec["cost"]),
            pv_curtailed_kwh=np.float64(rec["pv_curtailed_kwh"]),
            ev_unmet_kwh=np.float64(rec["ev_unmet_kwh"]),
            scales=self.scales,
        )
        total = float(rw.weighted_total(parts, self.weights))
        for k, v in parts.items():
            self._components[k][t] = v
        self._components["total"][t] = total
        self._prev_import = rec["grid_import_kwh"]
        self._t = t + 1
        info: dict[str, Any] = {"reward_components": {k: float(v) for k, v in parts.items()}}
        if done:
            info["episode_components"] = {
                k: float(v.sum()) for k, v in self._components.items() if k != "total"
            }
        return self._observe(raw), total, done, False, info

    def _record(
        self, t: int, q: dict[str, float], a: np.ndarray, ev_action: np.ndarray, forced: np.ndarray
    ) -> dict[str, float]:
        h = self._history
        for k, v in q.items():
            h[k][t] = v
        net = q["net_kwh"]
        grid_import = max(net, 0.0)
        curtailed = max(-net, 0.0)  # island grid: export earns nothing, it is curtailment
        h["grid_import_kwh"][t] = grid_import
        h["pv_curtailed_kwh"][t] = curtailed
        h["pv_used_kwh"][t] = q["pv_kwh"] - curtailed
        h["solar_direct_kwh"][t] = min(q["pv_kwh"], q["load_kwh"] + q["ev_charging_kwh"])
        h["co2_kg"][t] = grid_import * self._carbon[t]
        h["cost"][t] = grid_import * self._price[t]
        h["action_bess"][t] = a[0]
        h["action_ev_mean"][t] = float(ev_action.mean()) if ev_action.size else 0.0
        h["ev_forced_kwh"][t] = float(forced.sum())
        b = self.backend
        departing = (b.state[:, t] == 1) & (b.departure_steps[:, t] == 1)
        unmet = 0.0
        if departing.any():
            idx = np.flatnonzero(departing)
            soc_after, caps = b.ev_soc_and_capacity_after_step(t, idx)
            gap = np.maximum(b.required_soc[idx, t] - soc_after, 0.0) * caps
            # Below 1e-4 of capacity is float32 rounding in CityLearn's SOC, not a shortfall.
            gap = np.where(gap > 1e-4 * caps, gap, 0.0)
            unmet = float(gap.sum())
            h["ev_departures"][t] = idx.size
            h["ev_departures_met"][t] = int((gap == 0).sum())
            h["ev_departing_required_kwh"][t] = float((b.required_soc[idx, t] * caps).sum())
        h["ev_unmet_kwh"][t] = unmet
        return {k: h[k][t] for k in RECORD_FIELDS}

    # -- results -------------------------------------------------------------------------
    def history(self) -> pd.DataFrame:
        """The episode so far, one row per step, with reward components."""
        n = self._t
        frame = pd.DataFrame(
            {k: v[:n] for k, v in self._history.items()}, index=self.dataset.index[:n]
        )
        frame["price_per_kwh"] = self._price[:n]
        frame["carbon_kg_per_kwh"] = self._carbon[:n]
        for k, v in self._components.items():
            frame[f"reward_{k}"] = v[:n]
        return frame

    @property
    def citylearn(self):
        """The wrapped CityLearnEnv (for its own evaluate())."""
        return self.backend.env


__all__ = ["BUILDING", "CityLearnBackend", "SiteEnv"]
