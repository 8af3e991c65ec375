"""Checkpoints that survive a kill, and resuming from them.

A checkpoint is taken where training is in a consistent state: at the start
of a rollout (the last update done, no experience collected with the current
weights yet), at the first one after every ``checkpoint_every`` steps, and at
the end of training when it falls on such a boundary. Its files are written
under temporary names and renamed, the model's zip last (atomic on POSIX): a
kill while writing never leaves a corrupt or half-written "latest" checkpoint.
Training metrics buffered since the previous checkpoint are flushed to MLflow
before the rename (see tracking.MetricBuffer).

Ctrl-C and SIGTERM during training do not abort SB3 mid-update: they request a
stop, the next step saves a checkpoint and ends ``learn``; a second signal
quits at once without saving.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import signal
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

from pvbess.experiment.tracking import MetricBuffer

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
RESOLVED_CONFIG = "resolved_config.yaml"
LOCK_FILE = ".train.lock"
# Extra member in the model zip (SB3's loader reads only 'data' and '*.pth'):
# the values SB3's logger recorded since its last dump, e.g. the last update's
# train/* losses, which it writes only at the next dump.
LOGGER_MEMBER = "pvbess_logger_state.json"
# What every SB3 model zip holds: the pickled attributes and the policy's weights.
SB3_MEMBERS = frozenset({"data", "policy.pth"})
_TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint or run directory cannot be used; the message says which file and why."""


class Interrupted(KeyboardInterrupt):
    """Training stopped on a signal after saving a checkpoint."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


@dataclass(frozen=True)
class Checkpoint:
    steps: int
    model_path: Path
    replay_buffer_path: Path | None
    vecnormalize_path: Path | None


@dataclass
class StopRequest:
    """Set by a signal handler; the checkpoint callback acts on it at the next step."""

    signum: int | None = None

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextmanager
def graceful_stop() -> Iterator[StopRequest]:
    """Within the block, the first SIGINT/SIGTERM only requests a stop; a second one quits."""
    stop = StopRequest()

    def handler(signum: int, frame: Any) -> None:
        if stop.requested:
            log.warning("second signal: quitting without a checkpoint")
            raise Interrupted(signum)
        stop.signum = signum
        log.warning(
            "%s received: saving a checkpoint and stopping (send it again to quit at once)",
            signal.Signals(signum).name,
        )

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises Interrupted, a KeyboardInterrupt (so a run is
    marked KILLED); ``graceful_stop`` takes over while training."""

    def handler(signum: int, frame: Any) -> None:
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class AtomicCheckpointCallback(BaseCallback):
    """Atomic checkpoints at rollout starts, at the end of training and on a stop request.

    Files are named as SB3's CheckpointCallback names them:
    ``<prefix>_<steps>_steps.zip``, ``<prefix>_replay_buffer_<steps>_steps.pkl``,
    ``<prefix>_vecnormalize_<steps>_steps.pkl``.
    """

    def __init__(
        self,
        buffer: MetricBuffer,
        save_freq: int,
        save_path: str | Path,
        name_prefix: str,
        stop: StopRequest | None = None,
    ) -> None:
        super().__init__()
        self.buffer = buffer
        self.save_freq = save_freq
        self.save_path = Path(save_path)
        self.name_prefix = name_prefix
        self.stop = stop or StopRequest()
        self.last: Checkpoint | None = None
        self._next_save = save_freq
        self._rollout_start_steps = 0
        self._stopped_early = False

    def _on_training_start(self) -> None:
        self.save_path.mkdir(parents=True, exist_ok=True)
        # Leftovers of a kill while writing; never read, but they would pile up.
        for stale in self.save_path.glob(f"{_TMP_PREFIX}*"):
            stale.unlink(missing_ok=True)
        self._rollout_start_steps = self.num_timesteps
        self._next_save = (self.num_timesteps // self.save_freq + 1) * self.save_freq

    def _on_rollout_start(self) -> None:
        self._rollout_start_steps = self.num_timesteps
        if self.num_timesteps >= self._next_save or self.stop.requested:
            self.save_now(self.num_timesteps)

    def _on_step(self) -> bool:
        if not self.stop.requested:
            return True
        if self.last is None or self.last.steps != self._consistent_steps():
            self.save_now(self._consistent_steps())
        self._stopped_early = True
        return False  # ends SB3's learn()

    def _on_training_end(self) -> None:
        # The last steps cross a checkpoint_every boundary with no rollout after them.
        # Not after an early stop: the model is mid-rollout, its checkpoint is written.
        if not self._stopped_early and self.num_timesteps >= self._next_save:
            self.save_now(self.num_timesteps)

    def _consistent_steps(self) -> int:
        """The step count that matches the model's state at this point of a step.

        On-policy weights change only between rollouts, so the state inside a
        rollout is the one at its start. Off-policy: this step's transition is
        stored only after the callbacks, so the replay buffer holds one fewer.
        """
        if isinstance(self.model, OnPolicyAlgorithm):
            return self._rollout_start_steps
        return self.num_timesteps - self.model.n_envs

    def save_now(self, steps: int) -> Checkpoint:
        """Write a checkpoint labelled ``steps`` (model, replay buffer, VecNormalize, logger)."""
        model: Any = self.model
        actual = model.num_timesteps
        model.num_timesteps = steps  # saved into the zip: what a resume continues from
        try:
            ckpt = self._write(model, steps)
        finally:
            model.num_timesteps = actual
        self.last = ckpt
        self._next_save = (steps // self.save_freq + 1) * self.save_freq
        log.info("checkpoint at %d steps: %s", steps, ckpt.model_path)
        return ckpt

    def _write(self, model: Any, steps: int) -> Checkpoint:
        prefix, d = self.name_prefix, self.save_path
        final = {"model": d / f"{prefix}_{steps}_steps.zip"}
        if getattr(model, "replay_buffer", None) is not None:
            final["replay_buffer"] = d / f"{prefix}_replay_buffer_{steps}_steps.pkl"
        vec_normalize = model.get_vec_normalize_env()
        if vec_normalize is not None:
            final["vecnormalize"] = d / f"{prefix}_vecnormalize_{steps}_steps.pkl"
        tmp = {k: p.with_name(f"{_TMP_PREFIX}{p.name}") for k, p in final.items()}
        # Keep the real extension last: SB3 appends '.zip' to a path without it.
        model.save(str(tmp["model"]))
        with zipfile.ZipFile(tmp["model"], "a") as z:
            z.writestr(LOGGER_MEMBER, json.dumps(logger_state(model.logger)))
        if "replay_buffer" in tmp:
            model.save_replay_buffer(str(tmp["replay_buffer"]))
        if "vecnormalize" in tmp:
            vec_normalize.save(str(tmp["vecnormalize"]))
        # Metrics first: once the zip exists, everything up to its step is logged.
        self.buffer.flush()
        for key in sorted(final, key=lambda k: k == "model"):  # the zip last
            os.replace(tmp[key], final[key])
        for path in final.values():
            mlflow.log_artifact(str(path), artifact_path="checkpoints")
        return Checkpoint(
            steps, final["model"], final.get("replay_buffer"), final.get("vecnormalize")
        )


def logger_state(logger: Logger) -> dict[str, Any]:
    """The numeric values SB3's logger holds for its next dump, as JSON-able data."""
    values = {
        k: float(v)
        for k, v in logger.name_to_value.items()
        if isinstance(v, int | float) or hasattr(v, "__float__")
    }
    excluded = {
        k: [v] if isinstance(v, str) else list(v) if v else None
        for k, v in logger.name_to_excluded.items()
        if k in values
    }
    counts = {k: int(v) for k, v in logger.name_to_count.items() if k in values}
    return {"values": values, "counts": counts, "excluded": excluded}


def restore_logger_state(logger: Logger, state: dict[str, Any]) -> None:
    """Put back what ``logger_state`` saved, so the next dump writes it."""
    logger.name_to_value.update(state.get("values", {}))
    logger.name_to_count.update(state.get("counts", {}))
    for k, v in state.get("excluded", {}).items():
        logger.name_to_excluded[k] = tuple(v) if v else None


def read_logger_state(ckpt: Checkpoint) -> dict[str, Any]:
    """The logger state saved in a checkpoint's zip ({} for a checkpoint without one)."""
    with zipfile.ZipFile(ckpt.model_path) as z:
        if LOGGER_MEMBER not in z.namelist():
            return {}
        state: dict[str, Any] = json.loads(z.read(LOGGER_MEMBER))
        return state


_STEPS = re.compile(r"^(?P<prefix>.+)_(?P<steps>\d+)_steps\.zip$")


def latest(save_dir: str | Path, prefix: str) -> Checkpoint | None:
    """The checkpoint with the most steps in ``save_dir`` (temporary files ignored)."""
    best: Checkpoint | None = None
    for path in Path(save_dir).glob(f"{prefix}_*_steps.zip"):
        match = _STEPS.match(path.name)
        if not match or match["prefix"] != prefix:
            continue
        steps = int(match["steps"])
        if best is None or steps > best.steps:
            rb = path.with_name(f"{prefix}_replay_buffer_{steps}_steps.pkl")
            vn = path.with_name(f"{prefix}_vecnormalize_{steps}_steps.pkl")
            best = Checkpoint(
                steps, path, rb if rb.is_file() else None, vn if vn.is_file() else None
            )
    return best


def _check_zip(path: Path) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
            bad = z.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"member {bad} is corrupt")
        # A truncated SB3 zip can still open: zipfile finds the end record of a
        # torch archive nested inside it and reads that one instead.
        missing = sorted(SB3_MEMBERS - names)
        if missing:
            raise zipfile.BadZipFile(f"no {', '.join(missing)} in the archive")
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({exc}); delete it (and its "
            "replay_buffer/vecnormalize files of the same step) to resume from the previous one"
        ) from exc


def load(target: str, ckpt: Checkpoint, env: Any, device: str) -> Any:
    """Rebuild the SB3 model of class ``target`` from a checkpoint, with its replay buffer."""
    _check_zip(ckpt.model_path)
    try:
        model = get_class(target).load(str(ckpt.model_path), env=env, device=device)
    except Exception as exc:  # SB3 raises ValueError, KeyError, pickle and torch errors
        raise CheckpointError(
            f"checkpoint {ckpt.model_path} cannot be loaded as {target} "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    if hasattr(model, "load_replay_buffer"):
        if ckpt.replay_buffer_path is None:
            log.warning(
                "checkpoint %s has no replay buffer file: %s resumes with an empty buffer",
                ckpt.model_path,
                target,
            )
        else:
            try:
                model.load_replay_buffer(str(ckpt.replay_buffer_path))
            except Exception as exc:  # truncated pickle: EOFError, UnpicklingError, ...
                raise CheckpointError(
                    f"replay buffer {ckpt.replay_buffer_path} is truncated or corrupt "
                    f"({type(exc).__name__}: {exc}); delete it and {ckpt.model_path.name} "
                    "to resume from the previous checkpoint"
                ) from exc
    return model


def replay_buffer_size(model: Any) -> int | None:
    """Transitions in an off-policy model's replay buffer (None for on-policy models)."""
    buffer = getattr(model, "replay_buffer", None)
    return None if buffer is None else int(buffer.size())


def policy_digest(model: Any) -> str:
    """sha256 of the policy's parameters: equal digests, equal policies."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.policy.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().to(torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


@contextmanager
def run_lock(out_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory while training it.

    The kernel drops the lock when the process dies, even on kill -9, so a
    resume can tell a crashed run from one that another process still trains.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / LOCK_FILE, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            raise CheckpointError(
                f"run directory {out_dir} is in use by another training process; wait for it "
                "or stop it before resuming"
            ) from exc
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@dataclass
class ResumeTarget:
    cfg: DictConfig  # the original run's resolved config
    run_id: str
    status: str  # the run's MLflow status when found: RUNNING after a kill -9
    finished_kpis: dict[str, float] | None  # set when the run already finished


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_run_files(out_dir: Path, run_id: str, cfg: DictConfig) -> None:
    """What a later ``resume=<this dir>`` needs: the run id and the resolved config."""
    _write_atomic(out_dir / RESOLVED_CONFIG, OmegaConf.to_yaml(cfg, resolve=True))
    _write_atomic(out_dir / RUN_ID_FILE, run_id + "\n")


def _saved_config(out_dir: Path, value: str) -> DictConfig:
    from pvbess import config

    saved = out_dir / RESOLVED_CONFIG
    if not saved.is_file():
        raise CheckpointError(
            f"resume={value}: {saved} is missing; cannot rebuild the run's config"
        )
    merged = OmegaConf.merge(OmegaConf.structured(config.TrainConfig), OmegaConf.load(saved))
    assert isinstance(merged, DictConfig)
    return merged


def resume_target(value: str, cfg: DictConfig) -> ResumeTarget:
    """Find the run to continue from a run directory or an MLflow run id.

    A run directory carries its own store: its saved config's ``tracking.uri``
    (or the project store it was written to) is used unless ``cfg`` sets one.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pvbess.experiment import tracking

    path = Path(value).expanduser()
    saved: DictConfig | None = None
    if path.is_dir():
        id_file = path / RUN_ID_FILE
        if not id_file.is_file():
            raise CheckpointError(
                f"resume={value}: not a pvbess run directory (no {RUN_ID_FILE}; the run "
                "directory is the one with checkpoints/ under experiments/)"
            )
        run_id = id_file.read_text().strip()
        saved = _saved_config(path, value)
        if cfg.tracking.uri:  # the store moved: the run continues where it is found
            saved.tracking.uri = cfg.tracking.uri
        uri = saved.tracking.uri
        root = saved.paths.root_dir
    elif os.sep in value or value.startswith("."):
        raise CheckpointError(f"resume={value}: no such run directory")
    else:
        run_id, uri, root = value, cfg.tracking.uri, cfg.paths.root_dir
    tracking_uri = uri or tracking.store_uri(root)
    if tracking_uri.startswith(("http://", "https://")):
        tracking.check_server(tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise CheckpointError(
            f"resume={value}: no run {run_id} in {tracking_uri} (give a run id or a "
            "run directory under experiments/)"
        ) from exc
    if saved is None:
        saved = _saved_config(Path(run.data.tags.get("output_dir", "")), value)
    finished = None
    if run.info.status == "FINISHED":
        finished = {k[5:]: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    return ResumeTarget(cfg=saved, run_id=run_id, status=run.info.status, finished_kpis=finished)
