"""Compare controllers from the MLflow store: ``python -m pvbess.compare site=tiny``.

Reads the runs of one site (optionally one reward preset, one sweep, tags or
run ids), groups runs that differ only by seed (mean, std, count), and writes a
table (terminal, CSV, Markdown) and plots to a report folder, all logged as
artifacts of a ``comparison`` run in the same experiment.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from pvbess import config, tracking

log = logging.getLogger(__name__)
config.register()

BASELINE = "uncontrolled"
OPTIMUM = "optimal"
HOURS_PER_YEAR = 8760.0
LEARNING_CURVE_METRIC = "learning/co2_kg"

# Table columns: (column title, eval metric, scale to the shown unit).
COLUMNS: list[tuple[str, str, float]] = [
    ("grid import [MWh/yr]", "grid_import_kwh", 1e-3),
    ("cost [/yr]", "cost", 1.0),
    ("PV self-consumption [-]", "solar_self_consumption_ratio", 1.0),
    ("EV departure success [-]", "ev_departure_success_ratio", 1.0),
    ("EV unmet [kWh/yr]", "ev_unmet_kwh", 1.0),
    ("peak import [kW]", "peak_import_kw", 1.0),
    ("battery cycles [/yr]", "battery_equivalent_cycles", 1.0),
]
PER_YEAR = {"grid_import_kwh", "cost", "ev_unmet_kwh", "battery_equivalent_cycles"}


class SelectionError(RuntimeError):
    """No run matches the selection."""


@dataclass
class Selection:
    site: str
    experiment: str | None = None
    reward: str | None = None
    parent_run_id: str | None = None
    tags: dict[str, str] | None = None
    run_ids: list[str] | None = None


def select_runs(client: MlflowClient, sel: Selection) -> list[Run]:
    """Finished runs of the site (never comparison runs), filtered as asked."""
    exp = client.get_experiment_by_name(sel.experiment or sel.site)
    if exp is None:
        raise SelectionError(f"no MLflow experiment {sel.experiment or sel.site!r} in the store")
    clauses = [f"tags.site = '{sel.site}'", "attributes.status = 'FINISHED'"]
    if sel.reward:
        clauses.append(f"tags.reward = '{sel.reward}'")
    if sel.parent_run_id:
        clauses.append(f"tags.mlflow.parentRunId = '{sel.parent_run_id}'")
    for key, value in (sel.tags or {}).items():
        clauses.append(f"tags.{key} = '{value}'")
    runs = client.search_runs([exp.experiment_id], " and ".join(clauses), max_results=5000)
    runs = [
        r
        for r in runs
        if r.data.tags.get("kind") != "comparison" and "eval/co2_kg" in r.data.metrics
    ]
    if sel.run_ids:
        wanted = set(sel.run_ids)
        runs = [r for r in runs if r.info.run_id in wanted]
    if not runs:
        raise SelectionError(f"no finished run with evaluation KPIs matches {sel}")
    return runs


def runs_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per run: its tags and eval KPIs, per year where that makes sense."""
    rows = []
    for r in runs:
        m = r.data.metrics
        years = m.get("eval/hours", HOURS_PER_YEAR) / HOURS_PER_YEAR
        row: dict[str, Any] = {
            "run_id": r.info.run_id,
            "agent": r.data.tags.get("agent", "?"),
            "reward": r.data.tags.get("reward", "?"),
            "seed": r.data.tags.get("seed", "?"),
            "co2_t_per_yr": m["eval/co2_kg"] / 1e3 / years,
            "train_steps": m.get("time/train_steps", float("nan")),
            "wall_s": m.get("time/train_seconds", float("nan")) + m.get("time/eval_seconds", 0.0),
        }
        for _, key, _ in COLUMNS:
            value = m.get(f"eval/{key}", float("nan"))
            row[key] = value / years if key in PER_YEAR else value
        rows.append(row)
    return pd.DataFrame(rows)


def _reference(groups: pd.DataFrame, agent: str, reward: str) -> float | None:
    """Mean CO2 of a reference controller: same reward preset first, else any (uncontrolled)."""
    same = groups[(groups.agent == agent) & (groups.reward == reward)]
    if len(same):
        return float(same.co2_mean.iloc[0])
    if agent == BASELINE:  # no control: its CO2 does not depend on the reward weights
        anyr = groups[groups.agent == agent]
        if len(anyr):
            return float(anyr.co2_mean.iloc[0])
    return None


def table(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """Group by (agent, reward) over seeds; add the comparisons; return it and notes."""
    numeric = ["co2_t_per_yr", "train_steps", "wall_s"] + [k for _, k, _ in COLUMNS]
    g = frame.groupby(["agent", "reward"], sort=True)
    out = g[numeric].mean()
    out["co2_mean"] = out["co2_t_per_yr"]
    out["co2_std"] = g["co2_t_per_yr"].std(ddof=0)
    out["seeds"] = g.size()
    out = out.reset_index()
    notes = []
    if not (out.agent == BASELINE).any():
        notes.append(
            f"No '{BASELINE}' run for this selection: run "
            f"`python -m pvbess.train agent={BASELINE}`; the '% vs {BASELINE}' column is empty."
        )
    if not (out.agent == OPTIMUM).any():
        notes.append(
            f"No '{OPTIMUM}' run for this selection: run "
            f"`python -m pvbess.train agent={OPTIMUM}`; the '% of optimum' column is empty."
        )
    change, share = [], []
    for row in out.itertuples():
        base = _reference(out, BASELINE, row.reward)
        best = _reference(out, OPTIMUM, row.reward)
        change.append(100.0 * (row.co2_mean - base) / base if base else float("nan"))
        gap = (base - best) if (base is not None and best is not None) else None
        share.append(100.0 * (base - row.co2_mean) / gap if gap else float("nan"))
    out["co2_change_vs_uncontrolled_pct"] = change
    out["share_of_optimum_reduction_pct"] = share
    return out.sort_values(["reward", "co2_mean"]).reset_index(drop=True), notes


def display_frame(t: pd.DataFrame) -> pd.DataFrame:
    """The table with human column titles and units."""
    shown = pd.DataFrame(
        {
            "agent": t.agent,
            "reward": t.reward,
            "seeds": t.seeds,
            "CO2 [t/yr]": [
                f"{m:,.1f} ± {s:,.1f}" for m, s in zip(t.co2_mean, t.co2_std, strict=True)
            ],
            "vs uncontrolled [%]": t.co2_change_vs_uncontrolled_pct.round(2),
            "of optimum's reduction [%]": t.share_of_optimum_reduction_pct.round(1),
        }
    )
    for title, key, scale in COLUMNS:
        shown[title] = (t[key] * scale).round(3)
    shown["training steps"] = t.train_steps
    shown["wall time [s]"] = t.wall_s.round(1)
    return shown


def _timeseries(client: MlflowClient, run_id: str) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="eval_timeseries.csv", tracking_uri=mlflow.get_tracking_uri()
    )
    ts = pd.read_csv(path, index_col=0)
    # Keep the site's own UTC offset: the typical day is in local time.
    ts.index = pd.DatetimeIndex([pd.Timestamp(t) for t in ts.index])
    return ts


def plots(client: MlflowClient, frame: pd.DataFrame, t: pd.DataFrame, out: Path) -> list[Path]:
    """CO2 bars with seed spread, monthly CO2, a typical day, learning curves."""
    files = []
    labels = [f"{a}\n{r}" for a, r in zip(t.agent, t.reward, strict=True)]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(t)), 4.5))
    ax.bar(range(len(t)), t.co2_mean, yerr=t.co2_std.fillna(0), capsize=4, color="tab:gray")
    for i, row in enumerate(t.itertuples()):
        seeds = frame[(frame.agent == row.agent) & (frame.reward == row.reward)].co2_t_per_yr
        ax.plot([i] * len(seeds), seeds, "k.", ms=5)
    ax.set_xticks(range(len(t)), labels, fontsize=8)
    ax.set(
        ylabel="CO2 [t/yr]", title="CO2 by controller (bars: mean ± std over seeds; dots: seeds)"
    )
    lo = float(np.nanmin(t.co2_mean - t.co2_std.fillna(0)))
    ax.set_ylim(bottom=max(0.0, lo * 0.98))
    fig.tight_layout()
    files.append(out / "co2_by_controller.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    first = frame.sort_values("seed").groupby(["agent", "reward"]).first().reset_index()
    series = {f"{r.agent}/{r.reward}": _timeseries(client, r.run_id) for r in first.itertuples()}
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for name, ts in series.items():
        monthly = ts["co2_kg"].resample("MS").sum() / 1e3
        # Month starts as dates (a time axis), not strings (categories).
        ax.plot(monthly.index.tz_localize(None), monthly.to_numpy(), ".-", label=name)
    ax.set(ylabel="CO2 [t]", title="Monthly CO2 per controller (first seed)")
    ax.tick_params(axis="x", labelrotation=45)
    ax.legend(fontsize=8)
    fig.tight_layout()
    files.append(out / "monthly_co2.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    cols = [
        ("pv_kwh", "PV"),
        ("load_kwh", "mall load"),
        ("ev_charging_kwh", "EV charging"),
        ("bess_soc_frac", "battery SOC [-]"),
        ("grid_import_kwh", "grid import"),
    ]
    fig, axes = plt.subplots(1, len(cols), figsize=(4 * len(cols), 3.8), sharex=True)
    for name, ts in series.items():
        day = ts.groupby(ts.index.hour).mean()
        for ax, (col, title) in zip(axes, cols, strict=True):
            ax.plot(day.index, day[col], label=name)
            ax.set(title=title, xlabel="hour")
    axes[0].set_ylabel("power [kW]")
    axes[-1].legend(fontsize=7)
    fig.suptitle("A typical day per controller (mean over the evaluation)")
    fig.tight_layout()
    files.append(out / "typical_day.png")
    fig.savefig(files[-1], dpi=110)
    plt.close(fig)

    learners = frame[frame.train_steps > 0]
    if len(learners):
        fig, ax = plt.subplots(figsize=(8, 4.5))
        colors = {
            key: f"C{i % 10}"
            for i, key in enumerate(sorted(set(zip(learners.agent, learners.reward, strict=True))))
        }
        for (agent, reward), grp in learners.groupby(["agent", "reward"]):
            for k, row in enumerate(grp.itertuples()):
                hist = client.get_metric_history(row.run_id, LEARNING_CURVE_METRIC)
                if not hist:
                    continue
                hours = client.get_run(row.run_id).data.metrics.get("eval/hours", HOURS_PER_YEAR)
                ax.plot(
                    [h.step for h in hist],
                    [h.value / 1e3 * HOURS_PER_YEAR / hours for h in hist],
                    ".-",
                    color=colors[(agent, reward)],
                    alpha=0.8,
                    label=f"{agent}/{reward}" if k == 0 else None,
                )
        base = t[t.agent == BASELINE].co2_mean
        if len(base):
            ax.axhline(float(base.iloc[0]), color="k", ls="--", lw=1, label=BASELINE)
        best = t[t.agent == OPTIMUM].co2_mean
        if len(best):
            ax.axhline(float(best.min()), color="g", ls=":", lw=1, label=OPTIMUM)
        ax.set(
            xlabel="training steps",
            ylabel="CO2 [t/yr]",
            title="Learning curves: deterministic evaluation during training (one line per seed)",
        )
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(
                0.5,
                0.5,
                "no evaluation during training (eval_every=0 or too few steps)",
                ha="center",
                transform=ax.transAxes,
            )
        fig.tight_layout()
        files.append(out / "learning_curves.png")
        fig.savefig(files[-1], dpi=110)
        plt.close(fig)
    return files


def compare(sel: Selection, out_dir: Path) -> tuple[pd.DataFrame, list[str]]:
    """Build the report for a selection; log it as a 'comparison' run; return the table."""
    client = MlflowClient()
    frame = runs_frame(select_runs(client, sel))
    t, notes = table(frame)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = display_frame(t)
    t.to_csv(out_dir / "comparison.csv", index=False)
    (out_dir / "comparison.md").write_text(
        shown.to_markdown(index=False, floatfmt=",.3f")
        + ("\n\n" + "\n".join(f"- {n}" for n in notes) if notes else "")
        + "\n"
    )
    frame.to_csv(out_dir / "runs.csv", index=False)
    files = plots(client, frame, t, out_dir)
    exp = client.get_experiment_by_name(sel.experiment or sel.site)
    with mlflow.start_run(
        experiment_id=exp.experiment_id,
        run_name="comparison",
        tags={"kind": "comparison", "site": sel.site, "reward": sel.reward or "all"},
    ):
        mlflow.log_params(
            {"runs": len(frame), "groups": len(t), "parent_run_id": sel.parent_run_id or ""}
        )
        for f in ["comparison.csv", "comparison.md", "runs.csv", *[p.name for p in files]]:
            mlflow.log_artifact(str(out_dir / f))
    return shown, notes


def print_table(shown: pd.DataFrame, notes: list[str]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table_ = Table(title="Controllers compared (mean over seeds)")
    for col in shown.columns:
        # Units in brackets ([t/yr]) are not rich markup: escape them.
        table_.add_column(
            escape(str(col)), justify="left" if col in ("agent", "reward") else "right"
        )
    for row in shown.itertuples(index=False):
        table_.add_row(
            *["" if isinstance(v, float) and math.isnan(v) else escape(str(v)) for v in row]
        )
    console = Console(width=250)
    console.print(table_)
    for n in notes:
        console.print(f"[yellow]note:[/yellow] {n}")


@hydra.main(version_base="1.3", config_path="../conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    # site and reward are the config groups of training: their presets' names select.
    site = cfg.site.name
    reward = cfg.reward.name if cfg.get("reward") else None
    experiment = cfg.tracking.experiment or site
    tracking.configure(cfg.tracking.uri, cfg.paths.root_dir, experiment)
    tags = OmegaConf.to_container(cfg.tags) if cfg.tags else None
    run_ids = list(cfg.run_ids) if cfg.run_ids else None
    sel = Selection(
        site=site,
        experiment=experiment,
        reward=reward,
        parent_run_id=cfg.parent_run_id,
        tags=tags,
        run_ids=run_ids,
    )  # type: ignore[arg-type]
    shown, notes = compare(sel, Path(cfg.report_dir))
    print_table(shown, notes)
    print(f"report: {cfg.report_dir}")


if __name__ == "__main__":
    main()
