"""Latency of served controllers: ``python -m pvbess.experiment.serve_bench --store <uri>
<run id> ...`` (``make bench-serve RUNS="..."``) serves each run's controller with
``mlflow models serve`` on a free loopback port, posts ``--calls`` one-row requests (the
run's own evaluation states, in turn) and prints the median and p99 per call [ms] and
their ratio to the first run's. Figures only: nothing here asserts a time."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import requests

from pvbess.sim.step import EXPECTED_SESSIONS


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def served(model_uri: str, store: str, log: Path):
    """``mlflow models serve`` of ``model_uri`` in its own process group; its URL. The whole
    group is stopped on exit (the server's workers outlive a kill of the leader)."""
    port = free_port()
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    env = os.environ | {
        "MLFLOW_TRACKING_URI": store,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    argv = [mlflow_bin, "models", "serve", "-m", model_uri, "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--env-manager", "local"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"server exited:\n{log.read_text()[-2000:]}")
            time.sleep(0.5)
        else:
            raise RuntimeError(f"server not ready in 180 s:\n{log.read_text()[-2000:]}")
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def body(frame: pd.DataFrame) -> str:
    """A ``dataframe_split`` request; Python's JSON floats keep every digit (pandas'
    ``to_json`` rounds to 10)."""
    return json.dumps(
        {"dataframe_split": {"columns": list(frame.columns), "data": frame.to_numpy().tolist()}}
    )


def run_requests(run_id: str, store: str, tmp: str) -> pd.DataFrame:
    """The run's evaluation states as requests; forecast columns a run's timeseries lacks
    (the MPC's) are the evaluation's own future PV and load (perfect forecasts), and
    expected sessions it lacks (the MPC's) are none (``[]``)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from pvbess import deploy

    mlflow.set_tracking_uri(store)
    info = mlflow.models.get_model_info(f"runs:/{run_id}/{deploy.MODEL_NAME}")
    columns = [c.name for c in info.signature.inputs.inputs]
    path = MlflowClient().download_artifacts(run_id, "eval_timeseries.csv", tmp)
    ts = pd.read_csv(path, index_col="time", float_precision="round_trip")
    extra = {}
    for col in columns:
        if col not in ts.columns and "_forecast_" in col:
            quantity, lead = col.split("_forecast_")
            h = int(float(lead[:-4]))
            extra[col] = ts[f"{quantity}_kw"].shift(-h).ffill()
        elif col not in ts.columns and col == EXPECTED_SESSIONS:
            extra[col] = pd.Series("[]", index=ts.index)
    # One concat, not a column at a time: pandas warns about a fragmented frame.
    ts = pd.concat([ts, pd.DataFrame(extra, index=ts.index)], axis=1)
    return deploy.request_frame(ts, columns)


def measure(url: str, frame: pd.DataFrame, calls: int) -> np.ndarray:
    """Seconds per one-row call, ``calls`` calls over the rows in turn (after 20 warm-up calls)."""
    bodies = [body(frame.iloc[[k]]) for k in range(len(frame))]
    headers = {"Content-Type": "application/json"}
    with requests.Session() as http:
        for k in range(20):
            http.post(f"{url}/invocations", data=bodies[k % len(bodies)], headers=headers)
        out = np.zeros(calls)
        for k in range(calls):
            start = time.perf_counter()
            r = http.post(f"{url}/invocations", data=bodies[k % len(bodies)], headers=headers)
            out[k] = time.perf_counter() - start
            r.raise_for_status()
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="run ids; the first is the reference of the ratios")
    parser.add_argument("--store", required=True, help="the MLflow tracking URI")
    parser.add_argument("--calls", type=int, default=1000)
    args = parser.parse_args(argv)
    from mlflow.tracking import MlflowClient

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for run_id in args.runs:
            agent = MlflowClient(args.store).get_run(run_id).data.tags.get("agent", "?")
            frame = run_requests(run_id, args.store, tmp)
            with served(
                f"runs:/{run_id}/controller", args.store, Path(tmp) / f"{run_id}.log"
            ) as url:
                seconds = measure(url, frame, args.calls)
            rows.append((agent, run_id, np.median(seconds) * 1e3, np.percentile(seconds, 99) * 1e3))
    load = os.getloadavg()
    print(
        f"| controller | median [ms] | p99 [ms] | median / {rows[0][0]}'s | p99 / {rows[0][0]}'s |"
    )
    print("|---|---|---|---|---|")
    for agent, _, med, p99 in rows:
        print(
            f"| {agent} | {med:.2f} | {p99:.2f} | {med / rows[0][2]:.2f} | {p99 / rows[0][3]:.2f} |"
        )
    print(
        f"({args.calls} one-row calls each over HTTP on 127.0.0.1; load average "
        f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; {os.cpu_count()} cores)"
    )


if __name__ == "__main__":
    main()
