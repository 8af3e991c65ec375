"""Services the tests start and stop: a free loopback port, a process group, a stop that
reaches everything the service spawned (MLflow's workers, Ray's daemons)."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import requests


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_group(
    argv: list[str], env: dict[str, str], log: Path, cwd: Path | None = None
) -> subprocess.Popen[bytes]:
    """``argv`` in its own process group (session), output to ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen(
            argv, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> None:
    """SIGTERM to the process's whole group, then SIGKILL to whatever is left in it: a
    service's children (MLflow's workers, Ray's daemons) outlive a kill of the leader."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def wait_for(ready: Callable[[], bool], what: str, log: Path, timeout_s: float = 120.0) -> None:
    """Poll ``ready`` until it is true; fail with the service's log when it never is."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.5)
    raise AssertionError(f"{what} not ready within {timeout_s:g} s:\n{log.read_text()[-3000:]}")


def answers(url: str) -> bool:
    """Whether an HTTP server answers ``url`` with 200."""
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def make_command(root: Path, target: str, **variables: str) -> list[str]:
    """The MLflow command ``make <target>`` runs (read from ``make -n``, nothing run), with
    this Python's mlflow: a test starts exactly what the Makefile starts."""
    args = [f"{k}={v}" for k, v in variables.items()] + ["VENV=/nonexistent"]
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "-C", str(root), target, *args],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.replace("\\\n", " ")
    (line,) = [x for x in dry.splitlines() if x.startswith("/nonexistent/bin/mlflow ")]
    return [str(Path(sys.executable).with_name("mlflow")), *shlex.split(line)[1:]]
