"""Hyperparameter search with Optuna (TPE): ``python -m pvbess.tune hparams_search=ppo_optuna``.

    python -m pvbess.tune hparams_search=ppo_optuna site=tiny total_timesteps=20000
    python -m pvbess.tune hparams_search=sac_optuna tune.n_trials=50 tune.n_jobs=2
    python -m pvbess.tune hparams_search=a2c_optuna 'agent.gamma=interval(0.95,0.999)'

``conf/hparams_search/<name>.yaml`` names the agent, the objective (a KPI of the
evaluation, default ``reward_total_mean``, the figure ``pvbess.train.main``
returns) and its direction, the number of trials and the search space, written
in Hydra's sweep grammar: ``interval(a,b)`` (float), ``int(interval(a,b))``,
``tag(log,interval(a,b))`` (log scale), ``choice(a,b,...)``, ``range(a,b,step)``.
On the command line, ``tune.<key>=<value>`` changes a setting of that file, an
override with a sweep value adds (or replaces) a dimension, and any other
override is fixed for every trial (and removes a dimension of the same key).

Each trial is ``python -m pvbess.train`` in its own process (up to
``tune.n_jobs`` at once), an MLflow child run of the search's parent run; its
objective is read from the trial's ``result.json``. The study lives in
``<root>/mlruns/optuna.db`` beside the MLflow store (``tune.storage=<url>`` for
another); ``tune.study_name=<name>`` continues a study with the same overrides
and space. At the end the best trial's parameters are logged on the parent
(``best.<key>`` params, ``best/<objective>`` metric) and written as an agent
preset, ``<root>/conf/agent/<agent>_tuned.yaml``: ``agent=<agent>_tuned``.

Why not Hydra's Optuna sweeper: hydra-optuna-sweeper 1.3.0 requires
optuna<3, whose SQLite storage fails under SQLAlchemy 2 (which MLflow 3
requires), so its studies could only live in memory and die with the process.
This runs on current Optuna with a persistent study.
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import optuna
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import (
    ChoiceSweep,
    IntervalSweep,
    Override,
    RangeSweep,
)
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.trial import TrialState

from pvbess import config, sweep

log = logging.getLogger("pvbess.tune")

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
SEARCH_GROUP = "hparams_search"
RESULT_FILE = "result.json"
Primitive = None | bool | int | float | str


class TuneError(RuntimeError):
    """The search cannot start or produced no result; the message says why."""


@dataclass
class SamplerConfig:
    seed: int | None = 0
    n_startup_trials: int = 10
    multivariate: bool = True


@dataclass
class SearchConfig:
    """A ``conf/hparams_search/*.yaml`` file; ``tune.<key>=<value>`` overrides it."""

    agent: str = MISSING
    objective: str = "reward_total_mean"  # a key of the evaluation's KPIs (result.json)
    direction: str = "maximize"  # or minimize
    n_trials: int = 20  # trials to run now (a continued study adds these)
    n_jobs: int = 1  # trials at once, each a process
    study_name: str | None = None  # None: <search>-<site>-<date>_<time>; an existing one continues
    storage: str | None = None  # None: sqlite:///<root>/mlruns/optuna.db
    preset: str | None = None  # None: <agent>_tuned; "": write none
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    params: dict[str, str] = field(default_factory=dict)

    def check(self) -> None:
        if self.direction not in ("maximize", "minimize"):
            raise TuneError(f"tune.direction: must be maximize or minimize, got {self.direction!r}")
        if self.n_trials < 1 or self.n_jobs < 1:
            raise TuneError("tune.n_trials and tune.n_jobs must be >= 1")


def format_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back (strings quoted)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, list | tuple):
        return "[" + ",".join(format_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{format_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {value!r} as an override")


@dataclass(frozen=True)
class Dimension:
    """One searched key: its Optuna distribution and how a sampled value is passed on."""

    key: str  # as in an override, with a +/++ prefix if it adds the key
    spec: str  # the sweep as written: interval(...), choice(...), ...
    distribution: BaseDistribution
    # Categorical choices that Optuna cannot hold (lists, dicts) are labelled
    # by their override text; the label maps back to the value.
    values: dict[Primitive, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.key.lstrip("+")

    def value(self, sampled: Any) -> Any:
        return self.values.get(sampled, sampled)

    def override(self, sampled: Any) -> str:
        return f"{self.key}={format_value(self.value(sampled))}"


def dimension(override: Override) -> Dimension:
    """The distribution of one sweep override (the grammar of hydra-optuna-sweeper)."""
    sweep_value = override.value()
    key, spec = override.get_key_element(), str(override.input_line).partition("=")[2]
    if isinstance(sweep_value, ChoiceSweep):
        values: dict[Primitive, Any] = {}
        labels: list[Primitive] = []
        for v in sweep_value.list:
            label = v if v is None or isinstance(v, bool | int | float | str) else format_value(v)
            values[label] = v
            labels.append(label)
        return Dimension(key, spec, CategoricalDistribution(labels), values)
    if isinstance(sweep_value, RangeSweep):
        start, stop, step = sweep_value.start, sweep_value.stop, sweep_value.step
        assert start is not None and stop is not None
        n = math.ceil((stop - start) / step)
        if n < 1:
            raise TuneError(f"{override.input_line}: the range is empty")
        last = start + (n - 1) * step
        if all(isinstance(x, int) for x in (start, stop, step)):
            return Dimension(key, spec, IntDistribution(int(start), int(last), step=int(step)))
        return Dimension(key, spec, FloatDistribution(float(start), float(last), step=float(step)))
    if isinstance(sweep_value, IntervalSweep):
        log_scale = "log" in sweep_value.tags
        lo, hi = sweep_value.start, sweep_value.end
        assert lo is not None and hi is not None
        if isinstance(lo, int) and isinstance(hi, int):
            return Dimension(key, spec, IntDistribution(lo, hi, log=log_scale))
        return Dimension(key, spec, FloatDistribution(float(lo), float(hi), log=log_scale))
    raise TuneError(
        f"{override.input_line}: use interval(), int(interval()), tag(log, interval()), "
        "choice() or range() for a searched key"
    )


@dataclass
class Plan:
    """What a search will do, checked before anything runs."""

    name: str
    search: SearchConfig
    dimensions: dict[str, Dimension]
    fixed: list[str]  # overrides every trial gets, agent=<agent> first
    cfg: DictConfig  # the composed config of the trials, without the searched values
    root: Path
    study_dir: Path
    argv: list[str]

    @property
    def preset_name(self) -> str | None:
        if self.search.preset == "":
            return None
        return self.search.preset or f"{self.search.agent}_tuned"

    def space(self) -> dict[str, str]:
        return {d.key: d.spec for d in self.dimensions.values()}


def parse_argv(argv: Sequence[str]) -> tuple[str, list[str], list[str]]:
    """-> (search name, tune.* overrides without the prefix, the trials' overrides)."""
    name, tune_overrides, rest = None, [], []
    for arg in argv:
        if arg.startswith(f"{SEARCH_GROUP}="):
            name = arg.partition("=")[2]
        elif arg.startswith("tune."):
            tune_overrides.append(arg.removeprefix("tune."))
        else:
            rest.append(arg)
    if not name:
        known = sorted(p.stem for p in (CONF_DIR / SEARCH_GROUP).glob("*.yaml"))
        raise TuneError(f"name the search: {SEARCH_GROUP}=<{'|'.join(known)}>")
    return name, tune_overrides, rest


def load_search(name: str, tune_overrides: list[str]) -> SearchConfig:
    path = CONF_DIR / SEARCH_GROUP / f"{name}.yaml"
    if not path.is_file():
        raise TuneError(f"{SEARCH_GROUP}={name}: no such file {path}")
    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(SearchConfig),
            OmegaConf.load(path),
            OmegaConf.from_dotlist(tune_overrides),
        )
        search = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:  # omegaconf's errors name the key
        raise TuneError(f"{path.name} / tune.*: {exc}") from exc
    assert isinstance(search, SearchConfig)
    search.check()
    return search


def compose_train(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def make_plan(argv: Sequence[str], now: datetime | None = None) -> Plan:
    """Parse and check everything: the search file, the overrides, one trial's config."""
    config.register()
    name, tune_overrides, rest = parse_argv(argv)
    search = load_search(name, tune_overrides)
    parser = OverridesParser.create()
    dims: dict[str, Dimension] = {}
    for key, spec in search.params.items():
        dim = dimension(parser.parse_override(f"{key}={spec}"))
        dims[dim.name] = dim
    fixed = [f"agent={search.agent}"]
    for o in parser.parse_overrides(rest):
        if o.key_or_group == "agent" and not o.is_sweep_override():
            if o.value() != search.agent:
                raise TuneError(
                    f"{o.input_line}: {SEARCH_GROUP}={name} searches agent={search.agent}"
                )
            continue
        if o.key_or_group in ("hydra.run.dir", "tracking.run_name"):
            raise TuneError(f"{o.input_line}: set by pvbess.tune for each trial")
        if o.is_sweep_override():
            dim = dimension(o)
            dims[dim.name] = dim
        else:
            dims.pop(o.key_or_group, None)
            fixed.append(str(o.input_line))
    if not dims:
        raise TuneError("nothing to search: the search space is empty")
    root = Path(config.project_root())
    now = now or datetime.now()
    study_dir = root / "multirun" / f"{now:%Y-%m-%d}" / f"{now:%H-%M-%S}_{name}"
    try:
        cfg = compose_train([*fixed, f"paths.output_dir={format_value(str(study_dir))}"])
        # One trial's config, at the low end of every dimension: keys exist, values check.
        low = [d.override(_low(d.distribution)) for d in dims.values()]
        config.validate(compose_train([*fixed, *low, "paths.output_dir=/nonexistent"]))
    except (HydraException, OmegaConfBaseException, config.ConfigError) as exc:
        raise TuneError(f"the trials' config does not compose: {exc}") from exc
    return Plan(name, search, dims, fixed, cfg, root, study_dir, list(argv))


def _low(dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    assert isinstance(dist, IntDistribution | FloatDistribution)
    return dist.low


@dataclass
class TrialOutcome:
    number: int
    value: float | None  # None: the trial failed
    reason: str = ""
    seconds: float = 0.0


class Trials:
    """Runs trials as ``python -m pvbess.train`` processes and stops them on demand."""

    def __init__(self, plan: Plan, parent_id: str, signals: list[int]) -> None:
        self.plan = plan
        self.parent_id = parent_id
        self.signals = signals  # the stop signals received (see interrupts())
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._lock = threading.Lock()

    def directory(self, number: int) -> Path:
        c = self.plan.cfg
        return self.plan.study_dir / f"{number}_{self.plan.search.agent}-{c.reward.name}-s{c.seed}"

    def command(self, number: int, overrides: list[str]) -> list[str]:
        c = self.plan.cfg
        run_name = f"{self.plan.search.agent}-{c.reward.name}-s{c.seed}-t{number}"
        return [
            sys.executable,
            "-m",
            "pvbess.train",
            *self.plan.fixed,
            *overrides,
            f"hydra.run.dir={format_value(str(self.directory(number)))}",
            f"tracking.run_name={format_value(run_name)}",
        ]

    def env(self, number: int) -> dict[str, str]:
        env = dict(os.environ)
        env[sweep.PARENT_ENV] = self.parent_id
        env[sweep.JOB_ENV] = str(number)
        n_jobs = self.plan.search.n_jobs
        if n_jobs > 1:  # as joblib does: share the cores, no oversubscription
            threads = str(max(1, (os.cpu_count() or 1) // n_jobs))
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env.setdefault(var, threads)
        return env

    def run(self, number: int, overrides: list[str]) -> TrialOutcome:
        start = time.perf_counter()
        trial_dir = self.directory(number)
        trial_dir.mkdir(parents=True, exist_ok=True)
        out = trial_dir / "stdout.log"
        with out.open("wb") as sink:
            proc = subprocess.Popen(
                self.command(number, overrides),
                env=self.env(number),
                stdout=sink,
                stderr=subprocess.STDOUT,
            )
            with self._lock:
                self._procs[number] = proc
            try:
                code = proc.wait()
            finally:
                with self._lock:
                    self._procs.pop(number, None)
        seconds = time.perf_counter() - start
        if code != 0:
            tail = out.read_text(errors="replace").strip().splitlines()[-15:]
            return TrialOutcome(
                number, None, f"exit {code}; {out}:\n  " + "\n  ".join(tail), seconds
            )
        return self._objective(number, trial_dir, seconds)

    def _objective(self, number: int, trial_dir: Path, seconds: float) -> TrialOutcome:
        objective = self.plan.search.objective
        try:
            kpis = json.loads((trial_dir / RESULT_FILE).read_text())["kpis"]
        except (OSError, ValueError, KeyError) as exc:
            return TrialOutcome(
                number, None, f"no KPIs in {trial_dir / RESULT_FILE}: {exc}", seconds
            )
        if objective not in kpis:
            known = ", ".join(sorted(kpis))
            return TrialOutcome(number, None, f"no KPI {objective!r} (known: {known})", seconds)
        value = float(kpis[objective])
        if not math.isfinite(value):
            return TrialOutcome(number, None, f"{objective} = {value}", seconds)
        return TrialOutcome(number, value, "", seconds)

    def stop(self, grace_s: float = 60.0) -> None:
        """Pass a stop on to every running trial (it saves a checkpoint); kill stragglers."""
        sig = self.signals[0] if self.signals else signal.SIGINT
        log.warning("stopped (%s): stopping the running trials", signal.Signals(sig).name)
        with self._lock:
            procs = list(self._procs.values())
        for proc in procs:
            if proc.poll() is None and sig != signal.SIGINT:  # Ctrl-C reached them already
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("trial process %d did not stop: killing it", proc.pid)
                proc.kill()
                proc.wait()


@contextmanager
def interrupts() -> Iterator[list[int]]:
    """SIGTERM becomes KeyboardInterrupt; yields the list the signal received is put in."""
    received: list[int] = []

    def on_term(signum: int, frame: FrameType | None) -> None:
        received.append(signum)
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield received
    finally:
        signal.signal(signal.SIGTERM, previous)


def storage_url(plan: Plan) -> str:
    if plan.search.storage:
        return plan.search.storage
    path = plan.root / "mlruns" / "optuna.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def open_study(plan: Plan, storage: str) -> optuna.Study:
    """A new study, or the named one if it exists and searches the same way."""
    s = plan.search.sampler
    sampler = optuna.samplers.TPESampler(
        seed=s.seed,
        n_startup_trials=s.n_startup_trials,
        multivariate=s.multivariate,
        constant_liar=plan.search.n_jobs > 1,
    )
    started = f"{plan.study_dir.parent.name}_{plan.study_dir.name.split('_')[0]}"
    name = plan.search.study_name or f"{plan.name}-{plan.cfg.site.name}-{started}"
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        direction=optuna.study.StudyDirection[plan.search.direction.upper()],
        load_if_exists=True,
    )
    attrs = {
        "fixed_overrides": plan.fixed,
        "space": plan.space(),
        "objective": plan.search.objective,
    }
    if not study.trials and not study.user_attrs:
        for k, v in attrs.items():
            study.set_user_attr(k, v)
    else:
        for k, v in attrs.items():
            if study.user_attrs.get(k) != v:
                raise TuneError(
                    f"study {name!r} in {storage} was run with {k} = {study.user_attrs.get(k)!r}, "
                    f"not {v!r}: its trials are not comparable; choose another tune.study_name"
                )
        if study.direction.name.lower() != plan.search.direction:
            raise TuneError(
                f"study {name!r} {study.direction.name.lower()}s, not {plan.search.direction}"
            )
    return study


def start_parent(plan: Plan, study: optuna.Study, storage: str) -> tuple[str, str]:
    """The search's parent run in the trials' experiment -> (run id, experiment id)."""
    ids = sweep.prepare_store(plan.cfg, [sweep.experiment_name(plan.cfg)])
    exp_id = next(iter(ids.values()))
    s = plan.search
    params: dict[str, Any] = {
        "overrides": " ".join([*plan.fixed, *(f"{k}={v}" for k, v in plan.space().items())]),
        "size": s.n_trials,
        "search": plan.name,
        "objective": s.objective,
        "direction": s.direction,
        "n_jobs": s.n_jobs,
        "study": study.study_name,
        "sampler": "TPESampler",
        "sampler.seed": s.sampler.seed,
        "sampler.n_startup_trials": s.sampler.n_startup_trials,
        "sampler.multivariate": s.sampler.multivariate,
        **{f"space.{k}": v for k, v in plan.space().items()},
    }
    tags = {
        "kind": "search",
        "study_name": study.study_name,
        "optuna_storage": storage,
        "sweep_dir": str(plan.study_dir),
        "mlflow.note.content": "python -m pvbess.tune " + " ".join(plan.argv),
    }
    run_name = (
        f"search-{plan.name}-{plan.study_dir.parent.name}_{plan.study_dir.name.split('_')[0]}"
    )
    return sweep.start_parent(plan.cfg, exp_id, run_name, params, tags), exp_id


def run(plan: Plan) -> int:
    """Run the search; 0 when at least one trial finished, 1 when none did, 130 on a stop."""
    plan.study_dir.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(plan.study_dir / "tune.log")
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(levelname)s] %(message)s"))
    logging.getLogger().addHandler(handler)
    storage = storage_url(plan)
    study = open_study(plan, storage)
    parent_id, exp_id = start_parent(plan, study, storage)
    log.info(
        "study %r (%s, %d trials so far) in %s; MLflow parent run %s; trials in %s",
        study.study_name,
        plan.search.direction,
        len(study.trials),
        storage,
        parent_id,
        plan.study_dir,
    )
    pending: dict[int, optuna.trial.Trial] = {}  # asked, not yet told
    status, code = "FINISHED", 0
    with interrupts() as received:
        trials = Trials(plan, parent_id, received)
        try:
            done = optimize(plan, study, trials, parent_id, pending)
            if not done:
                status, code = "FAILED", 1
                log.error("no trial finished: see the trials' stdout.log under %s", plan.study_dir)
            else:
                finish(plan, study, parent_id, exp_id)
        except KeyboardInterrupt:  # the trials were stopped in optimize()
            status, code = "KILLED", 130
        except Exception as exc:
            from mlflow.tracking import MlflowClient

            MlflowClient().set_tag(parent_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
            status, code = "FAILED", 1
            raise
        finally:
            for trial in pending.values():
                study.tell(trial, state=TrialState.FAIL)
            sweep.end_parent(parent_id, [exp_id], status=status)
            logging.getLogger().removeHandler(handler)
            handler.close()
    return code


def optimize(
    plan: Plan,
    study: optuna.Study,
    trials: Trials,
    parent_id: str,
    pending: dict[int, optuna.trial.Trial],
) -> int:
    """Ask, run, tell until n_trials ran; return how many finished.

    ``pending`` holds the trials asked and not told yet, for the caller to fail on a stop.
    """
    with ThreadPoolExecutor(max_workers=plan.search.n_jobs, thread_name_prefix="trial") as pool:
        try:
            return _ask_run_tell(plan, study, trials, parent_id, pending, pool)
        except KeyboardInterrupt:
            trials.stop()  # before leaving the pool, which waits for the running trials
            raise


def _ask_run_tell(
    plan: Plan,
    study: optuna.Study,
    trials: Trials,
    parent_id: str,
    pending: dict[int, optuna.trial.Trial],
    pool: ThreadPoolExecutor,
) -> int:
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    dists = {d.name: d.distribution for d in plan.dimensions.values()}
    n_trials, n_jobs, objective = plan.search.n_trials, plan.search.n_jobs, plan.search.objective
    asked, finished = 0, 0
    running: dict[Future[TrialOutcome], optuna.trial.Trial] = {}
    while asked < n_trials or running:
        while asked < n_trials and len(running) < n_jobs:
            trial = study.ask(dists)
            pending[trial.number] = trial
            asked += 1
            overrides = [plan.dimensions[k].override(v) for k, v in trial.params.items()]
            trial.set_user_attr("overrides", overrides)
            trial.set_user_attr("trial_dir", str(trials.directory(trial.number)))
            log.info("trial %d: %s", trial.number, " ".join(overrides))
            running[pool.submit(trials.run, trial.number, overrides)] = trial
        completed, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in completed:
            trial = running.pop(future)
            outcome = future.result()
            del pending[trial.number]
            if outcome.value is None:
                study.tell(trial, state=TrialState.FAIL)
                log.warning("trial %d failed: %s", trial.number, outcome.reason)
                continue
            study.tell(trial, outcome.value)
            finished += 1
            best = study.best_value
            client.log_batch(
                parent_id,
                metrics=[
                    sweep.metric(f"trial/{objective}", outcome.value, trial.number),
                    # step: trials finished so far, so the last value is the best
                    sweep.metric(f"best/{objective}", best, finished),
                ],
                synchronous=True,
            )
            log.info(
                "trial %d: %s = %.6g in %.0f s (best %.6g, trial %d)",
                trial.number,
                objective,
                outcome.value,
                outcome.seconds,
                best,
                study.best_trial.number,
            )
    return finished


def child_run_id(parent_id: str, exp_id: str, number: int) -> str | None:
    for run in sweep.children(parent_id, [exp_id]):
        if run.data.tags.get(sweep.JOB_TAG) == str(number):
            return run.info.run_id
    return None


def finish(plan: Plan, study: optuna.Study, parent_id: str, exp_id: str) -> None:
    """Best trial -> parent params/tags/artifacts, results file, agent preset."""
    import mlflow
    from mlflow.tracking import MlflowClient

    best = study.best_trial
    values = {
        k: plan.dimensions[k].value(v) for k, v in best.params.items() if k in plan.dimensions
    }
    best_run = child_run_id(parent_id, exp_id, best.number)
    states = [t.state for t in study.trials]
    results = {
        "study": study.study_name,
        "objective": plan.search.objective,
        "direction": plan.search.direction,
        "best_value": best.value,
        "best_trial": best.number,
        "best_run_id": best_run,
        "best_params": values,
        "best_overrides": best.user_attrs.get("overrides", []),
        "fixed_overrides": plan.fixed,
        "trials_complete": states.count(TrialState.COMPLETE),
        "trials_failed": states.count(TrialState.FAIL),
    }
    results_path = plan.study_dir / "optimization_results.yaml"
    results_path.write_text(OmegaConf.to_yaml(OmegaConf.create(results)))
    study.trials_dataframe().to_csv(plan.study_dir / "trials.csv", index=False)
    sweep.log_params(parent_id, {f"best.{k}": format_value(v) for k, v in values.items()})
    client = MlflowClient()
    client.set_tag(parent_id, "best_trial", str(best.number))
    if best_run:
        client.set_tag(parent_id, "best_run_id", best_run)
    client.log_artifact(parent_id, str(results_path))
    client.log_artifact(parent_id, str(plan.study_dir / "trials.csv"))
    if plan.preset_name:
        preset = write_preset(plan, values, results)
        client.log_artifact(parent_id, str(preset), artifact_path="preset")
        use = f"agent={plan.preset_name}"
        if plan.root != CONF_DIR.parent:  # the preset is outside this checkout's conf/
            use += f" 'hydra.searchpath=[file://{plan.root / 'conf'}]'"
        log.info("best parameters written to %s: use %s", preset, use)
    log.info(
        "best trial %d: %s = %.6g, %s (MLflow run %s, tracking %s)",
        best.number,
        plan.search.objective,
        best.value,
        " ".join(results["best_overrides"]),
        best_run,
        mlflow.get_tracking_uri(),
    )


def write_preset(plan: Plan, values: dict[str, Any], results: dict[str, Any]) -> Path:
    """``<root>/conf/agent/<preset>.yaml``: the agent's preset plus the best agent.* values."""
    assert plan.preset_name
    agent = plan.search.agent
    node = OmegaConf.create({"defaults": [agent, "_self_"]})
    others = {}
    for key, value in sorted(values.items()):
        if key.startswith("agent."):
            OmegaConf.update(node, key.removeprefix("agent."), value, force_add=True)
        else:
            others[key] = value
    header = [
        f"# Written by pvbess.tune: the best of study {results['study']!r}",
        f"# ({results['trials_complete']} trials finished), trial {results['best_trial']}: "
        f"{results['objective']} = {results['best_value']:.6g} ({results['direction']}).",
        f"# MLflow run {results['best_run_id']}. The trials ran with: {' '.join(plan.fixed)}",
    ]
    if others:
        header.append(
            "# Searched outside agent.* (not part of this preset): "
            + " ".join(f"{k}={format_value(v)}" for k, v in others.items())
        )
    path = plan.root / "conf" / "agent" / f"{plan.preset_name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("\n".join(header) + "\n" + OmegaConf.to_yaml(node))
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args):
        print(__doc__)
        return 0
    logging.basicConfig(
        level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s"
    )
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        return run(make_plan(args))
    except TuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
