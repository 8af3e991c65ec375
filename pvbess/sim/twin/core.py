"""The twin's physics: CityLearn's battery, chargers, EV batteries and observations for
``n_envs`` copies stepped in lockstep, in float32 where CityLearn stores float32."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pvbess.sim.twin.schema import (
    EV_DRIFT_CLIP,
    EV_DRIFT_STD_PER_SQRT_H,
    F32,
    F64,
    NO_EV,
    ZERO_DIVISION,
    TwinData,
    _base_series,
)

# -- the simulation ---------------------------------------------------------------------------


@dataclass
class StepResult:
    """One step of every env copy, as CityLearn records it (float32 where it stores float32)."""

    bess_energy_kwh32: np.ndarray  # [n]: + charged, - discharged (battery's electricity use)
    bess_soc32: np.ndarray  # [n]: after the step
    charger_kwh32: np.ndarray  # [n, socket]: each charger's electricity use
    ev_charging_kwh32: np.ndarray  # [n]
    net_kwh32: np.ndarray  # [n]
    load_kwh32: np.float32
    pv_kwh32: np.float32


class TwinCore:
    """The site's physics for ``n_envs`` copies stepped in lockstep (one shared time step).

    All copies share the data (PV, load, sessions) and differ only by their actions
    and their random stream for unplugged EVs.
    """

    def __init__(
        self, data: TwinData, n_envs: int = 1, random_seeds: Sequence[int] | None = None
    ) -> None:
        self.data = data
        self.n_envs = n_envs
        d = data
        n_obs = len(d.observation_names)
        b = d.bess
        self._bess = b
        self._ev_min_energy = d.ev_min_soc * d.ev_capacity_kwh
        self._ev_max_input_kwh = d.ev_nominal_power_kw * d.step_hours
        self._ev_eff_divisor = np.maximum(d.ev_one_way_efficiency, ZERO_DIVISION)
        self._charger_min_kw = np.maximum(
            np.minimum(d.charger_min_power_kw, d.charger_max_power_kw), 0
        )
        self._drift_std = EV_DRIFT_STD_PER_SQRT_H * np.sqrt(max(d.seconds_per_step, 1.0) / 3600.0)
        # Per row: plugged-in sockets and their EVs, arrivals, and unplugged EVs' events.
        self._plugged = [np.flatnonzero(d.connected_ev[:, t] >= 0) for t in range(d.n_rows)]
        self._plugged_ev = [d.connected_ev[p, t] for t, p in enumerate(self._plugged)]
        self._arrivals = []
        for t in range(d.n_rows):
            socks = np.flatnonzero(~np.isnan(d.arrival_soc32[:, t]))
            self._arrivals.append((d.connected_ev[socks, t], d.arrival_soc32[socks, t]))
        self._drifting = [np.flatnonzero(d.ev_event_kind[:, t] == 0) for t in range(d.n_rows)]
        self._set_on_event = []
        for t in range(d.n_rows):
            evs = np.flatnonzero(d.ev_event_kind[:, t] == 2)
            self._set_on_event.append((evs, d.ev_event_soc32[evs, t]))
        # The observation table: every entry that does not depend on actions, per row.
        self._static_obs = np.zeros((d.n_rows, n_obs))
        self._soc_col = self._net_col = -1
        self._ev_soc_cols = np.full(d.n_sockets, -1)
        for j, (field, s) in enumerate(d.observation_fields):
            if s < 0:
                if field == "electrical_storage_soc":
                    self._soc_col = j
                elif field == "net_electricity_consumption":
                    self._net_col = j
                else:
                    self._static_obs[:, j] = _base_series(d, field)
                continue
            plugged = d.connected_ev[s] >= 0
            values = {
                "connected_state": np.ones(d.n_rows),
                "departure_time": d.departure_steps[s].astype(F64),
                "required_soc": d.required_soc32[s].astype(F64),
                "soc": np.full(d.n_rows, NO_EV["soc"]),
            }[field]
            self._static_obs[:, j] = np.where(plugged, values, NO_EV[field])
            if field == "soc":
                self._ev_soc_cols[s] = j
        seeds = [d.random_seed] * n_envs if random_seeds is None else list(random_seeds)
        if len(seeds) != n_envs:
            raise ValueError(f"{len(seeds)} random seeds for {n_envs} copies")
        self.episode = -1
        self.reset(seeds)
        # Building is not an episode: CityLearn's first reset() is episode 0.
        self.episode = -1

    # -- state -------------------------------------------------------------------------------
    def reset(self, random_seeds: Sequence[int] | None = None) -> None:
        """A new episode; CityLearn seeds its drift stream with random seed + episode index."""
        d, n = self.data, self.n_envs
        if random_seeds is not None:
            self.random_seeds = [int(s) for s in random_seeds]
        self.episode += 1
        self._rngs = [np.random.RandomState(s + self.episode) for s in self.random_seeds]
        self.t = 0
        b = self._bess
        self.bess_soc32 = np.full(n, max(b.initial_soc_frac, b.min_soc_frac), dtype=F32)
        self.ev_soc32 = np.tile(np.maximum(d.ev_initial_soc, d.ev_min_soc).astype(F32), (n, 1))
        self._associate(0)
        # What the observation of step t shows: CityLearn reads SOCs and net use of t - 1
        # (of t = 0 at the start).
        self.obs_bess_soc32 = self.bess_soc32.copy()
        self.obs_ev_soc32 = self.ev_soc32.copy()
        # Net use at reset: load and PV only, in CityLearn's float32 order.
        zero = F32(0.0)
        net0 = (((zero + d.load_kwh32[0]) + zero) + -d.pv_kwh32[0]) + zero
        self.obs_net32 = np.full(n, net0, dtype=F32)
        self._last_net32 = self.obs_net32

    def plugged(self, t: int) -> np.ndarray:
        """Sockets with an EV plugged in at step t (CityLearn's connected chargers)."""
        return self._plugged[t]

    def _associate(self, t: int) -> None:
        evs, soc32 = self._arrivals[t]
        if evs.size:
            self.ev_soc32[:, evs] = soc32

    @property
    def done(self) -> bool:
        return self.t >= self.data.n_steps

    # -- observation -------------------------------------------------------------------------
    def observe(self) -> np.ndarray:
        """Raw observations [n, n_obs] (float64 of CityLearn's values)."""
        # After the last step CityLearn's buildings stay on the last row.
        row = min(self.t, self.data.n_steps - 1)
        obs = np.repeat(self._static_obs[row][None, :], self.n_envs, axis=0)
        if self._soc_col >= 0:
            obs[:, self._soc_col] = self.obs_bess_soc32
        if self._net_col >= 0:
            obs[:, self._net_col] = self.obs_net32
        socks = self._plugged[row]
        cols = self._ev_soc_cols[socks]
        keep = cols >= 0
        if keep.any():
            obs[:, cols[keep]] = self.obs_ev_soc32[:, self._plugged_ev[row][keep]]
        return obs

    def ev_soc_and_capacity(self, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SOC at the start of this step (from CityLearn's energy_init) and capacity [kWh]
        of the EV at each given socket; 0 where none is plugged in. Shapes [n, len(sockets)]."""
        d = self.data
        ev = d.connected_ev[sockets, self.t]
        has = ev >= 0
        e = np.where(has, ev, 0)
        cap = d.ev_capacity_kwh[e]
        energy = np.maximum(self._ev_min_energy[e], self.ev_soc32[:, e].astype(F64) * cap)
        soc = np.where(has, energy / cap, 0.0)
        return soc, np.broadcast_to(np.where(has, cap, 0.0), soc.shape).copy()

    def ev_soc_after_step(self, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """SOC just after this step (before advancing) and capacity [kWh] of the EV that is
        plugged in at each given socket; 0 where none is."""
        d = self.data
        ev = d.connected_ev[sockets, self.t]
        has = ev >= 0
        e = np.where(has, ev, 0)
        soc = np.where(has, self.ev_soc32[:, e].astype(F64), 0.0)
        cap = np.where(has, d.ev_capacity_kwh[e], 0.0)
        return soc, np.broadcast_to(cap, soc.shape).copy()

    # -- dynamics ----------------------------------------------------------------------------
    def step(self, bess_action: np.ndarray, ev_action: np.ndarray) -> StepResult:
        """Apply actions ([n] in [-1, 1], [n, socket] in [0, 1]) to step t; do not advance."""
        if self.done:
            raise RuntimeError("episode is over: call reset()")
        d, t = self.data, self.t
        bess_energy32, self.bess_soc32 = self._charge_bess(np.asarray(bess_action, dtype=F64))
        chargers32 = np.zeros((self.n_envs, d.n_sockets), dtype=F32)
        socks = self._plugged[t]
        if socks.size:
            chargers32[:, socks] = self._charge_evs(socks, self._plugged_ev[t], ev_action[:, socks])
            # CityLearn: 0 + float32 per charger, in float64, stored in float32.
            ev_total32 = np.cumsum(chargers32[:, socks].astype(F64), axis=1)[:, -1].astype(F32)
        else:
            ev_total32 = np.zeros(self.n_envs, dtype=F32)
        # Building.update_variables: float32 sums in its order (HVAC, appliances are 0).
        load32, pv32 = d.load_kwh32[t], d.pv_kwh32[t]
        net32 = ((load32 + bess_energy32) + -pv32) + ev_total32
        self._last_net32 = net32
        return StepResult(
            bess_energy_kwh32=bess_energy32,
            bess_soc32=self.bess_soc32,
            charger_kwh32=chargers32,
            ev_charging_kwh32=ev_total32,
            net_kwh32=net32,
            load_kwh32=load32,
            pv_kwh32=pv32,
        )

    def _charge_bess(self, action: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Building.update_electrical_storage + Battery.charge, per copy."""
        b, h = self._bess, self.data.step_hours
        a = _clip(action, -1.0, 1.0)
        requested = (a * b.nominal_power_kw) * h
        energy_init = np.maximum(b.min_energy_kwh, self.bess_soc32.astype(F64) * b.capacity_kwh)
        max_kwh = max(b.nominal_power_kw, 0.0) * h  # flat capacity-power curve
        eta = b.one_way_efficiency_frac
        # Charging: power, then the capacity ceiling (twice in CityLearn; flat curves: same).
        headroom = np.maximum(b.capacity_kwh - energy_init, 0.0) / max(eta, ZERO_DIVISION)
        charge = np.minimum(np.minimum(requested, max_kwh), headroom)
        # Discharging: power, then the depth of discharge.
        floor_kwh = (1.0 - b.depth_of_discharge_frac) * b.capacity_kwh
        available = np.maximum(energy_init - floor_kwh, 0.0) * eta
        discharge = np.minimum(np.minimum(np.abs(requested), max_kwh), available)
        energy = np.where(requested >= 0, charge, -discharge)
        return _store(energy, energy_init, b.capacity_kwh, b.min_energy_kwh, eta)

    def _charge_evs(self, socks: np.ndarray, evs: np.ndarray, action: np.ndarray) -> np.ndarray:
        """Charger.update_connected_electric_vehicle_soc for plugged-in sockets; returns
        the chargers' electricity use [kWh, float32] and updates the EVs' SOC."""
        d, h = self.data, self.data.step_hours
        a = _clip(action, -1.0, 1.0)
        max_kw = d.charger_max_power_kw[socks]
        requested_kw = np.abs(a) * max_kw
        power_kw = np.where(
            (a > 0) & (max_kw > 0) & (requested_kw >= self._charger_min_kw[socks]),
            np.minimum(requested_kw, max_kw),
            0.0,
        )
        charging = power_kw != 0.0
        normalized = power_kw / np.maximum(max_kw, ZERO_DIVISION)
        eff = d.charger_efficiency[socks]
        commanded_kwh = (normalized * max_kw) * h
        # No power requested: CityLearn still calls battery.charge(0.0) (re-storing the SOC).
        battery_kwh = np.where(charging, commanded_kwh * eff, 0.0)
        cap = d.ev_capacity_kwh[evs]
        energy_init = np.maximum(self._ev_min_energy[evs], self.ev_soc32[:, evs].astype(F64) * cap)
        eta = d.ev_one_way_efficiency[evs]
        headroom = np.maximum(cap - energy_init, 0.0) / self._ev_eff_divisor[evs]
        energy = np.minimum(np.minimum(battery_kwh, self._ev_max_input_kwh[evs]), headroom)
        balance32, soc32 = _store(energy, energy_init, cap, self._ev_min_energy[evs], eta)
        self.ev_soc32[:, evs] = soc32
        balance = balance32.astype(F64)
        eff_div = np.maximum(eff, ZERO_DIVISION)
        use = np.where(balance >= 0, balance / eff_div, balance * eff)
        return np.where(charging, use, 0.0).astype(F32)

    def advance(self) -> bool:
        """To the next step, as CityLearn's next_time_step; returns True when the episode ends."""
        d = self.data
        last = self.t >= d.n_steps - 1
        if not last:
            b = self._bess
            self.obs_bess_soc32 = self.bess_soc32
            self.obs_net32 = self._last_net32
            self.obs_ev_soc32 = self.ev_soc32.copy()
            # StorageDevice.next_time_step: SOC carried over (no standby loss), clipped.
            self.bess_soc32 = _clip(self.bess_soc32.astype(F64), b.min_soc_frac, 1.0).astype(F32)
            previous = self.ev_soc32.astype(F64)
            self.ev_soc32 = _clip(previous, d.ev_min_soc, 1.0).astype(F32)
        self.t += 1
        if last:
            return True  # CityLearn's buildings stay on the last row
        t = self.t
        drifting = self._drifting[t]
        if drifting.size:
            # One draw per drifting EV, in pool order, from each copy's own stream.
            draws = np.stack(
                [rng.normal(1.0, self._drift_std, drifting.size) for rng in self._rngs]
            )
            factor = _clip(draws, *EV_DRIFT_CLIP)
            self.ev_soc32[:, drifting] = _clip(previous[:, drifting] * factor, 0.0, 1.0)
        evs, soc32 = self._set_on_event[t]
        if evs.size:
            self.ev_soc32[:, evs] = soc32
        self._associate(t)
        return False


def _clip(x: Any, low: Any, high: Any) -> np.ndarray:
    """np.clip's values without its Python overhead (this is the hot loop)."""
    return np.minimum(np.maximum(x, low), high)


def _store(
    energy: np.ndarray,
    energy_init: np.ndarray,
    capacity_kwh: Any,
    min_energy_kwh: Any,
    eta: Any,
) -> tuple[np.ndarray, np.ndarray]:
    """StorageDevice._charge: the stored energy after a limited charge, as CityLearn rounds it.

    Returns the battery's energy balance [kWh, float32; + charged from outside, before
    losses] and its SOC [float32].
    """
    final = np.where(
        energy >= 0,
        np.minimum(energy_init + energy * eta, capacity_kwh),
        np.maximum(min_energy_kwh, energy_init + energy / eta),
    )
    soc32 = (final / np.maximum(capacity_kwh, ZERO_DIVISION)).astype(F32)
    delta = final - energy_init
    balance32 = np.where(delta >= 0, delta / eta, delta * eta).astype(F32)
    return balance32, soc32
