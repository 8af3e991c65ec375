"""Checkpoints that survive a kill (resuming from them: ``resume``; signals: ``signals``).

A checkpoint is taken where training is in a consistent state: at the start
of a rollout (the last update done, no experience collected with the current
weights yet), at the first one after every ``checkpoint_every`` steps, and at
the end of training when it falls on such a boundary. Its files are written
under temporary names and renamed, the model's zip last (atomic on POSIX): a
kill while writing never leaves a corrupt or half-written "latest" checkpoint.
Training metrics buffered since the previous checkpoint are flushed to MLflow
before the rename (see tracking.MetricBuffer).

Ctrl-C and SIGTERM during training do not abort SB3 mid-update: they request a
stop (``signals.graceful_stop``), the next step saves a checkpoint and ends ``learn``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import torch
from hydra.utils import get_class
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger
from stable_baselines3.common.on_policy_algorithm import OnPolicyAlgorithm

from pvbess.experiment.signals import StopRequest
from pvbess.experiment.tracking import MetricBuffer

log = logging.getLogger(__name__)

# Extra member in the model zip (SB3's loader reads only 'data' and '*.pth'):
# the values SB3's logger recorded since its last dump, e.g. the last update's
# train/* losses, which it writes only at the next dump.
LOGGER_MEMBER = "pvbess_logger_state.json"
# The run's progress at the checkpoint: training seconds summed over the run's pieces
# (an interrupted run and its resumes) and how many pieces made it.
PROGRESS_MEMBER = "pvbess_progress.json"
# What every SB3 model zip holds: the pickled attributes and the policy's weights.
SB3_MEMBERS = frozenset({"data", "policy.pth"})
TMP_PREFIX = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint or run directory cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class Checkpoint:
    steps: int
    model_path: Path
    replay_buffer_path: Path | None
    vecnormalize_path: Path | None


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
        progress: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        super().__init__()
        self.progress = progress or dict
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
        for stale in self.save_path.glob(f"{TMP_PREFIX}*"):
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
        tmp = {k: p.with_name(f"{TMP_PREFIX}{p.name}") for k, p in final.items()}
        # Keep the real extension last: SB3 appends '.zip' to a path without it.
        model.save(str(tmp["model"]))
        with zipfile.ZipFile(tmp["model"], "a") as z:
            z.writestr(LOGGER_MEMBER, json.dumps(logger_state(model.logger)))
            z.writestr(PROGRESS_MEMBER, json.dumps(self.progress()))
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


def read_progress(ckpt: Checkpoint) -> dict[str, float]:
    """What ``progress`` saved in a checkpoint ({} for one written before it existed)."""
    with zipfile.ZipFile(ckpt.model_path) as z:
        if PROGRESS_MEMBER not in z.namelist():
            return {}
        progress: dict[str, float] = json.loads(z.read(PROGRESS_MEMBER))
        return progress


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
    restore_vec_normalize(model, ckpt.vecnormalize_path, ckpt.model_path)
    return model


def restore_vec_normalize(model: Any, path: Path | None, owner: Path) -> None:
    """The training env's VecNormalize statistics from ``path`` (saved with ``owner``, a
    model zip), for a model whose run normalizes; nothing for one that does not."""
    from stable_baselines3.common.vec_env import VecNormalize

    vec_normalize = model.get_vec_normalize_env()
    if vec_normalize is None:
        return
    if path is None:
        raise CheckpointError(
            f"{owner} has no VecNormalize statistics beside it but the run normalizes "
            "(env.normalize=true): they would start from scratch"
        )
    try:
        saved = VecNormalize.load(str(path), vec_normalize.venv)
    except Exception as exc:  # truncated pickle: EOFError, UnpicklingError, ...
        raise CheckpointError(
            f"VecNormalize statistics {path} are truncated or corrupt ({type(exc).__name__}: {exc})"
        ) from exc
    vec_normalize.obs_rms, vec_normalize.ret_rms = saved.obs_rms, saved.ret_rms


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
