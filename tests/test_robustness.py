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


@dataclass
class Case:
    overrides: list[str]
    needles: tuple[str, ...]  # what the message must name
    prepare: Callable[[Path], None] | None = None
    run_left: bool = False  # a run existed before: it must end FAILED with an error tag


CSV = ["site.load.source=csv", "site.load.csv.path=load.csv", "site.load.csv.value_column=load_kw"]
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
    ),
    "store_folder_is_a_file": Case(
        [], ("error: TrackingError: MLflow store folder",), make_file("mlruns")
    ),
    "artifact_folder_is_a_file": Case(
        [], ("error: TrackingError: MLflow artifact folder",), make_file("mlruns/artifacts")
    ),
    "truncated_checkpoint_on_resume": Case(
        ["resume=out"],
        ("error: CheckpointError:", "ppo_128_steps.zip is truncated or corrupt"),
        crashed_run_with_truncated_checkpoint,
        run_left=True,
    ),
}


# These import torch and MLflow (about 4 s each): started first, the quick ones
# fill the gaps.
SLOW_CASES = (
    "truncated_checkpoint_on_resume",
    "tracking_server_unreachable",
    "store_folder_is_a_file",
    "artifact_folder_is_a_file",
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
        o.replace("=load.csv", f"={root / 'load.csv'}").replace("resume=out", f"resume={root}/out")
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


def test_unreachable_server_fails_within_seconds(outcomes: dict[str, Outcome]) -> None:
    # MLflow's client alone retries for minutes (7 retries, exponential backoff).
    result = outcomes["tracking_server_unreachable"]
    assert result.returncode == 1
    assert result.seconds < UNREACHABLE_SERVER_MAX_S, result.output[-3000:]
