"""Bad input fails cleanly: ``python -m pvbess.train`` per case, on site=tiny.

Every case must exit non-zero with a message naming the problem (no traceback)
and leave no MLflow run that looks successful. The cases run as concurrent
subprocesses (a few at a time), each under its own PVBESS_ROOT.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from .conftest import ROOT, child_env, compose_cfg, store_runs

PARALLEL = 4  # enough to keep 2 cores busy; each process holds ~0.5 GB
TIMEOUT_S = 120
# MLflow's own retries take minutes (> 120 s); pvbess's probe answers in 5 s, after
# the dataset build and imports, which take 10-35 s with 4 cases on 2 busy cores.
UNREACHABLE_SERVER_MAX_S = 90
# site=tiny: 2024-01-01 00:00 (America/Lima), 7 days of hourly rows.
TINY_HOURS = pd.date_range("2024-01-01 00:00", periods=7 * 24, freq="h")


def write_csv(path: Path, times: list[pd.Timestamp], values: list[str]) -> None:
    lines = ["datetime,load_kw"] + [
        f"{t:%Y-%m-%d %H:%M},{v}" for t, v in zip(times, values, strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")


def csv_with(edit: Callable[[list[pd.Timestamp], list[str]], None]) -> Callable[[Path], None]:
    """A preparation writing a full week of 40 kWh rows to load.csv, then ``edit``-ed."""

    def prepare(root: Path) -> None:
        times, values = list(TINY_HOURS), ["40.0"] * len(TINY_HOURS)
        edit(times, values)
        write_csv(root / "load.csv", times, values)

    return prepare


def _short(t: list[pd.Timestamp], v: list[str]) -> None:
    del t[100:], v[100:]


def _set_value(row: int, value: str) -> Callable[[list[pd.Timestamp], list[str]], None]:
    def edit(t: list[pd.Timestamp], v: list[str]) -> None:
        v[row] = value

    return edit


def _duplicate(t: list[pd.Timestamp], v: list[str]) -> None:
    t[70] = t[69]


def _swap(t: list[pd.Timestamp], v: list[str]) -> None:
    t[80], t[81] = t[81], t[80]


def make_file(name: str) -> Callable[[Path], None]:
    """A regular file where the store needs a folder (root can write anywhere,
    so a read-only mode would not stop it)."""

    def prepare(root: Path) -> None:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("not a folder\n")

    return prepare


def crashed_run_with_truncated_checkpoint(root: Path) -> None:
    """What a crash leaves: a run directory, its run (KILLED), a half-written checkpoint.

    The checkpoint is a real SB3 zip cut to half its size, as a full disk or a
    copy interrupted half way leaves it (pvbess itself never renames a partial file).
    """
    import gymnasium as gym
    from stable_baselines3 import PPO

    from pvbess.experiment import resume, tracking

    cfg = compose_cfg(["site=tiny", "agent=ppo"], root)
    out_dir = Path(cfg.paths.output_dir)
    exp_id = tracking.configure(None, root, "tiny")
    client = MlflowClient()
    run = client.create_run(exp_id, tags={"output_dir": str(out_dir)})
    client.set_terminated(run.info.run_id, "KILLED")
    out_dir.mkdir(parents=True)
    resume.write_run_files(out_dir, run.info.run_id, cfg)
    zip_path = out_dir / "checkpoints" / "ppo_128_steps.zip"
    zip_path.parent.mkdir()
    PPO("MlpPolicy", gym.make("Pendulum-v1"), n_steps=64, device="cpu").save(zip_path)
    with open(zip_path, "r+b") as fh:
        fh.truncate(zip_path.stat().st_size // 2)


def quarter_hours_labelled_by_end(root: Path) -> None:
    """A meter export: 15-minute rows from 0:15 to 0:00 a week later, each labelled by
    the END of its interval (read as start-labelled, the first hour has 3 of 4 rows)."""
    times = pd.date_range("2024-01-01 00:15", periods=7 * 96, freq="15min")
    lines = ["datetime,load_kw"] + [f"{t:%Y-%m-%d %H:%M},10" for t in times]
    (root / "load.csv").write_text("\n".join(lines) + "\n")


def experiment_with_unwritable_artifacts(root: Path) -> None:
    """An experiment 'tiny' whose artifact folder lies under a regular file."""
    from pvbess.experiment import tracking

    (root / "blocker").write_text("a file, not a folder\n")
    mlflow_uri = tracking.store_uri(root)
    import mlflow

    mlflow.set_tracking_uri(mlflow_uri)
    MlflowClient().create_experiment("tiny", artifact_location=(root / "blocker" / "a").as_uri())


def a_folder(name: str) -> Callable[[Path], None]:
    def prepare(root: Path) -> None:
        (root / name).mkdir(parents=True)

    return prepare


@dataclass
class Case:
    overrides: list[str]
    needles: tuple[str, ...]  # what the message must name
    prepare: Callable[[Path], None] | None = None
    run_left: bool = False  # a run existed before: it must end FAILED with an error tag
    # The site's data were fine (the fault is in the store or a checkpoint): a cached
    # dataset is allowed. Otherwise none may be left behind.
    dataset_ok: bool = False


CSV = ["site.load.source=csv", "site.load.csv.path=load.csv", "site.load.csv.value_column=load_kw"]
FULL_CSV = csv_with(lambda t, v: None)


def config_error(key: str, *more: str) -> tuple[str, ...]:
    return (f"error: ConfigError: {key}", *more)


CASES: dict[str, Case] = {
    "unknown_group_option": Case(
        ["agent=nonexistent"], ("Could not find 'agent/nonexistent'", "Available options")
    ),
    "wrongly_typed_value": Case(
        ["total_timesteps=abc"],
        ("'abc' of type 'str' could not be converted to Integer", "full_key: total_timesteps"),
    ),
    "battery_power_above_c_rate": Case(
        ["site.bess.power_kw=500"],
        ("error: ConfigError: site.bess.power_kw: 500.0 kW exceeds max_c_rate_per_h",),
    ),
    "socket_power_zero": Case(
        ["site.ev.socket_power_kw=0"], ("error: ConfigError: site.ev.socket_power_kw: must be > 0",)
    ),
    "csv_too_short": Case(
        CSV, ("error: DataError:", "does not cover the whole site period"), csv_with(_short)
    ),
    "csv_nan": Case(
        CSV, ("error: DataError:", "data row 51", "missing value"), csv_with(_set_value(50, "nan"))
    ),
    "csv_negative_energy": Case(
        CSV, ("error: DataError:", "negative energy -5"), csv_with(_set_value(60, "-5"))
    ),
    "csv_duplicate_timestamp": Case(
        CSV, ("error: DataError:", "data row 71", "duplicate timestamp"), csv_with(_duplicate)
    ),
    "csv_unordered_timestamps": Case(
        CSV, ("error: DataError:", "data row 82", "not in increasing order"), csv_with(_swap)
    ),
    "csv_unparseable_number": Case(
        CSV, ("error: DataError:", "cannot read '12x' as a number"), csv_with(_set_value(90, "12x"))
    ),
    "tracking_server_unreachable": Case(
        ["tracking.uri=http://127.0.0.1:9"],
        ("error: TrackingError:", "cannot reach the MLflow tracking server", "Connection refused"),
        dataset_ok=True,
    ),
    "store_folder_is_a_file": Case(
        [],
        ("error: TrackingError: MLflow store folder",),
        make_file("mlruns"),
        dataset_ok=True,
    ),
    "artifact_folder_is_a_file": Case(
        [],
        ("error: TrackingError: MLflow artifact folder",),
        make_file("mlruns/artifacts"),
        dataset_ok=True,
    ),
    "truncated_checkpoint_on_resume": Case(
        ["resume=out"],
        ("error: CheckpointError:", "ppo_128_steps.zip is truncated or corrupt"),
        crashed_run_with_truncated_checkpoint,
        run_left=True,
        dataset_ok=True,
    ),
    # --- keys Hydra's '+' adds silently -------------------------------------------------
    "unknown_key_battery": Case(
        ["+site.bess.capacty_kwh=10"],
        config_error(
            "site.bess.capacty_kwh: unknown setting", "did you mean site.bess.capacity_kwh"
        ),
    ),
    "unknown_key_reward": Case(
        ["+reward.weights.c02=1"],
        config_error("reward.weights.c02: unknown setting", "did you mean reward.weights.co2"),
    ),
    "unknown_key_observations": Case(
        ["+env.observations.forcast=perfect"],
        config_error("env.observations.forcast", "did you mean env.observations.forecast"),
    ),
    "unknown_key_top_level": Case(["+foo=1"], config_error("foo: unknown setting")),
    "unknown_key_ev_class": Case(
        ["+site.ev.classes.moto.sokets=2"],
        config_error("site.ev.classes.moto.sokets", "did you mean site.ev.classes.moto.sockets"),
    ),
    "unknown_key_tracking": Case(
        ["+tracking.artifact_locaton=/tmp/x"],
        config_error("tracking.artifact_locaton", "did you mean tracking.artifact_location"),
    ),
    # --- non-finite numbers ------------------------------------------------------------
    "inf_battery_capacity": Case(
        ["site.bess.capacity_kwh=inf"], config_error("site.bess.capacity_kwh: must be a finite")
    ),
    "inf_socket_power": Case(
        ["site.ev.socket_power_kw=inf"], config_error("site.ev.socket_power_kw: must be a finite")
    ),
    "inf_pv_kwp": Case(["site.pv.dc_kwp=inf"], config_error("site.pv.dc_kwp: must be a finite")),
    "inf_reward_weight": Case(
        ["reward.weights.co2=inf"], config_error("reward.weights.co2: must be a finite")
    ),
    "inf_vehicles_per_day": Case(
        ["site.ev.classes.moto.vehicles_per_day=inf"],
        config_error("site.ev.classes.moto.vehicles_per_day: must be a finite"),
    ),
    "nan_battery_power": Case(
        ["site.bess.power_kw=nan"], config_error("site.bess.power_kw: must be a finite")
    ),
    "nan_peak_threshold": Case(
        ["reward.peak_threshold_frac=nan"],
        config_error("reward.peak_threshold_frac: must be a finite"),
    ),
    "inf_learning_rate": Case(
        ["agent.learning_rate=inf"], config_error("agent.learning_rate: must be a finite")
    ),
    "inf_carbon_intensity": Case(
        ["site.grid.carbon_intensity_kg_per_kwh=inf"],
        config_error("site.grid.carbon_intensity_kg_per_kwh: must be a finite"),
    ),
    "inf_annual_load": Case(
        ["site.load.annual_energy_kwh=inf"],
        config_error("site.load.annual_energy_kwh: must be a finite"),
    ),
    "inf_price": Case(
        ["site.tariff.peak_price_per_kwh=inf"],
        config_error("site.tariff.peak_price_per_kwh: must be a finite"),
    ),
    # --- ranges ---------------------------------------------------------------------------
    "negative_peak_threshold": Case(
        ["reward.peak_threshold_frac=-1"], config_error("reward.peak_threshold_frac: must be in")
    ),
    "negative_reward_weight": Case(
        ["reward.weights.grid=-0.5"], config_error("reward.weights.grid: must be >= 0")
    ),
    "tilt_above_90": Case(["site.pv.tilt_deg=120"], config_error("site.pv.tilt_deg: must be in")),
    "negative_azimuth": Case(
        ["site.pv.azimuth_deg=-10"], config_error("site.pv.azimuth_deg: must be in")
    ),
    "load_noise_above_1": Case(
        ["site.load.noise_frac=1.5"], config_error("site.load.noise_frac: must be in")
    ),
    "initial_soc_below_window": Case(
        ["site.bess.soc_min_frac=0.9"], config_error("site.bess.initial_soc_frac")
    ),
    "efficiency_above_1": Case(
        ["site.bess.round_trip_efficiency_frac=1.2"],
        config_error("site.bess.round_trip_efficiency_frac: must be in (0, 1]"),
    ),
    "charger_efficiency_zero": Case(
        ["site.ev.charger_efficiency_frac=0"], config_error("site.ev.charger_efficiency_frac")
    ),
    "peak_hour_25": Case(
        ["site.tariff.peak_start_hour=25"], config_error("site.tariff.peak_start_hour")
    ),
    "zero_days": Case(["site.days=0"], config_error("site.days: must be >= 1")),
    "latitude_100": Case(["site.latitude_deg=100"], config_error("site.latitude_deg")),
    "negative_site_seed": Case(["site.seed=-3"], config_error("site.seed: must be >= 0")),
    "zero_env_copies": Case(["env.n_envs=0"], config_error("env.n_envs: must be >= 1")),
    "evaluation_year_in_training": Case(
        ["env.train_seeds=[0,1]"], config_error("env.train_seeds", "evaluation year")
    ),
    "forecast_lead_zero": Case(
        ["env.observations.forecast_leads_h=[0]"],
        config_error("env.observations.forecast_leads_h"),
    ),
    "negative_torch_threads": Case(
        ["device.torch_threads=-1"], config_error("device.torch_threads: must be >= 0")
    ),
    "zero_eval_episodes": Case(["eval_episodes=0"], config_error("eval_episodes: must be >= 1")),
    "zero_checkpoint_every": Case(
        ["checkpoint_every=0"], config_error("checkpoint_every: must be >= 1")
    ),
    "zero_log_interval": Case(["log_interval=0"], config_error("log_interval: must be >= 1")),
    "negative_seed": Case(["seed=-1"], config_error("seed: must be in [0, 2**32)")),
    "negative_budget": Case(["total_timesteps=-5"], config_error("total_timesteps: must be >= 0")),
    "untrained_learner": Case(
        ["total_timesteps=0"], config_error("total_timesteps: is 0 for the learning agent")
    ),
    "unknown_backend": Case(["env.backend=gym"], config_error("env.backend: unknown backend")),
    "unknown_action_mode": Case(
        ["env.action_mode=both"], config_error("env.action_mode: unknown action mode")
    ),
    "unknown_device": Case(["device.name=tpu"], config_error("device.name")),
    "quarter_hour_steps": Case(
        ["site.step_minutes=15"], config_error("site.step_minutes: only hourly steps")
    ),
    # --- agent hyperparameters ---------------------------------------------------------
    "negative_learning_rate": Case(
        ["agent.learning_rate=-1"], config_error("agent.learning_rate: must be in (0, 1]")
    ),
    "zero_n_steps": Case(["agent.n_steps=0"], config_error("agent.n_steps: must be in [1,")),
    "gamma_above_1": Case(["agent.gamma=1.5"], config_error("agent.gamma: must be in [0, 1]")),
    "zero_batch_size": Case(["agent.batch_size=0"], config_error("agent.batch_size")),
    "fractional_epochs": Case(
        ["agent.n_epochs=2.5"], config_error("agent.n_epochs: must be a whole number")
    ),
    "unknown_agent_key": Case(
        ["+agent.lerning_rate=0.1"],
        config_error("agent.lerning_rate: unknown setting for stable_baselines3.PPO"),
        dataset_ok=True,
    ),
    "unknown_controller_key": Case(
        ["agent=rbc", "+agent.reserve_frac=0.3"],
        config_error("agent.reserve_frac: unknown setting", "did you mean agent.reserve_soc_frac"),
        dataset_ok=True,
    ),
    "sac_tau_zero": Case(
        ["agent=sac", "agent.tau=0"], config_error("agent.tau: must be in (0, 1]")
    ),
    "sac_gradient_steps_zero": Case(
        ["agent=sac", "agent.gradient_steps=0"], config_error("agent.gradient_steps")
    ),
    "no_battery_in_citylearn": Case(
        ["site.bess.capacity_kwh=0", "site.bess.power_kw=0"],
        config_error("env.eval_backend: site.bess.capacity_kwh=0 (no battery) runs on the twin"),
    ),
    # --- a site without chargers ---------------------------------------------------------
    "no_ev_sockets": Case(
        ["site.ev.classes.moto.sockets=0", "site.ev.classes.mototaxi.sockets=0"],
        config_error("site.ev.classes: the site has no EV socket"),
    ),
    # --- CSV settings ------------------------------------------------------------------
    "csv_separator_regex": Case(
        [*CSV, "site.load.csv.separator=xx"],
        config_error("site.load.csv.separator: unknown separator 'xx'"),
        FULL_CSV,
    ),
    "csv_decimal_unknown": Case(
        [*CSV, "site.load.csv.decimal=';'"], config_error("site.load.csv.decimal"), FULL_CSV
    ),
    "csv_timestamp_label_unknown": Case(
        [*CSV, "site.load.csv.timestamp_label=middle"],
        config_error("site.load.csv.timestamp_label: must be start or end"),
        FULL_CSV,
    ),
    "csv_thousands_equals_decimal": Case(
        [*CSV, "site.load.csv.thousands=','", "site.load.csv.decimal=','"],
        config_error("site.load.csv.thousands"),
        FULL_CSV,
    ),
    "csv_end_labelled_read_as_start": Case(
        [*CSV, "site.load.csv.unit=kW"],
        ("error: DataError:", "3 of 4 rows", "csv.timestamp_label=end"),
        quarter_hours_labelled_by_end,
    ),
    "csv_unknown_unit": Case(
        [*CSV, "site.load.csv.unit=kWs"], ("error: ConfigError:", "load_kwh.csv.unit"), FULL_CSV
    ),
    "csv_file_missing": Case(CSV, ("error: DataError:", "load.csv: file not found")),
    "csv_unknown_timezone": Case(
        [*CSV, "site.load.csv.timezone=Mars/Base"],
        ("error: ConfigError:", "unknown time zone 'Mars/Base'"),
        FULL_CSV,
    ),
    "csv_scale_zero": Case(
        [*CSV, "site.load.csv.scale=0"], config_error("site.load.csv.scale"), FULL_CSV
    ),
    # --- the store and resume ------------------------------------------------------------
    "experiment_with_unwritable_artifacts": Case(
        [],
        (
            "error: TrackingError: MLflow artifact folder",
            "tracking.experiment=<new name> tracking.artifact_location=<writable folder>",
        ),
        experiment_with_unwritable_artifacts,
        dataset_ok=True,
    ),
    "resume_missing_dir": Case(
        ["resume=out/none"], ("error: CheckpointError:", "no such run directory")
    ),
    "resume_not_a_run_dir": Case(
        ["resume=out/empty"],
        ("error: CheckpointError:", "not a pvbess run directory"),
        a_folder("out/empty"),
    ),
    "sqlite_store_under_a_file": Case(
        ["tracking.uri=sqlite:///STORE/blocker/db/mlflow.db"],
        ("error: TrackingError:", "blocker/db cannot be created"),
        make_file("blocker"),
        dataset_ok=True,
    ),
}


# These import torch and MLflow (about 4 s each): started first, the quick ones
# fill the gaps.
SLOW_CASES = (
    "truncated_checkpoint_on_resume",
    "tracking_server_unreachable",
    "store_folder_is_a_file",
    "artifact_folder_is_a_file",
    "experiment_with_unwritable_artifacts",
    "sqlite_store_under_a_file",
)


@dataclass
class Outcome:
    root: Path
    returncode: int
    output: str
    seconds: float


def _command(name: str, case: Case, root: Path) -> list[str]:
    # Relative paths in a case are relative to its root.
    overrides = [
        o.replace("=load.csv", f"={root / 'load.csv'}")
        .replace("resume=out", f"resume={root}/out")
        .replace("sqlite:///STORE", f"sqlite:///{root}")
        for o in case.overrides
    ]
    run_dir = f"hydra.run.dir={root / 'hydra'}"
    return [sys.executable, "-m", "pvbess.train", "site=tiny", run_dir, *overrides]


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Outcome]]:
    """Run every case, PARALLEL at a time; kill whatever still runs at the end."""
    pending = [*SLOW_CASES, *(name for name in CASES if name not in SLOW_CASES)]
    running: dict[str, tuple[subprocess.Popen[bytes], Path, float]] = {}
    done: dict[str, Outcome] = {}
    try:
        while pending or running:
            while pending and len(running) < PARALLEL:
                name = pending.pop(0)
                case, root = CASES[name], tmp_path_factory.mktemp(name)
                if case.prepare is not None:
                    case.prepare(root)
                # One torch thread each: PARALLEL processes share 2 cores.
                env = child_env(root, {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
                with open(root / "output.log", "w") as out:
                    proc = subprocess.Popen(
                        _command(name, case, root),
                        cwd=ROOT,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                    )
                running[name] = (proc, root, time.monotonic())
            for name, (proc, root, start) in list(running.items()):
                elapsed = time.monotonic() - start
                if proc.poll() is None and elapsed < TIMEOUT_S:
                    continue
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
                output = (root / "output.log").read_text()
                done[name] = Outcome(root, proc.returncode, output, elapsed)
                del running[name]
            time.sleep(0.05)
        yield done
    finally:
        for proc, _, _ in running.values():
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_fails_cleanly(name: str, outcomes: dict[str, Outcome]) -> None:
    case, result = CASES[name], outcomes[name]
    out = result.output
    assert result.returncode == 1, out[-3000:]
    for needle in case.needles:
        assert needle in out, (needle, out[-3000:])
    assert "Traceback" not in out, out[-3000:]

    has_store = (result.root / "mlruns" / "mlflow.db").is_file()
    runs = store_runs(result.root, experiment=None) if has_store else []
    if case.run_left:
        assert [r.info.status for r in runs] == ["FAILED"]
        assert case.needles[-1] in runs[0].data.tags["error"]
    else:  # it failed before any run started
        assert runs == []
    if not case.dataset_ok:  # data that failed their checks are never cached
        sites = result.root / "data" / "sites"
        cached = [p.name for p in sites.iterdir()] if sites.is_dir() else []
        assert cached == [], cached


def test_the_catalogue_covers_every_class() -> None:
    assert len(CASES) >= 60  # the issue asked for at least 60


def test_unreachable_server_fails_within_seconds(outcomes: dict[str, Outcome]) -> None:
    # MLflow's client alone retries for minutes (7 retries, exponential backoff).
    result = outcomes["tracking_server_unreachable"]
    assert result.returncode == 1
    assert result.seconds < UNREACHABLE_SERVER_MAX_S, result.output[-3000:]
