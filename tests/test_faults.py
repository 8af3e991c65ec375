"""Faults that would lose or misrecord data: runs started together on a new store, a
sweep killed with kill -9 and resumed, artifacts of a custom store, an experiment whose
artifact folder cannot be written."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import ROOT, child_env, run_module, store_client, store_runs

TINY_FAST = ["site=tiny", "env.eval_backend=twin"]


# Slow (16-45 s): four starts on a new store; test_sweep's four jobs on two workers
# start together in the fast suite.
@pytest.mark.slow
def test_four_runs_started_together_on_a_new_store_all_finish(tmp_path: Path) -> None:
    # Without the store lock, one of these dies in MLflow's table creation
    # ('table tags already exists' / an alembic revision error) and records nothing.
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pvbess.train",
                *TINY_FAST,
                "agent=uncontrolled",
                f"seed={seed}",
                f"hydra.run.dir={tmp_path / f'run{seed}'}",
            ],
            cwd=ROOT,
            env=child_env(tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in range(4)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, out[-3000:]
    runs = store_runs(tmp_path)
    assert sorted(r.data.tags["seed"] for r in runs) == ["0", "1", "2", "3"]
    for run in runs:
        assert run.info.status == "FINISHED"
        for key in ("eval/co2_kg", "eval/grid_import_kwh", "time/train_seconds"):
            assert key in run.data.metrics, (key, run.data.metrics.keys())


def _wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("condition not reached")
        time.sleep(0.2)


# Slow (18-48 s): a whole sweep killed; test_resume kills a run with kill -9 in the fast suite.
@pytest.mark.slow
def test_a_sweep_killed_with_kill_9_is_marked_then_resumed(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "sweep"
    args = [
        *TINY_FAST,
        "agent=uncontrolled,rbc,optimal",
        "hydra/launcher=basic",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvbess.train", "--multirun", *args],
        cwd=ROOT,
        env=child_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        # Killed while the second job runs: the first has finished, the third never began.
        _wait_for(lambda: (sweep_dir / "1_rbc-balanced-s0" / "mlflow_run_id").is_file(), 240)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    parent_name = f"sweep-{tmp_path.name}_sweep"  # sweep-<parent folder>_<folder>
    before = {r.info.run_name: r for r in store_runs(tmp_path)}
    assert before[parent_name].info.status == "RUNNING"
    assert before["rbc-balanced-s0"].info.status == "RUNNING"
    assert before["uncontrolled-balanced-s0"].info.status == "FINISHED"
    assert "optimal-balanced-s0" not in before

    # The next use of the store tells the dead runs from live ones: KILLED, with the reason.
    from pvbess.experiment import tracking

    closed = tracking.close_stale_runs(store_client(tmp_path))
    assert sorted(closed) == sorted(
        [before["rbc-balanced-s0"].info.run_id, before[parent_name].info.run_id]
    )
    killed = {r.info.run_name: r for r in store_runs(tmp_path)}
    for name in ("rbc-balanced-s0", parent_name):
        assert killed[name].info.status == "KILLED"
        assert "ended without ending the run" in killed[name].data.tags["error"]

    done = run_module("pvbess.train", [f"resume={sweep_dir}"], tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    after = store_runs(tmp_path)
    by_name = {r.info.run_name: r for r in after}
    assert len(after) == 4  # the parent and its three jobs: nothing started twice
    parent = by_name[parent_name]
    assert parent.info.run_id == before[parent_name].info.run_id
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["sweep/jobs"] == 3
    assert parent.data.metrics["sweep/jobs_finished"] == 3
    for name in ("uncontrolled-balanced-s0", "rbc-balanced-s0", "optimal-balanced-s0"):
        run = by_name[name]
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert "eval/co2_kg" in run.data.metrics
    # The interrupted job continued its own run.
    assert by_name["rbc-balanced-s0"].info.run_id == before["rbc-balanced-s0"].info.run_id


def test_a_live_run_is_not_marked_killed(tmp_path: Path) -> None:
    from pvbess.experiment import tracking

    tracking.configure(None, tmp_path, "tiny")
    client = store_client(tmp_path)
    exp = client.get_experiment_by_name("tiny")
    assert exp is not None
    alive = client.create_run(exp.experiment_id, tags=tracking.process_tags())
    dead_tags = tracking.process_tags() | {tracking.PID_STARTED_TAG: "12.000"}  # pid reused
    dead = client.create_run(exp.experiment_id, tags=dead_tags)
    other_host = client.create_run(
        exp.experiment_id, tags=dead_tags | {tracking.HOST_TAG: "another-host"}
    )
    assert tracking.close_stale_runs(client) == [dead.info.run_id]
    assert client.get_run(alive.info.run_id).info.status == "RUNNING"
    assert client.get_run(other_host.info.run_id).info.status == "RUNNING"  # cannot tell


def test_a_custom_sqlite_store_keeps_its_artifacts_beside_it(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pvbess.experiment import tracking

    project = tmp_path / "project"
    store = tmp_path / "elsewhere" / "runs.db"
    exp_id = tracking.configure(f"sqlite:///{store}", project, "tiny")
    location = MlflowClient().get_experiment(exp_id).artifact_location
    assert location == (tmp_path / "elsewhere" / "artifacts" / "tiny").as_uri()
    assert not (project / "mlruns").exists()


def test_the_advice_for_an_unwritable_artifact_folder_works(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from pvbess.experiment import tracking

    (tmp_path / "blocker").write_text("a file\n")
    tracking.configure(None, tmp_path, "other")  # creates the store
    MlflowClient().create_experiment("tiny", artifact_location=(tmp_path / "blocker").as_uri())
    with pytest.raises(tracking.TrackingError) as err:
        tracking.configure(None, tmp_path, "tiny")
    advice = "tracking.experiment=<new name> tracking.artifact_location=<writable folder>"
    assert advice in str(err.value)
    # Following it: a new experiment with a writable folder.
    writable = tmp_path / "artifacts_ok"
    exp_id = tracking.configure(None, tmp_path, "tiny_2", writable.as_uri())
    assert MlflowClient().get_experiment(exp_id).artifact_location == (writable / "tiny_2").as_uri()
