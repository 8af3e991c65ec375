"""The env's step, written once: safety layer -> simulator -> flows -> reward ->
record -> observation, over [n_envs, ...] arrays (``SiteStep``), and the pure
functions it is made of. ``pvbess.sim.env.SiteEnv`` runs one copy on CityLearn or
the twin; ``pvbess.sim.twin.TwinVecEnv`` runs n copies on the twin.

Action (``action_mode``): ``per_socket`` is ``[battery, socket_1 .. socket_n]``,
battery in [-1, 1] as a fraction of its power rating (+ charges), each socket in
[0, 1] of its power; ``fleet`` is ``[battery, one intensity per vehicle class]``,
allocated to plugged sockets by least laxity first (``pvbess.sim.fleet``).
Observation: the simulator's observations scaled to [0, 1], with the features of
``pvbess.sim.features``. Reward: ``pvbess.sim.reward`` from the step's physical
quantities, which are also recorded (``history``), less an optional per-step
baseline (``set_reward_baseline``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np
import pandas as pd

from pvbess.config import BATTERY_ACTIONS, EV_ACTIONS, ObservationConfig, RewardConfig, SiteConfig
from pvbess.sim import features, fleet
from pvbess.sim import reward as rw
from pvbess.sim.features import Features
from pvbess.site.dataset import SiteDataset
from pvbess.units import STEP_HOURS

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
    "bess_export_kwh",
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


# The state a controller knows at a step's start, recorded per step (``SiteStep.state_frame``).
STATE_FIELDS = ("battery_soc_frac", "prev_net_kw", "peak_import_kw")
# The simulator's observations of the battery's SOC and of the last step's net use.
BATTERY_SOC_OBS = "electrical_storage_soc"
NET_OBS = "net_electricity_consumption"


# The request column of the sessions a planner expects (``pvbess.control.mpc.sessions_json``).
EXPECTED_SESSIONS = "expected_sessions"


def forecast_column(name: str, lead_h: float) -> str:
    """The column of a forecast of ``pv_kwh`` or ``load_kwh`` at a lead [h], in kW."""
    return f"{name[:-4]}_forecast_{lead_h:g}h_kw"


# Below this fraction of capacity a departing EV's gap is float32 rounding of CityLearn's SOC.
SOC_ROUNDING_FRAC = 1e-4
# A per-step quantity of one env (a float) or of a batch of env copies (an array).
Quantity = float | np.floating | np.ndarray


class Simulator(Protocol):
    """What the env's step uses of a simulator of ``n_envs`` copies of the site.

    Session tables are [socket, step] arrays over the episode, shared by the copies:
    ``state`` (1 plugged in, 2 arriving next step, 3 away), ``departure_steps`` (steps
    left while plugged in), ``required_soc``. Observations are raw (unscaled) in
    ``observation_names`` order, [n_envs, n_obs]; ``obs_low`` and ``obs_span`` scale
    them to [0, 1]. Quantities are [n_envs] arrays [kWh per step, SOC fraction].
    """

    n_envs: int
    n_steps: int
    observation_names: list[str]
    obs_low: np.ndarray
    obs_span: np.ndarray
    state: np.ndarray
    departure_steps: np.ndarray
    required_soc: np.ndarray
    chargers: list[Any]  # each with charger_id and electricity_consumption [kWh per step]

    @property
    def t(self) -> int: ...

    def reset(self, seeds: Sequence[int | None] | None = None) -> np.ndarray: ...

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, dict[str, np.ndarray], bool]: ...

    def ev_soc_and_capacity(self, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...

    def ev_soc_after_step(self, t: int, sockets: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


def clip_action(
    action: np.ndarray, low: np.ndarray, high: np.ndarray, n_envs: int | None = None
) -> np.ndarray:
    """The action as float64 inside the action space: flat, or [n_envs, n_actions]."""
    a = np.asarray(action, dtype=np.float64)
    return np.clip(a.reshape(-1) if n_envs is None else a.reshape(n_envs, -1), low, high)


def action_space(n_ev_actions: int) -> gym.spaces.Box:
    """``[battery, ev_1 .. ev_n]``: battery in [-1, 1] (+ charges), the EV actions (sockets,
    or vehicle classes in fleet mode) in [0, 1]."""
    low = np.concatenate([[-1.0], np.zeros(n_ev_actions)]).astype(np.float32)
    return gym.spaces.Box(low=low, high=np.ones(n_ev_actions + 1, dtype=np.float32))


def correction_space(n_ev_actions: int) -> gym.spaces.Box:
    """A residual learner's ``[battery, ev_1 .. ev_n]`` when it corrects the MPC's charging
    too (``ev_action=mpc_residual``): every action in [-1, 1], 0 the MPC's own."""
    return gym.spaces.Box(-1.0, 1.0, shape=(n_ev_actions + 1,), dtype=np.float32)


def neutral_action(space: gym.spaces.Box) -> np.ndarray:
    """The action that leaves the site as its base has it: 0 where an action is a
    correction or the battery's power (low < 0), full charging (high) where it is a
    charging intensity. A residual learner's untrained mean, the ``mpc`` baseline's action."""
    low = np.asarray(space.low, dtype=np.float64)
    return np.where(low < 0, 0.0, np.asarray(space.high, dtype=np.float64))


@dataclass(frozen=True)
class Residual:
    """How a residual learner's action rides on the MPC planner's (``env.battery_action=
    mpc_residual``): what it observes of the plan and how its correction becomes the
    absolute action. The env's step and the served controller (``pvbess.deploy``) both
    use it, so the two cannot drift apart."""

    frac: float  # the battery correction's share of the rating (env.residual_frac)
    space: gym.spaces.Box  # the learner's action space
    corrects_plan: bool  # ev_action=mpc_residual: the EV actions correct the socket plan
    socket_class: np.ndarray | None  # fleet actions: each socket's class; per socket: None
    ev_frac: float = 1.0  # the EV corrections' scale (env.ev_residual_frac); 0: the plan

    def features(self, base: np.ndarray) -> list[np.ndarray]:
        """What the learner observes of the plan ``base`` [n, 1 + socket]: its battery
        action in [0, 1], and with ``corrects_plan`` the mean socket action; each [n, 1]."""
        out = [(base[:, :1] + 1.0) / 2.0]
        if self.corrects_plan:
            out.append(base[:, 1:].mean(axis=1, keepdims=True))
        return out

    def absolute(self, actions: np.ndarray, base: np.ndarray) -> np.ndarray:
        """The learner's actions [n, 1 + EV actions] made absolute on the plan ``base``
        (a new array): the battery's correction times ``frac`` added to the plan's battery
        action; with ``corrects_plan`` each EV correction (per socket, or per vehicle class
        for each of its sockets) times ``ev_frac`` added to the plan's socket action,
        clipped to [0, 1]."""
        a = np.clip(np.asarray(actions, dtype=np.float64), self.space.low, self.space.high)
        battery = self.frac * a[:, :1] + base[:, :1]
        if not self.corrects_plan:
            return np.concatenate([battery, a[:, 1:]], axis=1)
        ev = a[:, 1:] if self.socket_class is None else a[:, 1 + self.socket_class]
        ev = self.ev_frac * ev
        return np.concatenate([battery, np.clip(base[:, 1:] + ev, 0.0, 1.0)], axis=1)


def observation_space(n_obs: int) -> gym.spaces.Box:
    """Observations scaled to [0, 1]."""
    return gym.spaces.Box(0.0, 1.0, shape=(n_obs,), dtype=np.float32)


def observation_scaling(low: np.ndarray, high: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Offset and span [float64] that map the simulator's observation bounds to [0, 1]."""
    obs_low = np.asarray(low, dtype=np.float64)
    return obs_low, np.maximum(np.asarray(high, dtype=np.float64) - obs_low, 1e-9)


def normalize_observation(raw: np.ndarray, obs_low: np.ndarray, obs_span: np.ndarray) -> np.ndarray:
    """Raw observations scaled to [0, 1] by the simulator's observation-space bounds."""
    return np.clip((raw - obs_low) / obs_span, 0.0, 1.0).astype(np.float32)


def compose_observation(
    scaled: np.ndarray,
    features: Features,
    table_row: np.ndarray,
    peak_import_kwh: np.ndarray | None = None,
    max_import_kwh: float = 1.0,
    fleet_features: np.ndarray | None = None,
) -> np.ndarray:
    """[n, n_obs] observations in [0, 1]: the simulator's (scaled), less the dropped ones,
    then the features of ``pvbess.sim.features`` in ``features.names`` order.

    ``table_row`` is the step's row of the step-only features (time, tariff, forecasts),
    ``peak_import_kwh`` [n] the running peak (``features.config.peak``), ``fleet_features``
    [n, 3] the fleet's aggregates (``features.config.fleet``). The env and a served
    controller (``pvbess.deploy``) both build their observations here.
    """
    n = scaled.shape[0]
    obs = scaled if features.all_kept else scaled[:, features.keep]
    extra = []
    if table_row.size:
        extra.append(np.broadcast_to(table_row, (n, table_row.shape[-1])))
    if features.config.peak:
        assert peak_import_kwh is not None
        extra.append(np.minimum(peak_import_kwh / max_import_kwh, 1.0)[:, None])
    if features.config.fleet:
        assert fleet_features is not None
        extra.append(fleet_features)
    if not extra:
        return obs
    return np.concatenate([obs, *extra], axis=1).astype(np.float32)


def safety_actions(
    ev_action: np.ndarray,
    soc: np.ndarray,
    capacity_kwh: np.ndarray,
    required_soc: np.ndarray,
    departure_steps: np.ndarray,
    step_kwh: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Raise plugged sockets' actions so each EV can still reach its required SOC.

    All arrays are per plugged socket (last axis; a leading env axis broadcasts).
    A vehicle with L steps left needing E kWh in its battery can receive at most
    (L-1) full steps after this one; the rest must be delivered now. ``step_kwh``
    is one full step's battery-side energy. Returns the new actions in [0, 1] and
    the battery-side energy forced [kWh].
    """
    need_kwh = np.maximum(required_soc - soc, 0.0) * capacity_kwh
    later_kwh = np.maximum(departure_steps - 1, 0) * step_kwh
    must_now = np.clip((need_kwh - later_kwh) / step_kwh, 0.0, 1.0)
    # Tiny upward margin: CityLearn stores SOC in float32.
    must_now = np.where(must_now > 0, np.minimum(must_now * (1 + 1e-5) + 1e-7, 1.0), 0.0)
    new = np.maximum(ev_action, must_now)
    return new, (new - ev_action) * step_kwh


def socket_actions(
    a: np.ndarray,
    action_mode: str,
    n_sockets: int,
    plugged: np.ndarray,
    plugged_class: np.ndarray,
    need_kwh: np.ndarray,
    laxity_h: np.ndarray,
    step_kwh: float,
) -> np.ndarray:
    """The socket actions [n, socket] of clipped actions ``a`` [n, 1 + EV actions]: as given
    (``per_socket``), or each vehicle class's intensity allocated to its plugged sockets
    (``plugged``, of class ``plugged_class``) by least laxity (``fleet``)."""
    if action_mode == "per_socket":
        return a[:, 1:]
    out = np.zeros((a.shape[0], n_sockets))
    if plugged.size:
        out[:, plugged] = fleet.allocate(a[:, 1:], plugged_class, need_kwh, laxity_h, step_kwh)
    return out


def plugged_safety(
    ev_action: np.ndarray,
    plugged: np.ndarray,
    soc: np.ndarray,
    capacity_kwh: np.ndarray,
    required_soc: np.ndarray,
    departure_steps: np.ndarray,
    step_kwh: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``safety_actions`` on the plugged sockets of socket actions [n, socket]: the new
    actions and the battery-side energy forced [kWh], [n, socket]."""
    new = ev_action.copy()
    forced = np.zeros_like(ev_action)
    if plugged.size == 0:
        return new, forced
    new[:, plugged], forced[:, plugged] = safety_actions(
        ev_action[:, plugged], soc, capacity_kwh, required_soc, departure_steps, step_kwh
    )
    return new, forced


def battery_for_target(
    target: np.ndarray,
    ev_action: np.ndarray,
    load_kwh: Quantity,
    pv_kwh: Quantity,
    max_import_kwh: float,
    socket_grid_kwh: float,
    bess_step_kwh: float,
) -> np.ndarray:
    """Battery actions [-1, 1] that bring a step's grid import to ``target`` (-1..1 -> 0..the
    largest possible import [kWh]) given its load and PV [kWh] and the sockets' draw at
    their actions; the battery's limits and losses decide how close it gets."""
    target_kwh = (target + 1.0) / 2.0 * max_import_kwh
    ev_kwh = ev_action.sum(axis=1) * socket_grid_kwh
    bess_kwh = target_kwh - (load_kwh + ev_kwh - pv_kwh)
    return np.clip(bess_kwh / bess_step_kwh, -1.0, 1.0)


@dataclass(frozen=True)
class ActionMap:
    """From the env's action to what the site's devices are told, for one step: clip to the
    action space, sockets per socket or per fleet, the safety layer, the battery as a
    power or a grid target. ``SiteStep.step`` and a served controller (``pvbess.deploy``)
    both call ``apply``: the one place this mapping is written."""

    action_mode: str
    battery_action: str
    safety_layer: bool
    n_sockets: int
    socket_class: np.ndarray  # each socket's vehicle class (index into the fleet actions)
    low: np.ndarray
    high: np.ndarray
    step_kwh: float  # battery-side energy of one full socket step [kWh]
    socket_grid_kwh: float  # grid-side energy of one full socket step [kWh]
    bess_step_kwh: float  # the battery's power rating over one step [kWh]
    max_import_kwh: float  # the largest possible grid import of a step [kWh]

    def apply(
        self,
        actions: np.ndarray,
        plugged: np.ndarray,
        soc: np.ndarray,
        capacity_kwh: np.ndarray,
        required_soc: np.ndarray,
        departure_steps: np.ndarray,
        load_kwh: Quantity,
        pv_kwh: Quantity,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Actions [n, 1 + EV actions] and the step's state (the plugged sockets, their
        vehicles' SOC and capacity [n, plugged], required SOC and steps to departure,
        load and PV [kWh]) -> (clipped actions, the battery's mapped, [n, 1 + EV
        actions]; socket actions [n, socket]; battery-side energy forced [kWh])."""
        a = clip_action(actions, self.low, self.high, actions.shape[0])
        need_kwh = laxity_h = np.zeros((a.shape[0], 0))
        if self.action_mode == "fleet" and plugged.size:
            need_kwh, laxity_h = fleet.needs(
                soc, capacity_kwh, required_soc, departure_steps, self.step_kwh
            )
        ev_action = socket_actions(
            a,
            self.action_mode,
            self.n_sockets,
            plugged,
            self.socket_class[plugged],
            need_kwh,
            laxity_h,
            self.step_kwh,
        )
        forced = np.zeros_like(ev_action)
        if self.safety_layer and self.n_sockets:
            ev_action, forced = plugged_safety(
                ev_action, plugged, soc, capacity_kwh, required_soc, departure_steps, self.step_kwh
            )
        if self.battery_action == "grid_target":
            a[:, 0] = battery_for_target(
                a[:, 0],
                ev_action,
                load_kwh,
                pv_kwh,
                self.max_import_kwh,
                self.socket_grid_kwh,
                self.bess_step_kwh,
            )
        return a, ev_action, forced


def device_powers(
    battery_action: np.ndarray,
    ev_action: np.ndarray,
    plugged_mask: np.ndarray,
    bess_power_kw: float,
    socket_power_kw: float,
) -> tuple[np.ndarray, np.ndarray]:
    """What the devices are told [kW]: the battery's power (+ charges; its own limits still
    apply) and each socket's, 0 at a socket without a vehicle."""
    return battery_action * bess_power_kw, np.where(plugged_mask, ev_action, 0.0) * socket_power_kw


def step_flows(
    *,
    load_kwh: Quantity,
    pv_kwh: Quantity,
    ev_charging_kwh: Quantity,
    net_kwh: Quantity,
    carbon_kg_per_kwh: float,
    price_per_kwh: float,
) -> dict[str, Quantity]:
    """Grid import, curtailment, PV use, CO2 and cost of a step from its balance (vectorised).

    The island grid takes no export: what the site pushes out is lost. Up to the
    step's PV it is curtailed PV; beyond that it is battery energy discharged
    with nothing to supply (``bess_export_kwh``), which CityLearn allows.
    """
    grid_import = np.maximum(net_kwh, 0.0)
    export = np.maximum(-net_kwh, 0.0)
    curtailed = np.minimum(export, pv_kwh)
    return {
        "grid_import_kwh": grid_import,
        "pv_curtailed_kwh": curtailed,
        "pv_used_kwh": pv_kwh - curtailed,
        "bess_export_kwh": export - curtailed,
        "solar_direct_kwh": np.minimum(pv_kwh, load_kwh + ev_charging_kwh),
        "co2_kg": grid_import * carbon_kg_per_kwh,
        "cost": grid_import * price_per_kwh,
    }


def departure_gap_kwh(
    required_soc: np.ndarray, soc_after: np.ndarray, capacity_kwh: np.ndarray
) -> np.ndarray:
    """Battery-side energy each departing EV still misses for its required SOC [kWh]."""
    gap = np.maximum(required_soc - soc_after, 0.0) * capacity_kwh
    # Below SOC_ROUNDING_FRAC of capacity it is float32 rounding in the SOC, not a shortfall.
    return np.where(gap > SOC_ROUNDING_FRAC * capacity_kwh, gap, 0.0)


def socket_step_kwh(site: SiteConfig) -> float:
    """Battery-side energy one socket delivers in a full hourly step [kWh]."""
    return site.ev.socket_power_kw * STEP_HOURS * site.ev.charger_efficiency_frac


def reward_scales(dataset: SiteDataset, reward: RewardConfig) -> rw.RewardScales:
    """The reward's per-step normalisation for this site."""
    return rw.RewardScales.from_site(
        dataset.site,
        load_peak_kw=float(dataset.series["load_kwh"].max()),
        peak_threshold_frac=reward.peak_threshold_frac,
    )


class SiteStep:
    """The env's step, for ``n_envs`` copies at once: the one place it is written.

    safety layer -> simulator step -> flows -> reward -> record -> observation, over
    [n_envs, ...] arrays. ``SiteEnv`` runs one copy on either simulator; the twin's
    VecEnv runs n copies. A new observation feature or action mode is written here
    once, and the twin/CityLearn parity tests cover it on both simulators.
    """

    def __init__(
        self,
        sim: Simulator,
        dataset: SiteDataset,
        reward: RewardConfig,
        safety_layer: bool = True,
        record: bool = True,
        observations: ObservationConfig | None = None,
        action_mode: str = "per_socket",
        battery_action: str = "power",
        residual_frac: float = 0.5,
        ev_action: str = "intensity",
        planner_arrivals: str = "none",
        ev_residual_frac: float = 1.0,
        planner_forecast: str = "persistence",
    ) -> None:
        self.sim = sim
        self.dataset = dataset
        self.site = dataset.site
        self.n_envs = sim.n_envs
        self.n_steps = sim.n_steps
        self.n_sockets = dataset.n_sockets
        self.weights = reward.weights
        self.scales = reward_scales(dataset, reward)
        self.safety_layer = safety_layer
        self.record = record
        self.action_mode = action_mode
        if battery_action not in BATTERY_ACTIONS:
            raise ValueError(
                f"env.battery_action={battery_action!r}: choose {' | '.join(BATTERY_ACTIONS)}"
            )
        self.battery_action = battery_action
        if ev_action not in EV_ACTIONS:
            raise ValueError(f"env.ev_action={ev_action!r}: choose {' | '.join(EV_ACTIONS)}")
        if ev_action == "mpc_residual" and battery_action != "mpc_residual":
            raise ValueError(
                "env.ev_action=mpc_residual corrects the MPC's charging plan: it needs "
                "env.battery_action=mpc_residual"
            )
        if not 0.0 <= ev_residual_frac <= 1.0 or (
            ev_residual_frac != 1.0 and ev_action != "mpc_residual"
        ):
            raise ValueError(
                f"env.ev_residual_frac={ev_residual_frac}: a scale in [0, 1] of the "
                "corrections to the MPC's charging plan (with env.ev_action=mpc_residual)"
            )
        self._load = dataset.series["load_kwh"].to_numpy()
        self._pv = dataset.series["pv_kwh"].to_numpy()
        self._bess_step_kwh = self.site.bess.power_kw * STEP_HOURS
        self._socket_grid_kwh = self.site.ev.socket_power_kw * STEP_HOURS
        # Fleet mode: one action per vehicle class that has sockets, in the site's order.
        self.classes = list(dict.fromkeys(c for _, c in dataset.sockets))
        self._socket_class = np.asarray([self.classes.index(c) for _, c in dataset.sockets])
        if action_mode not in ("per_socket", "fleet"):
            raise ValueError(f"env.action_mode={action_mode!r}: choose per_socket or fleet")
        n_ev = self.n_sockets if action_mode == "per_socket" else len(self.classes)
        self.action_space = (
            correction_space(n_ev) if ev_action == "mpc_residual" else action_space(n_ev)
        )
        self.features = Features(
            observations or ObservationConfig(), dataset, sim.observation_names
        )
        # mpc_residual: the learner's battery action is added to the forecast MPC's, which
        # it observes (the last feature); ev_action=mpc_residual: its EV actions are added
        # to the MPC's charging plan too, whose mean over the sockets it also observes.
        self.mpc_base: Any = None
        self.residual: Residual | None = None
        if battery_action == "mpc_residual":
            from pvbess.control.residual import MpcBase  # the control package imports this one

            self.mpc_base = MpcBase(
                dataset,
                reward.weights,
                self.scales,
                arrivals=planner_arrivals,
                forecast=planner_forecast,
            )
            self.residual = Residual(
                frac=residual_frac,
                space=self.action_space,
                corrects_plan=ev_action == "mpc_residual",
                socket_class=None if action_mode == "per_socket" else self._socket_class,
                ev_frac=ev_residual_frac,
            )
        elif planner_arrivals != "none":
            raise ValueError(
                "env.planner_arrivals: the residual learner's planner forecasts arrivals: it "
                "needs env.battery_action=mpc_residual"
            )
        elif planner_forecast != "persistence":
            raise ValueError(
                "env.planner_forecast: the residual learner's planner forecasts PV and load: "
                "it needs env.battery_action=mpc_residual"
            )
        self._base = np.zeros((self.n_envs, 1 + self.n_sockets))
        n_base_obs = 0 if self.residual is None else 1 + self.residual.corrects_plan
        self.observation_space = observation_space(self.features.size + n_base_obs)
        self._max_need_kwh = self.n_sockets * max(
            (c.battery_kwh for c in self.site.ev.classes.values()), default=0.0
        )
        # Subtracted from the reward returned (not from returns, components or history).
        self.reward_baseline = np.zeros(sim.n_steps)
        # What scales observations to [0, 1]: the simulator's own bounds, or bounds shared
        # by every year a learner sees (``shared_obs_bounds``), so that one raw value is
        # one observation whichever year it comes from.
        self.obs_low, self.obs_span = sim.obs_low, sim.obs_span
        self._step_kwh = socket_step_kwh(self.site)
        # A correction of the MPC's plan is made an absolute per-socket action before the
        # map (``step``), so the map sees the sockets' own space.
        mapped = action_space(self.n_sockets) if ev_action == "mpc_residual" else self.action_space
        self.action_map = ActionMap(
            action_mode="per_socket" if ev_action == "mpc_residual" else action_mode,
            battery_action=battery_action,
            safety_layer=safety_layer,
            n_sockets=self.n_sockets,
            socket_class=self._socket_class,
            low=mapped.low,
            high=mapped.high,
            step_kwh=self._step_kwh,
            socket_grid_kwh=self._socket_grid_kwh,
            bess_step_kwh=self._bess_step_kwh,
            max_import_kwh=self.scales.max_import_kwh,
        )
        names = sim.observation_names
        self._soc_obs = names.index(BATTERY_SOC_OBS) if BATTERY_SOC_OBS in names else -1
        self._net_obs = names.index(NET_OBS) if NET_OBS in names else -1
        self._price = dataset.series["price_per_kwh"].to_numpy()
        self._carbon = dataset.series["carbon_kg_per_kwh"].to_numpy()
        n = self.n_steps
        state = sim.state[:, :n]
        self._plugged = [np.flatnonzero(state[:, t] == 1) for t in range(n)]
        self._departing = [
            np.flatnonzero((state[:, t] == 1) & (sim.departure_steps[:, t] == 1)) for t in range(n)
        ]
        self.t = 0
        self._soc_at: tuple = (-1, None, None)  # plugged_soc's step and answer
        # Each copy's grid import in the last step taken [kWh] (the ramp term's reference).
        self.prev_import_kwh = np.zeros(self.n_envs)
        self.history_arrays: dict[str, np.ndarray] = {}
        self.state_arrays: dict[str, np.ndarray] = {}
        self._peak_import = np.zeros(self.n_envs)
        self.components: dict[str, np.ndarray] = {}
        self.returns = np.zeros(self.n_envs)
        self.component_sums: dict[str, np.ndarray] = {}

    def observe(self, raw: np.ndarray) -> np.ndarray:
        """[n_envs, n_obs] observations in [0, 1]: the simulator's (scaled), then the
        features of step ``self.t`` (``pvbess.sim.features``)."""
        self._raw = raw
        f = self.features
        fleet_features = None
        if f.config.fleet:
            need_kwh, laxity_h = self.fleet_needs(self.t)
            fleet_features = fleet.aggregates(
                need_kwh, laxity_h, self.n_sockets, self._max_need_kwh
            )
        obs = compose_observation(
            normalize_observation(raw, self.obs_low, self.obs_span),
            f,
            f.table[min(self.t, f.table.shape[0] - 1)],
            self._peak_import,
            self.scales.max_import_kwh,
            fleet_features,
        )
        if self.residual is None:
            return obs
        t = self.t
        if t < self.n_steps:
            plugged = self._plugged[t]
            soc = cap = np.zeros((self.n_envs, 0))
            if plugged.size:
                soc, cap = self.plugged_soc(t)
            self._base = self.mpc_base.plan(
                t,
                raw[:, self._soc_obs],
                self.prev_import_kwh,
                plugged,
                soc,
                cap,
                self.sim.required_soc[plugged, t],
                self.sim.departure_steps[plugged, t],
            )
        base = self.residual.features(self._base)
        return np.concatenate([obs, *base], axis=1).astype(np.float32)

    def on_base(self, actions: np.ndarray) -> np.ndarray:
        """A residual learner's actions [n_envs, 1 + EV actions] made absolute on this
        step's plan (``Residual.absolute``)."""
        assert self.residual is not None
        return self.residual.absolute(actions, self._base)

    def plugged_soc(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """SOC at the start of step t and capacity [kWh] of the vehicles plugged in then,
        [n_envs, plugged]: asked of the simulator once per step, whoever asks (the
        observation's fleet features, the fleet allocation, the safety layer)."""
        if self._soc_at[0] != t:
            self._soc_at = (t, *self.sim.ev_soc_and_capacity(self._plugged[t]))
        return self._soc_at[1], self._soc_at[2]

    def fleet_needs(self, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Energy need [kWh] and laxity [h] of the vehicles plugged in at step t (its start),
        [n_envs, plugged] in ``self._plugged[t]`` order."""
        if t >= self.n_steps or self._plugged[t].size == 0:
            empty = np.zeros((self.n_envs, 0))
            return empty, empty
        plugged = self._plugged[t]
        soc, cap = self.plugged_soc(t)
        return fleet.needs(
            soc,
            cap,
            self.sim.required_soc[plugged, t],
            self.sim.departure_steps[plugged, t],
            self._step_kwh,
        )

    def set_reward_baseline(self, rewards: np.ndarray) -> None:
        """Subtract this per-step series [n_steps] from the reward returned to the learner
        (the uncontrolled site's reward: the optimal policy is unchanged, the variance
        the learner sees shrinks). Returns, components and history stay the objective's."""
        rewards = np.asarray(rewards, dtype=np.float64)
        if rewards.shape != (self.n_steps,):
            raise ValueError(f"a baseline of {rewards.shape} for {self.n_steps} steps")
        self.reward_baseline = rewards

    def battery_for_target(self, target: np.ndarray, ev_action: np.ndarray, t: int) -> np.ndarray:
        """Battery actions [-1, 1] that bring step t's grid import to ``target`` (-1..1 ->
        0..the largest possible import [kWh]) given its load, PV and the sockets' draw at
        their actions; the battery's limits and losses decide how close it gets."""
        m = self.action_map
        return battery_for_target(
            target,
            ev_action,
            self._load[t],
            self._pv[t],
            m.max_import_kwh,
            m.socket_grid_kwh,
            m.bess_step_kwh,
        )

    def ev_actions(self, a: np.ndarray, t: int) -> np.ndarray:
        """The socket actions [n_envs, socket] of clipped actions: as given (per_socket), or
        each class's intensity allocated by least laxity (fleet)."""
        plugged = self._plugged[t]
        need_kwh, laxity_h = self.fleet_needs(t)
        return socket_actions(
            a,
            self.action_mode,
            self.n_sockets,
            plugged,
            self._socket_class[plugged],
            need_kwh,
            laxity_h,
            self._step_kwh,
        )

    def set_obs_bounds(self, low: np.ndarray, span: np.ndarray) -> None:
        """Scale observations with these bounds [raw units] instead of the simulator's."""
        if low.shape != self.obs_low.shape:
            raise ValueError(f"{low.shape[0]} bounds for {self.obs_low.shape[0]} observations")
        self.obs_low, self.obs_span = low, span

    def reset(self, seeds: Sequence[int | None] | None = None) -> np.ndarray:
        raw = self.sim.reset(seeds)
        n = self.n_envs
        self.t = 0
        self._soc_at = (-1, None, None)
        self.prev_import_kwh = np.zeros(n)
        self._peak_import = np.zeros(n)
        self.returns = np.zeros(n)
        self.component_sums = {k: np.zeros(n) for k in rw.COMPONENTS}
        if self.record:
            self.history_arrays = {k: np.zeros((n, self.n_steps)) for k in RECORD_FIELDS}
            self.components = {k: np.zeros((n, self.n_steps)) for k in (*rw.COMPONENTS, "total")}
            self.state_arrays = {k: np.zeros((n, self.n_steps)) for k in STATE_FIELDS}
            self._ev_soc = np.zeros((n, self.n_sockets, self.n_steps))
            self._ev_action = np.zeros((n, self.n_sockets, self.n_steps))
        return self.observe(raw)

    def safety(self, ev_action: np.ndarray, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Raise plugged sockets' actions [n_envs, socket] so that each EV can still reach
        its required SOC; returns the new actions and the battery-side energy forced [kWh]."""
        plugged = self._plugged[t]
        if plugged.size == 0:
            return ev_action.copy(), np.zeros_like(ev_action)
        soc, cap = self.plugged_soc(t)
        return plugged_safety(
            ev_action,
            plugged,
            soc,
            cap,
            self.sim.required_soc[plugged, t],
            self.sim.departure_steps[plugged, t],
            self._step_kwh,
        )

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, bool, dict[str, np.ndarray]]:
        """Actions [n_envs, 1 + EV actions] -> (observations, rewards [n_envs] less the
        baseline, done, reward parts)."""
        t = self.t
        plugged = self._plugged[t]
        soc = cap = np.zeros((self.n_envs, 0))
        if plugged.size and (self.safety_layer or self.action_mode == "fleet"):
            soc, cap = self.plugged_soc(t)
        if self.record:
            self._record_state(t, soc)
        actions = np.asarray(actions).reshape(self.n_envs, -1)
        if self.residual is not None:
            actions = self.on_base(actions)
        a, ev_action, forced = self.action_map.apply(
            actions,
            plugged,
            soc,
            cap,
            self.sim.required_soc[plugged, t],
            self.sim.departure_steps[plugged, t],
            self._load[t],
            self._pv[t],
        )
        if self.record:
            self._ev_action[:, :, t] = ev_action
        raw, q, done = self.sim.step(np.concatenate([a[:, :1], ev_action], axis=1))
        self._soc_at = (-1, None, None)  # the step changed them
        flows = step_flows(
            load_kwh=q["load_kwh"],
            pv_kwh=q["pv_kwh"],
            ev_charging_kwh=q["ev_charging_kwh"],
            net_kwh=q["net_kwh"],
            carbon_kg_per_kwh=self._carbon[t],
            price_per_kwh=self._price[t],
        )
        departing = self._departing[t]
        if departing.size:  # most steps: nobody leaves, nothing to ask the simulator
            soc_after, caps = self.sim.ev_soc_after_step(t, departing)
        else:
            soc_after = caps = np.zeros((self.n_envs, 0))
        required = self.sim.required_soc[departing, t]
        gap = departure_gap_kwh(required, soc_after, caps)
        unmet = gap.sum(axis=1)
        parts = rw.components(
            grid_import_kwh=flows["grid_import_kwh"],
            prev_grid_import_kwh=self.prev_import_kwh,
            co2_kg=flows["co2_kg"],
            cost=flows["cost"],
            pv_curtailed_kwh=flows["pv_curtailed_kwh"],
            ev_unmet_kwh=unmet,
            scales=self.scales,
        )
        total = rw.weighted_total(parts, self.weights)
        self.prev_import_kwh = flows["grid_import_kwh"]
        self._peak_import = np.maximum(self._peak_import, self.prev_import_kwh)
        self.returns += total
        for k in rw.COMPONENTS:
            self.component_sums[k] += parts[k]
        if self.record:
            departures = {
                "ev_departures": np.full(self.n_envs, float(departing.size)),
                "ev_departures_met": (gap == 0).sum(axis=1).astype(np.float64),
                "ev_departing_required_kwh": (required * caps).sum(axis=1),
                "ev_unmet_kwh": unmet,
                "ev_forced_kwh": forced.sum(axis=1),
            }
            self._record(t, q | flows | departures, a, ev_action, parts, total)
        self.t = t + 1
        return self.observe(raw), total - self.reward_baseline[t], done, parts

    def _record_state(self, t: int, soc: np.ndarray) -> None:
        """What the controller knew at the start of step t (a served controller's request):
        the battery's SOC and the last step's net use as observed, the running peak, the
        plugged vehicles' SOC."""
        st = self.state_arrays
        raw = self._raw
        st["battery_soc_frac"][:, t] = raw[:, self._soc_obs] if self._soc_obs >= 0 else np.nan
        st["prev_net_kw"][:, t] = (
            raw[:, self._net_obs] / STEP_HOURS if self._net_obs >= 0 else np.nan
        )
        st["peak_import_kw"][:, t] = self._peak_import / STEP_HOURS
        plugged = self._plugged[t]
        if plugged.size:
            if soc.shape[1] != plugged.size:
                soc, _ = self.plugged_soc(t)
            self._ev_soc[:, plugged, t] = soc

    def state_frame(self, copy: int = 0) -> pd.DataFrame:
        """One copy's state at the start of each step so far, in physical units, and what
        its devices were told, in ``pvbess.deploy``'s request and response columns (one
        row per step): a served controller answers each row as this env did."""
        n = self.t
        sim = self.sim
        plugged = sim.state[:, :n] == 1
        cols: dict[str, np.ndarray] = {
            "pv_kw": self._pv[:n] / STEP_HOURS,
            "load_kw": self._load[:n] / STEP_HOURS,
        }
        cols |= {k: v[copy, :n] for k, v in self.state_arrays.items()}
        for i in range(self.n_sockets):
            p = plugged[i]
            cols[f"plugged_{i + 1}"] = p.astype(np.int64)
            cols[f"soc_frac_{i + 1}"] = np.where(p, self._ev_soc[copy, i, :n], 0.0)
            cols[f"hours_to_departure_{i + 1}"] = np.where(
                p, sim.departure_steps[i, :n] * STEP_HOURS, 0.0
            )
            cols[f"required_soc_frac_{i + 1}"] = np.where(p, sim.required_soc[i, :n], 0.0)
        obs = self.features.config
        if obs.forecast != "none":
            tables = features.forecast_tables(self.dataset, obs)
            for name, table in tables.items():
                for j, h in enumerate(obs.forecast_leads_h):
                    cols[forecast_column(name, h)] = table[:n, j] / STEP_HOURS
        if self.mpc_base is not None:
            # What the residual learner's planner was given, for a served one
            # to read from its request. At a lead the learner observes too, the column stays
            # the learner's: equal when it observes persistence, the only case that is served.
            for name, table in self.mpc_base.forecasts(np.arange(n)).items():
                for j, h in enumerate(self.mpc_base.leads_h):
                    cols.setdefault(forecast_column(name, h), table[:, j] / STEP_HOURS)
            if self.mpc_base.arrivals != "none":
                from pvbess.control.mpc import sessions_json

                cols[EXPECTED_SESSIONS] = np.asarray(
                    [sessions_json(self.mpc_base.expected(t)) for t in range(n)], dtype=object
                )
        battery_kw, socket_kw = device_powers(
            self.history_arrays["action_bess"][copy, :n],
            self._ev_action[copy, :, :n],
            plugged,
            self.site.bess.power_kw,
            self.site.ev.socket_power_kw,
        )
        cols["battery_kw"] = battery_kw
        for i in range(self.n_sockets):
            cols[f"socket_kw_{i + 1}"] = socket_kw[i]
        return pd.DataFrame(cols, index=self.dataset.index[:n])

    def _record(
        self,
        t: int,
        values: dict[str, np.ndarray],
        a: np.ndarray,
        ev_action: np.ndarray,
        parts: dict[str, np.ndarray],
        total: np.ndarray,
    ) -> None:
        h = self.history_arrays
        for k, v in values.items():
            h[k][:, t] = v
        h["action_bess"][:, t] = a[:, 0]
        h["action_ev_mean"][:, t] = ev_action.mean(axis=1) if ev_action.shape[1] else 0.0
        for k, v in parts.items():
            self.components[k][:, t] = v
        self.components["total"][:, t] = total

    def history(self, copy: int = 0) -> pd.DataFrame:
        """One copy's episode so far, one row per step, with reward components."""
        n = self.t
        frame = pd.DataFrame(
            {k: v[copy, :n] for k, v in self.history_arrays.items()},
            index=self.dataset.index[:n],
        )
        frame["price_per_kwh"] = self._price[:n]
        frame["carbon_kg_per_kwh"] = self._carbon[:n]
        for k, v in self.components.items():
            frame[f"reward_{k}"] = v[copy, :n]
        return pd.concat([frame, self.state_frame(copy)], axis=1)
