"""Hyperparameter search with Optuna (TPE), behind ``python -m pvbess.tune``.

    python -m pvbess.tune hparams_search=ppo_optuna site=tiny total_timesteps=20000
    python -m pvbess.tune hparams_search=sac_optuna tune.n_trials=50 tune.n_jobs=2
    python -m pvbess.tune hparams_search=a2c_optuna 'agent.gamma=interval(0.95,0.999)'

``conf/hparams_search/<name>.yaml`` names the agent, the objective (a KPI of the
trial's ``result.json``, default ``reward_total_mean``) and its direction, the
number of trials and the search space in Hydra's sweep grammar: ``interval(a,b)``,
``int(interval(a,b))``, ``tag(log,interval(a,b))``, ``choice(a,b,...)``,
``range(a,b,step)``. On the command line ``tune.<key>=<value>`` changes a
setting of that file, a sweep override adds (or replaces) a dimension, any other
override is fixed for every trial (and removes a dimension of the same key).

Hydra's OverridesParser reads the space; Optuna runs the study
(``study.optimize``: ``n_jobs`` threads, each waiting on its trial's
``python -m pvbess.train`` process, an MLflow child run of the search's parent
run; ``catch`` fails a trial and goes on; a callback reports it) and keeps it in
its RDB storage, ``<root>/mlruns/optuna.db`` (``tune.storage=<url>``);
``tune.study_name=<name>`` continues a study with the same overrides and space up
to ``n_trials`` complete trials (after a kill, or from several machines at once: a
shared database URL); ``hydra/launcher=<name>`` runs the trials through a Hydra
launcher (Ray), see ``pvbess.experiment.launch``.
The best values go to the parent (``best.<key>``, ``best/<objective>``) and to
the preset ``<root>/conf/agent/<agent>_tuned.yaml`` (``agent=<agent>_tuned``).
Ctrl-C or SIGTERM stops the trials (each saves a checkpoint; killed after 60 s),
marks the parent KILLED and exits 130.

Why not Hydra's Optuna sweeper: hydra-optuna-sweeper 1.3.0 requires optuna<3,
whose SQLite storage fails under SQLAlchemy 2 (which MLflow 3 requires), so its
studies could only live in memory and die with the process. This runs on
current Optuna with a persistent study.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import mlflow
import optuna
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.errors import HydraException
from mlflow.tracking import MlflowClient
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from optuna.distributions import CategoricalDistribution as Categorical
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.trial import FrozenTrial, TrialState

from pvbess import config
from pvbess.experiment import launch, signals, sweep, tracking

log = logging.getLogger("pvbess.tune")
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
SEARCH_GROUP = "hparams_search"


class TuneError(RuntimeError):
    """The search cannot start; the message says why."""


class TrialFailed(Exception):
    """A trial's process failed or left no objective: Optuna marks the trial FAIL."""


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
    n_trials: int = 20  # complete trials the study ends with (a continued one runs the missing)
    n_jobs: int = 1  # trials at once, each a process
    study_name: str | None = None  # None: <search>-<site>-<date>_<time>; an existing one continues
    storage: str | None = None  # None: sqlite:///<root>/mlruns/optuna.db
    # Seconds between a running trial's signs of life in the storage; a trial silent for
    # twice that (its process was killed) is failed and retried once. None: no heartbeat.
    heartbeat_s: int | None = 60
    preset: str | None = None  # None: <agent>_tuned; "": write none
    # Trials are evaluated on this site seed's year, neither a training year nor the
    # evaluation year (site.seed, 0): the search never sees the year results are shown on.
    # None, or site.seed=<n> on the command line: the trials' own site.seed.
    validation_seed: int | None = 4
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    params: dict[str, str] = field(default_factory=dict)


def format_value(value: Any) -> str:
    """A value as Hydra's override grammar reads it back (strings quoted)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
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
    distribution: Categorical | IntDistribution | FloatDistribution
    values: dict[Any, Any] = field(default_factory=dict)  # label -> choice Optuna cannot hold

    @property
    def name(self) -> str:
        return self.key.lstrip("+")

    def value(self, sampled: Any) -> Any:
        return self.values.get(sampled, sampled)

    def override(self, sampled: Any) -> str:
        return f"{self.key}={format_value(self.value(sampled))}"

    def suggest(self, trial: optuna.Trial | None) -> Any:
        """The trial's value; without a trial, the low end (a value to check the config)."""
        d = self.distribution
        if isinstance(d, Categorical):
            return trial.suggest_categorical(self.name, d.choices) if trial else d.choices[0]
        if trial is None:
            return d.low
        suggest = trial.suggest_int if isinstance(d, IntDistribution) else trial.suggest_float
        return suggest(self.name, d.low, d.high, step=d.step, log=d.log)


def dimension(override: Override) -> Dimension:
    """The distribution of one sweep override (the grammar of hydra-optuna-sweeper)."""
    sweep_value, key = override.value(), override.get_key_element()
    spec = str(override.input_line).partition("=")[2]
    if isinstance(sweep_value, ChoiceSweep):
        primitive = (type(None), bool, int, float, str)
        labels = {v if isinstance(v, primitive) else format_value(v): v for v in sweep_value.list}
        return Dimension(key, spec, Categorical(list(labels)), labels)
    if isinstance(sweep_value, RangeSweep):
        values, step = list(override.sweep_iterator()), abs(sweep_value.step)  # Hydra enumerates
        if not values:
            raise TuneError(f"{override.input_line}: the range is empty")
        if all(isinstance(x, int) for x in (sweep_value.start, sweep_value.stop, step)):
            return Dimension(key, spec, IntDistribution(min(values), max(values), step=int(step)))
        return Dimension(key, spec, FloatDistribution(min(values), max(values), step=step))
    if isinstance(sweep_value, IntervalSweep):
        lo, hi, log_scale = sweep_value.start, sweep_value.end, "log" in sweep_value.tags
        if isinstance(lo, int) and isinstance(hi, int):
            return Dimension(key, spec, IntDistribution(lo, hi, log=log_scale))
        assert lo is not None and hi is not None
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
    study_dir: Path  # <root>/multirun/<date>/<time>_<name>
    stamp: str  # <date>_<time> of the start
    argv: list[str]
    launcher: list[str] = field(default_factory=list)  # hydra/launcher=..., hydra.launcher.*

    @property
    def preset_name(self) -> str | None:
        preset = self.search.preset
        return None if preset == "" else preset or f"{self.search.agent}_tuned"

    def space(self) -> dict[str, str]:
        return {d.key: d.spec for d in self.dimensions.values()}


def load_search(name: str, overrides: list[str]) -> SearchConfig:
    """The search file merged onto its schema, then the ``tune.*`` overrides; checked."""
    path = CONF_DIR / SEARCH_GROUP / f"{name}.yaml"
    if not name:
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise TuneError(f"name the search: {SEARCH_GROUP}=<{'|'.join(known)}>")
    if not path.is_file():
        raise TuneError(f"{SEARCH_GROUP}={name}: no such file {path}")
    try:
        dotlist = OmegaConf.from_dotlist(overrides)
        search = OmegaConf.to_object(OmegaConf.merge(SearchConfig, OmegaConf.load(path), dotlist))
    except OmegaConfBaseException as exc:  # omegaconf's errors name the key
        raise TuneError(f"{path.name} / tune.*: {exc}") from exc
    assert isinstance(search, SearchConfig)
    if search.direction not in ("maximize", "minimize"):
        raise TuneError(f"tune.direction: must be maximize or minimize, got {search.direction!r}")
    if search.n_trials < 1 or search.n_jobs < 1:
        raise TuneError("tune.n_trials and tune.n_jobs must be >= 1")
    return search


def make_plan(argv: Sequence[str], now: datetime | None = None) -> Plan:
    """Parse and check everything: the search file, the overrides, one trial's config."""
    config.register()
    names = [a.split("=", 1)[1] for a in argv if a.startswith(f"{SEARCH_GROUP}=")]
    name = names[-1] if names else ""
    search = load_search(name, [a.removeprefix("tune.") for a in argv if a.startswith("tune.")])
    rest = [a for a in argv if not a.startswith(("tune.", f"{SEARCH_GROUP}="))]
    parser = OverridesParser.create()
    try:
        space = parser.parse_overrides([f"{k}={v}" for k, v in search.params.items()])
        dims = {d.name: d for d in map(dimension, space)}
        overrides = parser.parse_overrides(rest)
    except HydraException as exc:  # the grammar's message names the override
        raise TuneError(str(exc)) from exc
    fixed = [f"agent={search.agent}"]
    if search.validation_seed is not None and all(o.key_or_group != "site.seed" for o in overrides):
        fixed.append(f"site.seed={search.validation_seed}")
    launcher = [str(o.input_line) for o in overrides if launch.is_launcher_override(o.key_or_group)]
    for o in overrides:
        if launch.is_launcher_override(o.key_or_group):
            continue  # where the trials run, not what they are: not in the study's identity
        if o.key_or_group in ("hydra.run.dir", "hydra.sweep.dir", "tracking.run_name"):
            raise TuneError(f"{o.input_line}: set by pvbess.tune for each trial")
        if o.key_or_group == "agent" and not o.is_sweep_override():
            if o.value() != search.agent:
                raise TuneError(
                    f"{o.input_line}: {SEARCH_GROUP}={name} searches agent={search.agent}"
                )
        elif o.is_sweep_override():
            dim = dimension(o)
            dims[dim.name] = dim
        else:
            dims.pop(o.key_or_group, None)
            fixed.append(str(o.input_line))
    if not dims:
        raise TuneError("nothing to search: the search space is empty")
    root, now = Path(config.project_root()), now or datetime.now()
    stamp = f"{now:%Y-%m-%d_%H-%M-%S}"
    study_dir = root / "multirun" / f"{now:%Y-%m-%d}" / f"{now:%H-%M-%S}_{name}"
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("train", [*fixed, f"paths.output_dir={format_value(str(study_dir))}"])
            # One trial's config, at the low end of every dimension: keys exist, values check.
            low = [d.override(d.suggest(None)) for d in dims.values()]
            config.validate(compose("train", [*fixed, *low, "paths.output_dir=/nonexistent"]))
    except (HydraException, OmegaConfBaseException, config.ConfigError) as exc:
        raise TuneError(f"the trials' config does not compose: {exc}") from exc
    return Plan(name, search, dims, fixed, cfg, root, study_dir, stamp, list(argv), launcher)


class Trials:
    """The objective: a trial is a ``python -m pvbess.train`` process; a signal stops them all."""

    def __init__(self, plan: Plan, parent_id: str, exp_id: str) -> None:
        self.plan, self.parent_id, self.exp_id, self.finished = plan, parent_id, exp_id, 0
        self.procs: list[subprocess.Popen[bytes]] = []
        self.stopper: threading.Thread | None = None  # started by the first stop signal
        self.lock = threading.Lock()

    def __call__(self, trial: optuna.Trial) -> float:
        try:
            return self.run(trial)
        except TrialFailed as exc:
            if self.stopper is None:  # a stopped trial is no news
                log.warning("trial %d failed: %s", trial.number, exc)
            raise

    def run(self, trial: optuna.Trial) -> float:
        plan, n, c = self.plan, trial.number, self.plan.cfg
        name = f"{plan.search.agent}-{c.reward.name}-s{c.seed}"
        trial_dir = plan.study_dir / f"{n}_{name}"
        stdout = trial_dir / "stdout.log"
        overrides = [d.override(d.suggest(trial)) for d in plan.dimensions.values()]
        trial.set_user_attr("overrides", overrides)
        trial.set_user_attr("trial_dir", str(trial_dir))
        log.info("trial %d: %s", n, " ".join(overrides))
        command = launch.trial_command(
            plan.launcher,
            [*plan.fixed, *overrides],
            format_value(str(trial_dir)),
            format_value(f"{name}-t{n}"),
            self.parent_id,
            n,
        )
        env = dict(os.environ, **{tracking.PARENT_ENV: self.parent_id, tracking.JOB_ENV: str(n)})
        if plan.search.n_jobs > 1:  # as joblib does: share the cores, no oversubscription
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
                env.setdefault(var, str(max(1, (os.cpu_count() or 1) // plan.search.n_jobs)))
        trial_dir.mkdir(parents=True, exist_ok=True)
        with stdout.open("wb") as out, self.lock:  # no trial starts once a stop began
            if self.stopper:
                raise TrialFailed("not started: the search is stopping")
            proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
            self.procs.append(proc)
        if code := proc.wait():
            tail = stdout.read_text(errors="replace").strip().splitlines()[-15:]
            raise TrialFailed(f"exit {code}; {stdout}:\n  " + "\n  ".join(tail))
        try:
            return launch.objective_value(
                trial_dir, plan.search.objective, self.parent_id, n, self.exp_id
            )
        except (OSError, LookupError, ValueError) as exc:
            raise TrialFailed(f"{trial_dir}: {exc}") from exc

    def report(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """Optuna's callback after each trial: the parent's trial/ and best/ curves, progress."""
        if trial.state != TrialState.COMPLETE:
            return
        key, best, client = self.plan.search.objective, study.best_trial, MlflowClient()
        with self.lock:  # step of best/: trials finished so far, so its last value is the best
            self.finished += 1
            client.log_metric(self.parent_id, f"trial/{key}", trial.value, step=trial.number)
            client.log_metric(self.parent_id, f"best/{key}", best.value, step=self.finished)
        seconds = trial.duration.total_seconds() if trial.duration else math.nan
        msg = "trial %d: %s = %.6g in %.0f s (best %.6g, trial %d)"
        log.info(msg, trial.number, key, trial.value, seconds, best.value, best.number)

    def on_signal(self, signum: int, frame: object) -> None:
        """SIGINT or SIGTERM: stop the trials (in a thread) and raise KeyboardInterrupt, once."""
        if self.stopper is None:
            self.stopper = threading.Thread(target=self.stop, args=(signum,), daemon=True)
            self.stopper.start()
            raise KeyboardInterrupt

    def stop(self, signum: int, grace_s: float = 60.0) -> None:
        """Pass the stop on to every running trial (it saves a checkpoint); kill stragglers."""
        log.warning("stopped (%s): stopping the running trials", signal.Signals(signum).name)
        with self.lock:
            procs = [p for p in self.procs if p.poll() is None]
        for proc in procs:
            if signum != signal.SIGINT:  # Ctrl-C reached them already
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("trial process %d did not stop: killing it", proc.pid)
                proc.kill()
                proc.wait()


def open_study(plan: Plan, storage: str | optuna.storages.BaseStorage) -> optuna.Study:
    """A new study, or the named one if it exists and searches the same way."""
    s = plan.search
    name = s.study_name or f"{plan.name}-{plan.cfg.site.name}-{plan.stamp}"
    sampler = optuna.samplers.TPESampler(**vars(s.sampler), constant_liar=s.n_jobs > 1)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        direction=s.direction,
        load_if_exists=True,
    )
    attrs = {"fixed_overrides": plan.fixed, "space": plan.space(), "objective": s.objective}
    if not study.trials and not study.user_attrs:
        for k, v in attrs.items():
            study.set_user_attr(k, v)
    ran = {**study.user_attrs, "direction": study.direction.name.lower()}
    where = getattr(storage, "url", storage)
    for k, v in {**attrs, "direction": s.direction}.items():
        if ran.get(k) != v:
            raise TuneError(
                f"study {name!r} in {where} was run with {k} = {ran.get(k)!r}, not {v!r}: "
                "its trials are not comparable; choose another tune.study_name"
            )
    return study


def run(plan: Plan) -> int:
    """Run the search; 0 when a trial finished (or the study had all its trials), 1 when
    none did, 130 on a stop."""
    (plan.root / "mlruns").mkdir(parents=True, exist_ok=True)
    s = plan.search
    storage = s.storage or f"sqlite:///{plan.root / 'mlruns' / 'optuna.db'}"
    study = open_study(plan, launch.storage(storage, s.heartbeat_s))
    parent_id, exp_id = start_parent(plan, study, storage)
    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    msg = "study %r (%s, %d of %d trials complete) in %s; MLflow parent run %s; trials in %s"
    log.info(
        msg, study.study_name, s.direction, done, s.n_trials, storage, parent_id, plan.study_dir
    )
    trials, status, code = Trials(plan, parent_id, exp_id), "FAILED", 1
    # Up to n_trials complete ones in all: this process runs the missing trials at most,
    # and stops when processes sharing the study (other machines) have completed them.
    enough = optuna.study.MaxTrialsCallback(s.n_trials, states=(TrialState.COMPLETE,))
    with signals.handling(trials.on_signal):  # until the end: a second signal is ignored
        try:
            if done < s.n_trials:
                study.optimize(
                    trials,
                    s.n_trials - done,
                    n_jobs=s.n_jobs,
                    catch=TrialFailed,
                    callbacks=[trials.report, enough],
                )
            if trials.finished or done >= s.n_trials:
                finish(plan, study, parent_id, exp_id)
                status, code = "FINISHED", 0
            else:
                log.error("no trial finished: see the trials' stdout.log under %s", plan.study_dir)
        except KeyboardInterrupt:
            if trials.stopper:
                trials.stopper.join()  # the trials' processes have ended
            status, code = "KILLED", 130
        except Exception as exc:
            MlflowClient().set_tag(parent_id, "error", f"{type(exc).__name__}: {exc}"[:5000])
            raise
        finally:
            sweep.end_parent(parent_id, [exp_id], status=status)
    return code


def start_parent(plan: Plan, study: optuna.Study, storage: str) -> tuple[str, str]:
    """The search's parent run in the trials' experiment -> (run id, experiment id)."""
    (exp_id,) = sweep.prepare_store(plan.cfg, [sweep.experiment_name(plan.cfg)]).values()
    s, space = plan.search, plan.space()
    params = {
        "overrides": " ".join([*plan.fixed, *(f"{k}={v}" for k, v in space.items())]),
        "size": s.n_trials,
        "search": plan.name,
        "objective": s.objective,
        "direction": s.direction,
        "n_jobs": s.n_jobs,
        "study": study.study_name,
        "sampler": "TPESampler",
        **{f"sampler.{k}": v for k, v in vars(s.sampler).items()},
        # MLflow param names allow no "+": space.<name>, not space.<key>
        **{f"space.{d.name}": d.spec for d in plan.dimensions.values()},
    }
    tags = {
        "kind": "search",
        "study_name": study.study_name,
        "optuna_storage": storage,
        "sweep_dir": str(plan.study_dir),
        "mlflow.note.content": "python -m pvbess.tune " + " ".join(plan.argv),
    }
    run_name = f"search-{plan.name}-{plan.stamp}"
    return sweep.start_parent(plan.cfg, exp_id, run_name, params, tags), exp_id


def finish(plan: Plan, study: optuna.Study, parent_id: str, exp_id: str) -> None:
    """Best trial -> parent params/tags/artifacts, results file, trials.csv, agent preset."""
    best, dims, client, s = study.best_trial, plan.dimensions, MlflowClient(), plan.search
    values = {k: dims[k].value(v) for k, v in best.params.items() if k in dims}
    runs = sweep.children(parent_id, [exp_id])
    run_of_job = {r.data.tags.get(tracking.JOB_TAG): r.info.run_id for r in runs}
    best_run, states = run_of_job.get(str(best.number)), [t.state for t in study.trials]
    overrides = best.user_attrs.get("overrides", [])
    results = {
        "study": study.study_name,
        "objective": s.objective,
        "direction": s.direction,
        "best_value": best.value,
        "best_trial": best.number,
        "best_run_id": best_run,
        "best_params": values,
        "best_overrides": overrides,
        "fixed_overrides": plan.fixed,
        "trials_complete": states.count(TrialState.COMPLETE),
        "trials_failed": states.count(TrialState.FAIL),
    }
    (plan.study_dir / "optimization_results.yaml").write_text(OmegaConf.to_yaml(results))
    study.trials_dataframe().to_csv(plan.study_dir / "trials.csv", index=False)
    sweep.log_params(parent_id, {f"best.{k}": format_value(v) for k, v in values.items()})
    client.set_tag(parent_id, "best_trial", str(best.number))
    if best_run:
        client.set_tag(parent_id, "best_run_id", best_run)
    for name in ("optimization_results.yaml", "trials.csv"):
        client.log_artifact(parent_id, str(plan.study_dir / name))
    if plan.preset_name:
        preset = write_preset(plan, values, results)
        # The search's record beside the preset, to commit with it.
        record = preset.with_name(f"{plan.preset_name}.trials.csv")
        shutil.copyfile(plan.study_dir / "trials.csv", record)
        client.log_artifact(parent_id, str(preset), artifact_path="preset")
        use = f"agent={plan.preset_name}"
        if plan.root != CONF_DIR.parent:  # the preset is outside this checkout's conf/
            use += f" 'hydra.searchpath=[file://{plan.root / 'conf'}]'"
        log.info("best parameters written to %s: use %s", preset, use)
    msg = "best trial %d: %s = %.6g, %s (MLflow run %s, tracking %s)"
    uri, line = mlflow.get_tracking_uri(), " ".join(overrides)
    log.info(msg, best.number, s.objective, best.value, line, best_run, uri)


def write_preset(plan: Plan, values: dict[str, Any], results: dict[str, Any]) -> Path:
    """``<root>/conf/agent/<preset>.yaml``: the agent's preset plus the best agent.* values,
    under the search's results as comments."""
    node = OmegaConf.create({"defaults": [plan.search.agent, "_self_"]})
    for key, value in sorted(values.items()):
        if key.startswith("agent."):
            OmegaConf.update(node, key.removeprefix("agent."), value, force_add=True)
    notes = "Written by pvbess.tune; only the agent.* values below are part of this preset.\n"
    notes += OmegaConf.to_yaml(results)
    path = plan.root / "conf" / "agent" / f"{plan.preset_name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    tmp.write_text("".join(f"# {line}\n" for line in notes.splitlines()) + OmegaConf.to_yaml(node))
    os.replace(tmp, path)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if {"-h", "--help"} & set(args):
        print(__doc__)
        return 0
    # Trials are reported here; Optuna's own warning for a failed one adds a traceback.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        plan = make_plan(args)
        plan.study_dir.mkdir(parents=True, exist_ok=True)
        handlers = [logging.StreamHandler(), logging.FileHandler(plan.study_dir / "tune.log")]
        fmt = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"
        logging.basicConfig(level=logging.INFO, format=fmt, handlers=handlers)
        return run(plan)
    except TuneError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
