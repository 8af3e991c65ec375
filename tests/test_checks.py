"""Cross-checks that act, and bugs that keep their traceback."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.exceptions import MlflowException

from pvbess import train
from pvbess.experiment import checks, cli, evaluation

from .conftest import run_python, the_run


def test_limits_decide_and_nan_fails() -> None:
    ok = {"eval/co2_vs_citylearn_rel": 1e-7, "lp/replay_co2_gap_rel": 0.0, "other": 5.0}
    assert checks.failed(ok) == []
    bad = {"eval/co2_vs_citylearn_rel": 2e-5, "lp/relaxation_gap_rel": float("nan")}
    assert [c.name for c, _ in checks.failed(bad)] == ["co2_vs_citylearn", "lp_relaxation_gap"]
    # A metric a run does not have is not checked.
    assert checks.failed({}) == []


def test_a_run_whose_co2_disagrees_with_citylearn_is_tagged(make_cfg, monkeypatch, caplog) -> None:
    real = evaluation.citylearn_co2_kg
    monkeypatch.setattr(evaluation, "citylearn_co2_kg", lambda env: real(env) * 1.001)
    cfg = make_cfg("site=tiny", "agent=uncontrolled")
    train.train(cfg)
    run = the_run(cfg.paths.root_dir)
    assert run.info.status == "FINISHED"  # the evidence stays in the store
    assert run.data.tags[checks.CHECK_TAG] == "co2_vs_citylearn"
    assert run.data.metrics["eval/co2_vs_citylearn_rel"] == pytest.approx(1e-3, rel=1e-3)
    assert "check failed: CO2 differs from CityLearn" in caplog.text


def test_a_clean_run_is_not_tagged(make_cfg) -> None:
    cfg = make_cfg("site=tiny", "agent=optimal")
    train.train(cfg)
    run = the_run(cfg.paths.root_dir)
    assert checks.CHECK_TAG not in run.data.tags
    # Every check that applies to the optimum was measured.
    for check in checks.CHECKS:
        if check.name != "twin_replay":  # only runs evaluated on the twin are replayed
            assert check.metric in run.data.metrics, check.metric


def test_library_errors_are_not_user_errors() -> None:
    from pvbess.config import ConfigError

    assert cli.user_error(ConfigError("site.bess.capacity_kwh: must be > 0"))
    assert not cli.user_error(ZeroDivisionError())
    assert not cli.user_error(MlflowException("bad parameter"))


BUG = """
import runpy
import sys

from pvbess.experiment import evaluation

def evaluate(*args, **kwargs):
    return 1 / 0

evaluation.evaluate = evaluate
sys.argv = ["pvbess.train", "site=tiny", "agent=uncontrolled"]
runpy.run_module("pvbess.train", run_name="__main__")  # as python -m pvbess.train
"""


def test_a_bug_prints_its_traceback_and_the_run_keeps_it(tmp_path) -> None:
    proc = run_python(["-c", BUG], tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "Traceback" in out and "ZeroDivisionError" in out, out[-3000:]
    run = the_run(tmp_path)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"] == "ZeroDivisionError: division by zero"
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="error.txt")
    text = open(path).read()
    assert text.startswith("Traceback") and "in evaluate" in text and "ZeroDivisionError" in text
