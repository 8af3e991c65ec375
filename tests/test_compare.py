"""The comparison on the tiny site: figures equal the runs' own metrics, grouping is right."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pvbess import compare, tracking, train

from .conftest import compose_cfg


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    runs = [
        ["agent=ppo", "seed=0"],
        ["agent=ppo", "seed=1"],
        ["agent=uncontrolled"],
        ["agent=optimal"],
    ]
    for k, overrides in enumerate(runs):
        cfg = compose_cfg(
            [
                "site=tiny",
                "total_timesteps=64",
                "agent.n_steps=32" if "agent=ppo" in overrides else "seed=0",
                *overrides,
            ],
            root,
        )
        cfg.paths.output_dir = str(root / f"out{k}")
        train.train(cfg)
    tracking.configure(None, root, "tiny")
    return root


def test_table_matches_runs_and_groups_seeds(store) -> None:
    client = MlflowClient()
    shown, notes = compare.compare(compare.Selection(site="tiny"), store / "report")
    assert notes == []
    assert len(shown) == 3 and "CO2 [t/yr]" in shown.columns
    frame = compare.runs_frame(compare.select_runs(client, compare.Selection(site="tiny")))
    t, _ = compare.table(frame)
    assert set(t.agent) == {"ppo", "uncontrolled", "optimal"}
    ppo = t[t.agent == "ppo"].iloc[0]
    assert ppo.seeds == 2
    # Figures equal the runs' own metrics (tiny = one week: per year = x 52.14).
    runs = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], "tags.agent = 'ppo'"
    )
    co2_t = [
        r.data.metrics["eval/co2_kg"] / 1e3 * 8760 / r.data.metrics["eval/hours"] for r in runs
    ]
    assert ppo.co2_mean == pytest.approx(sum(co2_t) / 2)
    assert ppo.co2_std == pytest.approx(abs(co2_t[0] - co2_t[1]) / 2)
    base = t[t.agent == "uncontrolled"].co2_mean.iloc[0]
    best = t[t.agent == "optimal"].co2_mean.iloc[0]
    assert ppo.co2_change_vs_uncontrolled_pct == pytest.approx(100 * (ppo.co2_mean - base) / base)
    assert ppo.share_of_optimum_reduction_pct == pytest.approx(
        100 * (base - ppo.co2_mean) / (base - best)
    )
    opt = t[t.agent == "optimal"].iloc[0]
    assert opt.share_of_optimum_reduction_pct == pytest.approx(100.0)
    for f in (
        "comparison.csv",
        "comparison.md",
        "co2_by_controller.png",
        "monthly_co2.png",
        "typical_day.png",
        "learning_curves.png",
    ):
        assert (store / "report" / f).is_file(), f
    comp = client.search_runs(
        [client.get_experiment_by_name("tiny").experiment_id], "tags.kind = 'comparison'"
    )
    assert len(comp) >= 1
    names = {a.path for a in client.list_artifacts(comp[0].info.run_id)}
    assert {"comparison.csv", "comparison.md", "co2_by_controller.png"} <= names


def test_missing_baselines_are_named_and_columns_left_empty(store) -> None:
    sel = compare.Selection(site="tiny", tags={"agent": "ppo"})
    frame = compare.runs_frame(compare.select_runs(MlflowClient(), sel))
    t, notes = compare.table(frame)
    assert any("uncontrolled" in n for n in notes) and any("optimal" in n for n in notes)
    assert t.co2_change_vs_uncontrolled_pct.isna().all()
    assert t.share_of_optimum_reduction_pct.isna().all()


def test_empty_selection_is_a_clear_error(store) -> None:
    mlflow.set_tracking_uri(f"sqlite:///{store}/mlruns/mlflow.db")
    with pytest.raises(compare.SelectionError, match="no finished run"):
        compare.select_runs(MlflowClient(), compare.Selection(site="tiny", reward="nonexistent"))


def test_command_line_selects_by_site_and_reward_presets(store) -> None:
    import os
    import subprocess
    import sys

    from .conftest import ROOT

    env = dict(os.environ, PVBESS_ROOT=str(store), CITYLEARN_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pvbess.compare", "site=tiny", "reward=balanced"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CO2 [t/yr]" in proc.stdout and "uncontrolled" in proc.stdout
    reports = list((store / "reports" / "tiny").glob("*/comparison.md"))
    assert len(reports) == 1
