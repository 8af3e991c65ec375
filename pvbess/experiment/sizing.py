"""Sizing: what each design of the site emits and costs per year, behind ``python -m pvbess.size``.

    python -m pvbess.size site.bess.capacity_kwh=0,850,1700,3400 site.pv.ac_kw=1670,2500
    python -m pvbess.size site=tiny site.bess.capacity_kwh=0,100 'controllers=[optimal,rbc]'
    python -m pvbess.size ... costs.discount_rate_frac=0.1 n_jobs=2 reward=balanced

Design parameters are given in Hydra's sweep grammar (``a,b,c``, ``range(a,b,step)``,
``choice(...)``), read by Hydra's own OverridesParser; the designs are every
combination. ``site.bess.capacity_kwh``, ``site.bess.power_kw``, ``site.pv.dc_kwp`` and
``site.pv.ac_kw`` are design parameters even with one value; any other ``site.*`` key may
be swept too. Every other override is fixed for all designs and shapes today's design
(``site=...``, ``site.seed=...``, ``reward=...``, default ``reward=co2_only``). Sizing's own
settings (``conf/size.yaml``): ``controllers``, ``n_jobs``, ``report_dir``,
``keep_datasets`` and the ``costs`` group (``costs.<key>=<value>``, ``pvbess.site.costs``).

Today's design (the site as composed, without the design overrides) is always a row: the
reference for the changes and the cost per tonne of CO2 avoided. A battery of 0 kWh is the
design without a battery (its power is set to 0: one row, whatever the power values). A
design the config refuses (``pvbess.config``'s checks: a battery power above its C-rate,
a negative size, ...) or with more inverter AC than PV DC is skipped with the reason; the
sweep goes on.

Each (design, controller) is one evaluation of the evaluation year (``site.seed``) on the
twin (bit-exact with CityLearn, which cannot run a site without a battery), in a process
of its own (``n_jobs`` at once), and an MLflow child run of the sizing's parent run, with
the same ``eval/*`` KPIs as a training run and the design's costs as ``size/*``. The
parent gets the table (``sizing.csv``, ``sizing.md``) and the Pareto plot
(``pareto.png``), also written to the report folder.
"""

from __future__ import annotations

import itertools
import logging
import math
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from pvbess import config
from pvbess.site.costs import CostsConfig, Design, annualized_investment
from pvbess.units import HOURS_PER_YEAR

log = logging.getLogger("pvbess.size")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

# The design parameters the costs price, and their columns in the table.
DESIGN_KEYS = {
    "site.bess.capacity_kwh": "bess_capacity_kwh",
    "site.bess.power_kw": "bess_power_kw",
    "site.pv.dc_kwp": "pv_dc_kwp",
    "site.pv.ac_kw": "pv_ac_kw",
}
# Fixed for every design unless given: the optimum of CO2 alone, evaluated on the twin.
DEFAULTS = {"reward": "co2_only", "env.eval_backend": "twin"}


class SizeError(RuntimeError):
    """The sizing cannot start; the message says why."""


@dataclass
class SizeConfig:
    """``conf/size.yaml``: sizing's own settings; ``<key>=<value>`` overrides one."""

    controllers: list[str] = field(default_factory=lambda: ["optimal"])
    n_jobs: int | None = None  # None: one per core
    report_dir: str | None = None  # None: <root>/reports/size/<site>_<date>_<time>
    keep_datasets: bool = False
    costs: CostsConfig = field(default_factory=CostsConfig)


def register() -> None:
    config.register()
    ConfigStore.instance().store(name="size_schema", node=SizeConfig)


SIZE_KEYS = tuple(f.name for f in SizeConfig.__dataclass_fields__.values())


@dataclass
class Candidate:
    """One design: its swept values, whether it is today's, and why it is skipped."""

    number: int
    values: dict[str, Any]  # the swept keys' values
    today: bool = False
    skipped: str | None = None
    design: Design | None = None
    sizes: dict[str, Any] = field(default_factory=dict)  # every design key's value

    @property
    def label(self) -> str:
        v = {DESIGN_KEYS.get(k, k): x for k, x in (self.sizes | self.values).items()}
        swept = {DESIGN_KEYS.get(k, k) for k in self.values}
        parts = []
        if {"bess_capacity_kwh", "bess_power_kw"} & swept:
            cap, power = v.get("bess_capacity_kwh"), v.get("bess_power_kw")
            parts.append("no battery" if cap == 0 else f"BESS {_num(cap)} kWh/{_num(power)} kW")
        if {"pv_dc_kwp", "pv_ac_kw"} & swept:
            parts.append(f"PV {_num(v.get('pv_dc_kwp'))} kWp/{_num(v.get('pv_ac_kw'))} kW")
        parts += [f"{k}={x}" for k, x in v.items() if k not in DESIGN_KEYS.values()]
        return ", ".join(parts)


def _num(x: Any) -> str:
    return "?" if x is None else f"{float(x):,.0f}"


@dataclass
class Job:
    """One (design, controller) evaluation, everything a worker process needs."""

    number: int
    candidate: int
    controller: str
    label: str
    today: bool
    values: dict[str, Any]
    container: dict[str, Any]  # the run's resolved config
    design: Design
    costs: CostsConfig
    parent_id: str = ""


@dataclass
class Plan:
    """What a sizing will do, checked before anything runs."""

    settings: SizeConfig
    fixed: list[str]
    dimensions: dict[str, list[Any]]
    candidates: list[Candidate]
    jobs: list[Job]
    base: DictConfig  # today's design, agent=<first controller>
    root: Path
    report_dir: Path
    stamp: str
    argv: list[str]

    @property
    def site(self) -> str:
        return str(self.base.site.name)

    @property
    def experiment(self) -> str:
        return str(self.base.tracking.experiment)


def _parse(argv: Sequence[str]) -> tuple[list[str], list[Any], list[Any]]:
    """Split the command line: sizing's settings, design sweeps, fixed overrides."""
    try:
        overrides = OverridesParser.create().parse_overrides(list(argv))
    except HydraException as exc:  # the grammar's message names the override
        raise SizeError(str(exc)) from exc
    own, sweeps, fixed = [], [], []
    for o in overrides:
        key = o.key_or_group
        if key.split(".")[0] in SIZE_KEYS:
            if key == "controllers" and o.is_sweep_override():  # controllers=optimal,rbc
                own.append(f"controllers=[{','.join(o.sweep_string_iterator())}]")
            elif o.is_sweep_override():
                raise SizeError(f"{o.input_line}: {key} is a setting of the sizing, not swept")
            else:
                own.append(str(o.input_line))
        elif o.is_sweep_override() or key in DESIGN_KEYS:
            if not key.startswith("site."):
                raise SizeError(
                    f"{o.input_line}: only site.* values are design parameters "
                    "(one site, one reward per sizing; fixed values apply to every design)"
                )
            sweeps.append(o)
        elif key == "agent":
            raise SizeError(f"{o.input_line}: choose the controllers with controllers=[...]")
        else:
            fixed.append(o)
    return own, sweeps, fixed


def _compose(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides)


def _settings(own: list[str]) -> SizeConfig:
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            node = compose("size", own)
        settings = OmegaConf.to_object(node)
    except (HydraException, OmegaConfBaseException) as exc:
        raise SizeError(f"conf/size.yaml: {exc}") from exc
    assert isinstance(settings, SizeConfig)
    settings.costs.check()
    if not settings.controllers:
        raise SizeError("controllers: name at least one, e.g. controllers=[optimal]")
    if settings.n_jobs is not None and settings.n_jobs < 1:
        raise SizeError(f"n_jobs: must be >= 1, got {settings.n_jobs}")
    return settings


def _dimensions(sweeps: list[Any]) -> dict[str, list[Any]]:
    dims: dict[str, list[Any]] = {}
    for o in sweeps:
        values = list(o.sweep_iterator()) if o.is_sweep_override() else [o.value()]
        if not values:
            raise SizeError(f"{o.input_line}: the sweep is empty")
        dims[o.key_or_group] = values
    if not dims:
        raise SizeError(
            "nothing to size: give design parameters in Hydra's sweep syntax, e.g. "
            "site.bess.capacity_kwh=0,1700,3400 site.pv.ac_kw=1670,2500"
        )
    return dims


def _apply(cfg: DictConfig, values: dict[str, Any]) -> DictConfig:
    """A copy of ``cfg`` with the design's values; a key the config lacks or a value of
    the wrong type is an error of the whole sizing (OmegaConf's message names it)."""
    out = cfg.copy()
    for key, value in values.items():
        if OmegaConf.select(cfg, key, default=KeyError) is KeyError:
            raise SizeError(f"{key}: no such key in the run config (see conf/site/*.yaml)")
        try:
            OmegaConf.update(out, key, value, merge=False)
        except OmegaConfBaseException as exc:
            raise SizeError(f"{key}={value}: {exc}") from exc
    return out


def _normalize(values: dict[str, Any]) -> dict[str, Any]:
    """A battery of 0 kWh is no battery: its power is 0 too (one design, not one per power)."""
    out = dict(values)
    if out.get("site.bess.capacity_kwh") == 0:
        out["site.bess.power_kw"] = 0
    return out


def _check_design(cfg: DictConfig) -> tuple[Design | None, str | None]:
    """The design's parts, or why it is skipped: the config's own checks, then the
    sizing's rule that inverters carry no more AC than the PV's DC."""
    try:
        typed = config.validate(cfg)
    except config.ConfigError as exc:
        return None, str(exc)
    pv, bess = typed.site.pv, typed.site.bess
    if pv.ac_kw > pv.dc_kwp:
        return None, f"site.pv.ac_kw: {pv.ac_kw:g} kW of inverters exceed {pv.dc_kwp:g} kWp of PV"
    return Design(bess.capacity_kwh, bess.power_kw, pv.dc_kwp, pv.ac_kw), None


def make_plan(argv: Sequence[str], now: datetime | None = None) -> Plan:
    """Parse and check everything: settings, costs, every design's config."""
    register()
    own, sweeps, fixed_overrides = _parse(argv)
    settings = _settings(own)
    dims = _dimensions(sweeps)
    given = {o.key_or_group for o in fixed_overrides}
    fixed = [f"{k}={v}" for k, v in DEFAULTS.items() if k not in given]
    fixed += [str(o.input_line) for o in fixed_overrides]
    root, now = Path(config.project_root()), now or datetime.now()
    stamp = f"{now:%Y-%m-%d_%H-%M-%S}"
    try:
        base = _compose([*fixed, f"agent={settings.controllers[0]}"])
        site = str(base.site.name)
        report_dir = Path(settings.report_dir or root / "reports" / "size" / f"{site}_{stamp}")
        with open_dict(base):
            base.paths.data_dir = str(report_dir / "datasets")
            base.paths.output_dir = str(report_dir / "runs")
            if "tracking.experiment" not in given:
                base.tracking.experiment = f"{site}_size"
        agents = {c: _controller_cfg(base, fixed, c) for c in settings.controllers}
    except (HydraException, OmegaConfBaseException) as exc:
        raise SizeError(f"the designs' config does not compose: {exc}") from exc
    if settings.costs.currency != base.site.tariff.currency:
        raise SizeError(
            f"costs.currency: {settings.costs.currency!r} is not the site's tariff currency "
            f"{base.site.tariff.currency!r}: set costs.currency and costs.currency_per_usd"
        )
    candidates = _candidates(base, dims)
    jobs = []
    for cand in candidates:
        if cand.skipped or cand.design is None:
            continue
        for controller, agent_cfg in agents.items():
            cfg = _apply(agent_cfg, cand.values)
            with open_dict(cfg):
                cfg.paths.output_dir = str(report_dir / "runs" / f"{cand.number}_{controller}")
                cfg.tracking.run_name = f"{controller}-design{cand.number}"
            container = OmegaConf.to_container(cfg, resolve=True)
            assert isinstance(container, dict)
            jobs.append(
                Job(
                    number=len(jobs),
                    candidate=cand.number,
                    controller=controller,
                    label=cand.label,
                    today=cand.today,
                    values=cand.values,
                    container=container,
                    design=cand.design,
                    costs=settings.costs,
                )
            )
    return Plan(settings, fixed, dims, candidates, jobs, base, root, report_dir, stamp, list(argv))


def _controller_cfg(base: DictConfig, fixed: list[str], controller: str) -> DictConfig:
    """Today's design run by ``controller`` (an agent preset that does not learn)."""
    from hydra.utils import get_class

    try:
        cfg = _compose([*fixed, f"agent={controller}"])
    except HydraException as exc:
        known = sorted(p.stem for p in (CONF_DIR / "agent").glob("*.yaml"))
        raise SizeError(f"controllers: {controller!r} ({exc}); presets: {known}") from exc
    if getattr(get_class(cfg.agent["_target_"]), "learns", True):
        raise SizeError(
            f"controllers: {controller} learns; sizing runs controllers that do not "
            "(optimal, rbc, mpc, mpc_persistence, mpc_learned, uncontrolled)"
        )
    with open_dict(cfg):
        cfg.paths = base.paths
        cfg.tracking = base.tracking
    return cfg


def _candidates(base: DictConfig, dims: dict[str, list[Any]]) -> list[Candidate]:
    """Every combination of the swept values (today's design first), deduplicated."""
    today = {key: OmegaConf.select(base, key, default=None) for key in dims}
    combos = [today] + [dict(zip(dims, c, strict=True)) for c in itertools.product(*dims.values())]
    seen: dict[tuple[Any, ...], Candidate] = {}
    for values in combos:
        values = _normalize(values)
        token = tuple(float(v) if isinstance(v, int | float) else v for v in values.values())
        if token in seen:
            continue
        cfg = _apply(base, values)
        sizes = {key: OmegaConf.select(cfg, key) for key in DESIGN_KEYS}
        cand = Candidate(number=len(seen), values=values, today=not seen, sizes=sizes)
        cand.design, cand.skipped = _check_design(cfg)
        seen[token] = cand
    return list(seen.values())


# --- one design, in a worker process -------------------------------------------------------
def _init_worker(log_dir: str) -> None:
    """A worker writes its output (HiGHS's banner, warnings, logs) to its own file, so the
    terminal keeps the progress bar; one thread per library, as the designs share the cores."""
    path = Path(log_dir) / f"worker-{os.getpid()}.log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    fmt = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt, stream=sys.stderr, force=True)
    register()


def run_design(job: Job) -> dict[str, Any]:
    """Evaluate one design with one controller in an MLflow child run; return its row."""
    from pvbess.experiment import tracking

    os.environ[tracking.PARENT_ENV] = job.parent_id
    os.environ[tracking.JOB_ENV] = str(job.number)
    row: dict[str, Any] = {
        "design_number": job.candidate,
        "design": job.label,
        "controller": job.controller,
        "today": job.today,
        **asdict(job.design),
        **{k: v for k, v in job.values.items() if k not in DESIGN_KEYS},
    }
    started = time.perf_counter()
    try:
        row |= _evaluate(job)
        row["status"] = "finished"
    except Exception as exc:  # the row says why; the sweep goes on
        log.exception("design %d (%s), %s failed", job.candidate, job.label, job.controller)
        row |= {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
    row["seconds"] = time.perf_counter() - started
    sys.stdout.flush()
    return row


def _evaluate(job: Job) -> dict[str, Any]:
    import mlflow
    from hydra.utils import instantiate

    from pvbess.experiment import checks, evaluation, tracking
    from pvbess.experiment.run import agent_name
    from pvbess.site import dataset

    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    cfg = OmegaConf.merge(OmegaConf.structured(config.TrainConfig), job.container)
    assert isinstance(cfg, DictConfig)
    typed = config.validate(cfg)
    data = dataset.build(typed.site, cfg.paths.data_dir)
    seconds = {"build": lap()}
    with tracking.start_run(cfg, data.data_hash, agent_name(cfg)) as run:
        tracking.log_config(cfg)
        mlflow.set_tags(
            {"kind": "design", "design": job.label, "today_design": str(job.today).lower()}
        )
        envs = instantiate(cfg.env)(
            dataset=data,
            reward=typed.reward,
            learns=False,
            seed=cfg.seed,
            data_dir=cfg.paths.data_dir,
            learning_curve=False,
        )
        mlflow.set_tags(envs.tags)
        seconds["start_run"] = lap()
        model = instantiate(cfg.agent, _convert_="all")(env=envs.train, seed=cfg.seed, device="cpu")
        seconds["controller"] = lap()  # the optimum's solve, for agent=optimal
        result = evaluation.evaluate(envs.evaluate, model, seed=cfg.seed, progress=False)
        seconds["evaluate"] = lap()
        checked = {f"eval/{k}": v for k, v in result.kpis.items()}
        mlflow.log_metrics(checked)
        if hasattr(model, "metrics"):  # the optimum's lp/*, the MPC's mpc/*
            own = model.metrics(result.timeseries)
            mlflow.log_metrics(own)
            checked |= own
        checks.act(checked)
        figures = annual_figures(result.kpis, job.design, job.costs)
        mlflow.log_metrics({f"size/{k}": v for k, v in figures.items()})
        seconds["log"] = lap()
        mlflow.log_metrics({f"time/size_{k}_seconds": v for k, v in seconds.items()})
        log.info(
            "design %d (%s), %s: %s",
            job.candidate,
            job.label,
            job.controller,
            ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()),
        )
        return figures | {"run_id": run.info.run_id, "data_hash": data.data_hash}


def annual_figures(kpis: dict[str, float], design: Design, costs: CostsConfig) -> dict[str, float]:
    """A year's figures from an evaluation's KPIs (annualized from its period) and the
    design's annualized investment [kg, kWh, currency, cycles per year]."""
    per_yr = HOURS_PER_YEAR / kpis["hours"]
    cycles_per_yr = kpis["battery_equivalent_cycles"] * per_yr
    inv = annualized_investment(design, costs, cycles_per_yr)
    energy_cost = kpis["cost"] * per_yr
    return {
        "co2_kg_per_yr": kpis["co2_kg"] * per_yr,
        "grid_import_kwh_per_yr": kpis["grid_import_kwh"] * per_yr,
        "pv_curtailed_kwh_per_yr": kpis["pv_curtailed_kwh"] * per_yr,
        "peak_import_kw": kpis["peak_import_kw"],
        "ev_unmet_kwh_per_yr": kpis["ev_unmet_kwh"] * per_yr,
        "bess_cycles_per_yr": cycles_per_yr,
        "bess_life_yr": inv.bess_life_yr,
        "energy_cost_per_yr": energy_cost,
        "investment_bess_per_yr": inv.bess_per_yr,
        "investment_inverter_per_yr": inv.inverter_per_yr,
        "investment_pv_per_yr": inv.pv_per_yr,
        "investment_per_yr": inv.total_per_yr,
        "total_cost_per_yr": energy_cost + inv.total_per_yr,
    }


# --- the table, the front, the plot --------------------------------------------------------
def pareto_front(co2: Any, cost: Any, rel_tol: float = 1e-6) -> np.ndarray:
    """True for the points no other point dominates (as low or lower in both, lower in one).

    Differences below ``rel_tol`` of the largest value count as ties: two designs whose
    optimum emits the same CO2 up to the solver's rounding differ only in cost.
    """
    co2, cost = np.asarray(co2, dtype=float), np.asarray(cost, dtype=float)
    tol_co2 = rel_tol * max(np.abs(co2).max(initial=0.0), 1e-12)
    tol_cost = rel_tol * max(np.abs(cost).max(initial=0.0), 1e-12)
    # [i, j]: j is as good as i in both (within tolerance), and better in one.
    le = (co2[None, :] <= co2[:, None] + tol_co2) & (cost[None, :] <= cost[:, None] + tol_cost)
    lt = (co2[None, :] < co2[:, None] - tol_co2) | (cost[None, :] < cost[:, None] - tol_cost)
    return ~np.any(le & lt, axis=1)


def table(rows: pd.DataFrame) -> pd.DataFrame:
    """Per controller: change in CO2 vs today's design, cost per tonne avoided, the front."""
    out = rows.copy()
    for col in ("co2_change_vs_today_pct", "cost_per_t_co2_avoided"):
        out[col] = np.nan
    out["pareto"] = False
    out["co2_t_per_yr"] = out["co2_kg_per_yr"] / 1e3
    for _, group in out[out["status"] == "finished"].groupby("controller"):
        today = group[group["today"]]
        if len(today):
            ref = today.iloc[0]
            avoided_t = (ref["co2_kg_per_yr"] - group["co2_kg_per_yr"]) / 1e3
            out.loc[group.index, "co2_change_vs_today_pct"] = (
                group["co2_kg_per_yr"] / ref["co2_kg_per_yr"] - 1.0
            ) * 100.0
            extra = group["total_cost_per_yr"] - ref["total_cost_per_yr"]
            # Only where CO2 falls: a cost per tonne of CO2 that rises means nothing.
            out.loc[group.index, "cost_per_t_co2_avoided"] = (extra / avoided_t).where(
                avoided_t > 1e-9
            )
        front = pareto_front(group["co2_kg_per_yr"], group["total_cost_per_yr"])
        out.loc[group.index, "pareto"] = front
    return out.sort_values(["controller", "co2_kg_per_yr"], kind="stable")


COLUMNS = {
    "design": "design",
    "controller": "controller",
    "co2_t_per_yr": "CO2 [t/yr]",
    "co2_change_vs_today_pct": "vs today [%]",
    "grid_import_kwh_per_yr": "import [MWh/yr]",
    "energy_cost_per_yr": "energy cost [k{c}/yr]",
    "investment_per_yr": "investment [k{c}/yr]",
    "total_cost_per_yr": "total [k{c}/yr]",
    "cost_per_t_co2_avoided": "{c}/t CO2 avoided",
    "bess_cycles_per_yr": "cycles/yr",
    "pareto": "front",
}


def markdown(t: pd.DataFrame, skipped: list[Candidate], currency: str, note: str) -> str:
    """The table as Markdown (MWh, thousands of the currency), then the skipped designs."""
    done = t[t["status"] == "finished"].copy()
    shown = pd.DataFrame(
        {
            "design": [
                ("**today** " if x else "") + d
                for d, x in zip(done["design"], done["today"], strict=True)
            ],
            "controller": done["controller"],
            "CO2 [t/yr]": done["co2_t_per_yr"].map(lambda x: f"{x:,.1f}"),
            "vs today [%]": done["co2_change_vs_today_pct"].map(_pct),
            "import [MWh/yr]": (done["grid_import_kwh_per_yr"] / 1e3).map(lambda x: f"{x:,.1f}"),
            f"energy cost [k{currency}/yr]": (done["energy_cost_per_yr"] / 1e3).map(_k),
            f"investment [k{currency}/yr]": (done["investment_per_yr"] / 1e3).map(_k),
            f"total [k{currency}/yr]": (done["total_cost_per_yr"] / 1e3).map(_k),
            f"{currency}/t CO2 avoided": done["cost_per_t_co2_avoided"].map(_per_t),
            "cycles/yr": done["bess_cycles_per_yr"].map(lambda x: f"{x:,.0f}"),
            "front": done["pareto"].map(lambda x: "*" if x else ""),
        }
    )
    lines = [note, "", shown.to_markdown(index=False, disable_numparse=True), ""]
    failed = t[t["status"] != "finished"]
    if len(failed):
        lines += ["Failed:", ""]
        lines += [f"- {r.design} ({r.controller}): {r.reason}" for r in failed.itertuples()]
        lines.append("")
    if skipped:
        lines += ["Skipped (a rule broken):", ""]
        lines += [f"- {c.label}: {c.skipped}" for c in skipped]
        lines.append("")
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "" if not math.isfinite(x) else f"{x:+.2f}"


def _k(x: float) -> str:
    return f"{x:,.1f}"


def _per_t(x: float) -> str:
    return "" if not math.isfinite(x) else f"{x:,.0f}"


def plot(t: pd.DataFrame, currency: str, title: str, path: Path) -> Path:
    """CO2 vs total annual cost per design; the front highlighted, today's design marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = t[t["status"] == "finished"]
    big = done["total_cost_per_yr"].abs().max() >= 1e6 if len(done) else False
    scale, prefix = (1e6, "M") if big else (1e3, "k")
    fig, ax = plt.subplots(figsize=(9, 6))
    markers = itertools.cycle("osD^v<>")
    for (controller, group), marker in zip(done.groupby("controller"), markers, strict=False):
        x, y = group["total_cost_per_yr"] / scale, group["co2_kg_per_yr"] / 1e3
        ax.scatter(x, y, marker=marker, s=22, alpha=0.5, label=f"{controller}: designs")
        front = group[group["pareto"]].sort_values("total_cost_per_yr")
        ax.plot(
            front["total_cost_per_yr"] / scale,
            front["co2_kg_per_yr"] / 1e3,
            marker=marker,
            lw=2,
            label=f"{controller}: Pareto front",
        )
        for r in group[group["today"]].itertuples():
            ax.scatter(
                [r.total_cost_per_yr / scale],
                [r.co2_kg_per_yr / 1e3],
                marker="*",
                s=260,
                c="red",
                edgecolors="k",
                zorder=5,
                label=f"{controller}: today's design",
            )
    ax.set_xlabel(f"total annual cost: energy + annualized investment [{prefix}{currency}/yr]")
    ax.set_ylabel("CO2 [t/yr]")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# --- the whole sizing -----------------------------------------------------------------------
def run(plan: Plan, progress: bool = True) -> int:
    """Run every job, write and log the report; 0 if every job finished, 1 if some failed
    (the others are in the table), 130 on Ctrl-C."""
    from tqdm.auto import tqdm

    from pvbess.experiment import sweep

    plan.report_dir.mkdir(parents=True, exist_ok=True)
    (exp_id,) = sweep.prepare_store(plan.base, [plan.experiment]).values()
    parent_id = _start_parent(plan, exp_id)
    skipped = [c for c in plan.candidates if c.skipped]
    for cand in skipped:
        log.warning("skipped design %d (%s): %s", cand.number, cand.label, cand.skipped)
    n_jobs = plan.settings.n_jobs or os.cpu_count() or 1
    log.info(
        "%d designs (%d skipped) x %d controllers = %d runs, %d at once; MLflow parent run %s "
        "(experiment %s); report %s",
        len(plan.candidates),
        len(skipped),
        len(plan.settings.controllers),
        len(plan.jobs),
        n_jobs,
        parent_id,
        plan.experiment,
        plan.report_dir,
    )
    log_dir = plan.report_dir / "logs"
    log_dir.mkdir(exist_ok=True)
    rows: list[dict[str, Any]] = []
    status, code, started = "FAILED", 1, time.perf_counter()
    pool = ProcessPoolExecutor(
        max_workers=min(n_jobs, max(len(plan.jobs), 1)),
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(str(log_dir),),
    )
    try:
        futures: dict[Future[dict[str, Any]], Job] = {}
        for job in plan.jobs:
            job.parent_id = parent_id
            futures[pool.submit(run_design, job)] = job
        bar = tqdm(total=len(futures), desc="designs", unit="run", disable=not progress)
        with bar:
            for future in as_completed(futures):
                job = futures[future]
                try:
                    row = future.result()
                except Exception as exc:  # the worker process died
                    row = {"design": job.label, "controller": job.controller, "today": job.today}
                    row |= {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
                rows.append(row)
                bar.set_postfix_str(f"{job.controller}: {job.label}"[:60])
                bar.update(1)
        pool.shutdown()
        wall_s = time.perf_counter() - started
        frame = table(pd.DataFrame(rows))
        _report(plan, frame, skipped, parent_id, wall_s)
        failed = int((frame["status"] != "finished").sum())
        status, code = ("FINISHED", 0) if not failed else ("FAILED", 1)
        if failed:
            log.error("%d of %d runs failed: see %s", failed, len(frame), log_dir)
    except KeyboardInterrupt:
        pool.shutdown(wait=False, cancel_futures=True)
        status, code = "KILLED", 130
    finally:
        sweep.end_parent(parent_id, [exp_id], status=status)
        if not plan.settings.keep_datasets:
            shutil.rmtree(plan.report_dir / "datasets", ignore_errors=True)
    return code


def _start_parent(plan: Plan, exp_id: str) -> str:
    from pvbess.experiment import sweep

    costs = asdict(plan.settings.costs)
    params = {
        "overrides": " ".join(plan.argv),
        "fixed": " ".join(plan.fixed),
        "size": len(plan.jobs),
        "designs": len(plan.candidates),
        "skipped": sum(bool(c.skipped) for c in plan.candidates),
        "controllers": ",".join(plan.settings.controllers),
        **{f"space.{k}": ",".join(map(str, v)) for k, v in plan.dimensions.items()},
        **{f"costs.{k}": v for k, v in costs.items()},
    }
    tags = {
        "kind": "sizing",
        "report_dir": str(plan.report_dir),
        "mlflow.note.content": "python -m pvbess.size " + " ".join(plan.argv),
    }
    return sweep.start_parent(plan.base, exp_id, f"size-{plan.site}-{plan.stamp}", params, tags)


def _report(
    plan: Plan, frame: pd.DataFrame, skipped: list[Candidate], parent_id: str, wall_s: float
) -> None:
    """sizing.csv, sizing.md, skipped.csv and pareto.png: to the folder and the parent run."""
    from mlflow.tracking import MlflowClient

    from pvbess.experiment import sweep

    out, currency = plan.report_dir, plan.settings.costs.currency
    frame.to_csv(out / "sizing.csv", index=False)
    pd.DataFrame(
        [{"design": c.label, **c.values, "reason": c.skipped} for c in skipped],
        columns=["design", *plan.dimensions, "reason"],
    ).to_csv(out / "skipped.csv", index=False)
    finished = int((frame["status"] == "finished").sum())
    note = (
        f"Sizing of {plan.site}: `python -m pvbess.size {' '.join(plan.argv)}` "
        f"(fixed: {' '.join(plan.fixed)}); {len(plan.candidates)} designs, {len(skipped)} "
        f"skipped, {finished} runs in {wall_s:.0f} s. Costs in {currency} per year; "
        "changes and cost per tonne avoided vs today's design under the same controller; "
        "front: on the Pareto front of CO2 and total annual cost."
    )
    (out / "sizing.md").write_text(markdown(frame, skipped, currency, note))
    plot(frame, currency, f"{plan.site}: CO2 vs total annual cost per design", out / "pareto.png")
    client = MlflowClient()
    for name in ("sizing.csv", "sizing.md", "skipped.csv", "pareto.png"):
        client.log_artifact(parent_id, str(out / name))
    client.log_batch(
        parent_id,
        metrics=[
            sweep.metric("size/wall_seconds", wall_s),
            sweep.metric("size/seconds_per_run", wall_s / max(len(frame), 1)),
        ],
        synchronous=True,
    )
    log.info(
        "table %s, plot %s (%.0f s for %d runs)",
        out / "sizing.md",
        out / "pareto.png",
        wall_s,
        len(frame),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args):
        print(__doc__)
        return 0
    fmt = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"
    logging.basicConfig(level=logging.INFO, format=fmt)
    try:
        plan = make_plan(args)
        plan.report_dir.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(plan.report_dir / "size.log")
        handler.setFormatter(logging.Formatter(fmt))
        logging.getLogger().addHandler(handler)
        return run(plan)
    except Exception as exc:
        from pvbess.experiment import cli

        if not (isinstance(exc, SizeError) or cli.user_error(exc)):
            raise  # a bug: its traceback
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
