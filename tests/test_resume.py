"""Resume and interrupts, end to end: ``python -m pvbess.train`` subprocesses on site=tiny.

A PPO run is killed with SIGKILL after its second checkpoint and resumed; a
SAC run likewise, to check that its replay buffer comes back; a run stopped by
SIGTERM saves a checkpoint and is marked KILLED; its checkpoint, truncated, is
then refused by name. Independent processes run side by side, in three phases,
to keep the module short; each test checks one outcome.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pvbess.experiment import checkpoints, resume

from .conftest import ROOT, child_env, metric_steps, the_run

# Four PPO updates between checkpoints: the kill lands well before the run ends.
# One env copy: the step arithmetic below is per env step.
PPO_ARGS = [
    "env.n_envs=1",
    "agent=ppo",
    "agent.n_steps=64",
    "agent.batch_size=32",
    "agent.n_epochs=10",
    "total_timesteps=640",
    "checkpoint_every=128",
]
SAC_ARGS = [
    "env.n_envs=1",
    "agent=sac",
    "agent.learning_starts=50",
    "agent.buffer_size=1000",
    "agent.batch_size=32",
    "total_timesteps=256",
    "checkpoint_every=128",
]
# Stopped by SIGTERM long before its end, and before any periodic checkpoint:
# a checkpoint there is the one SIGTERM wrote.
LONG_PPO_ARGS = [*PPO_ARGS, "total_timesteps=64000", "checkpoint_every=1000000"]
TIMEOUT_S = 120
# Processes run side by side on 2 cores: torch's default of one thread per core
# in each of them oversubscribes the CPU and slows training tenfold.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Train:
    """One ``python -m pvbess.train`` subprocess; its output goes to ``<name>.log``."""

    def __init__(self, root: Path, name: str, *overrides: str) -> None:
        self.root = root
        self.run_dir = root / name
        self.log = root / f"{name}.log"
        args = [sys.executable, "-m", "pvbess.train", f"hydra.run.dir={self.run_dir}"]
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(
                [*args, "site=tiny", "device=cpu", *overrides],
                cwd=ROOT,
                env=child_env(root, ONE_THREAD),
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def output(self) -> str:
        return self.log.read_text()

    def wait(self) -> int:
        return self.proc.wait(timeout=TIMEOUT_S)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def signal_when(triggers: dict[Train, tuple[Callable[[], bool], signal.Signals]]) -> None:
    """Send each process its signal as soon as its condition holds (polled every 5 ms)."""
    pending = dict(triggers)
    deadline = time.monotonic() + TIMEOUT_S
    while pending:
        for t, (ready, sig) in list(pending.items()):
            assert t.proc.poll() is None, f"exited {t.proc.returncode} early:\n{t.output()}"
            if ready():
                t.proc.send_signal(sig)
                del pending[t]
        assert time.monotonic() < deadline, "timed out waiting for checkpoints"
        time.sleep(0.005)


def has_checkpoint(t: Train, name: str) -> Callable[[], bool]:
    return (t.run_dir / "checkpoints" / name).is_file


def training_for(t: Train, seconds: float) -> Callable[[], bool]:
    """True once ``t`` has been training for ``seconds`` (from its log line)."""
    seen: list[float] = []

    def ready() -> bool:
        if not seen and "training ppo from step 0" in t.output():
            seen.append(time.monotonic())
        return bool(seen) and time.monotonic() - seen[0] >= seconds

    return ready


def resume_args(run_dir: Path) -> list[str]:
    # Only the run directory: the config comes from there, not from overrides.
    return [f"resume={run_dir}"]


@dataclass
class Killed:
    """A run killed by a signal, and what it left."""

    first: Train
    returncode: int
    last: checkpoints.Checkpoint | None
    status: str  # the run's MLflow status right after the signal
    resumed: Train | None = None


@dataclass
class Scenarios:
    ppo: Killed
    ppo_digest: str  # policy_digest of the checkpoint PPO resumes from
    ppo_finished_before: Run  # the resumed PPO run before resuming it again
    ppo_again: Train  # resuming the finished PPO run
    sac: Killed
    sac_saved_buffer_size: int
    stopped: Killed  # by SIGTERM; its resume is from the truncated checkpoint
    stopped_model_steps: int  # num_timesteps inside the checkpoint SIGTERM wrote
    truncated: Path


def _killed(t: Train, prefix: str) -> Killed:
    returncode = t.wait()
    last = checkpoints.latest(t.run_dir / "checkpoints", prefix)
    return Killed(t, returncode, last, the_run(t.root).info.status)


def _scenarios(new_root: Callable[[str], Path], spawn: Callable[..., Train]) -> Scenarios:
    from stable_baselines3 import PPO
    from stable_baselines3.common.save_util import load_from_pkl

    # Phase 1: three trainings side by side, each stopped by its signal.
    ppo = spawn(new_root("ppo"), "run", *PPO_ARGS)
    sac = spawn(new_root("sac"), "run", *SAC_ARGS)
    long = spawn(new_root("sigterm"), "run", *LONG_PPO_ARGS)
    signal_when(
        {
            ppo: (has_checkpoint(ppo, "ppo_256_steps.zip"), signal.SIGKILL),
            sac: (has_checkpoint(sac, "sac_128_steps.zip"), signal.SIGKILL),
            long: (training_for(long, 1.0), signal.SIGTERM),
        }
    )
    killed_ppo, killed_sac, stopped = _killed(ppo, "ppo"), _killed(sac, "sac"), _killed(long, "ppo")
    assert killed_ppo.last is not None and killed_sac.last is not None
    assert killed_sac.last.replay_buffer_path is not None
    digest = checkpoints.policy_digest(PPO.load(killed_ppo.last.model_path, device="cpu"))
    buffer_size = int(load_from_pkl(killed_sac.last.replay_buffer_path).size())

    # Phase 2: resume both killed runs; resume the stopped one from a truncated checkpoint.
    assert stopped.last is not None
    truncated = stopped.last.model_path
    stopped_steps = int(PPO.load(truncated, device="cpu").num_timesteps)
    with open(truncated, "r+b") as fh:
        fh.truncate(truncated.stat().st_size // 2)
    for k, name in ((killed_ppo, "resume"), (killed_sac, "resume"), (stopped, "resume_bad")):
        k.resumed = spawn(k.first.root, name, *resume_args(k.first.run_dir))
    for k in (killed_ppo, killed_sac, stopped):
        assert k.resumed is not None
        k.resumed.wait()

    # Phase 3: resume the PPO run again, now that it is finished.
    before = the_run(killed_ppo.first.root)
    again = spawn(killed_ppo.first.root, "resume_again", *resume_args(ppo.run_dir))
    again.wait()
    return Scenarios(
        killed_ppo,
        digest,
        before,
        again,
        killed_sac,
        buffer_size,
        stopped,
        stopped_steps,
        truncated,
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scenarios]:
    """Run the scenarios; every process still running at the end is killed."""
    started: list[Train] = []

    def spawn(root: Path, name: str, *overrides: str) -> Train:
        started.append(Train(root, name, *overrides))
        return started[-1]

    try:
        yield _scenarios(tmp_path_factory.mktemp, spawn)
    finally:
        for t in started:
            t.stop()


def test_kill_9_leaves_the_last_checkpoint(runs: Scenarios) -> None:
    ppo = runs.ppo
    assert ppo.returncode == -signal.SIGKILL
    assert ppo.last is not None
    assert 256 <= ppo.last.steps < 640, "the run ended before the kill: nothing to resume"
    assert ppo.status == "RUNNING"  # nobody could mark it: kill -9


def test_resume_continues_the_same_run_to_total_timesteps(runs: Scenarios) -> None:
    ppo = runs.ppo
    assert ppo.resumed is not None and ppo.last is not None
    assert ppo.resumed.proc.returncode == 0, ppo.resumed.output()[-3000:]
    run = the_run(ppo.first.root)  # the same run, continued: there is no second one
    assert run.info.status == "FINISHED"
    assert run.info.run_id == (ppo.first.run_dir / resume.RUN_ID_FILE).read_text().strip()
    assert run.data.metrics["time/train_steps"] == 640
    assert run.data.tags["resumed_from_steps"] == str(ppo.last.steps)
    assert run.data.tags["resumed_policy_digest"] == runs.ppo_digest
    assert "eval/co2_kg" in run.data.metrics
    # Training time accumulates over the pieces: the killed attempt's time up to its
    # checkpoint (saved in it) plus the resumed piece's.
    first_piece = checkpoints.read_progress(ppo.last)
    assert first_piece["train_pieces"] == 1 and first_piece["train_seconds"] > 0
    assert run.data.metrics["time/train_pieces"] == 2
    assert run.data.metrics["time/train_seconds"] > first_piece["train_seconds"]


def test_resumed_metrics_have_every_step_once(runs: Scenarios) -> None:
    assert runs.ppo.last is not None
    killed_at = runs.ppo.last.steps
    run = the_run(runs.ppo.first.root)
    train_keys = [k for k in run.data.metrics if k.startswith("train/")]
    assert train_keys
    for key in ["episode/return", "time/total_timesteps", *train_keys]:
        s = metric_steps(run.info.run_id, key)
        assert s == sorted(set(s)), (key, s)  # strictly increasing: no duplicate
    # Exactly the steps an uninterrupted run logs: SB3 dumps after each rollout of
    # 64 steps, train/* (the previous update's losses) from the second one on.
    assert metric_steps(run.info.run_id, "time/total_timesteps") == list(range(64, 641, 64))
    for key in train_keys:
        assert metric_steps(run.info.run_id, key) == list(range(128, 641, 64)), key
    history = MlflowClient().get_metric_history(run.info.run_id, "time/total_timesteps")
    assert all(m.value == m.step for m in history)  # the model's own step counter
    # Episodes from before the kill (flushed with its checkpoint) and after the resume.
    episodes = metric_steps(run.info.run_id, "episode/return")
    assert min(episodes) <= killed_at < max(episodes), (episodes, killed_at)


def test_resuming_a_finished_run_does_nothing(runs: Scenarios) -> None:
    again, before = runs.ppo_again, runs.ppo_finished_before
    assert before.info.status == "FINISHED"
    assert again.proc.returncode == 0, again.output()[-3000:]
    assert "FINISHED: nothing to resume" in again.output()
    assert "training ppo" not in again.output()
    after = the_run(runs.ppo.first.root)
    assert after.info.status == "FINISHED"
    assert after.info.end_time == before.info.end_time
    for key in ("time/total_timesteps", "eval/co2_kg"):
        assert metric_steps(after.info.run_id, key) == metric_steps(before.info.run_id, key), key


def test_sac_resume_brings_back_the_replay_buffer(runs: Scenarios) -> None:
    sac = runs.sac
    assert sac.returncode == -signal.SIGKILL
    assert sac.last is not None and sac.resumed is not None
    assert 128 <= sac.last.steps < 256, "the run ended before the kill: nothing to resume"
    # One transition per step, all kept (buffer_size 1000 > steps).
    assert runs.sac_saved_buffer_size == sac.last.steps
    assert sac.resumed.proc.returncode == 0, sac.resumed.output()[-3000:]
    run = the_run(sac.first.root)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["time/train_steps"] == 256
    assert run.data.tags["resumed_from_steps"] == str(sac.last.steps)
    # Measured by the resumed process on the model it goes on training.
    assert run.data.tags["resumed_replay_buffer_size"] == str(runs.sac_saved_buffer_size)
    assert f"replay buffer {runs.sac_saved_buffer_size} transitions" in sac.resumed.output()


def test_sigterm_saves_a_checkpoint_and_marks_the_run_killed(runs: Scenarios) -> None:
    stopped = runs.stopped
    out = stopped.first.output()
    assert stopped.returncode == 128 + signal.SIGTERM, out[-3000:]
    assert stopped.status == "KILLED"
    assert f"resume={stopped.first.run_dir}" in out
    saved = sorted((stopped.first.run_dir / "checkpoints").glob("ppo_*_steps.zip"))
    assert saved == [runs.truncated]  # the only checkpoint
    assert stopped.last is not None and stopped.last.model_path == runs.truncated
    after_signal = out.split("SIGTERM received", 1)[1]
    assert f"checkpoint at {stopped.last.steps} steps: {runs.truncated}" in after_signal
    assert stopped.last.steps == runs.stopped_model_steps  # file name = saved counter
    # As at the start of a rollout: the state a resume continues from.
    assert stopped.last.steps % 64 == 0


def test_truncated_checkpoint_is_refused_by_name(runs: Scenarios) -> None:
    bad = runs.stopped.resumed
    assert bad is not None
    out = bad.output()
    assert bad.proc.returncode == 1, out[-3000:]
    assert f"error: CheckpointError: checkpoint {runs.truncated} is truncated or corrupt" in out
    assert "Traceback" not in out
    run = the_run(runs.stopped.first.root)
    assert run.info.status == "FAILED"
    assert str(runs.truncated) in run.data.tags["error"]


def test_a_checkpoint_cut_short_is_never_the_latest(tmp_path: Path, monkeypatch) -> None:
    """A crash between writing a checkpoint and renaming it (in process, on Pendulum)."""
    import gymnasium as gym
    from stable_baselines3 import PPO

    from pvbess.experiment import tracking

    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    mlflow.set_experiment("cut-short")  # not the experiment an earlier test left active
    env = gym.make("Pendulum-v1")
    model = PPO("MlpPolicy", env, n_steps=64, batch_size=64, n_epochs=1, device="cpu", seed=0)
    buffer = tracking.MetricBuffer()
    model.set_logger(tracking.sb3_logger(buffer))
    save_dir = tmp_path / "checkpoints"
    rename = os.replace

    def crash_before_second_zip(src: str | Path, dst: str | Path) -> None:
        if Path(dst).name == "ppo_128_steps.zip":
            raise OSError("simulated crash before the rename")
        rename(src, dst)

    monkeypatch.setattr(os, "replace", crash_before_second_zip)
    saver = checkpoints.AtomicCheckpointCallback(buffer, 64, save_dir, "ppo")
    with mlflow.start_run() as run, pytest.raises(OSError, match="simulated crash"):
        model.learn(total_timesteps=256, callback=saver)
    monkeypatch.undo()

    last = checkpoints.latest(save_dir, "ppo")
    assert last is not None and last.steps == 64
    assert (save_dir / ".tmp-ppo_128_steps.zip").is_file()  # complete, never renamed
    # The metrics up to the lost checkpoint were logged before its rename.
    assert metric_steps(run.info.run_id, "time/total_timesteps") == [64, 128]
    # The next training start clears the leftover.
    fresh = checkpoints.AtomicCheckpointCallback(buffer, 64, save_dir, "ppo")
    fresh.init_callback(model)
    fresh.on_training_start({}, {})
    assert not list(save_dir.glob(".tmp-*"))
    assert sorted(p.name for p in save_dir.iterdir()) == ["ppo_64_steps.zip"]
