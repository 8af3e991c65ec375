"""Checkpoints that survive a kill, and resuming from them.

A checkpoint is written under a temporary name and renamed (atomic on POSIX),
so a kill while writing never leaves a corrupt "latest" checkpoint. Each one
is logged to MLflow as it is written, together with the training metrics
buffered since the previous one.
"""

from __future__ import annotations

import hashlib
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
from stable_baselines3.common.callbacks import CheckpointCallback

from pvbess.tracking import MetricBuffer

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message says which file and why."""


@dataclass(frozen=True)
class Checkpoint:
    steps: int
    model_path: Path
    replay_buffer_path: Path | None
    vecnormalize_path: Path | None


class AtomicCheckpointCallback(CheckpointCallback):
    """SB3's CheckpointCallback with atomic writes, MLflow artifacts and a metric flush."""

    def __init__(self, buffer: MetricBuffer, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.buffer = buffer

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0:
            self.save_now()
        return True

    def save_now(self) -> Checkpoint:
        """Write model (+ replay buffer, VecNormalize), log them, flush metrics."""
        paths = [self._atomic(self._checkpoint_path(extension="zip"), self.model.save)]
        buffer = getattr(self.model, "replay_buffer", None)
        if self.save_replay_buffer and buffer is not None:
            path = self._checkpoint_path("replay_buffer_", extension="pkl")
            paths.append(self._atomic(path, self.model.save_replay_buffer))  # type: ignore[attr-defined]
        vec_normalize = self.model.get_vec_normalize_env()
        if self.save_vecnormalize and vec_normalize is not None:
            path = self._checkpoint_path("vecnormalize_", extension="pkl")
            paths.append(self._atomic(path, vec_normalize.save))
        for p in paths:
            mlflow.log_artifact(str(p), artifact_path="checkpoints")
        self.buffer.flush()
        log.info("checkpoint at %d steps: %s", self.num_timesteps, paths[0])
        return Checkpoint(self.num_timesteps, paths[0], None, None)

    @staticmethod
    def _atomic(path: str, save: Any) -> Path:
        final = Path(path)
        # Keep the real extension last: SB3 appends '.zip' to a path without it.
        tmp = final.with_name(f".tmp-{final.name}")
        save(str(tmp))
        os.replace(tmp, final)
        return final


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


def load(target: str, ckpt: Checkpoint, env: Any, device: str) -> Any:
    """Rebuild the SB3 model of class ``target`` from a checkpoint, with its replay buffer."""
    try:
        with zipfile.ZipFile(ckpt.model_path) as z:
            bad = z.testzip()
        if bad is not None:
            raise zipfile.BadZipFile(f"member {bad} is corrupt")
    except (zipfile.BadZipFile, OSError) as exc:
        raise CheckpointError(
            f"checkpoint {ckpt.model_path} is truncated or corrupt ({exc}); delete it to resume "
            "from the previous one"
        ) from exc
    model = get_class(target).load(str(ckpt.model_path), env=env, device=device)
    if ckpt.replay_buffer_path is not None and hasattr(model, "load_replay_buffer"):
        model.load_replay_buffer(str(ckpt.replay_buffer_path))
    return model


def policy_digest(model: Any) -> str:
    """sha256 of the policy's parameters: equal digests, equal policies."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.policy.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().to(torch.float64).numpy().tobytes())
    return h.hexdigest()[:16]


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises KeyboardInterrupt (so it saves like Ctrl-C does)."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


RUN_ID_FILE = "mlflow_run_id"
RESOLVED_CONFIG = "resolved_config.yaml"


@dataclass
class ResumeTarget:
    cfg: Any  # the original run's resolved DictConfig
    run_id: str
    finished_kpis: dict[str, float] | None  # set when the run already finished


def write_run_files(out_dir: Path, run_id: str, cfg: Any) -> None:
    """What a later ``resume=<this dir>`` needs: the run id and the resolved config."""
    from omegaconf import OmegaConf

    (out_dir / RUN_ID_FILE).write_text(run_id + "\n")
    (out_dir / RESOLVED_CONFIG).write_text(OmegaConf.to_yaml(cfg, resolve=True))


def resume_target(value: str, cfg: Any) -> ResumeTarget:
    """Find the run to continue from a run directory or an MLflow run id."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient
    from omegaconf import OmegaConf

    from pvbess import config, tracking

    path = Path(value).expanduser()
    out_dir: Path | None = None
    if path.is_dir():
        id_file = path / RUN_ID_FILE
        if not id_file.is_file():
            raise CheckpointError(f"resume={value}: not a pvbess run directory (no {RUN_ID_FILE})")
        run_id, out_dir = id_file.read_text().strip(), path
    else:
        run_id = value
    mlflow.set_tracking_uri(cfg.tracking.uri or tracking.store_uri(cfg.paths.root_dir))
    try:
        run = MlflowClient().get_run(run_id)
    except MlflowException as exc:
        raise CheckpointError(
            f"resume={value}: no such run in {mlflow.get_tracking_uri()} (give a run id or a "
            "run directory under experiments/)"
        ) from exc
    out_dir = out_dir or Path(run.data.tags.get("output_dir", ""))
    saved = out_dir / RESOLVED_CONFIG
    if not saved.is_file():
        raise CheckpointError(
            f"resume={value}: {saved} is missing; cannot rebuild the run's config"
        )
    original = OmegaConf.merge(OmegaConf.structured(config.TrainConfig), OmegaConf.load(saved))
    finished = None
    if run.info.status == "FINISHED":
        finished = {k[5:]: v for k, v in run.data.metrics.items() if k.startswith("eval/")}
    return ResumeTarget(cfg=original, run_id=run_id, finished_kpis=finished)
