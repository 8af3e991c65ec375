"""Typed configuration schema, registered in Hydra's ConfigStore.

Hydra checks types while composing (``total_timesteps=abc`` fails there);
``validate`` then runs the physical checks in each dataclass's ``check``
(a negative capacity, an SOC window upside down) before any work starts.
Every physical quantity carries its unit in its name.
"""

from __future__ import annotations

import difflib
import math
import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from pvbess.units import HOURS_PER_YEAR


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key."""


def _require(ok: bool, key: str, message: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {message}")


def _in_range(
    value: float,
    key: str,
    low: float,
    high: float,
    *,
    open_low: bool = False,
    open_high: bool = False,
) -> None:
    """``value`` within [low, high] (a bound is excluded where ``open_*``)."""
    above = value > low if open_low else value >= low
    below = value < high if open_high else value <= high
    left, right = "(" if open_low else "[", ")" if open_high else "]"
    _require(above and below, key, f"must be in {left}{low:g}, {high:g}{right}, got {value}")


# The separators csv.separator accepts (auto = the most frequent of them in the header).
SEPARATORS = {"auto": "auto", ",": ",", ";": ";", "tab": "\t", "\\t": "\t", "\t": "\t", "|": "|"}
DECIMALS = ("auto", ".", ",")
THOUSANDS = ("none", ".", ",", " ", "'")
TIMESTAMP_LABELS = ("start", "end")


@dataclass
class CsvSourceConfig:
    """Where one user time series comes from, and how to read it."""

    path: str | None = None
    time_column: str = "datetime"
    value_column: str = "value"
    # 'kWh' = energy over each row's interval (summed when aggregating);
    # 'kW' = mean power over the interval (averaged); also 'Wh', 'W', 'MWh', 'MW'.
    unit: str = "kWh"
    separator: str = "auto"
    date_format: str | None = None
    dayfirst: bool = False
    # Time zone of naive timestamps; None = the site's time zone.
    timezone: str | None = None
    scale: float = 1.0
    # start: a row's timestamp is the start of its interval (10:00 = 10:00-10:15);
    # end: meter exports that label each row by the end of its interval (10:15 = 10:00-10:15).
    timestamp_label: str = "start"
    # Decimal mark: auto = '.' (and ',' in ';'-separated files); '.' or ',' to say so.
    decimal: str = "auto"
    # Thousands separator inside numbers ('1,489' or '1.489'): none | . | , | ' ' | "'".
    thousands: str = "none"

    def check_source(self, key: str) -> None:
        _require(
            self.separator in SEPARATORS,
            f"{key}.separator",
            f"unknown separator {self.separator!r} (choose auto, ',', ';', tab or '|'; "
            "on the command line quote it: 'site.load.csv.separator=;')",
        )
        _require(
            self.decimal in DECIMALS,
            f"{key}.decimal",
            f"must be auto, '.' or ',', got {self.decimal!r}",
        )
        _require(
            self.thousands in THOUSANDS,
            f"{key}.thousands",
            f"must be none, '.', ',', ' ' or \"'\", got {self.thousands!r}",
        )
        _require(
            self.thousands == "none" or self.thousands != self.decimal,
            f"{key}.thousands",
            f"{self.thousands!r} cannot be both the decimal mark and the thousands separator",
        )
        _require(
            self.timestamp_label in TIMESTAMP_LABELS,
            f"{key}.timestamp_label",
            f"must be start or end, got {self.timestamp_label!r}",
        )
        _require(self.scale != 0, f"{key}.scale", "must not be 0 (it would erase the series)")


@dataclass
class PvConfig:
    source: str = "generated"  # generated | csv
    dc_kwp: float = 4050.0
    ac_kw: float = 1670.0
    tilt_deg: float = 10.0
    # pvlib convention: 0 = north, 180 = south. North faces the equator south of it.
    azimuth_deg: float = 0.0
    system_losses_frac: float = 0.14
    ghi_target_kwh_m2_day: float = 4.75
    csv: CsvSourceConfig = field(default_factory=CsvSourceConfig)

    def check(self) -> None:
        _require(self.source in ("generated", "csv"), "site.pv.source", "must be generated or csv")
        _require(self.dc_kwp >= 0, "site.pv.dc_kwp", f"must be >= 0, got {self.dc_kwp}")
        _require(self.ac_kw > 0, "site.pv.ac_kw", f"must be > 0, got {self.ac_kw}")
        _in_range(self.tilt_deg, "site.pv.tilt_deg", 0, 90)
        _in_range(self.azimuth_deg, "site.pv.azimuth_deg", 0, 360)
        self.csv.check_source("site.pv.csv")
        _require(
            0 <= self.system_losses_frac < 1,
            "site.pv.system_losses_frac",
            f"must be in [0, 1), got {self.system_losses_frac}",
        )
        _require(
            0 < self.ghi_target_kwh_m2_day < 12,
            "site.pv.ghi_target_kwh_m2_day",
            f"must be in (0, 12), got {self.ghi_target_kwh_m2_day}",
        )
        _require(
            self.source != "csv" or bool(self.csv.path),
            "site.pv.csv.path",
            "is required when site.pv.source=csv",
        )


@dataclass
class LoadConfig:
    source: str = "generated"  # generated | csv
    annual_energy_kwh: float = 12_368_653.0
    peak_kw: float = 2763.0
    open_hour: int = 9
    close_hour: int = 22
    weekend_factor: float = 1.1
    seasonal_amplitude_frac: float = 0.08
    noise_frac: float = 0.05
    csv: CsvSourceConfig = field(default_factory=CsvSourceConfig)

    def check(self) -> None:
        _require(
            self.source in ("generated", "csv"), "site.load.source", "must be generated or csv"
        )
        _require(self.annual_energy_kwh > 0, "site.load.annual_energy_kwh", "must be > 0")
        mean_kw = self.annual_energy_kwh / HOURS_PER_YEAR
        _require(
            self.peak_kw > mean_kw,
            "site.load.peak_kw",
            f"must exceed the mean load {mean_kw:.1f} kW implied by annual_energy_kwh",
        )
        _require(
            0 <= self.open_hour < self.close_hour <= 24,
            "site.load.open_hour/close_hour",
            "need 0 <= open_hour < close_hour <= 24",
        )
        _require(self.weekend_factor > 0, "site.load.weekend_factor", "must be > 0")
        _in_range(
            self.seasonal_amplitude_frac, "site.load.seasonal_amplitude_frac", 0, 1, open_high=True
        )
        _in_range(self.noise_frac, "site.load.noise_frac", 0, 1, open_high=True)
        self.csv.check_source("site.load.csv")
        _require(
            self.source != "csv" or bool(self.csv.path),
            "site.load.csv.path",
            "is required when site.load.source=csv",
        )


@dataclass
class BessConfig:
    capacity_kwh: float = 1700.0
    power_kw: float = 400.0
    soc_min_frac: float = 0.2
    soc_max_frac: float = 1.0
    initial_soc_frac: float = 0.5
    round_trip_efficiency_frac: float = 0.95
    # Highest power the cells accept, as a multiple of capacity per hour.
    max_c_rate_per_h: float = 1.0

    def check(self) -> None:
        # capacity_kwh = 0 is the site without a battery (power_kw must then be 0 too, by the
        # C-rate rule below): a real design option (pvbess.size), not an error.
        _require(
            self.capacity_kwh >= 0,
            "site.bess.capacity_kwh",
            f"must be >= 0, got {self.capacity_kwh}",
        )
        _require(self.power_kw >= 0, "site.bess.power_kw", f"must be >= 0, got {self.power_kw}")
        _require(
            0 <= self.soc_min_frac < self.soc_max_frac <= 1,
            "site.bess.soc_min_frac/soc_max_frac",
            "need 0 <= soc_min_frac < soc_max_frac <= 1, "
            f"got {self.soc_min_frac}, {self.soc_max_frac}",
        )
        _require(
            self.soc_min_frac <= self.initial_soc_frac <= self.soc_max_frac,
            "site.bess.initial_soc_frac",
            "must lie within [soc_min_frac, soc_max_frac]",
        )
        _require(
            0 < self.round_trip_efficiency_frac <= 1,
            "site.bess.round_trip_efficiency_frac",
            f"must be in (0, 1], got {self.round_trip_efficiency_frac}",
        )
        _require(
            self.power_kw <= self.max_c_rate_per_h * self.capacity_kwh,
            "site.bess.power_kw",
            f"{self.power_kw} kW exceeds max_c_rate_per_h x capacity_kwh = "
            f"{self.max_c_rate_per_h * self.capacity_kwh:.1f} kW",
        )
        _require(
            self.max_c_rate_per_h > 0,
            "site.bess.max_c_rate_per_h",
            f"must be > 0, got {self.max_c_rate_per_h}",
        )


@dataclass
class EvClassConfig:
    sockets: int = 1
    vehicles_per_day: float = 10.0
    battery_kwh: float = 4.6
    session_minutes_mean: float = 60.0
    arrival_soc_frac_mean: float = 0.25
    arrival_soc_frac_std: float = 0.08
    required_soc_frac: float = 0.9

    def check_class(self, name: str) -> None:
        key = f"site.ev.classes.{name}"
        _require(self.sockets >= 0, f"{key}.sockets", "must be >= 0")
        _require(self.vehicles_per_day >= 0, f"{key}.vehicles_per_day", "must be >= 0")
        _require(self.battery_kwh > 0, f"{key}.battery_kwh", "must be > 0")
        _require(self.session_minutes_mean > 0, f"{key}.session_minutes_mean", "must be > 0")
        _require(self.arrival_soc_frac_std >= 0, f"{key}.arrival_soc_frac_std", "must be >= 0")
        _require(
            0 <= self.arrival_soc_frac_mean < self.required_soc_frac <= 1,
            f"{key}.required_soc_frac",
            "need 0 <= arrival_soc_frac_mean < required_soc_frac <= 1",
        )


@dataclass
class EvConfig:
    socket_power_kw: float = 7.4
    charger_efficiency_frac: float = 0.95
    open_hour: int = 9
    close_hour: int = 22
    classes: dict[str, EvClassConfig] = field(default_factory=dict)

    def check(self) -> None:
        _require(
            self.socket_power_kw > 0,
            "site.ev.socket_power_kw",
            f"must be > 0, got {self.socket_power_kw}",
        )
        _require(
            0 < self.charger_efficiency_frac <= 1,
            "site.ev.charger_efficiency_frac",
            "must be in (0, 1]",
        )
        _require(
            0 <= self.open_hour < self.close_hour <= 24,
            "site.ev.open_hour/close_hour",
            "need 0 <= open_hour < close_hour <= 24",
        )
        _require(len(self.classes) > 0, "site.ev.classes", "needs at least one vehicle class")
        for name, c in self.classes.items():
            c.check_class(name)
        # CityLearn's EV model and the env's action space are built per socket.
        _require(
            sum(c.sockets for c in self.classes.values()) >= 1,
            "site.ev.classes",
            "the site has no EV socket (every class has sockets=0); a site without chargers "
            "(PV and battery only) is not supported yet: give one class sockets >= 1",
        )


@dataclass
class TariffConfig:
    currency: str = "PEN"
    peak_price_per_kwh: float = 0.45
    offpeak_price_per_kwh: float = 0.28
    peak_start_hour: int = 18
    peak_end_hour: int = 23

    def check(self) -> None:
        _require(self.peak_price_per_kwh >= 0, "site.tariff.peak_price_per_kwh", "must be >= 0")
        _require(
            self.offpeak_price_per_kwh >= 0, "site.tariff.offpeak_price_per_kwh", "must be >= 0"
        )
        _require(
            0 <= self.peak_start_hour <= self.peak_end_hour <= 24,
            "site.tariff.peak_start_hour/peak_end_hour",
            "need 0 <= peak_start_hour <= peak_end_hour <= 24",
        )
        _require(bool(self.currency.strip()), "site.tariff.currency", "must not be empty")


@dataclass
class GridConfig:
    carbon_intensity_kg_per_kwh: float = 0.4521

    def check(self) -> None:
        _require(
            self.carbon_intensity_kg_per_kwh >= 0,
            "site.grid.carbon_intensity_kg_per_kwh",
            "must be >= 0",
        )


@dataclass
class SiteConfig:
    name: str = MISSING
    latitude_deg: float = -3.7469
    longitude_deg: float = -73.2528
    altitude_m: float = 104.0
    timezone: str = "America/Lima"
    start: str = "2024-01-01 00:00"
    days: int = 365
    step_minutes: int = 60
    seed: int = 0
    pv: PvConfig = field(default_factory=PvConfig)
    load: LoadConfig = field(default_factory=LoadConfig)
    bess: BessConfig = field(default_factory=BessConfig)
    ev: EvConfig = field(default_factory=EvConfig)
    tariff: TariffConfig = field(default_factory=TariffConfig)
    grid: GridConfig = field(default_factory=GridConfig)

    def check(self) -> None:
        _require(self.days >= 1, "site.days", f"must be >= 1, got {self.days}")
        _require(
            self.step_minutes == 60, "site.step_minutes", "only hourly steps (60) are supported"
        )
        _require(-90 <= self.latitude_deg <= 90, "site.latitude_deg", "must be in [-90, 90]")
        _require(-180 <= self.longitude_deg <= 180, "site.longitude_deg", "must be in [-180, 180]")
        _in_range(self.altitude_m, "site.altitude_m", -500, 9000)
        _require(self.seed >= 0, "site.seed", f"must be >= 0, got {self.seed}")


@dataclass
class RewardWeights:
    co2: float = 0.5
    solar: float = 0.2
    cost: float = 0.15
    ev: float = 0.1
    grid: float = 0.05

    def check(self) -> None:
        values = {
            "co2": self.co2,
            "solar": self.solar,
            "cost": self.cost,
            "ev": self.ev,
            "grid": self.grid,
        }
        for key, value in values.items():
            _require(value >= 0, f"reward.weights.{key}", f"must be >= 0, got {value}")
        _require(sum(values.values()) > 0, "reward.weights", "must not all be zero")


@dataclass
class RewardConfig:
    name: str = MISSING
    weights: RewardWeights = field(default_factory=RewardWeights)
    # Import above this share of the site's peak load is penalised by the grid term.
    peak_threshold_frac: float = 0.8

    def check(self) -> None:
        _in_range(self.peak_threshold_frac, "reward.peak_threshold_frac", 0, 2, open_low=True)


@dataclass
class DeviceConfig:
    name: str = "auto"  # auto | cpu | cuda
    # torch threads on the CPU; 0 = torch's default (one per core).
    torch_threads: int = 1

    def check(self) -> None:
        _require(self.name in ("auto", "cpu", "cuda"), "device.name", "must be auto, cpu or cuda")
        _require(
            self.torch_threads >= 0,
            "device.torch_threads",
            f"must be >= 0, got {self.torch_threads}",
        )


# citylearn: the reference simulator; twin: pvbess.sim.twin, a numpy twin of the same physics.
BACKENDS = ("citylearn", "twin")


FORECASTS = ("none", "perfect", "persistence", "noisy", "average")
ACTION_MODES = ("per_socket", "fleet")
BATTERY_ACTIONS = ("power", "grid_target", "mpc_residual")
EV_ACTIONS = ("intensity", "mpc_residual")
# What a residual learner's planner forecasts of EV arrivals (env.planner_arrivals).
PLANNER_ARRIVALS = ("none", "persistence")
# What a residual learner's planner forecasts PV and load with (env.planner_forecast): the
# same hour on the last day observed, or its mean over the last 7 days (agent=mpc_average's).
PLANNER_FORECASTS = ("persistence", "average")
REWARD_BASELINES = ("none", "uncontrolled", "mpc")


@dataclass
class ObservationConfig:
    """What a learner observes beyond the battery, site and price (``pvbess.sim.features``).
    Each lever is switchable; all features are scaled to [0, 1]."""

    # The simulator's 4 observations per socket (connected, departure, required SOC, SOC).
    sockets: bool = True
    # Hour, weekday and day of year as sin/cos.
    time: bool = False
    # Price now (/ the highest price) and hours to the next price change (/ 24 h).
    tariff: bool = False
    # PV and load at forecast_leads_h ahead: none | perfect | persistence | noisy | average
    # (the forecast models of agent=mpc, pvbess.site.forecast).
    forecast: str = "none"
    forecast_leads_h: list[int] = field(default_factory=lambda: [1, 3, 6, 12, 24])
    noise_frac_at_24h: float = 0.2
    # The episode's running peak grid import (/ the largest possible import).
    peak: bool = False
    # Vehicles plugged in, energy they still need, least laxity [h] (/ 24 h).
    fleet: bool = False

    def check(self) -> None:
        _require(
            self.forecast in FORECASTS,
            "env.observations.forecast",
            f"unknown forecast {self.forecast!r} (choose {' | '.join(FORECASTS)})",
        )
        _require(
            all(h >= 1 for h in self.forecast_leads_h),
            "env.observations.forecast_leads_h",
            f"lead times must be >= 1 h, got {list(self.forecast_leads_h)}",
        )
        _require(
            all(h <= 168 for h in self.forecast_leads_h),
            "env.observations.forecast_leads_h",
            f"lead times must be <= 168 h (a week), got {list(self.forecast_leads_h)}",
        )
        _require(
            self.noise_frac_at_24h >= 0,
            "env.observations.noise_frac_at_24h",
            f"must be >= 0, got {self.noise_frac_at_24h}",
        )


@dataclass
class EnvConfig:
    _target_: str = "pvbess.sim.env.build_envs"
    _partial_: bool = True
    backend: str = "twin"
    safety_layer: bool = True
    # Env copies stepped at once in one numpy call for training (pvbess.sim.twin.TwinVecEnv);
    # > 1 needs backend twin.
    n_envs: int = 8
    # Site seeds of the years learners train on (other weather, load noise and EV
    # arrivals; the episodes cycle through them). Every controller is evaluated on
    # the year of site.seed, which no learner sees unless eval_on_training_data.
    train_seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    # Allow site.seed among train_seeds: evaluation on a training year (tagged).
    eval_on_training_data: bool = False
    # A site seed whose year is neither a training year nor the evaluation year: a
    # learner's policy is scored on it every select_every steps (and at step 0) and the
    # best one is the run's (SB3's EvalCallback); None = the last policy.
    validation_seed: int | None = None
    # Where the evaluation year runs: citylearn (the reference, with CityLearn's own
    # KPIs and the CO2 cross-check) or twin (bit-exact, ~30x faster; a study replays
    # runs in CityLearn to prove it: python -m pvbess.compare ... verify=true).
    eval_backend: str = "citylearn"
    observations: ObservationConfig = field(default_factory=ObservationConfig)
    # per_socket: [battery, socket_1 .. socket_n]; fleet: [battery, one charging intensity
    # per vehicle class], allocated to plugged sockets by least laxity first (learners only;
    # controllers always act per socket).
    action_mode: str = "per_socket"
    # power: the battery action is its power (/ rating); grid_target: the grid import the
    # battery aims for this step (-1..1 -> 0..the largest possible import), from the
    # step's load, PV and EV charging; mpc_residual: the learner's action, times
    # residual_frac, is added to the battery action of the persistence-forecast MPC's
    # planner at the same state, which it also observes (learners only).
    battery_action: str = "power"
    # The largest correction [/ rating] a residual learner (battery_action=mpc_residual)
    # makes to the MPC's battery action.
    residual_frac: float = 0.5
    # intensity: each EV action is a charging intensity [0, 1]; mpc_residual (with
    # battery_action=mpc_residual): a correction [-1, 1] added to the MPC planner's socket
    # actions (per socket, or per vehicle class to each of its sockets), so that the
    # learner's zero action is the MPC's whole decision, charging included.
    ev_action: str = "intensity"
    # The scale of those EV corrections (ev_action=mpc_residual) [-]: 1 adds the learner's
    # correction as it is; 0 leaves the planner's charging plan as planned, so the learner
    # corrects the battery only (its EV actions change nothing).
    ev_residual_frac: float = 1.0
    # none: the residual learner's planner plans for the plugged vehicles only (as the
    # served agent=mpc does); persistence: for yesterday's arrivals too, shifted a day
    # (as agent=mpc_persistence does). With battery_action=mpc_residual only.
    planner_arrivals: str = "none"
    # persistence: the residual learner's planner forecasts PV and load as agent=mpc
    # (the same hour yesterday); average: as agent=mpc_average (that hour's mean over the
    # last 7 days). With battery_action=mpc_residual only.
    planner_forecast: str = "persistence"
    # uncontrolled: the uncontrolled site's reward at the same step (a fixed series per
    # year) is subtracted from the training reward; the optimal policy is unchanged.
    # mpc (with battery_action=mpc_residual): the reward of the learner's neutral action
    # at the same step: the MPC's battery with the site's own charging, or with the MPC's
    # charging plan (ev_action=mpc_residual).
    reward_baseline: str = "none"
    # SB3's VecNormalize on the training env (observations and reward), saved with every
    # checkpoint, frozen at evaluation.
    normalize: bool = False

    def check(self) -> None:
        _require(
            self.action_mode in ACTION_MODES,
            "env.action_mode",
            f"unknown action mode {self.action_mode!r} (choose {' | '.join(ACTION_MODES)})",
        )
        _require(
            self.battery_action in BATTERY_ACTIONS,
            "env.battery_action",
            f"unknown battery action {self.battery_action!r} "
            f"(choose {' | '.join(BATTERY_ACTIONS)})",
        )
        _require(
            0.0 < self.residual_frac <= 2.0,
            "env.residual_frac",
            f"must be in (0, 2] (a share of the battery's rating), got {self.residual_frac}",
        )
        _require(
            self.ev_action in EV_ACTIONS,
            "env.ev_action",
            f"unknown EV action {self.ev_action!r} (choose {' | '.join(EV_ACTIONS)})",
        )
        _require(
            self.ev_action != "mpc_residual" or self.battery_action == "mpc_residual",
            "env.ev_action",
            "mpc_residual corrects the MPC's charging plan: it needs "
            "env.battery_action=mpc_residual",
        )
        _require(
            0.0 <= self.ev_residual_frac <= 1.0,
            "env.ev_residual_frac",
            f"must be in [0, 1] (a scale of the EV corrections), got {self.ev_residual_frac}",
        )
        _require(
            self.ev_residual_frac == 1.0 or self.ev_action == "mpc_residual",
            "env.ev_residual_frac",
            "scales the corrections to the MPC's charging plan: it needs "
            "env.ev_action=mpc_residual",
        )
        _require(
            self.planner_arrivals in PLANNER_ARRIVALS,
            "env.planner_arrivals",
            f"unknown arrival forecast {self.planner_arrivals!r} "
            f"(choose {' | '.join(PLANNER_ARRIVALS)})",
        )
        _require(
            self.planner_arrivals == "none" or self.battery_action == "mpc_residual",
            "env.planner_arrivals",
            "the residual learner's planner forecasts arrivals: it needs "
            "env.battery_action=mpc_residual",
        )
        _require(
            self.planner_forecast in PLANNER_FORECASTS,
            "env.planner_forecast",
            f"unknown forecast {self.planner_forecast!r} (choose {' | '.join(PLANNER_FORECASTS)})",
        )
        _require(
            self.planner_forecast == "persistence" or self.battery_action == "mpc_residual",
            "env.planner_forecast",
            "the residual learner's planner forecasts PV and load: it needs "
            "env.battery_action=mpc_residual",
        )
        _require(
            self.reward_baseline in REWARD_BASELINES,
            "env.reward_baseline",
            f"unknown baseline {self.reward_baseline!r} (choose {' | '.join(REWARD_BASELINES)})",
        )
        _require(
            self.reward_baseline != "mpc" or self.battery_action == "mpc_residual",
            "env.reward_baseline",
            "mpc is the baseline of a residual learner: it needs env.battery_action=mpc_residual",
        )
        _require(
            self.backend in BACKENDS,
            "env.backend",
            f"unknown backend {self.backend!r} (choose {' or '.join(BACKENDS)})",
        )
        _require(self.n_envs >= 1, "env.n_envs", f"must be >= 1, got {self.n_envs}")
        _require(
            self.n_envs == 1 or self.backend == "twin",
            "env.n_envs",
            f"{self.n_envs} copies need env.backend=twin (got {self.backend!r})",
        )
        _require(
            self.eval_backend in BACKENDS,
            "env.eval_backend",
            f"unknown backend {self.eval_backend!r} (choose {' or '.join(BACKENDS)})",
        )
        _require(len(self.train_seeds) >= 1, "env.train_seeds", "needs at least one site seed")
        _require(
            all(s >= 0 for s in self.train_seeds),
            "env.train_seeds",
            f"seeds must be >= 0, got {list(self.train_seeds)}",
        )
        _require(
            len(set(self.train_seeds)) == len(self.train_seeds),
            "env.train_seeds",
            f"has a seed twice: {list(self.train_seeds)}",
        )
        _require(
            self.validation_seed is None or self.validation_seed >= 0,
            "env.validation_seed",
            f"must be >= 0 or null, got {self.validation_seed}",
        )
        _require(
            self.validation_seed is None or self.validation_seed not in self.train_seeds,
            "env.validation_seed",
            f"{self.validation_seed} is a training year ({list(self.train_seeds)}): the "
            "policy would be chosen on data it learned from",
        )


@dataclass
class TrackingConfig:
    # None = sqlite:///<root>/mlruns/mlflow.db; http://... = a tracking server.
    uri: str | None = None
    artifact_location: str | None = None
    # None = one experiment per site, named after it.
    experiment: str | None = None
    run_name: str | None = None


@dataclass
class PathsConfig:
    root_dir: str = MISSING
    data_dir: str = MISSING
    output_dir: str = MISSING


@dataclass
class TrainConfig:
    seed: int = 0
    total_timesteps: int = 300000
    eval_episodes: int = 1
    checkpoint_every: int = 100000
    # SB3's log_interval: iterations (PPO, A2C) or episodes (SAC) between metric dumps.
    log_interval: int = 1
    # Training steps between deterministic evaluations for the learning curve
    # (learning/* metrics, on the bit-exact twin); 0 = none.
    eval_every: int = 50000
    # Training steps between scores on the validation year (env.validation_seed) that
    # choose the policy a learner is evaluated with; 0 = none.
    select_every: int = 25000
    # PPO and A2C: env steps during which only the value function is trained, the
    # policy left where it started (pvbess.experiment.warmup); 0 = none.
    critic_warmup_steps: int = 0
    # A run directory or an MLflow run id: continue that run from its last checkpoint.
    resume: str | None = None
    # A learner with total_timesteps=0 evaluates an untrained policy; refused unless this
    # is set (the run is then tagged untrained=true).
    allow_untrained: bool = False
    agent: dict[str, Any] = field(default_factory=dict)
    reward: RewardConfig = field(default_factory=RewardConfig)
    site: SiteConfig = field(default_factory=SiteConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    env: EnvConfig = field(default_factory=EnvConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)

    def check(self) -> None:
        _require(
            self.total_timesteps >= 0,
            "total_timesteps",
            f"must be >= 0, got {self.total_timesteps}",
        )
        _require(0 <= self.seed < 2**32, "seed", f"must be in [0, 2**32), got {self.seed}")
        _require(self.log_interval >= 1, "log_interval", f"must be >= 1, got {self.log_interval}")
        _require(
            self.eval_episodes >= 1, "eval_episodes", f"must be >= 1, got {self.eval_episodes}"
        )
        _require(self.eval_every >= 0, "eval_every", f"must be >= 0, got {self.eval_every}")
        _require(self.select_every >= 0, "select_every", f"must be >= 0, got {self.select_every}")
        _require(
            self.critic_warmup_steps >= 0,
            "critic_warmup_steps",
            f"must be >= 0, got {self.critic_warmup_steps}",
        )
        _require(
            self.env.validation_seed != self.site.seed,
            "env.validation_seed",
            f"{self.site.seed} is the evaluation year (site.seed): choosing the policy on it "
            "would report a figure selected on its own test data; choose another seed",
        )
        _require(
            self.checkpoint_every >= 1,
            "checkpoint_every",
            f"must be >= 1, got {self.checkpoint_every}",
        )
        _require(
            self.env.eval_on_training_data or self.site.seed not in self.env.train_seeds,
            "env.train_seeds",
            f"{list(self.env.train_seeds)} contains the evaluation year (site.seed="
            f"{self.site.seed}): learners must be evaluated on a year they never saw; choose "
            "other seeds, or set env.eval_on_training_data=true to evaluate on a training "
            "year (the run is tagged eval_on_training_data)",
        )
        _require(
            "_target_" in self.agent,
            "agent",
            "needs a _target_ (choose agent=ppo|sac|a2c|uncontrolled|rbc|optimal|mpc)",
        )
        check_agent(self.agent)
        # CityLearn refuses a battery action without a battery; the twin models it.
        no_battery = self.site.bess.capacity_kwh == 0
        _require(
            not no_battery or "citylearn" not in (self.env.backend, self.env.eval_backend),
            "env.eval_backend",
            "site.bess.capacity_kwh=0 (no battery) runs on the twin only: set "
            "env.backend=twin env.eval_backend=twin",
        )
        _require(
            not is_learner(self.agent) or self.total_timesteps > 0 or self.allow_untrained,
            "total_timesteps",
            f"is 0 for the learning agent {self.agent['_target_']}: its evaluation would be "
            "an untrained policy filed as the agent. Give a budget, or set "
            "allow_untrained=true to evaluate the untrained policy (tagged untrained=true)",
        )


def is_learner(agent: dict[str, Any]) -> bool:
    """Stable-Baselines3 agents (they need a ``policy``); pvbess's controllers do not learn."""
    return "policy" in agent


# Stable-Baselines3 hyperparameters with a range, checked before SB3 is imported: its own
# errors come from deep inside torch or numpy and do not name the key.
# name -> (lowest, highest, lowest excluded)
AGENT_RANGES: dict[str, tuple[float, float, bool]] = {
    "learning_rate": (0.0, 1.0, True),
    "n_steps": (1, math.inf, False),
    "batch_size": (1, math.inf, False),
    "n_epochs": (1, math.inf, False),
    "gamma": (0.0, 1.0, False),
    "gae_lambda": (0.0, 1.0, False),
    "clip_range": (0.0, math.inf, True),
    "ent_coef": (0.0, math.inf, False),
    "vf_coef": (0.0, math.inf, False),
    "max_grad_norm": (0.0, math.inf, True),
    "buffer_size": (1, math.inf, False),
    "learning_starts": (0, math.inf, False),
    "tau": (0.0, 1.0, True),
    "train_freq": (1, math.inf, False),
    "target_update_interval": (1, math.inf, False),
    "sde_sample_freq": (-1, math.inf, False),
}
AGENT_INTEGERS = {
    "n_steps",
    "batch_size",
    "n_epochs",
    "buffer_size",
    "learning_starts",
    "train_freq",
    "target_update_interval",
    "sde_sample_freq",
}


def check_agent(agent: dict[str, Any]) -> None:
    """Range and type checks on the agent's numeric hyperparameters, naming the key."""
    for key, (low, high, open_low) in AGENT_RANGES.items():
        if key not in agent or isinstance(agent[key], str):  # a schedule's name: SB3 checks
            continue
        value = agent[key]
        _require(
            isinstance(value, int | float) and not isinstance(value, bool),
            f"agent.{key}",
            f"must be a number, got {value!r}",
        )
        _require(math.isfinite(value), f"agent.{key}", f"must be finite, got {value}")
        _require(
            key not in AGENT_INTEGERS or float(value).is_integer(),
            f"agent.{key}",
            f"must be a whole number, got {value}",
        )
        _in_range(value, f"agent.{key}", low, high, open_low=open_low)
    for key in ("gradient_steps",):
        if key in agent:
            value = agent[key]
            _require(
                isinstance(value, int) and (value >= 1 or value == -1),
                f"agent.{key}",
                f"must be >= 1 or -1 (one per transition), got {value!r}",
            )


def project_root() -> str:
    """Where outputs go: $PVBESS_ROOT, else the source checkout, else the working directory.

    Resolved without Hydra's runtime, so that sweep directories (resolved before
    a job starts) and every job agree on one absolute root.
    """
    env = os.environ.get("PVBESS_ROOT")
    if env:
        return str(Path(env).resolve())
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "conf").is_dir():
        return str(checkout)
    return str(Path.cwd())


def register() -> None:
    """Register the schemas that conf/*.yaml extend, and the ${pvbess_root:} resolver."""
    OmegaConf.register_new_resolver("pvbess_root", project_root, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    cs.store(name="site_schema", node=SiteConfig)


def _check_finite(value: Any, key: str) -> None:
    """Every number in a setting is finite: inf and nan crash deep in CityLearn or torch."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        _require(math.isfinite(value), key, f"must be a finite number, got {value}")
    elif isinstance(value, dict):
        for k, v in value.items():
            _check_finite(v, f"{key}.{k}")
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            _check_finite(v, f"{key}[{i}]")


def _check_tree(obj: Any, prefix: str = "") -> None:
    """Finite numbers everywhere, then ``check()`` on a dataclass and every one inside it."""
    if is_dataclass(obj):
        for f in fields(obj):
            value = getattr(obj, f.name)
            if not is_dataclass(value):
                _check_finite(value, f"{prefix}{f.name}")
        if hasattr(obj, "check"):
            obj.check()
        for f in fields(obj):
            _check_tree(getattr(obj, f.name), f"{prefix}{f.name}.")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _check_tree(v, f"{prefix}{k}.")


def check_keys(cfg: DictConfig, prefix: str = "") -> None:
    """Refuse keys the typed schema does not know (Hydra's ``+key=value`` adds them
    silently), naming the key and the nearest valid one."""
    typ = OmegaConf.get_type(cfg)
    if typ is not None and is_dataclass(typ):
        known = [f.name for f in fields(typ)]
        for key in cfg.keys():
            if key in known:
                continue
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{close[0]}?" if close else ""
            raise ConfigError(
                f"{prefix}{key}: unknown setting{hint} (the valid keys here: {', '.join(known)})"
            )
    for key in cfg.keys():
        child = cfg._get_node(key)  # the node, without resolving interpolations
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none():
            check_keys(child, f"{prefix}{key}.")


def validate_site(cfg: DictConfig) -> SiteConfig:
    """Run the physical checks on a composed site config; return the typed object."""
    merged = OmegaConf.merge(OmegaConf.structured(SiteConfig), cfg)
    assert isinstance(merged, DictConfig)
    check_keys(merged, "site.")
    site = OmegaConf.to_object(merged)
    assert isinstance(site, SiteConfig)
    _check_tree(site, "site.")
    return site


def validate(cfg: DictConfig) -> TrainConfig:
    """Run every ``check`` on a composed config; raise ConfigError naming the key."""
    check_keys(cfg)
    obj = OmegaConf.to_object(cfg)
    assert isinstance(obj, TrainConfig)
    _check_tree(obj)
    return obj
