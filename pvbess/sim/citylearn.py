"""CityLearn 3 behind the env's step: ``CityLearnBackend``, one copy of the site
loaded from pvbess's local schema (the reference simulator)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

from pvbess.config import ConfigError
from pvbess.sim.step import observation_scaling
from pvbess.site.dataset import SiteDataset

os.environ.setdefault("CITYLEARN_OFFLINE", "1")


class CityLearnBackend:
    """CityLearn 3 with a central agent, loaded from a local schema: one copy."""

    n_envs = 1

    def __init__(self, dataset: SiteDataset, seed: int | None = None) -> None:
        from citylearn.citylearn import CityLearnEnv  # slow import, kept local

        if dataset.site.bess.capacity_kwh <= 0:
            # CityLearn refuses a battery action without a battery; the twin models it.
            raise ConfigError(
                "env.eval_backend: site.bess.capacity_kwh=0 (no battery) runs on the twin only: "
                "use env.eval_backend=twin (CityLearn refuses a battery action without a battery)"
            )
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
        self.obs_low, self.obs_span = observation_scaling(space.low, space.high)
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

    def reset(self, seeds: Sequence[int | None] | None = None) -> np.ndarray:
        obs, _ = self.env.reset(seed=None if seeds is None else seeds[0])
        return np.asarray(obs, dtype=np.float64)

    def ev_soc_and_capacity(self, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SOC at the start of this step and capacity [kWh] of the EV at each given socket,
        [1, len(sockets)]. Only the sockets asked for are read: attribute access into
        CityLearn is the cost here."""
        soc = np.zeros((1, len(sockets)))
        cap = np.zeros((1, len(sockets)))
        for j, i in enumerate(sockets):
            ev = self.chargers[i].connected_electric_vehicle
            if ev is not None:
                b = ev.battery
                cap[0, j] = b.capacity
                soc[0, j] = b.energy_init / b.capacity
        return soc, cap

    def ev_soc_after_step(self, t: int, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SOC after step t and capacity [kWh] of the EV that was at each given socket."""
        soc = np.zeros((1, len(sockets)))
        cap = np.zeros((1, len(sockets)))
        for j, i in enumerate(sockets):
            ev = self.chargers[i].past_connected_evs[t]
            if ev is not None:
                soc[0, j] = ev.battery.soc[t]
                cap[0, j] = ev.battery.capacity
        return soc, cap

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], bool]:
        t = self.t
        obs, _, terminated, truncated, _ = self.env.step([actions[0].tolist()])
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
        batch = {k: np.array([v]) for k, v in quantities.items()}
        return np.asarray(obs, dtype=np.float64), batch, bool(terminated or truncated)
