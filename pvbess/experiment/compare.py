"""Compare controllers from the MLflow store (``python -m pvbess.compare site=tiny``).

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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from pvbess import config
from pvbess.experiment import tracking
from pvbess.experiment.checks import CHECK_TAG
from pvbess.experiment.plots import typical_day
from pvbess.sim.reward import COMPONENTS
from pvbess.units import HOURS_PER_YEAR

log = logging.getLogger(__name__)
config.register()

BASELINE = "uncontrolled"
OPTIMUM = "optimal"
# The learning curve's evaluations (the twin, the evaluation year): their mean reward
# gives J, hence the share of the optimum's gain, during training.
LEARNING_CURVE_METRIC = "learning/reward_total_mean"

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


# What defines an experiment, except the seed: runs equal in all of these are seeds
# of one row; any difference makes another row.
GROUP_KEYS = [
    "agent",
    "reward",
    "reward_config",
    "hparams",
    "site_data",
    "train_data",
    "budget",
    "env",
]


def _weights(params: dict[str, str]) -> dict[str, float]:
    return {c: float(params.get(f"reward.weights.{c}", "nan")) for c in COMPONENTS}


def objective(metrics: dict[str, float], weights: dict[str, float]) -> float:
    """The preset's objective J of an evaluation under ``weights``: minus the summed
    weighted reward [-] (what the LP minimises; lower is better).

    The reward is linear in its weights and each component's episode mean is logged
    (``eval/reward_<c>_mean``), so J can be recomputed under another preset's weights
    for a run whose actions do not depend on them (``uncontrolled``).
    """
    hours = metrics.get("eval/hours", HOURS_PER_YEAR)
    return -hours * sum(w * metrics[f"eval/reward_{c}_mean"] for c, w in weights.items())


def _train_data(tags: dict[str, str]) -> str:
    seeds = tags.get("train_seeds", "?")
    return seeds + ("*" if tags.get("eval_on_training_data") == "true" else "")


def _env_label(tags: dict[str, str]) -> str:
    label = f"{tags.get('env_backend', '?')}x{tags.get('env_n_envs', '?')}"
    levers = tags.get("env_levers", "default")
    return label if levers == "default" else f"{label} {levers}"


def runs_frame(runs: list[Run]) -> pd.DataFrame:
    """One row per run: what defines its experiment, its eval KPIs (per year where that
    makes sense) and its objective J."""
    rows = []
    for r in runs:
        m, tags, params = r.data.metrics, r.data.tags, r.data.params
        years = m.get("eval/hours", HOURS_PER_YEAR) / HOURS_PER_YEAR
        train_steps = m.get("time/train_steps", 0.0)
        learned = train_steps > 0
        weights = _weights(params)
        row: dict[str, Any] = {
            "run_id": r.info.run_id,
            "agent": tags.get("agent", "?"),
            "reward": tags.get("reward", "?"),
            "reward_config": tracking.params_digest(params, "reward."),
            "hparams": tracking.params_digest(params, "agent."),
            # The evaluation data: only runs evaluated on the same data are compared.
            "site_data": tags.get("eval_data_hash") or tags.get("site_data_hash", "?"),
            # The years a learner trained on (their seeds; '*' when the evaluation
            # year was one of them).
            "train_data": _train_data(tags) if learned else "-",
            # The training budget asked for; a controller trains nothing, and its
            # result does not depend on a training env it never used.
            "budget": int(params.get("total_timesteps", 0)) if learned else 0,
            # Where it trained, and its env levers (observations, actions, reward, scaling).
            "env": _env_label(tags) if learned else "-",
            "seed": tags.get("seed", "?"),
            "peak_threshold_frac": params.get("reward.peak_threshold_frac", "?"),
            "weights": weights,
            "checks_failed": tags.get(CHECK_TAG, ""),
            # The training step of the policy evaluated, when it was chosen on a
            # validation year ("" for the last policy).
            "selected_at_steps": tags.get("selected_at_steps", ""),
            "co2_t_per_yr": m["eval/co2_kg"] / 1e3 / years,
            "objective": objective(m, weights),
            "components": {c: m.get(f"eval/reward_{c}_mean", math.nan) for c in COMPONENTS},
            "hours": m.get("eval/hours", HOURS_PER_YEAR),
            "train_steps": train_steps,
            "wall_s": m.get("time/train_seconds", math.nan) + m.get("time/eval_seconds", 0.0),
        }
        for _, key, _ in COLUMNS:
            value = m.get(f"eval/{key}", math.nan)
            row[key] = value / years if key in PER_YEAR else value
        rows.append(row)
    return pd.DataFrame(rows)


def _baseline_objective(frame: pd.DataFrame, row: Any) -> float | None:
    """J of the uncontrolled site under ``row``'s reward: a run with the same reward
    config, else J recomputed from any uncontrolled run's components on the same data."""
    base = frame[(frame.agent == BASELINE) & (frame.site_data == row.site_data)]
    same = base[base.reward_config == row.reward_config]
    if len(same):
        return float(same.objective.mean())
    comparable = base[base.peak_threshold_frac == row.peak_threshold_frac]
    if not len(comparable):
        return None
    weights = frame.loc[frame.reward_config == row.reward_config, "weights"].iloc[0]
    return float(
        np.mean(
            [
                objective(
                    {"eval/hours": h} | {f"eval/reward_{c}_mean": v for c, v in comp.items()},
                    weights,
                )
                for h, comp in zip(comparable.hours, comparable.components, strict=True)
            ]
        )
    )


def _reference_kpis(frame: pd.DataFrame, site_data: str) -> pd.Series | None:
    """The uncontrolled site's KPIs on the same data (mean over its runs)."""
    base = frame[(frame.agent == BASELINE) & (frame.site_data == site_data)]
    if not len(base):
        return None
    return base[["co2_t_per_yr", "cost", "peak_import_kw", "ev_unmet_kwh"]].mean()


def table(frame: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    """One row per experiment (GROUP_KEYS) over its seeds, with the comparisons; and notes.

    The headline is the share of the optimum's improvement in the reward preset's own
    objective: (J_uncontrolled - J) / (J_uncontrolled - J_optimal), J the evaluation's
    summed weighted reward with its sign flipped, all on the same site data.
    """
    numeric = ["co2_t_per_yr", "objective", "train_steps", "wall_s"] + [k for _, k, _ in COLUMNS]
    g = frame.groupby(GROUP_KEYS, sort=True)
    out = g[numeric].mean()
    out["co2_mean"] = out["co2_t_per_yr"]
    out["co2_std"] = g["co2_t_per_yr"].std(ddof=0)
    out["objective_std"] = g["objective"].std(ddof=0)
    out["seeds"] = g.size()
    out["checks_failed"] = g["checks_failed"].agg(
        lambda v: ",".join(sorted({c for x in v for c in x.split(",") if c}))
    )
    # Per seed, in seed order: "0,25000,0" says which policies the row pools.
    out["selected_at_steps"] = g[["seed", "selected_at_steps"]].apply(
        lambda v: (
            ",".join(
                v.sort_values(
                    "seed", key=lambda s: pd.to_numeric(s, errors="coerce")
                ).selected_at_steps
            )
            if (v.selected_at_steps != "").any()
            else ""
        )
    )
    out = out.reset_index()
    first = frame.groupby(GROUP_KEYS, sort=True).first().reset_index()
    out["peak_threshold_frac"] = first["peak_threshold_frac"]
    notes = []
    if not (out.agent == BASELINE).any():
        notes.append(
            f"No '{BASELINE}' run for this selection: run "
            f"`python -m pvbess.train agent={BASELINE}`; the columns vs {BASELINE} and the "
            "share of the optimum are empty."
        )
    if not (out.agent == OPTIMUM).any():
        notes.append(
            f"No '{OPTIMUM}' run for this selection: run "
            f"`python -m pvbess.train agent={OPTIMUM} reward=<preset>`; the share of the "
            "optimum is empty."
        )
    if out.site_data.nunique() > 1:
        notes.append(
            f"{out.site_data.nunique()} different evaluation datasets: rows are compared only "
            "with the baselines on their own data (column 'eval data')."
        )
    share, base_js, gains, d_co2, d_cost, d_peak, d_unmet = [], [], [], [], [], [], []
    for row in out.itertuples():
        base_j = _baseline_objective(frame, row)
        opt = out[
            (out.agent == OPTIMUM)
            & (out.site_data == row.site_data)
            & (out.reward_config == row.reward_config)
        ]
        gain = None if base_j is None or not len(opt) else base_j - float(opt.objective.iloc[0])
        share.append(100.0 * (base_j - row.objective) / gain if gain else math.nan)
        base_js.append(math.nan if base_j is None else base_j)
        gains.append(gain or math.nan)
        ref = _reference_kpis(frame, row.site_data)
        if ref is None:
            d_co2.append(math.nan), d_cost.append(math.nan), d_peak.append(math.nan)
            d_unmet.append(math.nan)
            continue
        d_co2.append(_pct(row.co2_mean, ref.co2_t_per_yr))
        d_cost.append(_pct(row.cost, ref.cost))
        d_peak.append(_pct(row.peak_import_kw, ref.peak_import_kw))
        d_unmet.append(row.ev_unmet_kwh - ref.ev_unmet_kwh)
    out["share_of_optimum_pct"] = share
    # The share's spread over seeds (std of J over seeds / the optimum's gain).
    out["share_of_optimum_std_pct"] = 100.0 * out["objective_std"] / np.asarray(gains)
    out["baseline_objective"] = base_js
    out["optimum_gain"] = gains
    out["co2_change_vs_uncontrolled_pct"] = d_co2
    out["cost_change_vs_uncontrolled_pct"] = d_cost
    out["peak_change_vs_uncontrolled_pct"] = d_peak
    out["ev_unmet_change_vs_uncontrolled_kwh"] = d_unmet
    failed = out[out.checks_failed != ""]
    for row in failed.itertuples():
        notes.append(
            f"{row.agent}/{row.reward}: check failed ({row.checks_failed}); see README, "
            "'Checks that act'. Its figures are marked with '!'."
        )
    out["label"] = _labels(out)
    out = out.sort_values(["reward", "site_data", "objective"]).reset_index(drop=True)
    return out, notes


def _pct(value: float, ref: float) -> float:
    return 100.0 * (value - ref) / ref if ref else math.nan


def _labels(t: pd.DataFrame) -> list[str]:
    """'agent/reward', plus what tells apart rows that share it."""
    base = [f"{a}/{r}" for a, r in zip(t.agent, t.reward, strict=True)]
    labels = []
    for i, name in enumerate(base):
        same = [j for j, n in enumerate(base) if n == name]
        extra = []
        if len(same) > 1:
            for key in ("hparams", "budget", "env", "train_data", "site_data", "reward_config"):
                if t[key].iloc[same].nunique() > 1:
                    extra.append(f"{key}={t[key].iloc[i]}")
        labels.append(name + (f" [{' '.join(extra)}]" if extra else ""))
    return labels


def display_frame(t: pd.DataFrame) -> pd.DataFrame:
    """The table with human column titles and units."""
    mark = ["!" if c else "" for c in t.checks_failed]
    shown = pd.DataFrame(
        {
            "agent": [a + m for a, m in zip(t.agent, mark, strict=True)],
            "reward": t.reward,
            "hparams": t.hparams,
            "eval data": t.site_data,
            "train years": t.train_data,
            "budget [steps]": t.budget,
            "env": t.env,
            "seeds": t.seeds,
            "of optimum's gain [%]": t.share_of_optimum_pct.round(1),
            "± over seeds [%]": t.share_of_optimum_std_pct.round(1),
            "chosen at [steps]": t.selected_at_steps,
            "CO2 [t/yr]": [
                f"{m:,.1f} ± {s:,.1f}" for m, s in zip(t.co2_mean, t.co2_std, strict=True)
            ],
            "Δ CO2 [%]": t.co2_change_vs_uncontrolled_pct.round(2),
            "Δ cost [%]": t.cost_change_vs_uncontrolled_pct.round(2),
            "Δ peak import [%]": t.peak_change_vs_uncontrolled_pct.round(2),
            "Δ EV unmet [kWh/yr]": t.ev_unmet_change_vs_uncontrolled_kwh.round(3),
        }
    )
    for title, key, scale in COLUMNS:
        shown[title] = (t[key] * scale).round(3)
    shown["wall time [s]"] = t.wall_s.round(1)
    shown["checks failed"] = t.checks_failed
    return shown


def _timeseries(client: MlflowClient, run_id: str) -> pd.DataFrame:
    path = mlflow.artifacts.download_artifacts(
        run_id=run_id, artifact_path="eval_timeseries.csv", tracking_uri=mlflow.get_tracking_uri()
    )
    ts = pd.read_csv(path, index_col=0)
    # Keep the site's own UTC offset: the typical day is in local time.
    ts.index = pd.DatetimeIndex([pd.Timestamp(t) for t in ts.index])
    return ts


def _members(frame: pd.DataFrame, group: Any) -> pd.DataFrame:
    """The runs (seeds) of one row of the table."""
    mask = np.ones(len(frame), dtype=bool)
    for key in GROUP_KEYS:
        mask &= (frame[key] == getattr(group, key)).to_numpy()
    return frame[mask]


def plots(client: MlflowClient, frame: pd.DataFrame, t: pd.DataFrame, out: Path) -> list[Path]:
    """CO2 bars with seed spread, monthly CO2, a typical day, learning curves."""
    files = []
    labels = [label.replace("/", "\n", 1) for label in t.label]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(t)), 4.5))
    ax.bar(range(len(t)), t.co2_mean, yerr=t.co2_std.fillna(0), capsize=4, color="tab:gray")
    for i, row in enumerate(t.itertuples()):
        seeds = _members(frame, row).co2_t_per_yr
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

    series = {
        row.label: _timeseries(client, _members(frame, row).sort_values("seed").run_id.iloc[0])
        for row in t.itertuples()
    }
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
        # Numeric columns only: a residual learner's timeseries records its expected
        # sessions as JSON text.
        day = typical_day(ts, [col for col, _ in cols])
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

    curves = _learning_curves(client, frame, t, out / "learning_curves.png")
    if curves is not None:
        files.append(curves)
    return files


def _learning_curves(
    client: MlflowClient, frame: pd.DataFrame, t: pd.DataFrame, path: Path
) -> Path | None:
    """Share of the optimum's gain on the evaluation year against training steps, one
    panel per reward preset, one line per seed; the controllers' shares as lines."""
    learners = t[t.train_steps > 0]
    if not len(learners):
        return None
    rewards = sorted(learners.reward.unique())
    fig, axes = plt.subplots(1, len(rewards), figsize=(7 * len(rewards), 4.8), squeeze=False)
    for ax, reward in zip(axes[0], rewards, strict=True):
        rows = t[t.reward == reward]
        drawn = False
        for i, group in enumerate(rows[rows.train_steps > 0].itertuples()):
            for k, run in enumerate(_members(frame, group).itertuples()):
                hist = client.get_metric_history(run.run_id, LEARNING_CURVE_METRIC)
                if not hist or not np.isfinite(group.optimum_gain):
                    continue
                hist = sorted(hist, key=lambda h: h.step)
                # J = -hours x mean reward, as the evaluation's (same year, same physics).
                share = [
                    100.0 * (group.baseline_objective + run.hours * h.value) / group.optimum_gain
                    for h in hist
                ]
                ax.plot(
                    [h.step for h in hist],
                    share,
                    ".-",
                    color=f"C{i % 10}",
                    alpha=0.8,
                    label=group.label if k == 0 else None,
                )
                drawn = True
        for j, ctrl in enumerate(rows[rows.train_steps == 0].itertuples()):
            if np.isfinite(ctrl.share_of_optimum_pct):
                ax.axhline(
                    ctrl.share_of_optimum_pct,
                    color="k",
                    ls=("--", ":", "-.")[j % 3],
                    lw=1,
                    alpha=0.7,
                    label=f"{ctrl.agent} {ctrl.share_of_optimum_pct:.1f} %",
                )
        ax.set(
            xlabel="training steps",
            ylabel="share of the optimum's gain [%]",
            title=f"{reward}: evaluation year during training",
        )
        if not drawn:
            ax.text(
                0.5,
                0.5,
                "no evaluation during training (eval_every=0 or too few steps)",
                ha="center",
                transform=ax.transAxes,
            )
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def compare(
    sel: Selection,
    out_dir: Path,
    verify_data_dir: str | None = None,
    verify_jobs: int | None = None,
) -> tuple[pd.DataFrame, list[str]]:
    """Build the report for a selection; log it as a 'comparison' run; return the table.

    With ``verify_data_dir``, runs evaluated on the twin are first proven: one run of
    each controller kind is replayed in CityLearn (``pvbess.experiment.replay``; up to
    ``verify_jobs`` at once, None: one per core) and must give identical KPIs; the
    notes say which.
    """
    client = MlflowClient()
    runs = select_runs(client, sel)
    replays: dict[str, str] = {}
    if verify_data_dir is not None:
        from pvbess.experiment import replay

        replays = replay.verify_kinds(runs, verify_data_dir, jobs=verify_jobs)
        runs = select_runs(client, sel)  # with the replays' tags
    frame = runs_frame(runs)
    t, notes = table(frame)
    from pvbess.experiment.replay import controller_kind

    on_twin = sorted(
        {controller_kind(r) for r in runs if r.data.tags.get("eval_backend") == "twin"}
    )
    if on_twin:
        proof = "; ".join(f"{a}: {replays[a]}" for a in on_twin if a in replays)
        notes.append(
            f"Evaluated on the twin: {', '.join(on_twin)}. "
            + (
                f"Replayed in CityLearn: {proof}."
                if proof
                else "Not replayed in CityLearn: run with verify=true to prove these figures."
            )
        )
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


# The terminal shows what decides; comparison.md and .csv hold every column.
TERMINAL_COLUMNS = [
    "agent",
    "reward",
    "hparams",
    "train years",
    "budget [steps]",
    "env",
    "seeds",
    "of optimum's gain [%]",
    "chosen at [steps]",  # 0,0,0: no seed's learning beat its untrained policy
    "CO2 [t/yr]",
    "Δ CO2 [%]",
    "Δ cost [%]",
    "Δ peak import [%]",
    "Δ EV unmet [kWh/yr]",
    "checks failed",
]


def print_table(shown: pd.DataFrame, notes: list[str]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table_ = Table(title="Controllers compared (mean over seeds; every column in comparison.md)")
    columns = [c for c in TERMINAL_COLUMNS if c in shown.columns]
    for col in columns:
        # Units in brackets ([t/yr]) are not rich markup: escape them.
        table_.add_column(
            escape(str(col)),
            justify="left" if col in ("agent", "reward") else "right",
            # Long names (experiment=mpc_forecasts's) wrap rather than lose the part
            # that tells two rows apart.
            overflow="fold" if col == "agent" else "ellipsis",
        )
    for row in shown[columns].itertuples(index=False):
        table_.add_row(
            *["" if isinstance(v, float) and math.isnan(v) else escape(str(v)) for v in row]
        )
    console = Console(width=250)
    console.print(table_)
    for n in notes:
        console.print(f"[yellow]note:[/yellow] {n}")


def context(run_id: str, client: MlflowClient | None = None) -> str:
    """One run's result in context: its share of the optimum's gain in its preset's
    objective and its changes vs. the uncontrolled site, from the runs in the store
    evaluated on the same data; or the commands that make the missing references."""
    client = client or MlflowClient()
    run = client.get_run(run_id)
    tags = run.data.tags
    data = tags.get("eval_data_hash") or tags.get("site_data_hash")
    refs = [
        r
        for agent in (BASELINE, OPTIMUM)
        for r in client.search_runs(
            [run.info.experiment_id],
            f"attributes.status = 'FINISHED' and tags.agent = '{agent}'",
            max_results=500,
        )
        if r.info.run_id != run_id
        and (r.data.tags.get("eval_data_hash") or r.data.tags.get("site_data_hash")) == data
        and "eval/co2_kg" in r.data.metrics
    ]
    frame = runs_frame([run, *refs])
    t, _ = table(frame)
    row = _members(t, frame.iloc[0]).iloc[0]  # the table's row of this run
    site, reward = tags.get("site", "?"), tags.get("reward", "?")
    lines = []
    if math.isnan(row.co2_change_vs_uncontrolled_pct):
        lines.append(
            f"no uncontrolled run on this evaluation data: `python -m pvbess.train "
            f"agent={BASELINE} site={site}` gives the reference"
        )
    else:
        lines.append(
            f"vs uncontrolled: CO2 {row.co2_change_vs_uncontrolled_pct:+.2f} %, cost "
            f"{row.cost_change_vs_uncontrolled_pct:+.2f} %, peak import "
            f"{row.peak_change_vs_uncontrolled_pct:+.2f} %, EV unmet "
            f"{row.ev_unmet_change_vs_uncontrolled_kwh:+.3f} kWh/yr"
        )
    if math.isnan(row.share_of_optimum_pct):
        lines.append(
            f"no optimum for reward={reward} on this evaluation data: `python -m pvbess.train "
            f"agent={OPTIMUM} site={site} reward={reward}` gives the ceiling"
        )
    else:
        lines.append(
            f"share of the optimum's gain in the {reward} objective: "
            f"{row.share_of_optimum_pct:.1f} %"
        )
    return "; ".join(lines)
