"""Sizing (python -m pvbess.size): costs by hand, the Pareto front, a site without a
battery, skipped designs, bad input, and a small sweep on the tiny site into a
temporary MLflow store."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pvbess.config import ConfigError
from pvbess.experiment import sizing
from pvbess.site.costs import (
    CostsConfig,
    Design,
    annualized_investment,
    battery_life_yr,
    capital_recovery_factor,
)

# CRF(8 %, n) = 0.08 * 1.08^n / (1.08^n - 1), worked out by hand from 1.08^n:
# 1.08^15 = 3.1721691, 1.08^12 = 2.5181701, 1.08^25 = 6.8484752, 1.08^10 = 2.1589250.
CRF_8_15 = 0.08 * 3.1721691 / 2.1721691  # 0.1168295
CRF_8_12 = 0.08 * 2.5181701 / 1.5181701  # 0.1326950
CRF_8_25 = 0.08 * 6.8484752 / 5.8484752  # 0.0936788
CRF_8_10 = 0.08 * 2.1589250 / 1.1589250  # 0.1490295


def test_capital_recovery_factor_by_hand() -> None:
    assert capital_recovery_factor(0.08, 15) == pytest.approx(0.1168295, abs=1e-7)
    assert capital_recovery_factor(0.08, 15) == pytest.approx(CRF_8_15, rel=1e-7)
    assert capital_recovery_factor(0.08, 25) == pytest.approx(CRF_8_25, rel=1e-7)
    # No interest: the capital back in equal parts.
    assert capital_recovery_factor(0.0, 20) == pytest.approx(0.05)


def test_annualized_investment_by_hand() -> None:
    costs = CostsConfig(currency_per_usd=2.0)
    design = Design(bess_capacity_kwh=1000, bess_power_kw=500, pv_dc_kwp=100, pv_ac_kw=50)
    inv = annualized_investment(design, costs, bess_cycles_per_yr=100.0)
    # Battery: (1000 x 241 + 500 x 339) USD x 2 = 821,000 over 15 yr (calendar life binds:
    # 6,000 cycles / 100 per yr = 60 yr).
    assert inv.bess_life_yr == 15.0
    assert inv.bess_per_yr == pytest.approx(821_000 * CRF_8_15, rel=1e-7)
    assert inv.inverter_per_yr == pytest.approx(50 * 100 * 2 * CRF_8_12, rel=1e-7)
    assert inv.pv_per_yr == pytest.approx(100 * 800 * 2 * CRF_8_25, rel=1e-7)
    assert inv.total_per_yr == pytest.approx(
        821_000 * CRF_8_15 + 10_000 * CRF_8_12 + 160_000 * CRF_8_25, rel=1e-7
    )


def test_cycling_shortens_the_battery_life() -> None:
    costs = CostsConfig(currency_per_usd=1.0)
    assert battery_life_yr(costs, 0.0) == 15.0
    assert battery_life_yr(costs, 400.0) == 15.0  # 6,000 / 400 = 15: the two meet
    assert battery_life_yr(costs, 600.0) == pytest.approx(10.0)  # 6,000 / 600
    design = Design(1000, 500, 0, 0)
    calm = annualized_investment(design, costs, 100.0)
    hard = annualized_investment(design, costs, 600.0)
    capex = 1000 * 241 + 500 * 339
    assert calm.bess_per_yr == pytest.approx(capex * CRF_8_15, rel=1e-7)
    assert hard.bess_per_yr == pytest.approx(capex * CRF_8_10, rel=1e-7)
    assert hard.bess_per_yr > calm.bess_per_yr


def test_costs_are_checked() -> None:
    with pytest.raises(ConfigError, match=r"costs\.discount_rate_frac"):
        CostsConfig(discount_rate_frac=1.5).check()
    with pytest.raises(ConfigError, match=r"costs\.bess_cycle_life_cycles"):
        CostsConfig(bess_cycle_life_cycles=0).check()


def test_pareto_front_on_a_hand_made_table() -> None:
    #              A    B    C    D    E    F    G (= A)
    co2 = np.array([10, 8, 9, 8, 12, 12, 10], dtype=float)
    cost = np.array([5, 7, 8, 9, 4, 6, 5], dtype=float)
    front = sizing.pareto_front(co2, cost)
    # C (9, 8) and D (8, 9) lose to B (8, 7); F (12, 6) to E (12, 4) and A; ties stay.
    assert front.tolist() == [True, True, False, False, True, False, True]
    # Below the tolerance a difference is the solver's rounding, not a better design.
    assert sizing.pareto_front([100.0, 100.0 - 1e-7], [1.0, 2.0]).tolist() == [True, False]


def test_table_changes_and_cost_per_tonne_by_hand() -> None:
    rows = pd.DataFrame(
        {
            "design": ["today", "big", "worse", "none"],
            "controller": "optimal",
            "today": [True, False, False, False],
            "status": "finished",
            "co2_kg_per_yr": [100_000.0, 90_000.0, 101_000.0, 105_000.0],
            "total_cost_per_yr": [1_000.0, 1_500.0, 1_200.0, 900.0],
        }
    )
    t = sizing.table(rows).set_index("design")
    assert t.loc["big", "co2_change_vs_today_pct"] == pytest.approx(-10.0)
    assert t.loc["worse", "co2_change_vs_today_pct"] == pytest.approx(1.0)
    # 500 more per year for 10 t less: 50 per tonne avoided.
    assert t.loc["big", "cost_per_t_co2_avoided"] == pytest.approx(50.0)
    assert math.isnan(t.loc["worse", "cost_per_t_co2_avoided"])  # no CO2 avoided
    assert math.isnan(t.loc["today", "cost_per_t_co2_avoided"])
    assert t["pareto"].to_dict() == {"big": True, "today": True, "none": True, "worse": False}


def test_plan_skips_designs_that_break_a_rule() -> None:
    plan = sizing.make_plan(
        [
            "site=tiny",
            "site.bess.capacity_kwh=0,100",
            "site.bess.power_kw=40,150",
            "site.pv.ac_kw=60,200",
        ]
    )
    by_values = {tuple(c.values.values()): c for c in plan.candidates}
    # Today's design first; 0 kWh is no battery: one design, power 0, whatever the powers.
    assert plan.candidates[0].today and plan.candidates[0].values == {
        "site.bess.capacity_kwh": 100.0,
        "site.bess.power_kw": 40.0,
        "site.pv.ac_kw": 60.0,
    }
    no_battery = by_values[(0, 0, 60)]
    assert no_battery.skipped is None and no_battery.design == Design(0, 0, 100, 60)
    assert (0, 40, 60) not in by_values and (0, 150, 60) not in by_values
    c_rate = by_values[(100, 150, 60)]
    assert c_rate.skipped is not None and "max_c_rate_per_h" in c_rate.skipped
    more_ac = by_values[(100, 40, 200)]
    assert more_ac.skipped is not None and "site.pv.ac_kw" in more_ac.skipped
    # 2 PV x (no battery, 100/40, 100/150) = 6 designs, 4 skipped, 2 runs of the optimum.
    assert len(plan.candidates) == 6
    assert sum(c.skipped is None for c in plan.candidates) == 2
    assert [j.controller for j in plan.jobs] == ["optimal", "optimal"]
    assert plan.experiment == "tiny_size"
    assert "reward=co2_only" in plan.fixed and "env.eval_backend=twin" in plan.fixed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["site=tiny"], "nothing to size"),
        (["site=tiny", "site.bess.capcity_kwh=1,2"], "site.bess.capcity_kwh"),
        (["site=tiny", "site.bess.capacity_kwh=abc,1"], "site.bess.capacity_kwh=abc"),
        (["site=tiny", "site.bess.capacity_kwh=range(5,5)"], "the sweep is empty"),
        (["site=tiny", "reward=balanced,co2_only", "site.pv.ac_kw=60"], "only site.*"),
        (["site=tiny", "site.pv.ac_kw=60", "controllers=[ppo]"], "ppo learns"),
        (["site=tiny", "site.pv.ac_kw=60", "controllers=[nosuch]"], "nosuch"),
        (["site=tiny", "site.pv.ac_kw=60", "costs.currency=USD"], "costs.currency"),
        (["site=tiny", "site.pv.ac_kw=60", "costs.nosuch=1"], "nosuch"),
        (["site=tiny", "site.pv.ac_kw=60", "agent=rbc"], "controllers=[...]"),
    ],
)
def test_bad_input_is_a_clear_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(sizing.SizeError) as info:
        sizing.make_plan(argv)
    assert message in str(info.value)
    assert sizing.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: SizeError:") and message in err


def test_cost_input_is_checked_by_the_cli(capsys: pytest.CaptureFixture[str]) -> None:
    assert sizing.main(["site=tiny", "site.pv.ac_kw=60", "costs.discount_rate_frac=2"]) == 1
    assert "error: ConfigError: costs.discount_rate_frac" in capsys.readouterr().err


def test_a_site_without_a_battery_is_refused_by_citylearn_with_the_key(tmp_path: Path) -> None:
    from pvbess import config
    from pvbess.sim.citylearn import CityLearnBackend
    from pvbess.site import dataset
    from tests.conftest import compose_cfg

    cfg = compose_cfg(["site=tiny", "site.bess.capacity_kwh=0", "site.bess.power_kw=0"], tmp_path)
    data = dataset.build(config.validate_site(cfg.site), cfg.paths.data_dir)
    with pytest.raises(ConfigError, match=r"env\.eval_backend"):
        CityLearnBackend(data)


def test_small_sweep_writes_table_plot_and_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """4 designs (one without a battery, one skipped) x 2 controllers on the tiny site:
    the table, the plot, a parent run with its child runs in a temporary store."""
    from mlflow.tracking import MlflowClient

    from tests.conftest import PARENT_RUN_ENV

    for var in PARENT_RUN_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("PVBESS_ROOT", str(tmp_path))
    report = tmp_path / "report"
    argv = [
        "site=tiny",
        "site.bess.capacity_kwh=0,100,200",
        "site.bess.power_kw=40,150",
        "controllers=[optimal,rbc]",
        "n_jobs=2",
        f"report_dir={report}",
    ]
    plan = sizing.make_plan(argv)
    assert sizing.run(plan, progress=False) == 0

    t = pd.read_csv(report / "sizing.csv")
    assert len(t) == 8 and (t["status"] == "finished").all()
    assert set(t["controller"]) == {"optimal", "rbc"}
    opt = t[t["controller"] == "optimal"].set_index("design")
    today = opt[opt["today"]].iloc[0]
    assert (today["bess_capacity_kwh"], today["bess_power_kw"]) == (100, 40)
    assert today["co2_change_vs_today_pct"] == 0.0
    # The design without a battery is a row: no cycles, no battery cost, more CO2.
    none = opt.loc["no battery"]
    assert (none["bess_capacity_kwh"], none["bess_power_kw"]) == (0, 0)
    assert none["bess_cycles_per_yr"] == 0 and none["investment_bess_per_yr"] == 0
    assert none["co2_kg_per_yr"] > today["co2_kg_per_yr"]
    assert math.isnan(none["cost_per_t_co2_avoided"])
    # Costs from the hand formulas, the cycles from the run (PEN at 3.75 per USD).
    big = opt.loc["BESS 200 kWh/40 kW"]
    life = min(15.0, 6000.0 / big["bess_cycles_per_yr"])
    capex_pen = (200 * 241 + 40 * 339) * 3.75
    assert big["investment_bess_per_yr"] == pytest.approx(
        capex_pen * capital_recovery_factor(0.08, life), rel=1e-9
    )
    assert big["total_cost_per_yr"] == pytest.approx(
        big["energy_cost_per_yr"] + big["investment_per_yr"], rel=1e-12
    )
    # A week annualized: CO2 = import x 0.4521 kg/kWh.
    assert big["co2_kg_per_yr"] == pytest.approx(0.4521 * big["grid_import_kwh_per_yr"], rel=1e-6)
    assert set(opt.index[opt["pareto"]]) >= {"no battery", "BESS 200 kWh/40 kW"}

    skipped = pd.read_csv(report / "skipped.csv")
    assert skipped["design"].tolist() == ["BESS 100 kWh/150 kW"]
    assert "exceeds max_c_rate_per_h" in skipped["reason"].iloc[0]
    md = (report / "sizing.md").read_text()
    assert "**today** BESS 100 kWh/40 kW" in md and "Skipped" in md
    assert (report / "pareto.png").stat().st_size > 10_000
    assert not (report / "datasets").exists()  # removed unless keep_datasets

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("tiny_size")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sizing"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 8
    assert {r.info.status for r in children} == {"FINISHED"}
    assert {r.data.tags["agent"] for r in children} == {"optimal", "rbc"}
    assert all("size/total_cost_per_yr" in r.data.metrics for r in children)
    assert all("eval/co2_kg" in r.data.metrics for r in children)
    assert parent.data.params["designs"] == "5" and parent.data.params["skipped"] == "1"
    logged = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sizing.csv", "sizing.md", "skipped.csv", "pareto.png"} <= logged
