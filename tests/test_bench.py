"""``python -m pvbess.experiment.bench --study``: the README's commands, timed as subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from pvbess.experiment import bench, study

from .conftest import ROOT, run_module

WALL_TIME = re.compile(r"^(?:(\d+) h )?(?:(\d+) min )?(\d+(?:\.\d+)?) s$")


def _study(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m pvbess.experiment.bench --study <args>`` with PVBESS_ROOT=<tmp>/root."""
    return run_module("pvbess.experiment.bench", ["--study", *args], tmp_path / "root", timeout=600)


def _seconds(cell: str) -> float:
    m = WALL_TIME.match(cell)
    assert m, f"not a wall time: {cell!r}"
    h, mins, s = m.groups()
    return int(h or 0) * 3600 + int(mins or 0) * 60 + float(s)


def _table(markdown: str) -> dict[str, list[str]]:
    """The study's table: 'what' -> [command, wall time, x ref, notes]."""
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert rows[0] == "| what | command | wall time | × ref | notes |"
    cells = [[c.strip() for c in re.split(r"(?<!\\)\|", row)[1:-1]] for row in rows[1:]]
    return {c[0]: c[1:] for c in cells}


def _makefile_recipe(target: str) -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_the_commands_are_read_from_the_makefile() -> None:
    b = "/some/venv/bin"
    assert study.study_commands("dataset", "tiny", ["seed=1"], bin_dir=b) == [
        f"{b}/python -m pvbess.site site=tiny seed=1"
    ]
    assert study.study_commands("run", "tiny", ["seed=1"], bin_dir=b) == [
        f"{b}/python -m pvbess.train site=tiny seed=1"
    ]
    assert study.study_commands("tests", "tiny", ["seed=1"], bin_dir=b) == [
        f'{b}/python -m pytest -m "not slow and not ray and not ui" -q'
    ]
    assert study.shown(f"{b}/python -m pvbess.train", b) == "python -m pvbess.train"
    # compare-all: each line of the target's recipe, in order; total_timesteps -> BUDGET.
    recipe = _makefile_recipe("compare-all")
    for overrides, budget, steps in (
        (["total_timesteps=300", "seed=1"], None, "300"),
        (["total_timesteps=300", "seed=1"], 500, "500"),
    ):
        cmds = study.study_commands("compare-all", "tiny", overrides, budget=budget, bin_dir=b)
        assert len(cmds) == len(recipe)
        for line, cmd in zip(recipe, cmds, strict=True):
            module = re.search(r"-m (\S+)", line).group(1)
            assert cmd.startswith(f"{b}/python -m {module} "), (line, cmd)
            assert "site=tiny" in cmd
            assert cmd.count("total_timesteps=") <= 1, cmd
        assert any(f"total_timesteps={steps}" in c for c in cmds)
        assert not any("total_timesteps=300" in c for c in cmds if steps != "300")


def test_bad_parts_are_refused() -> None:
    with pytest.raises(SystemExit) as exc:
        bench.main(["--study", "dataset,nope"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        bench.main(["--study", "total_timesteps=5"])
    assert exc.value.code == 2


def test_a_failing_command_fails_the_study_naming_it(tmp_path: Path) -> None:
    proc = _study(tmp_path, "run", "--site", "tiny", "--repeats", "1", "total_timesteps=abc")
    assert proc.returncode == 1, proc.stderr
    assert proc.stdout == ""  # no table
    assert (
        "command `python -m pvbess.train site=tiny total_timesteps=abc` exited with status 1"
        in proc.stderr
    )
    assert "its stderr" in proc.stderr and "total_timesteps" in proc.stderr.split("its stderr")[1]
    (report,) = (tmp_path / "root" / "reports" / "bench").glob("*/study.md")
    assert "a command failed" in report.read_text()
    # The user's root holds the report only: the run wrote into a temporary root.
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["reports"]


@pytest.mark.slow
def test_study_dataset_and_run_on_tiny(tmp_path: Path) -> None:
    proc = _study(
        tmp_path, "dataset,run", "--site", "tiny", "--repeats", "1", "total_timesteps=500"
    )
    assert proc.returncode == 0, proc.stderr
    assert "[1/2] dataset: python -m pvbess.site site=tiny" in proc.stderr
    assert "[2/2] run: python -m pvbess.train site=tiny total_timesteps=500" in proc.stderr
    assert proc.stderr.count("done in") == 2
    header = proc.stdout.splitlines()[0]
    assert header.startswith("Study on site=tiny: 20") and "commit " in header
    assert f"{os.cpu_count()} CPUs" in header or " of " in header
    table = _table(proc.stdout)
    dataset_row = table[study.STUDY_LABELS["dataset"]]
    run_row = table[study.STUDY_LABELS["run"]]
    assert dataset_row[0] == "`python -m pvbess.site site=tiny total_timesteps=500`"
    assert run_row[0] == "`python -m pvbess.train site=tiny total_timesteps=500`"
    train = table["↳ training (`time/train_seconds`)"]
    evaluation = table["↳ evaluation in CityLearn (`time/eval_seconds`)"]
    (ref_what,) = [w for w in table if w.startswith("reference:")]
    for row in (dataset_row, run_row, train, evaluation, table[ref_what]):
        assert _seconds(row[1]) > 0, row
        assert float(row[2].replace(",", "")) > 0, row
    assert _seconds(train[1]) + _seconds(evaluation[1]) < _seconds(run_row[1])
    assert re.search(r"[\d,]+ steps, [\d,]+ steps/s \([\d.,]+ × ref rate\)", train[3]), train
    # Written as printed, with the figures as JSON; the user's root holds only the report.
    (report,) = (tmp_path / "root" / "reports" / "bench").glob("*/study.md")
    assert report.read_text() == proc.stdout
    figures = json.loads((report.parent / "study.json").read_text())
    assert figures["reference_steps_per_s"] > 0
    assert all(r["seconds"] > 0 and r["x_ref"] > 0 for r in figures["rows"])
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["reports"]


def test_time_to_share_on_tiny(tmp_path: Path) -> None:
    """The default learner's time to a share of the optimum: a target it cannot reach
    gives nan and its best share; a reachable one (below the uncontrolled site's 0 %)
    stops at the first evaluation."""
    from pvbess.experiment import speed

    typed, agent = speed.compose("tiny", with_agent=True)
    out = speed.time_to_share(typed, agent, str(tmp_path), target_pct=1e6, budget=2048, every=1024)
    assert out["steps_to_target"] != out["steps_to_target"]  # nan: not reached
    assert -1e4 < out["best_share_pct"] < 1e6 and out["best_steps"] in (1024, 2048)
    easy = speed.time_to_share(
        typed, agent, str(tmp_path), target_pct=-1e9, budget=4096, every=1024
    )
    assert easy["steps_to_target"] == 1024 and easy["seconds_to_target"] > 0
