"""``--study`` instead times the README's commands themselves, each as a subprocess
in its own empty temporary ``PVBESS_ROOT`` (the user's dataset cache and MLflow
store are never touched), and prints a Markdown table to paste into the README
(also written to ``reports/bench/<time>/study.md``)::

    python -m pvbess.experiment.bench --study [dataset,run,compare-all,tests] \
        [--site S] [OVERRIDE ...]

- ``dataset``: ``make site`` (``python -m pvbess.site site=S``) from an empty cache;
- ``run``: ``make run`` (``python -m pvbess.train site=S``), with the split the run
  logs itself (``time/train_seconds``, ``time/eval_seconds``, train steps/s);
- ``compare-all``: the commands of ``make compare-all SITE=S``;
- ``tests``: ``make test`` (the fast suite).

The commands are read from the Makefile (``make -n``), so they are always the
ones the targets run. Beside each wall time the study prints its ratio to a
machine-speed reference measured in the same invocation (raw CityLearn steps on
the site under random actions, before and after the commands), so that readers
on a faster or slower machine can scale the figures.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from pvbess import config
from pvbess.experiment import speed
from pvbess.site import dataset

# --- the study: the README's commands, timed as subprocesses ----------------------------

CHECKOUT = Path(__file__).resolve().parents[2]
SHELL = "/bin/bash"  # the Makefile's SHELL: each command line runs as make would run it
# The study's parts in the order they run, and the Makefile target each one times.
STUDY_TARGETS = {"dataset": "site", "run": "run", "compare-all": "compare-all", "tests": "test"}
STUDY_LABELS = {
    "dataset": "dataset build, empty cache (`make site`)",
    "run": "`make run`: dataset, training, CityLearn evaluation",
    "compare-all": "`make compare-all`",
    "tests": "fast test suite (`make test`)",
}
# Variables that would send a command's runs, or make's own variables, elsewhere.
STUDY_ENV_DROP = (
    "MAKEFLAGS",
    "MFLAGS",
    "MAKELEVEL",
    "MAKEOVERRIDES",
    "MLFLOW_TRACKING_URI",
    "MLFLOW_RUN_ID",
    "MLFLOW_EXPERIMENT_NAME",
    "MLFLOW_EXPERIMENT_ID",
    "PVBESS_PARENT_RUN_ID",
    "PVBESS_SWEEP_JOB",
)
REF_UNIT_STEPS = 1000  # "x ref" of a time: that time in units of 1,000 reference steps
TAIL_LINES = 20
EXIT_STUDY_FAILED = 1


class StudyError(RuntimeError):
    """A command of the study failed or could not be read; the message names it."""


def study_env(root: Path | None = None) -> dict[str, str]:
    """The environment of a study command: outputs under ``root``, nothing inherited
    that points MLflow or make elsewhere."""
    env = {k: v for k, v in os.environ.items() if k not in STUDY_ENV_DROP}
    env["CITYLEARN_OFFLINE"] = "1"  # as the Makefile exports it
    if root is not None:
        env["PVBESS_ROOT"] = str(root)
    return env


def make_commands(target: str, variables: dict[str, str]) -> list[str]:
    """The shell lines ``make <target> VAR=value ...`` runs, read with ``make -n``
    (its ``install`` prerequisite left out)."""
    make = shutil.which("make")
    if make is None:
        raise StudyError("`make` not found: the study reads its commands from the Makefile")
    argv = [
        make,
        "-n",
        "--no-print-directory",
        "-f",
        str(CHECKOUT / "Makefile"),
        "-o",
        "install",
        target,
        *(f"{k}={v}" for k, v in variables.items()),
    ]
    proc = subprocess.run(
        argv, cwd=CHECKOUT, env=study_env(), capture_output=True, text=True, timeout=60, check=False
    )
    if proc.returncode != 0:
        raise StudyError(f"`{shlex.join(argv)}` failed: {proc.stderr.strip()}")
    lines = [line.strip() for line in proc.stdout.replace("\\\n", " ").splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    if not lines:
        raise StudyError(f"`make -n {target}` prints no command")
    return lines


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def study_commands(
    part: str,
    site: str,
    overrides: list[str],
    budget: int | None = None,
    bin_dir: str | None = None,
) -> list[str]:
    """The command lines of one part of the study, from its Makefile target.

    ``overrides`` go into ``ARGS`` (not for ``tests``). For ``compare-all``, a
    ``total_timesteps=N`` among them becomes ``BUDGET``, ``SAC_BUDGET`` and
    ``RESIDUAL_BUDGET`` ``=N`` unless
    ``budget`` is given (the target sets total_timesteps from them itself).
    """
    variables = {"BIN": shlex.quote(bin_dir or str(Path(sys.executable).parent))}
    args = [f"site={site}", *overrides]
    if part == "compare-all":
        steps = [o.split("=", 1)[1] for o in overrides if _key(o) == "total_timesteps"]
        variables["SITE"] = site
        if budget is not None or steps:
            variables["BUDGET"] = str(budget if budget is not None else steps[-1])
            variables["SAC_BUDGET"] = variables["RESIDUAL_BUDGET"] = variables["BUDGET"]
        args = [o for o in overrides if _key(o) != "total_timesteps"]
    elif part == "tests":
        args = []
    variables["ARGS"] = shlex.join(args)
    return make_commands(STUDY_TARGETS[part], variables)


def shown(line: str, bin_dir: str | None = None) -> str:
    """A command line as the README writes it: ``python -m ...``."""
    prefix = shlex.quote(bin_dir or str(Path(sys.executable).parent)) + "/"
    return line[len(prefix) :] if line.startswith(prefix) else line


def fmt_seconds(seconds: float) -> str:
    """6.1 s, 1 min 52 s, 1 h 2 min 5 s."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(round(seconds), 60)
    if m < 60:
        return f"{m} min {s} s"
    h, m = divmod(m, 60)
    return f"{h} h {m} min {s} s"


def _tail(path: Path, n: int = TAIL_LINES) -> list[str]:
    """The last ``n`` non-empty lines of a log (progress bars' carriage returns split lines)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return []
    lines = [line.rstrip() for line in re.split(r"[\r\n]+", text)]
    return [line for line in lines if line.strip()][-n:]


class Progress:
    """Which command is running and for how long, on stderr: updated in place on a
    terminal, one line a minute otherwise."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self._next = 60.0

    def say(self, message: str) -> None:
        print(message, file=self.stream, flush=True)

    def start(self, message: str) -> None:
        self._next = 60.0
        self.say(message)

    def tick(self, elapsed: float) -> None:
        if self.tty:
            self.stream.write(f"\r  running {fmt_seconds(elapsed):<16}")
            self.stream.flush()
        elif elapsed >= self._next:
            self.say(f"  still running, {fmt_seconds(elapsed)}")
            self._next += 60.0

    def done(self, seconds: float, ok: bool = True) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 28 + "\r")
        self.say(f"  {'done' if ok else 'FAILED'} in {fmt_seconds(seconds)}")


def run_command(
    line: str, root: Path, log_stem: Path, progress: Progress, bin_dir: str | None = None
) -> float:
    """Run one command line (as make would: ``bash -c``) with PVBESS_ROOT=root; its
    wall time. Output goes to ``<log_stem>.stdout.log`` / ``.stderr.log``; a non-zero
    exit raises StudyError naming the command, with the tail of its stderr."""
    out_path = log_stem.with_name(log_stem.name + ".stdout.log")
    err_path = log_stem.with_name(log_stem.name + ".stderr.log")
    with out_path.open("wb") as out, err_path.open("wb") as err:
        start = time.perf_counter()
        proc = subprocess.Popen(
            [SHELL, "-c", line],
            cwd=CHECKOUT,
            env=study_env(root),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
        )
        try:
            while True:
                try:
                    code = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    progress.tick(time.perf_counter() - start)
        finally:
            if proc.poll() is None:  # interrupted (Ctrl-C reached the command too)
                for stop in (None, proc.terminate, proc.kill):
                    if stop is not None:
                        stop()
                    try:
                        proc.wait(timeout=15)
                        break
                    except subprocess.TimeoutExpired:
                        continue
        seconds = time.perf_counter() - start
    progress.done(seconds, ok=code == 0)
    if code != 0:
        parts = [
            f"command `{shown(line, bin_dir)}` exited with status {code} after "
            f"{fmt_seconds(seconds)}"
        ]
        for name, path, n in (("stderr", err_path, TAIL_LINES), ("stdout", out_path, 10)):
            tail = _tail(path, n)
            if tail:
                parts.append(f"--- its {name}, last {len(tail)} lines ({path}):")
                parts += tail
        raise StudyError("\n".join(parts))
    return seconds


def mlflow_timings(root: Path) -> list[dict[str, Any]]:
    """The time/* figures each run logged itself in the store under ``root``, oldest first."""
    db = root / "mlruns" / "mlflow.db"
    if not db.is_file():
        return []
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db.resolve()}")
    ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, order_by=["attributes.start_time ASC"]) if ids else []
    found = []
    for r in runs:
        m = r.data.metrics
        if "time/train_seconds" not in m:
            continue  # a sweep's parent run, a comparison run
        train_s, steps = m["time/train_seconds"], m.get("time/train_steps", 0.0)
        found.append(
            {
                "run_id": r.info.run_id,
                "name": r.info.run_name,
                "status": r.info.status,
                "train_seconds": train_s,
                "train_steps": steps,
                "train_steps_per_s": steps / train_s if steps > 0 and train_s > 0 else None,
                "eval_seconds": m.get("time/eval_seconds"),
            }
        )
    return found


def pytest_summary(stdout_log: Path) -> str:
    """'270 passed, 5 deselected' from pytest's last line, or ''."""
    found = re.findall(
        r"^=*\s*(\d+ (?:passed|failed|error|skipped|deselected)[^\n]*?) in [\d.]+s",
        stdout_log.read_text(errors="replace") if stdout_log.is_file() else "",
        flags=re.MULTILINE,
    )
    return found[-1] if found else ""


@dataclass
class Row:
    """One line of the study's table: a wall time (or none) and what it is."""

    what: str
    command: str = ""
    seconds: float | None = None
    notes: str = ""


@dataclass
class Reference:
    """The machine-speed reference: raw CityLearn steps/s on the site, random actions."""

    site: str
    steps: int
    before: list[float] = field(default_factory=list)
    after: list[float] = field(default_factory=list)

    @property
    def steps_per_s(self) -> float:
        return max(self.before + self.after)

    def times(self, seconds: float) -> float:
        """``seconds`` in units of REF_UNIT_STEPS reference steps."""
        return seconds * self.steps_per_s / REF_UNIT_STEPS

    def rate(self, steps_per_s: float) -> float:
        return steps_per_s / self.steps_per_s


def measure_reference(
    ref: Reference, ds: dataset.SiteDataset, repeats: int, out: list[float], progress: Progress
) -> None:
    actions = speed.random_actions(ds, ref.steps)
    ref.steps = len(actions)  # at most the site's period
    for _ in range(repeats):
        out.append(speed.raw_citylearn_steps_per_s(ds.schema_path, actions))
    progress.say(
        f"reference: raw CityLearn on site={ref.site}, {len(actions)} random steps: "
        + ", ".join(f"{v:,.0f}" for v in out)
        + " steps/s"
    )


def _git(*args: str) -> str:
    try:
        proc = subprocess.run(
            ["git", *args], cwd=CHECKOUT, capture_output=True, text=True, timeout=10, check=False
        )
    except OSError:
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def render(
    rows: list[Row],
    ref: Reference,
    meta: dict[str, Any],
    failure: str | None = None,
) -> str:
    """The study as Markdown: a header line (date, commit, CPUs), the table, the notes."""
    lines = [
        f"Study on site={meta['site']}: {meta['date']}, commit {meta['commit']}, "
        f"{meta['cpus']} CPUs ({meta['cpu_model']}), Python {meta['python']}, "
        f"load average {meta['load_before']:.2f} before, "
        + (f"{meta['load_after']:.2f} after." if "load_after" in meta else "n/a after."),
        "",
        f"Rerun: `{meta['rerun']}`",
        "",
        "| what | command | wall time | × ref | notes |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        wall = fmt_seconds(r.seconds) if r.seconds is not None else ""
        ratio = f"{ref.times(r.seconds):,.1f}" if r.seconds is not None and ref.before else ""
        command = f"`{_md(r.command)}`" if r.command else ""
        lines.append(f"| {_md(r.what)} | {command} | {wall} | {ratio} | {_md(r.notes)} |")
    if ref.before:
        ref_s = REF_UNIT_STEPS / ref.steps_per_s
        after = ", ".join(f"{v:,.0f}" for v in ref.after) or "not measured"
        lines.append(
            f"| reference: {REF_UNIT_STEPS:,} raw CityLearn steps, site={ref.site}, random "
            f"actions |  | {fmt_seconds(ref_s)} | 1.0 | measured in this process: "
            f"{ref.steps_per_s:,.0f} steps/s, the best of {ref.steps}-step runs before the "
            f"commands ({', '.join(f'{v:,.0f}' for v in ref.before)}) and after ({after}) |"
        )
    lines += [
        "",
        "Each command ran as a subprocess, as its Makefile target runs it (read with "
        "`make -n`), in its own empty temporary PVBESS_ROOT: `make run` and `make "
        "compare-all` include building the site's dataset, and the user's cache and "
        "MLflow store are untouched. Training and evaluation times are the ones the "
        "run logged (`time/train_seconds` includes building the agent; train steps/s = "
        "`time/train_steps` / `time/train_seconds`).",
        "",
        f"× ref: the wall time in units of the reference time ({REF_UNIT_STEPS:,} raw "
        f"CityLearn steps on site={ref.site} under random actions, the `CityLearn raw` "
        f'figure of `make bench ARGS="--site {ref.site}"`); for a rate, the rate over the '
        "reference rate. Another machine's time ≈ × ref × its own reference time.",
    ]
    if failure:
        lines += ["", "**The study stopped: a command failed.**", "", "```text", failure, "```"]
    return "\n".join(lines) + "\n"


def _part_rows(
    part: str, lines: list[str], seconds: list[float], root: Path, ref: Reference, log: Path
) -> list[Row]:
    """The table rows of one finished part: its wall time, and what the runs logged."""
    cmds = [shown(line) for line in lines]
    total = sum(seconds)
    rows = [Row(STUDY_LABELS[part], cmds[0] if len(cmds) == 1 else "", total)]
    if len(cmds) > 1:
        rows[0].notes = f"{len(cmds)} commands, one after another"
        rows += [
            Row(f"↳ command {i}/{len(cmds)}", c, s)
            for i, (c, s) in enumerate(zip(cmds, seconds, strict=True), 1)
        ]
    if part == "tests":
        rows[0].notes = pytest_summary(log.with_name(log.name + ".stdout.log"))
    if part not in ("run", "compare-all"):
        return rows
    runs = mlflow_timings(root)
    if not runs:
        rows[0].notes = (rows[0].notes + "; " if rows[0].notes else "") + (
            f"no run with time/* metrics in {root / 'mlruns'} (tracking.uri overridden?)"
        )
        return rows

    def speed(run: dict[str, Any]) -> str:
        rate = run["train_steps_per_s"]
        if rate is None:
            return "no training steps: a controller's setup and planning (the LP solve)"
        return (
            f"{run['train_steps']:,.0f} steps, {rate:,.0f} steps/s "
            f"({ref.rate(rate):,.1f} × ref rate)"
        )

    if part == "run":
        run = runs[-1]
        rows.append(Row("↳ training (`time/train_seconds`)", "", run["train_seconds"], speed(run)))
        if run["eval_seconds"] is not None:
            rows.append(
                Row("↳ evaluation in CityLearn (`time/eval_seconds`)", "", run["eval_seconds"])
            )
            rest = total - run["train_seconds"] - run["eval_seconds"]
            rows.append(Row("↳ the rest: imports, dataset build, logging", "", rest))
        rows[0].notes = f"MLflow run {run['name']} ({run['status']})"
        return rows
    for run in runs:  # compare-all: each job, as it logged itself (jobs run in parallel)
        both = run["train_seconds"] + (run["eval_seconds"] or 0.0)
        note = f"training {fmt_seconds(run['train_seconds'])}: {speed(run)}"
        if run["eval_seconds"] is not None:
            note += f"; evaluation {fmt_seconds(run['eval_seconds'])}"
        rows.append(Row(f"↳ job {run['name']} (training + evaluation)", "", both, note))
    return rows


def study(args: argparse.Namespace, parts: list[str]) -> int:
    """Run the study's parts, print the table and write it; 0, or 1 if a command failed."""
    progress = Progress()
    started = datetime.datetime.now().astimezone()
    stamp = started.strftime("%Y-%m-%d_%H-%M-%S")
    report_dir = (
        Path(args.report_dir)
        if args.report_dir
        else Path(config.project_root()) / "reports" / "bench" / stamp
    )
    log_dir = report_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    commit = _git("rev-parse", "--short=12", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    cpus = os.cpu_count() or 1
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cpus
    rerun = " ".join(
        ["python -m pvbess.experiment.bench --study", ",".join(parts), "--site", args.site]
        + ([f"--budget {args.budget}"] if args.budget is not None else [])
        + [shlex.quote(o) for o in args.overrides]
    )
    meta: dict[str, Any] = {
        "site": args.site,
        "date": started.strftime("%Y-%m-%d %H:%M %Z"),
        "commit": commit,
        "cpus": cpus if usable == cpus else f"{usable} of {cpus}",
        "cpu_model": _cpu_model(),
        "python": platform.python_version(),
        "load_before": os.getloadavg()[0],
        "rerun": rerun,
        "overrides": args.overrides,
        "parts": parts,
    }
    bin_dir = str(Path(sys.executable).parent)
    ref = Reference(args.site, args.steps)
    rows: list[Row] = []
    failure = None
    # Every command is read before anything runs: a broken Makefile fails at once.
    try:
        commands = {p: study_commands(p, args.site, args.overrides, args.budget) for p in parts}
    except StudyError as exc:
        progress.say(f"error: {exc}")
        return EXIT_STUDY_FAILED
    n_total = sum(len(c) for c in commands.values())
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="pvbess-study-"))
    progress.say(
        f"study on site={args.site}: {n_total} command{'s' if n_total != 1 else ''}, "
        f"temporary roots under {work}"
    )
    try:
        try:
            ref_ds = dataset.build(speed.compose(args.site).site, work / "reference")
        except Exception as exc:  # an unknown site, a bad preset: named, without a traceback
            raise StudyError(f"site={args.site}: {type(exc).__name__}: {exc}") from exc
        measure_reference(ref, ref_ds, args.repeats, ref.before, progress)
        n = 0
        for part in parts:
            root = work / part
            if root.exists() and any(root.iterdir()):
                raise StudyError(f"{root} is not empty: the study needs empty roots")
            root.mkdir(parents=True, exist_ok=True)
            seconds = []
            for line in commands[part]:
                n += 1
                log = log_dir / f"{n:02d}-{part}"
                progress.start(f"[{n}/{n_total}] {part}: {shown(line, bin_dir)}")
                seconds.append(run_command(line, root, log, progress, bin_dir))
            rows += _part_rows(part, commands[part], seconds, root, ref, log)
        measure_reference(ref, ref_ds, args.repeats, ref.after, progress)
    except StudyError as exc:
        failure = str(exc)
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    meta["load_after"] = os.getloadavg()[0]
    text = render(rows, ref, meta, failure)
    (report_dir / "study.md").write_text(text)
    (report_dir / "study.json").write_text(
        json.dumps(
            {
                **meta,
                "reference_steps_per_s": ref.steps_per_s if ref.before else None,
                "reference_before": ref.before,
                "reference_after": ref.after,
                "reference_steps": ref.steps,
                "rows": [
                    {
                        "what": r.what,
                        "command": r.command,
                        "seconds": r.seconds,
                        "x_ref": ref.times(r.seconds)
                        if r.seconds is not None and ref.before
                        else None,
                        "notes": r.notes,
                    }
                    for r in rows
                ],
                "failure": failure,
            },
            indent=1,
        )
    )
    if failure:
        progress.say(f"error: the study failed: {failure}")
        progress.say(f"partial report: {report_dir / 'study.md'}")
        return EXIT_STUDY_FAILED
    print(text, end="", flush=True)
    progress.say(f"written: {report_dir / 'study.md'} (and study.json, logs/)")
    return 0


def _study_parts(value: str, parser: argparse.ArgumentParser) -> list[str]:
    if "=" in value:
        parser.error(
            f"--study {value}: give the parts first (all or {','.join(STUDY_TARGETS)}), then "
            "the overrides: --study all total_timesteps=2000"
        )
    names = [v.strip() for v in value.split(",") if v.strip()]
    if names == ["all"]:
        return list(STUDY_TARGETS)
    unknown = sorted(set(names) - set(STUDY_TARGETS))
    if unknown or not names:
        parser.error(f"--study: unknown part(s) {unknown}; choose all or {','.join(STUDY_TARGETS)}")
    return [p for p in STUDY_TARGETS if p in names]  # always in this order
