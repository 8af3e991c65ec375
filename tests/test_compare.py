"""The comparison on the tiny site: figures equal the runs' own metrics, grouping is right."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from mlflow.entities import Run

from pvbess import train
from pvbess.experiment import compare, tracking
from pvbess.experiment.checks import CHECK_TAG

from .conftest import artifact_paths, compose_cfg, run_module, store_client, store_runs

PPO = ["agent=ppo", "total_timesteps=64", "agent.n_steps=32"]
RUNS = {
    "ppo_s0": [*PPO, "seed=0"],
    "ppo_s1": [*PPO, "seed=1"],
    "ppo_lr": [*PPO, "seed=0", "agent.learning_rate=0.001"],
    "ppo_budget": ["agent=ppo", "total_timesteps=128", "agent.n_steps=32", "seed=0"],
    "ppo_cost": [*PPO, "seed=0", "reward=cost_heavy"],
    # Its timeseries carries a text column (each step's expected sessions, JSON).
    "residual_arrivals": [
        "agent=ppo_residual",
        "levers=mpc_residual_arrivals",
        "total_timesteps=64",
        "agent.n_steps=32",
        "seed=0",
    ],
    "uncontrolled": ["agent=uncontrolled"],
    "uncontrolled_cost": ["agent=uncontrolled", "reward=cost_heavy"],
    "optimal": ["agent=optimal"],
    "optimal_cost": ["agent=optimal", "reward=cost_heavy"],
}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    for k, (name, overrides) in enumerate(RUNS.items()):
        cfg = compose_cfg(["site=tiny", *overrides, f"tracking.run_name={name}"], root)
        cfg.paths.output_dir = str(root / f"out{k}")
        train.train(cfg)
    tracking.configure(None, root, "tiny")
    return root


def _runs(store: Path) -> dict[str, Run]:
    return {r.info.run_name: r for r in store_runs(store) if r.info.run_name in RUNS}


def _objective(run: Run) -> float:
    """J by hand: minus the evaluation's summed reward."""
    m = run.data.metrics
    return -m["eval/reward_total_mean"] * m["eval/hours"]


def _row(t, **where):
    mask = True
    for key, value in where.items():
        mask = mask & (t[key] == value)
    rows = t[mask]
    assert len(rows) == 1, (where, t[list(compare.GROUP_KEYS)])
    return rows.iloc[0]


def test_rows_are_experiments_and_only_seeds_are_pooled(store) -> None:
    client = store_client(store)
    t, _ = compare.table(compare.runs_frame(compare.select_runs(client, compare.Selection("tiny"))))
    residual = t.env.str.contains("bess=mpc_residual")
    # PPO on the MPC is PPO with other levers: a row of its own.
    assert (t[residual].agent == "ppo").all() and residual.sum() == 1
    ppo = t[(t.agent == "ppo") & (t.reward == "balanced") & ~residual]
    # seeds 0 and 1 pooled; another learning rate and another budget are rows of their own.
    assert sorted(ppo.seeds) == [1, 1, 2]
    assert ppo.hparams.nunique() == 2 and ppo.budget.nunique() == 2
    runs = _runs(store)
    pooled = _row(ppo, seeds=2)
    co2_t = [
        runs[n].data.metrics["eval/co2_kg"] / 1e3 * 8760 / runs[n].data.metrics["eval/hours"]
        for n in ("ppo_s0", "ppo_s1")
    ]
    assert pooled.co2_mean == pytest.approx(sum(co2_t) / 2)
    assert pooled.co2_std == pytest.approx(abs(co2_t[0] - co2_t[1]) / 2)
    assert pooled.hparams == runs["ppo_s0"].data.tags["agent_hparams"]
    levers = runs["ppo_s0"].data.tags["env_levers"]
    assert levers.startswith("obs=time+tariff+peak+fleet+fc:persistence") and "norm" in levers
    assert pooled.env == f"twinx8 {levers}"
    assert pooled.site_data == runs["ppo_s0"].data.tags["site_data_hash"]
    # A controller's row does not depend on a training env it never used.
    assert (t[t.agent != "ppo"].env == "-").all()


def test_share_of_optimum_is_in_the_presets_own_objective(store) -> None:
    client = store_client(store)
    runs = _runs(store)
    t, notes = compare.table(
        compare.runs_frame(compare.select_runs(client, compare.Selection("tiny")))
    )
    assert notes == []
    cases = {
        "balanced": ("uncontrolled", "optimal", ["ppo_s0", "ppo_s1"]),
        "cost_heavy": ("uncontrolled_cost", "optimal_cost", ["ppo_cost"]),
    }
    for reward, (unc_name, opt_name, ppo_names) in cases.items():
        base = _objective(runs[unc_name])
        best = _objective(runs[opt_name])
        assert best < base  # the optimum improves the objective
        ppo = [runs[n] for n in ppo_names]
        j = sum(_objective(r) for r in ppo) / len(ppo)
        row = _row(
            t, agent="ppo", reward=reward, budget=64, hparams=ppo[0].data.tags["agent_hparams"]
        )
        assert row.seeds == len(ppo)
        assert row.objective == pytest.approx(j)
        assert row.share_of_optimum_pct == pytest.approx(100 * (base - j) / (base - best))
        # Its spread: the std over seeds of each seed's own share.
        shares = [100 * (base - _objective(r)) / (base - best) for r in ppo]
        assert row.share_of_optimum_std_pct == pytest.approx(float(np.std(shares)), abs=1e-9)
        assert _row(t, agent="optimal", reward=reward).share_of_optimum_pct == pytest.approx(100)
        assert _row(t, agent="uncontrolled", reward=reward).share_of_optimum_pct == pytest.approx(0)
        # Per-KPI changes vs. the uncontrolled site stand beside it.
        unc = runs[unc_name].data.metrics
        cost = sum(r.data.metrics["eval/cost"] for r in ppo) / len(ppo)
        assert row.cost_change_vs_uncontrolled_pct == pytest.approx(
            100 * (cost - unc["eval/cost"]) / unc["eval/cost"]
        )


def test_uncontrolled_objective_recomputed_under_another_presets_weights(store) -> None:
    """The reward is linear in its weights: J of the uncontrolled run under cost_heavy,
    recomputed from its balanced run's components, equals the cost_heavy run's own J."""
    runs = _runs(store)
    without = [r for n, r in runs.items() if n != "uncontrolled_cost"]
    frame = compare.runs_frame(without)
    t, _ = compare.table(frame)
    row = _row(t, agent="optimal", reward="cost_heavy")
    assert row.share_of_optimum_pct == pytest.approx(100)
    recomputed = compare._baseline_objective(frame, row)
    assert recomputed == pytest.approx(_objective(runs["uncontrolled_cost"]), rel=1e-9)


def test_report_files_and_comparison_run(store) -> None:
    client = store_client(store)
    shown, _ = compare.compare(compare.Selection(site="tiny"), store / "report")
    assert "CO2 [t/yr]" in shown.columns and "of optimum's gain [%]" in shown.columns
    for col in (
        "hparams",
        "eval data",
        "train years",
        "budget [steps]",
        "env",
        "seeds",
        "Δ cost [%]",
    ):
        assert col in shown.columns, col
    assert len(shown) == 9
    for f in (
        "comparison.csv",
        "comparison.md",
        "co2_by_controller.png",
        "monthly_co2.png",
        "typical_day.png",
        "learning_curves.png",
    ):
        assert (store / "report" / f).is_file(), f
    comp = [r for r in store_runs(store) if r.data.tags.get("kind") == "comparison"]
    assert len(comp) >= 1
    names = artifact_paths(client, comp[0].info.run_id)
    assert {"comparison.csv", "comparison.md", "co2_by_controller.png"} <= names


def test_a_failed_check_marks_the_row(store) -> None:
    runs = list(_runs(store).values())
    victim = next(r for r in runs if r.info.run_name == "ppo_lr")
    victim.data.tags[CHECK_TAG] = "co2_vs_citylearn"  # as checks.act tags a run
    t, notes = compare.table(compare.runs_frame(runs))
    row = _row(t, agent="ppo", hparams=victim.data.tags["agent_hparams"])
    assert row.checks_failed == "co2_vs_citylearn"
    assert any("co2_vs_citylearn" in n for n in notes)
    shown = compare.display_frame(t)
    assert (shown.agent == "ppo!").sum() == 1


def test_the_steps_each_seeds_policy_was_chosen_at_are_shown(store) -> None:
    runs = list(_runs(store).values())
    for name, steps in (("ppo_s0", "25000"), ("ppo_s1", "0")):
        next(r for r in runs if r.info.run_name == name).data.tags["selected_at_steps"] = steps
    t, _ = compare.table(compare.runs_frame(runs))
    shown = compare.display_frame(t)
    pooled = t.index[(t.agent == "ppo") & (t.seeds == 2)][0]
    assert shown["chosen at [steps]"][pooled] == "25000,0"  # seed 0, then seed 1
    assert (shown["chosen at [steps]"].drop(pooled) == "").all()  # the last policy


def test_missing_baselines_are_named_and_columns_left_empty(store) -> None:
    sel = compare.Selection(site="tiny", tags={"agent": "ppo"})
    frame = compare.runs_frame(compare.select_runs(store_client(store), sel))
    t, notes = compare.table(frame)
    assert any("uncontrolled" in n for n in notes) and any("optimal" in n for n in notes)
    assert t.co2_change_vs_uncontrolled_pct.isna().all()
    assert t.share_of_optimum_pct.isna().all()


def test_empty_selection_is_a_clear_error(store) -> None:
    client = store_client(store)
    with pytest.raises(compare.SelectionError, match="no finished run"):
        compare.select_runs(client, compare.Selection(site="tiny", reward="nonexistent"))


def test_command_line_selects_by_site_and_reward_presets(store) -> None:
    proc = run_module("pvbess.compare", ["site=tiny", "reward=balanced"], store)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "CO2 [t/yr]" in proc.stdout and "uncontrolled" in proc.stdout
    reports = list((store / "reports" / "tiny").glob("*/comparison.md"))
    assert len(reports) == 1


def test_a_runs_closing_summary_puts_it_in_context(store, tmp_path) -> None:
    client = store_client(store)
    runs = _runs(store)
    ppo, base, best = runs["ppo_s0"], runs["uncontrolled"], runs["optimal"]
    share = (_objective(base) - _objective(ppo)) / (_objective(base) - _objective(best))
    text = compare.context(ppo.info.run_id, client)
    assert f"share of the optimum's gain in the balanced objective: {100 * share:.1f} %" in text
    co2 = ppo.data.metrics["eval/co2_kg"] / base.data.metrics["eval/co2_kg"] - 1
    assert f"CO2 {100 * co2:+.2f} %" in text
    # Without references in the store: the commands that make them.
    cfg = compose_cfg(["site=tiny", *PPO], tmp_path)
    train.train(cfg)
    lonely = store_runs(tmp_path)[0]
    text = compare.context(lonely.info.run_id, store_client(tmp_path))
    assert "python -m pvbess.train agent=uncontrolled site=tiny" in text
    assert "python -m pvbess.train agent=optimal site=tiny reward=balanced" in text


def test_the_terminal_table_wraps_long_agent_names_instead_of_cutting_them(capsys) -> None:
    import pandas as pd

    names = [f"mpc(pv=persistence,load=perfect,ev={k})" for k in ("perfect", "persistence")]
    # Every column filled, so the 250-character console has to squeeze some.
    shown = pd.DataFrame({c: ["a cell of some length"] * 2 for c in compare.TERMINAL_COLUMNS})
    shown["agent"] = names
    compare.print_table(shown, [])
    body = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("│")]
    assert len(body) > len(names)  # the names did not fit on one line each
    # The agent column read top to bottom is the names in full, none cut.
    assert "".join(ln.split("│")[1].strip() for ln in body) == "".join(names)
