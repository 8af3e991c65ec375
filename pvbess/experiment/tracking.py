"""MLflow tracking: the store, runs with tags and params, SB3 logging and checkpoints.

Every run directory and multirun job writes to one store, resolved to an
absolute path under the project root (MLflow 3.13+ refuses a bare ./mlruns).
The store is checked before a run starts: an unreachable server or an
unwritable folder raises :class:`TrackingError` within seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import mlflow
import numpy as np
import requests
from hydra.core.hydra_config import HydraConfig
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import HumanOutputFormat, KVWriter, Logger

import pvbess

log = logging.getLogger(__name__)

MAX_PARAMS_PER_CALL = 100
# A tracking server that does not answer its health check within this time is
# reported at once; MLflow's own client would retry for minutes (7 retries,
# exponential backoff) before giving up.
SERVER_PROBE_TIMEOUT_S = 5.0


class TrackingError(RuntimeError):
    """The MLflow store cannot be used; the message names the URI or folder and why."""


# A sweep's or search's parent run reaches its jobs through these variables.
PARENT_ENV = "PVBESS_PARENT_RUN_ID"
JOB_ENV = "PVBESS_SWEEP_JOB"
PARENT_TAG = "mlflow.parentRunId"
JOB_TAG = "sweep_job"


def parent_tags() -> dict[str, str]:
    """Tags that make the current run a child of the sweep that started it.

    Empty outside a sweep. ``sweep_job`` is the job's number in the sweep (the
    trial number in a search), to find a job's run from its number.
    """
    parent = os.environ.get(PARENT_ENV, "").strip()
    if not parent:
        return {}
    tags = {PARENT_TAG: parent}
    job = os.environ.get(JOB_ENV) or _hydra_job_num()
    if job is not None:
        tags[JOB_TAG] = str(job)
    return tags


def _hydra_job_num() -> str | None:
    if not HydraConfig.initialized():
        return None
    hydra_cfg = cast(DictConfig, HydraConfig.get())  # a DictConfig typed as HydraConf
    num = OmegaConf.select(hydra_cfg, "job.num", default=None)
    return None if num is None else str(num)


# What tells a RUNNING run whose process died from one still at work (same host only).
HOST_TAG, PID_TAG, PID_STARTED_TAG = "host", "pid", "pid_started"
# How long a process waits for another to finish creating or upgrading a SQLite store.
STORE_LOCK_TIMEOUT_S = 300.0


def process_tags() -> dict[str, str]:
    """The host, pid and process start time of this process (a run's liveness proof)."""
    import psutil

    pid = os.getpid()
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(pid),
        PID_STARTED_TAG: f"{psutil.Process(pid).create_time():.3f}",
    }


def process_alive(tags: dict[str, str]) -> bool | None:
    """Whether the process named by ``process_tags`` still runs; None = cannot tell
    (another host, or a run without the tags)."""
    import psutil

    if tags.get(HOST_TAG) != socket.gethostname() or PID_TAG not in tags:
        return None
    try:
        started = psutil.Process(int(tags[PID_TAG])).create_time()
    except (psutil.NoSuchProcess, ValueError):
        return False
    # A pid reused by a later process (or after a reboot) is not the run's process.
    return abs(started - float(tags.get(PID_STARTED_TAG, "nan"))) < 1.0


def close_stale_runs(client: MlflowClient | None = None) -> list[str]:
    """Mark KILLED every RUNNING run of this host whose process is gone (a kill -9, a
    machine that died); return their ids. Runs of other hosts are left as they are."""
    client = client or MlflowClient()
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    running = client.search_runs(
        experiments,
        f"attributes.status = 'RUNNING' and tags.{HOST_TAG} = '{socket.gethostname()}'",
        max_results=50_000,
    )
    closed = []
    for run in running:
        if process_alive(run.data.tags) is not False:
            continue
        message = (
            f"its process (pid {run.data.tags.get(PID_TAG)} on {run.data.tags.get(HOST_TAG)}) "
            "ended without ending the run"
        )
        client.set_tag(run.info.run_id, "error", message)
        client.set_terminated(run.info.run_id, status="KILLED")
        where = run.data.tags.get("output_dir") or run.data.tags.get("sweep_dir")
        log.warning(
            "run %s (%s) was RUNNING but %s: marked KILLED%s",
            run.info.run_id,
            run.info.run_name,
            message,
            f"; resume it with: python -m pvbess.train resume={where}" if where else "",
        )
        closed.append(run.info.run_id)
    return closed


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a sqlite:/// URI (None for other stores or in-memory)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri.removeprefix("sqlite:///")
    return None if path in ("", ":memory:") else Path(path)


def store_uri(root_dir: str | Path) -> str:
    """The project's store: sqlite under <root>/mlruns [absolute]."""
    path = Path(root_dir).resolve() / "mlruns"
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingError(
            f"MLflow store folder {path} cannot be created ({_reason(exc)}); make it a writable "
            "folder, set PVBESS_ROOT to another project root, or set tracking.uri"
        ) from exc
    return f"sqlite:///{path / 'mlflow.db'}"


def _reason(exc: BaseException) -> str:
    """The innermost OS-level reason ('Connection refused') in an exception chain."""
    seen: set[int] = set()
    current: BaseException | None = exc
    reason = str(exc) or type(exc).__name__
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.strerror:
            reason = current.strerror
        if isinstance(current, requests.Timeout):
            return f"no answer within {SERVER_PROBE_TIMEOUT_S:g} s"
        # requests and urllib3 wrap the socket error in args instead of chaining it.
        nested = next((a for a in current.args if isinstance(a, BaseException)), None)
        current = current.__cause__ or current.__context__ or nested
    return reason


def check_server(uri: str) -> None:
    """Fail fast when an http(s) tracking server does not answer at all.

    Any HTTP answer (even 401 or 404 behind a proxy) counts as reachable; only a
    refused connection, an unknown host or a timeout is an error.
    """
    try:
        requests.get(f"{uri.rstrip('/')}/health", timeout=SERVER_PROBE_TIMEOUT_S)
    except requests.RequestException as exc:
        raise TrackingError(
            f"tracking.uri={uri}: cannot reach the MLflow tracking server ({_reason(exc)}). "
            "Start the server, fix tracking.uri, or leave it unset to use the project's "
            "store under mlruns/"
        ) from exc


def _check_artifact_folder(location: str | None) -> None:
    """A local artifact folder must be writable before a run starts, not at its first file."""
    if not location or not location.startswith(("file:", "/")):
        return  # remote artifact stores answer for themselves
    folder = Path(location.removeprefix("file://").removeprefix("file:"))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise TrackingError(
            f"MLflow artifact folder {folder} is not writable ({_reason(exc)}); make it a "
            "writable folder, or log to a new experiment with a writable artifact folder: "
            "tracking.experiment=<new name> tracking.artifact_location=<writable folder> "
            "(an experiment's artifact folder is fixed when the experiment is created)"
        ) from exc


def configure(
    uri: str | None, root_dir: str | Path, experiment: str, artifact_location: str | None = None
) -> str:
    """Point MLflow at the store and select (or create) the experiment; return its id.

    A SQLite store is created or upgraded under a file lock beside it: processes started
    at the same moment on a new store would otherwise race through MLflow's table creation
    (``table tags already exists``). Artifacts of a SQLite store go beside it
    (``<store folder>/artifacts``) unless ``artifact_location`` says otherwise. RUNNING
    runs of this host whose process died are marked KILLED. Raises TrackingError when the
    store cannot be reached or written.
    """
    from filelock import FileLock, Timeout

    tracking_uri = uri or store_uri(root_dir)
    if tracking_uri.startswith(("http://", "https://")):
        check_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    db = _sqlite_path(tracking_uri)
    if artifact_location is None and db is not None:
        artifact_location = (db.resolve().parent / "artifacts").as_uri()
    lock: Any = contextlib.nullcontext()
    if db is not None:
        try:
            db.resolve().parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise TrackingError(
                f"MLflow store folder {db.parent} cannot be created ({_reason(exc)}); make it "
                "a writable folder or set tracking.uri"
            ) from exc
        lock = FileLock(f"{db.resolve()}.lock", timeout=STORE_LOCK_TIMEOUT_S)
    try:
        with lock:
            client = MlflowClient()
            found = client.get_experiment_by_name(experiment)
            if found is not None:
                exp_id = found.experiment_id
            else:
                location = None
                if artifact_location is not None:
                    location = f"{artifact_location.rstrip('/')}/{experiment}"
                try:
                    exp_id = client.create_experiment(experiment, artifact_location=location)
                except MlflowException:  # created meanwhile by a job on another store lock
                    found = client.get_experiment_by_name(experiment)
                    if found is None:
                        raise
                    exp_id = found.experiment_id
        _check_artifact_folder(client.get_experiment(exp_id).artifact_location)
        mark_model_training(client, exp_id)
        mlflow.set_experiment(experiment_id=exp_id)
        close_stale_runs(client)
    except Timeout as exc:
        raise TrackingError(
            f"MLflow store {tracking_uri}: another process has held {exc.lock_file} for "
            f"{STORE_LOCK_TIMEOUT_S:g} s; if none is running, delete that file"
        ) from exc
    except (MlflowException, OSError) as exc:
        raise TrackingError(
            f"MLflow store {tracking_uri}: cannot open experiment {experiment!r} ({_reason(exc)})"
        ) from exc
    return exp_id


def mark_model_training(client: MlflowClient, experiment_id: str) -> None:
    """Tag the experiment ``mlflow.experimentKind=custom_model_development``.

    MLflow's mark of a model-training experiment, which its UI shows as the experiment's
    kind and, where its GenAI / Model training switch is off, opens on the runs table
    and charts rather than the GenAI view (MLflow 3.17.2's switch wins: ``make ui``
    prints the Model training URL). Set on experiments made before this tag when they
    are next used; a kind chosen in the UI (not merely inferred by it) is kept.
    """
    key = "mlflow.experimentKind"
    kind = client.get_experiment(experiment_id).tags.get(key, "")
    if not kind or "inferred" in kind:
        client.set_experiment_tag(experiment_id, key, "custom_model_development")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists become JSON strings."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out |= flatten(v, f"{key}.")
        elif isinstance(v, list | tuple):
            out[key] = json.dumps(v)
        else:
            out[key] = v
    return out


def log_config(cfg: DictConfig) -> None:
    """The whole resolved config: flattened params (in batches) and a YAML artifact."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(resolved, dict)
    params = {k: str(v)[:6000] for k, v in flatten(resolved).items()}
    items = sorted(params.items())
    for i in range(0, len(items), MAX_PARAMS_PER_CALL):
        mlflow.log_params(dict(items[i : i + MAX_PARAMS_PER_CALL]))
    mlflow.set_tags(
        {
            "agent_hparams": params_digest(params, "agent."),
            "reward_config": params_digest(params, "reward."),
        }
    )
    mlflow.log_text(OmegaConf.to_yaml(cfg, resolve=True), "config.yaml")


def params_digest(params: dict[str, str], prefix: str) -> str:
    """A short hash of the logged params under ``prefix`` (e.g. the agent's resolved
    hyperparameters): runs that differ in any of them get different digests.

    Computed from the params as MLflow stores them, so ``pvbess.compare`` can
    recompute it for any run, tagged or not.
    """
    import hashlib

    text = "\n".join(f"{k}={v}" for k, v in sorted(params.items()) if k.startswith(prefix))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def git_commit(root_dir: str | Path) -> str:
    """The commit checked out in ``root_dir``, or 'unknown' (not a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=root_dir,
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


@contextmanager
def start_run(
    cfg: DictConfig, data_hash: str, agent_name: str, run_id: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """A run named <agent>-<reward>-s<seed>, tagged so runs can be selected and compared.

    ``run_id`` continues an existing run (resume). A run that raises is marked
    FAILED with the error as a tag; an interrupt (Ctrl-C, SIGTERM) marks it KILLED
    and logs how to resume it.
    """
    configure_for(cfg)
    name = cfg.tracking.run_name or f"{agent_name}-{cfg.reward.name}-s{cfg.seed}"
    tags = {
        "agent": agent_name,
        "reward": cfg.reward.name,
        "site": cfg.site.name,
        "seed": str(cfg.seed),
        # The code's commit, wherever the outputs go ($PVBESS_ROOT may be elsewhere).
        "git_commit": git_commit(Path(pvbess.__file__).resolve().parent),
        "site_data_hash": data_hash,
        "pvbess_version": pvbess.__version__,
        "currency": cfg.site.tariff.currency,
        # Where the agent trained (and in how many copies); evaluation is always CityLearn.
        "env_backend": cfg.env.backend,
        "env_n_envs": str(cfg.env.get("n_envs", 1)),
        "output_dir": str(Path(cfg.paths.output_dir).resolve()),
    }
    if HydraConfig.initialized():  # the levers preset's name (conf/levers/), as chosen
        choice = HydraConfig.get().runtime.choices.get("levers")
        if choice:
            tags["levers_preset"] = str(choice)
    tags |= parent_tags()  # a child of the sweep or search that started this job
    tags |= process_tags()
    kwargs = {"run_id": run_id} if run_id else {"run_name": name, "tags": tags}
    with mlflow.start_run(**kwargs) as run:
        if run_id:
            mlflow.set_tags(process_tags())  # the resuming process is the one alive now
        if run_id and "error" in run.data.tags:
            # A previous attempt's error no longer describes this run.
            MlflowClient().delete_tag(run_id, "error")
        try:
            yield run
        except BaseException as exc:
            interrupted = isinstance(exc, KeyboardInterrupt)
            if not interrupted:
                # The tag is the one-line message; the artifact keeps the traceback.
                mlflow.set_tag("error", f"{type(exc).__name__}: {exc}"[:5000])
                mlflow.log_text("".join(traceback.format_exception(exc)), "error.txt")
            mlflow.end_run(status="KILLED" if interrupted else "FAILED")
            if interrupted:
                log.warning(
                    "MLflow run %s marked KILLED. Resume it with:\n"
                    "  python -m pvbess.train resume=%s",
                    run.info.run_id,
                    Path(cfg.paths.output_dir).resolve(),
                )
            raise


def configure_for(cfg: DictConfig) -> str:
    """``configure`` with a composed config's tracking settings; return the experiment id."""
    experiment = cfg.tracking.experiment or cfg.site.name
    return configure(
        cfg.tracking.uri, cfg.paths.root_dir, experiment, cfg.tracking.artifact_location
    )


def last_logged_step(run_id: str) -> int:
    """The highest step of any metric already in the run (-1 if none)."""
    client = MlflowClient()
    steps = [
        m.step
        for key in client.get_run(run_id).data.metrics
        for m in client.get_metric_history(run_id, key)
    ]
    return max(steps, default=-1)


class MetricBuffer:
    """Training metrics held until the next checkpoint, then written in one batch.

    A checkpoint flushes the buffer before its file appears, so every metric up
    to a checkpoint's step is in MLflow once that checkpoint exists. A kill
    between the flush and the rename leaves metrics a little past the checkpoint
    the run resumes from; ``after_step`` (the run's last logged step) drops the
    resumed run's metrics for those steps. So each metric's history has every
    step once, in increasing order.
    """

    def __init__(self, after_step: int = -1) -> None:
        self._pending: list[tuple[dict[str, float], int]] = []
        self.after_step = after_step
        # The last step each key was written at: a key given again at a step already
        # written (after a checkpoint's flush at that step) is not written twice.
        self._written: dict[str, int] = {}

    def add(self, metrics: dict[str, float], step: int) -> None:
        """Queue metrics at ``step``; a key given twice at one step keeps its last value.

        SB3's off-policy loop dumps its logger once per finished episode, i.e. n
        times at one step when n copies end together: each key is logged once.
        """
        if not metrics or step <= self.after_step:
            return
        if self._pending and self._pending[-1][1] == int(step):
            self._pending[-1][0].update(metrics)
        else:
            self._pending.append((dict(metrics), int(step)))

    def flush(self) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = []
        for metrics, step in self._pending:
            for key, value in metrics.items():
                if self._written.get(key, -1) < step:
                    batch.append(Metric(key, float(value), now, step))
                    self._written[key] = step
        run = mlflow.active_run()
        if batch and run is not None:
            client = MlflowClient()
            for i in range(0, len(batch), 1000):  # MLflow's batch limit
                client.log_batch(run.info.run_id, metrics=batch[i : i + 1000], synchronous=True)
        self._pending.clear()


class MLflowOutputFormat(KVWriter):
    """SB3 logger output that writes numeric values as MLflow metrics (SB3 docs' recipe)."""

    def __init__(self, buffer: MetricBuffer) -> None:
        self.buffer = buffer

    def write(
        self, key_values: dict[str, Any], key_excluded: dict[str, Any], step: int = 0
    ) -> None:
        metrics = {}
        for key, value in key_values.items():
            excluded = key_excluded.get(key)
            if excluded is not None and "mlflow" in excluded:
                continue
            if isinstance(value, int | float | np.floating | np.integer) and not isinstance(
                value, bool
            ):
                # SB3's EvalCallback records its scores as eval/*; here they are the
                # validation year's (pvbess.experiment.selection), and a run's eval/*
                # are its KPIs on the evaluation year.
                if key.startswith("eval/"):
                    key = "validation/" + key.removeprefix("eval/")
                metrics[key] = float(value)
        self.buffer.add(metrics, step)

    def close(self) -> None:
        pass


def sb3_logger(buffer: MetricBuffer, verbose: bool = False) -> Logger:
    formats: list[KVWriter] = [MLflowOutputFormat(buffer)]
    if verbose:
        formats.append(HumanOutputFormat(sys.stdout))
    return Logger(folder=None, output_formats=formats)


class EpisodeMetricsCallback(BaseCallback):
    """Logs the episodes that end at a step: return and reward components (summed over
    the episode), one value per metric and step.

    With n copies (``env.n_envs``) several episodes end at the same step (all of them,
    on the twin's lockstep copies): the metric is their mean, with ``_min`` and ``_max``
    beside it, never one value per copy (MLflow would show the last or the largest).
    """

    def __init__(self, buffer: MetricBuffer) -> None:
        super().__init__()
        self.buffer = buffer

    def _on_step(self) -> bool:
        infos = self.locals.get("infos", [])
        dones = self.locals.get("dones", [])
        ended: dict[str, list[float]] = {}
        for info, done in zip(infos, dones, strict=False):
            if not done:
                continue
            values = {}
            if "episode" in info:
                values["episode/return"] = float(info["episode"]["r"])
                values["episode/length"] = float(info["episode"]["l"])
            for k, v in info.get("episode_components", {}).items():
                values[f"episode/reward_{k}"] = float(v)
            for key, value in values.items():
                ended.setdefault(key, []).append(value)
        if ended:
            self.buffer.add(aggregate_episodes(ended), self.num_timesteps)
        return True


def aggregate_episodes(ended: dict[str, list[float]]) -> dict[str, float]:
    """{key: values of the copies} -> key (mean), key_min, key_max, and episode/count."""
    out: dict[str, float] = {}
    for key, values in ended.items():
        out[key] = float(np.mean(values))
        out[f"{key}_min"] = float(np.min(values))
        out[f"{key}_max"] = float(np.max(values))
    out["episode/count"] = float(max(len(v) for v in ended.values()))
    return out


def log_model(model: Any, name: str = "model") -> None:
    """The final model (and VecNormalize statistics, if any) as reloadable artifacts."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"{name}.zip"
        model.save(path)
        mlflow.log_artifact(str(path), artifact_path="model")
        get_vn = getattr(model, "get_vec_normalize_env", None)
        vec_normalize = get_vn() if get_vn else None
        if vec_normalize is not None:
            vn_path = Path(tmp) / "vecnormalize.pkl"
            vec_normalize.save(str(vn_path))
            mlflow.log_artifact(str(vn_path), artifact_path="model")
