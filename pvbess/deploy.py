"""A run's controller as an MLflow model (pyfunc flavor): the site's state at a step in,
what its battery and sockets are told out, everything in between inside.

Every finished run logs it as ``controller`` (``log_controller``); ``mlflow models serve
-m runs:/<id>/controller --env-manager local`` (``make serve RUN=<id>``) answers it over
HTTP and ``promote`` registers it as ``<site>`` with the alias ``champion``.

A request row is one step, answered from its own state alone (no state is kept between
rows or calls): ``time`` (ISO 8601, local time of the site when it has no offset),
``pv_kw`` and ``load_kw`` (mean power over the step), ``battery_soc_frac`` (the
battery's SOC at the step's start, of its capacity), ``n_sockets`` (how many sockets the
row describes: MLflow ignores columns its signature does not know, so a socket too many
would otherwise go unnoticed) and per socket i = 1..n ``plugged_i`` (1 or 0),
``soc_frac_i``, ``hours_to_departure_i`` and ``required_soc_frac_i`` (0 at an empty
socket). What some controllers also need, as columns rather than hidden state:
``prev_net_kw`` (the site's net use in the step before, + imports: learners observe it,
the MPC starts its ramp from it), ``peak_import_kw`` (the highest grid import so far,
for learners that observe it) and forecasts ``pv_forecast_<h>h_kw`` /
``load_forecast_<h>h_kw`` (the learner's forecast leads; for the MPC every lead 1 ..
horizon - 1) and ``expected_sessions`` (the MPC's, and a residual learner's whose planner
forecasts arrivals: a JSON array of ``[hours_to_arrival, hours_to_departure, energy_kwh,
socket]``, ``pvbess.control.mpc.sessions_json``). The response row holds ``battery_kw``
(+ charges; the battery's own limits still apply) and ``socket_kw_i`` (0 at an empty
socket).

Inside: the simulator's observation rebuilt from the state and scaled as in training,
the features (``pvbess.sim.step.compose_observation``), VecNormalize's frozen statistics,
the SB3 policy (deterministic; a residual learner's correction added to its planner's
action, ``pvbess.sim.step.Residual``) or the controller's decision (``policy.act``), and the
env's action mapping with its safety layer (``pvbess.sim.step.ActionMap``): the same
functions the env runs, so a served controller never leaves a vehicle short of its
required SOC when that can still be reached.
"""

from __future__ import annotations

import copy
import logging
import pickle
import tempfile
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pvbess.config import GridConfig, ObservationConfig, TariffConfig
from pvbess.sim import features as feats
from pvbess.sim import fleet
from pvbess.sim.features import Features
from pvbess.sim.step import (
    BATTERY_SOC_OBS,
    EXPECTED_SESSIONS,
    NET_OBS,
    ActionMap,
    compose_observation,
    device_powers,
    forecast_column,
    normalize_observation,
)
from pvbess.sim.twin.schema import CHARGER_OBSERVATIONS, NO_EV, pv_generation_kwh32
from pvbess.site import dataset as ds
from pvbess.site import tariff
from pvbess.units import STEP_HOURS

log = logging.getLogger(__name__)

MODEL_NAME = "controller"  # the artifact path of a run's served controller
CHAMPION = "champion"  # the alias of the version a site runs
SOCKET_FIELDS = ("plugged", "soc_frac", "hours_to_departure", "required_soc_frac")
FRACTIONS = ("battery_soc_frac", "soc_frac", "required_soc_frac")
# What a registered model is called: the site's name (models:/<site>@champion).
REGISTERED_NAME = "{site}"


class PromoteError(RuntimeError):
    """A run that cannot be promoted: another site's, or without a served controller."""


class NotDeployable(ValueError):
    """This run's controller cannot act from a step's state (the perfect-foresight LP)."""


def socket_columns(n_sockets: int) -> list[str]:
    return [f"{f}_{i}" for i in range(1, n_sockets + 1) for f in SOCKET_FIELDS]


def output_columns(n_sockets: int) -> list[str]:
    return ["battery_kw", *(f"socket_kw_{i}" for i in range(1, n_sockets + 1))]


@dataclass
class Spec:
    """What a served controller knows of its site and of the env it was evaluated in."""

    site: str
    agent: str
    kind: str  # "learner" (an SB3 model) or "controller" (``policy.act``)
    timezone: str
    n_sockets: int
    socket_power_kw: float
    bess_power_kw: float
    dc_kwp: float
    capacity_kwh: np.ndarray  # each socket's vehicle battery [kWh]
    tariff: TariffConfig
    grid: GridConfig
    observation_names: list[str]
    observation_fields: list[tuple[str, int]]  # (field, socket or -1) per observation
    obs_low: np.ndarray
    obs_span: np.ndarray
    features: Features  # the layout only (its per-year table emptied)
    price_max: float
    forecast_scales: dict[str, float]
    max_import_kwh: float
    max_need_kwh: float
    action_map: ActionMap
    forecast_leads_h: list[float] = field(default_factory=list)  # the request's columns
    planner_leads_h: list[float] = field(default_factory=list)  # what ``Planner`` is given
    expects_arrivals: bool = False  # the planner reads the request's expected_sessions
    needs_prev_net: bool = False
    # A controller's decision (``Rules``, ``FullPower``, ``Planner``), or the planner a
    # residual learner corrects (``residual``: how, ``pvbess.sim.step.Residual``).
    policy: Any = None
    residual: Any = None
    agent_class: str = ""  # a learner's SB3 class

    def input_columns(self) -> list[str]:
        cols = ["time", "pv_kw", "load_kw", "battery_soc_frac"]
        if self.needs_prev_net:
            cols.append("prev_net_kw")
        if self.features.config.peak and self.kind == "learner":
            cols.append("peak_import_kw")
        cols += [
            forecast_column(q, h) for q in ("pv_kwh", "load_kwh") for h in self.forecast_leads_h
        ]
        if self.expects_arrivals:
            cols.append(EXPECTED_SESSIONS)
        return [*cols, "n_sockets", *socket_columns(self.n_sockets)]


def observation_fields(names: list[str], socket_ids: list[str]) -> list[tuple[str, int]]:
    """Each simulator observation's field and socket (-1: the building's)."""
    by_name = {
        pattern.format(sid): (f, s)
        for pattern, f in CHARGER_OBSERVATIONS.values()
        for s, sid in enumerate(socket_ids)
    }
    return [by_name.get(n, (n, -1)) for n in names]


def build_spec(model: Any, env: Any, agent_target: str, agent: str) -> Spec:
    """The spec of the controller ``model`` evaluated in ``env`` (a ``SiteEnv``)."""
    core = env.core
    data = env.dataset
    site = data.site
    learner = bool(getattr(model, "learns", True))
    policy = None
    leads: list[float] = []
    planner_leads: list[float] = []
    expects_arrivals = False
    if learner:
        obs = core.features.config
        if obs.forecast != "none":
            leads = list(obs.forecast_leads_h)
        if core.mpc_base is not None:
            planned = core.mpc_base.forecast
            if obs.forecast not in ("none", planned):
                raise NotDeployable(
                    f"agent {agent!r} is a residual learner that observes {obs.forecast} "
                    f"forecasts while its planner is given {planned} ones: a request holds "
                    "one forecast per lead; train it with env.observations.forecast="
                    f"{planned} to serve it"
                )
            policy = core.mpc_base.planner
            expects_arrivals = core.mpc_base.arrivals != "none"
            planner_leads = core.mpc_base.leads_h
            leads = sorted(set(leads) | set(planner_leads))
    else:
        policy = model.policy
        if policy is None:
            raise NotDeployable(
                f"agent {agent!r} plans the whole period with perfect foresight: it has no "
                "decision from one step's state to serve"
            )
        horizon = getattr(policy, "horizon", 0)
        leads = planner_leads = [h * STEP_HOURS for h in range(1, horizon)]
        expects_arrivals = horizon > 0
    layout = copy.copy(core.features)
    layout.table = layout.table[:0]
    classes = {c: site.ev.classes[c].battery_kwh for c in site.ev.classes}
    return Spec(
        site=site.name,
        agent=agent,
        kind="learner" if learner else "controller",
        timezone=str(data.index.tz),
        n_sockets=data.n_sockets,
        socket_power_kw=site.ev.socket_power_kw,
        bess_power_kw=site.bess.power_kw,
        dc_kwp=site.pv.dc_kwp,
        capacity_kwh=np.asarray([classes[c] for _, c in data.sockets], dtype=np.float64),
        tariff=site.tariff,
        grid=site.grid,
        observation_names=list(env.backend.observation_names),
        observation_fields=observation_fields(
            list(env.backend.observation_names), [s for s, _ in data.sockets]
        ),
        obs_low=np.asarray(core.obs_low, dtype=np.float64),
        obs_span=np.asarray(core.obs_span, dtype=np.float64),
        features=layout,
        price_max=float(data.series["price_per_kwh"].max()),
        forecast_scales=feats.forecast_scales(data),
        max_import_kwh=core.scales.max_import_kwh,
        max_need_kwh=core._max_need_kwh,
        action_map=core.action_map,
        forecast_leads_h=leads,
        planner_leads_h=planner_leads,
        expects_arrivals=expects_arrivals,
        needs_prev_net=learner or hasattr(policy, "horizon"),
        policy=policy,
        residual=core.residual if learner else None,
        agent_class=agent_target if learner else "",
    )


# -- a request -> what the controller knows -----------------------------------------------------


def _bad(message: str) -> Exception:
    """A bad request: MLflow's scoring server answers it with HTTP 400 and this message."""
    from mlflow.exceptions import MlflowException

    return MlflowException.invalid_parameter_value(message)


def _check_column(col: str, column: pd.Series) -> None:
    """A numeric column: finite, fractions in 0..1, plugged 0 or 1, powers not negative."""
    values = pd.to_numeric(column, errors="coerce").to_numpy(dtype=np.float64)
    base = col.rsplit("_", 1)[0] if col[-1].isdigit() else col
    checks = (
        (~np.isfinite(values), "is not a finite number"),
        ((values < 0) | (values > 1) if base in FRACTIONS else None, "is outside 0..1"),
        (~np.isin(values, (0, 1)) if base == "plugged" else None, "must be 0 or 1"),
        (values < 0 if base != "prev_net_kw" else None, "is negative"),
    )
    for bad, what in checks:
        if bad is not None and bad.any():
            row = int(np.argmax(bad))
            raise _bad(f"{col}: {column.iloc[row]!r} in row {row} {what}")


def _expected_sessions(text: Any, spec: Spec, row: int) -> Any:
    """A row's ``expected_sessions`` as the sessions its planner plans for (a ``Forecast``)."""
    from pvbess.control.mpc import parse_sessions

    try:
        return parse_sessions(text, spec.n_sockets, spec.policy.horizon)
    except ValueError as exc:
        raise _bad(f"{EXPECTED_SESSIONS}: {exc} (row {row})") from exc


def validate(frame: pd.DataFrame, spec: Spec) -> pd.DatetimeIndex:
    """Refuse a request the controller must not answer; return its times (site time)."""
    missing = [c for c in spec.input_columns() if c not in frame.columns]
    if missing:
        raise _bad(f"missing input column(s): {', '.join(missing)}")
    if len(frame) == 0:
        raise _bad("the request holds no row")
    counts = pd.to_numeric(frame["n_sockets"], errors="coerce")
    wrong = frame.index[counts != spec.n_sockets]
    if len(wrong):
        raise _bad(
            f"n_sockets: {frame['n_sockets'].iloc[frame.index.get_loc(wrong[0])]} in row "
            f"{frame.index.get_loc(wrong[0])}, the site {spec.site!r} has {spec.n_sockets} sockets"
        )
    for col in spec.input_columns()[1:]:
        if col != EXPECTED_SESSIONS:
            _check_column(col, frame[col])
    for i in range(1, spec.n_sockets + 1):
        plugged = frame[f"plugged_{i}"].to_numpy(dtype=np.float64) == 1
        hours = frame[f"hours_to_departure_{i}"].to_numpy(dtype=np.float64)
        if (plugged & (hours <= 0)).any():
            row = int(np.argmax(plugged & (hours <= 0)))
            raise _bad(f"hours_to_departure_{i}: must be > 0 for a plugged vehicle (row {row})")
    if spec.expects_arrivals:
        for row, text in enumerate(frame[EXPECTED_SESSIONS]):
            _expected_sessions(text, spec, row)
    try:
        times = pd.DatetimeIndex(pd.to_datetime(frame["time"].astype(str), format="ISO8601"))
    except (ValueError, TypeError) as exc:
        raise _bad(f"time: not an ISO 8601 timestamp ({exc})") from exc
    if times.tz is None:
        return times.tz_localize(spec.timezone)
    return times.tz_convert(spec.timezone)


@dataclass
class StepState:
    """One request row as arrays: what the env's step and the controllers read."""

    time: pd.DatetimeIndex  # one entry
    pv_kwh: float
    load_kwh: float
    plugged: np.ndarray
    plugged_mask: np.ndarray
    soc: np.ndarray  # [plugged]
    capacity_kwh: np.ndarray
    required_soc: np.ndarray
    departure_steps: np.ndarray
    row: pd.Series


def step_state(row: pd.Series, time: pd.Timestamp, spec: Spec) -> StepState:
    """One request row as the arrays the step reads (plugged sockets in socket order)."""

    def per_socket(name: str) -> np.ndarray:
        return np.asarray(
            [row[f"{name}_{i}"] for i in range(1, spec.n_sockets + 1)], dtype=np.float64
        )

    mask = per_socket("plugged") == 1
    plugged = np.flatnonzero(mask)
    return StepState(
        time=pd.DatetimeIndex([time]),
        pv_kwh=float(row["pv_kw"]) * STEP_HOURS,
        load_kwh=float(row["load_kw"]) * STEP_HOURS,
        plugged=plugged,
        plugged_mask=mask,
        soc=per_socket("soc_frac")[plugged],
        capacity_kwh=spec.capacity_kwh[plugged],
        required_soc=per_socket("required_soc_frac")[plugged],
        departure_steps=per_socket("hours_to_departure")[plugged] / STEP_HOURS,
        row=row,
    )


def raw_observation(s: StepState, spec: Spec) -> np.ndarray:
    """The simulator's observation [1, n_obs] of this state (raw units, as CityLearn's)."""
    f32 = np.float32
    cal = ds.calendar(s.time)
    solar = np.float32(ds.solar_generation_w_per_kw(np.asarray([s.pv_kwh]), spec.dc_kwp))
    price = tariff.price_per_kwh(s.time, spec.tariff).to_numpy()[0]
    building = {
        "month": float(cal["month"][0]),
        "day_type": float(cal["day_type"][0]),
        "hour": float(cal["hour"][0]),
        "solar_generation": float(pv_generation_kwh32(solar, spec.dc_kwp)[0]),
        "non_shiftable_load": float(f32(s.load_kwh)),
        BATTERY_SOC_OBS: float(s.row["battery_soc_frac"]),
        "electricity_pricing": float(f32(price)),
        "carbon_intensity": float(f32(spec.grid.carbon_intensity_kg_per_kwh)),
    }
    if NET_OBS in spec.observation_names:
        building[NET_OBS] = float(s.row.get("prev_net_kw", 0.0)) * STEP_HOURS
    raw = np.zeros((1, len(spec.observation_fields)))
    for j, (name, socket) in enumerate(spec.observation_fields):
        if socket < 0:
            raw[0, j] = building[name]
            continue
        i = socket + 1
        if not s.plugged_mask[socket]:
            raw[0, j] = NO_EV[name]
            continue
        raw[0, j] = {
            "connected_state": 1.0,
            "departure_time": float(s.row[f"hours_to_departure_{i}"]) / STEP_HOURS,
            "required_soc": float(s.row[f"required_soc_frac_{i}"]),
            "soc": float(s.row[f"soc_frac_{i}"]),
        }[name]
    return raw


def step_features(s: StepState, spec: Spec) -> np.ndarray:
    """The step-only features (time, tariff, forecasts) of this state, float32 [k]."""
    obs: ObservationConfig = spec.features.config
    cols: dict[str, np.ndarray] = {}
    if obs.time:
        cols |= feats.time_features(s.time)
    if obs.tariff:
        day_steps = round(24 / STEP_HOURS)
        ahead = pd.date_range(s.time[0], periods=day_steps + 1, freq=pd.Timedelta(hours=STEP_HOURS))
        prices = tariff.price_per_kwh(ahead, spec.tariff).to_numpy()
        change = feats.steps_to_change(prices, day_steps)[:1]
        cols |= feats.tariff_features(prices[:1], spec.price_max, change)
    if obs.forecast != "none":
        forecasts = {
            q: np.asarray(
                [[float(s.row[forecast_column(q, h)]) * STEP_HOURS for h in obs.forecast_leads_h]]
            )
            for q in ("pv_kwh", "load_kwh")
        }
        cols |= feats.forecast_features(forecasts, obs.forecast_leads_h, spec.forecast_scales)
    if not cols:
        return np.zeros(0, dtype=np.float32)
    return np.asarray([v[0] for v in cols.values()], dtype=np.float32)


def observation(s: StepState, spec: Spec) -> tuple[np.ndarray, np.ndarray]:
    """The scaled simulator observation and the learner's observation, both [1, ...]."""
    scaled = normalize_observation(raw_observation(s, spec), spec.obs_low, spec.obs_span)
    fleet_features = None
    if spec.features.config.fleet:
        need_kwh, laxity_h = np.zeros((1, 0)), np.zeros((1, 0))
        if s.plugged.size:
            need_kwh, laxity_h = fleet.needs(
                s.soc[None, :],
                s.capacity_kwh[None, :],
                s.required_soc,
                s.departure_steps,
                spec.action_map.step_kwh,
            )
        fleet_features = fleet.aggregates(need_kwh, laxity_h, spec.n_sockets, spec.max_need_kwh)
    peak = None
    if spec.features.config.peak and "peak_import_kw" in s.row:
        peak = np.asarray([float(s.row["peak_import_kw"]) * STEP_HOURS])
    full = compose_observation(
        scaled, spec.features, step_features(s, spec), peak, spec.max_import_kwh, fleet_features
    )
    return scaled, full


def measured(s: StepState, scaled: np.ndarray, spec: Spec) -> Any:
    """What a controller knows (``Measured``), its SOC read back from its observation."""
    from pvbess.control.controllers import Measured, observed_soc_frac

    prev_net_kwh = float(s.row.get("prev_net_kw", 0.0)) * STEP_HOURS
    return Measured(
        time=s.time[0],
        pv_kwh=s.pv_kwh,
        load_kwh=s.load_kwh,
        battery_soc_frac=observed_soc_frac(
            scaled[0], spec.observation_names.index(BATTERY_SOC_OBS), spec.obs_low, spec.obs_span
        ),
        plugged=s.plugged,
        soc=s.soc,
        capacity_kwh=s.capacity_kwh,
        required_soc=s.required_soc,
        departure_steps=s.departure_steps,
        prev_import_kwh=max(prev_net_kwh, 0.0),
    )


# -- the MLflow model ----------------------------------------------------------------------------


def _pyfunc_base() -> type:
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


class ControllerModel(_pyfunc_base()):  # type: ignore[misc]
    """The served controller: a request's rows (steps) -> battery and socket powers [kW]."""

    def load_context(self, context: Any) -> None:
        with open(context.artifacts["spec"], "rb") as f:
            self.spec: Spec = pickle.load(f)
        self.model = self.vec_normalize = None
        if self.spec.kind == "learner":
            import torch
            from hydra.utils import get_class

            # One thread: a request is one small forward pass; the answers do not depend on it.
            torch.set_num_threads(1)
            self.model = get_class(self.spec.agent_class).load(
                context.artifacts["policy"], device="cpu"
            )
            if "vecnormalize" in context.artifacts:
                # VecNormalize.load without the env it would wrap: only its statistics.
                with open(context.artifacts["vecnormalize"], "rb") as f:
                    self.vec_normalize = pickle.load(f)
                self.vec_normalize.training = False

    def predict(self, context, model_input, params=None):  # untyped: MLflow reads hints
        return answer(self.spec, self.model, self.vec_normalize, pd.DataFrame(model_input))


def planned(spec: Spec, s: StepState, m: Any) -> np.ndarray:
    """The planner's action [1 + socket] on what it measures and the request's forecasts."""
    fc = {
        q: np.asarray(
            [float(s.row[forecast_column(q, h)]) * STEP_HOURS for h in spec.planner_leads_h]
        )
        for q in ("pv_kwh", "load_kwh")
    }
    arrivals = None
    if spec.expects_arrivals:
        arrivals = _expected_sessions(s.row[EXPECTED_SESSIONS], spec, int(s.row.name))
    return spec.policy.act(m, fc["pv_kwh"], fc["load_kwh"], arrivals)


def action_of(spec: Spec, s: StepState, model: Any, vec_normalize: Any) -> np.ndarray:
    """The env's action [1 + EV actions] the controller takes in this state: for a residual
    learner, its correction made absolute on the planner's action, as in the env."""
    scaled, obs = observation(s, spec)
    if spec.kind == "learner":
        x = obs[0]
        base = None
        if spec.residual is not None:
            base = planned(spec, s, measured(s, scaled, spec))[None, :]
            x = np.concatenate([obs, *spec.residual.features(base)], axis=1)[0]
            x = x.astype(np.float32)
        if vec_normalize is not None:
            x = vec_normalize.normalize_obs(x)
        action, _ = model.predict(x, deterministic=True)
        if base is None:
            return np.asarray(action)
        return spec.residual.absolute(np.asarray(action).reshape(1, -1), base)[0]
    m = measured(s, scaled, spec)
    if hasattr(spec.policy, "horizon"):
        return planned(spec, s, m)
    return spec.policy.act(m)


def answer(spec: Spec, model: Any, vec_normalize: Any, frame: pd.DataFrame) -> pd.DataFrame:
    """Each row's battery and socket powers [kW], each row from its own state."""
    times = validate(frame, spec)
    out = np.zeros((len(frame), spec.n_sockets + 1))
    for k in range(len(frame)):
        s = step_state(frame.iloc[k], times[k], spec)
        action = action_of(spec, s, model, vec_normalize)
        a, ev_action, _ = spec.action_map.apply(
            np.asarray(action).reshape(1, -1),
            s.plugged,
            s.soc[None, :],
            s.capacity_kwh[None, :],
            s.required_soc,
            s.departure_steps,
            s.load_kwh,
            s.pv_kwh,
        )
        battery_kw, socket_kw = device_powers(
            a[:, 0], ev_action, s.plugged_mask[None, :], spec.bess_power_kw, spec.socket_power_kw
        )
        out[k, 0], out[k, 1:] = battery_kw[0], socket_kw[0]
    return pd.DataFrame(out, columns=output_columns(spec.n_sockets))


def signature(spec: Spec) -> Any:
    """Named, typed columns: the request's and the response's."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    def kind(col: str) -> str:
        if col in ("time", EXPECTED_SESSIONS):
            return "string"
        return "long" if col == "n_sockets" or col.startswith("plugged_") else "double"

    inputs = Schema([ColSpec(kind(c), c) for c in spec.input_columns()])
    outputs = Schema([ColSpec("double", c) for c in output_columns(spec.n_sockets)])
    return ModelSignature(inputs=inputs, outputs=outputs)


def _requirements() -> list[str]:
    """The pinned packages the model needs (given, not inferred: inference loads the model
    in a subprocess for seconds)."""
    out = []
    for name in ("mlflow", "numpy", "pandas", "torch", "stable-baselines3", "hydra-core"):
        try:
            out.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return out


def log_controller(model: Any, env: Any, agent_target: str, agent: str) -> str | None:
    """Log the run's controller as the pyfunc model ``controller`` of the active run; its
    model URI, or None for a controller that cannot be served (logged as such)."""
    import mlflow

    try:
        spec = build_spec(model, env, agent_target, agent)
    except NotDeployable as exc:
        log.info("no served controller: %s", exc)
        mlflow.set_tag("controller", "not deployable")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {"spec": str(Path(tmp) / "spec.pkl")}
        with open(artifacts["spec"], "wb") as f:
            pickle.dump(spec, f)
        if spec.kind == "learner":
            artifacts["policy"] = str(Path(tmp) / "policy.zip")
            model.save(artifacts["policy"])
            vec_normalize = model.get_vec_normalize_env()
            if vec_normalize is not None:
                artifacts["vecnormalize"] = str(Path(tmp) / "vecnormalize.pkl")
                vec_normalize.save(artifacts["vecnormalize"])
        with warnings.catch_warnings():
            # The signature names and types every column; MLflow still asks for an example.
            warnings.filterwarnings("ignore", message=".*input example was not provided.*")
            info = mlflow.pyfunc.log_model(
                name=MODEL_NAME,
                python_model=ControllerModel(),
                artifacts=artifacts,
                signature=signature(spec),
                pip_requirements=_requirements(),
                metadata={"site": spec.site, "agent": agent, "n_sockets": spec.n_sockets},
            )
    mlflow.set_tag("controller", MODEL_NAME)
    return info.model_uri


# -- requests from a run's timeseries, the registry ----------------------------------------------


def request_frame(timeseries: pd.DataFrame, spec_or_columns: Spec | list[str]) -> pd.DataFrame:
    """The requests a run's controller answered in its evaluation, one row per step, from
    its ``eval_timeseries.csv`` (its ``time`` column or index: the step's start)."""
    columns = (
        spec_or_columns.input_columns() if isinstance(spec_or_columns, Spec) else spec_or_columns
    )
    ts = timeseries.reset_index() if "time" not in timeseries.columns else timeseries
    frame = ts.copy()
    frame["time"] = pd.to_datetime(frame["time"].astype(str), format="ISO8601").map(
        lambda t: t.isoformat()
    )
    n = sum(1 for c in frame.columns if str(c).startswith("plugged_"))
    frame["n_sockets"] = n
    return frame[columns].reset_index(drop=True)


def promote(run_id: str, site: str) -> Any:
    """Register run ``run_id``'s controller as the model ``<site>`` and point the alias
    ``champion`` at the new version; returns the version."""
    import mlflow
    from mlflow.tracking import MlflowClient

    name = REGISTERED_NAME.format(site=site)
    run = MlflowClient().get_run(run_id)
    if run.data.tags.get("site") != site:
        raise PromoteError(
            f"run {run_id} is of site {run.data.tags.get('site')!r}, not {site!r}: "
            f"promote it with site={run.data.tags.get('site')}"
        )
    if run.data.tags.get("controller") != MODEL_NAME:
        raise PromoteError(
            f"run {run_id} ({run.data.tags.get('agent')}, {run.info.status}) logged no served "
            f"controller ({run.data.tags.get('controller', 'none')})"
        )
    version = mlflow.register_model(f"runs:/{run_id}/{MODEL_NAME}", name)
    MlflowClient().set_registered_model_alias(name, CHAMPION, version.version)
    log.info(
        "registered %s version %s (run %s) as %s@%s", name, version.version, run_id, name, CHAMPION
    )
    return version
