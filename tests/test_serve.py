"""Served controllers (``pvbess.deploy``): a tiny-site run's controller over HTTP answers its
own evaluation's states with exactly the actions it took; bad requests get a 4xx naming
the field; ``pvbess.compare promote=<run id>`` registers ``<site>@champion``."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import requests

from .conftest import ROOT, child_env, run_module, store_client
from .services import answers, free_port, start_group, stop_group, wait_for

RUNS = {
    "ppo": [
        "agent=ppo",
        "env.n_envs=1",
        "total_timesteps=64",
        "agent.n_steps=32",
        "agent.batch_size=32",
    ],
    "rbc": ["agent=rbc"],
    "optimal": ["agent=optimal"],
}
SOCKET_KW = 7.4  # conf/site/iquitos_mall.yaml's socket power, kept by site=tiny
CHARGER_EFF = 0.95
DAY = slice(24, 48)  # the second day: not the period's end, where the tariff's next change
# lies beyond the data (the env sees none, a served controller the tariff's own)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A store with one tiny-site run per agent of RUNS (evaluated on the twin); run ids."""
    root = tmp_path_factory.mktemp("serve")
    ids = {}
    for agent, overrides in RUNS.items():
        args = ["site=tiny", "env.eval_backend=twin", "eval_every=0", *overrides]
        proc = run_module("pvbess.train", args, root)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
        client = store_client(root)
        exp = client.get_experiment_by_name("tiny")
        assert exp is not None
        (run,) = client.search_runs([exp.experiment_id], f"tags.agent = '{agent}'")
        ids[agent] = run.info.run_id
    return root, ids


def server_env(root: Path) -> dict[str, str]:
    """The server's environment: the store, and the venv's bin first (MLflow runs uvicorn)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return child_env(root, {"MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlruns/mlflow.db"}) | {
        "PATH": path
    }


@pytest.fixture(scope="module", params=["ppo", "rbc"])
def served(
    request: pytest.FixtureRequest, store: tuple[Path, dict[str, str]]
) -> Iterator[tuple[str, str, Path]]:
    """``mlflow models serve -m runs:/<id>/controller`` on a free loopback port, in its own
    process group, stopped with its workers; (agent, URL, root)."""
    root, ids = store
    agent = request.param
    port = free_port()
    argv = [str(Path(sys.executable).with_name("mlflow")), "models", "serve"]
    argv += ["-m", f"runs:/{ids[agent]}/controller", "--host", "127.0.0.1"]
    argv += ["--port", str(port), "--env-manager", "local"]
    log = root / f"serve-{agent}.log"
    proc = start_group(argv, server_env(root), log, cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(f"{url}/health"), f"served {agent}", log)
        yield agent, url, root
    finally:
        stop_group(proc)


def timeseries(root: Path, run_id: str) -> pd.DataFrame:
    """The run's evaluation timeseries, every float as written (round trip)."""
    client = store_client(root)
    path = client.download_artifacts(run_id, "eval_timeseries.csv", str(root / run_id))
    return pd.read_csv(path, index_col="time", float_precision="round_trip")


def post(url: str, frame: pd.DataFrame) -> requests.Response:
    """``dataframe_split`` with Python's JSON floats (every digit kept)."""
    body = {"dataframe_split": {"columns": list(frame.columns), "data": frame.values.tolist()}}
    return requests.post(
        f"{url}/invocations",
        data=json.dumps(body),
        headers={"Content-Type": "application/json"},
        timeout=60,
    )


def columns(run_id: str) -> list[str]:
    import mlflow

    info = mlflow.models.get_model_info(f"runs:/{run_id}/controller")
    return [c.name for c in info.signature.inputs.inputs]


def test_served_actions_are_the_runs_own(
    served: tuple[str, str, Path], store: tuple[Path, dict[str, str]]
) -> None:
    """A day of the run's evaluation states posted over HTTP: the answers are, exactly, the
    actions the run took in its evaluation and those of the model loaded in-process."""
    import mlflow

    from pvbess import deploy

    agent, url, root = served
    run_id = store[1][agent]
    ts = timeseries(root, run_id)
    day = deploy.request_frame(ts, columns(run_id)).iloc[DAY].reset_index(drop=True)
    assert len(day) == 24 and day["n_sockets"].eq(4).all()
    assert day["plugged_1"].sum() + day["plugged_4"].sum() > 0  # vehicles come that day
    r = post(url, day)
    assert r.status_code == 200, r.text
    got = pd.DataFrame(r.json()["predictions"])
    assert list(got.columns) == deploy.output_columns(4)
    taken = ts[deploy.output_columns(4)].iloc[DAY].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, taken, check_exact=True)
    in_process = mlflow.pyfunc.load_model(f"runs:/{run_id}/controller").predict(day)
    pd.testing.assert_frame_equal(got, in_process, check_exact=True)
    assert (got["battery_kw"] != 0).any()  # a real answer, not a default


def test_the_safety_layer_is_inside(served: tuple[str, str, Path]) -> None:
    """A vehicle that must charge at full power this hour to leave at its required SOC gets
    full socket power, whatever the policy wants; an empty socket gets none."""
    agent, url, root = served
    from pvbess import deploy

    run_id = store_ids(root)[agent]
    row = deploy.request_frame(timeseries(root, run_id), columns(run_id)).iloc[[30]]
    row = row.reset_index(drop=True)
    # A moto (4.6 kWh) needing 0.8 of its battery within the hour, a mototaxi (7.4 kWh)
    # needing more than one hour at socket power can give, an empty socket.
    for i, state in ((2, [1, 0.1, 1.0, 0.9]), (4, [1, 0.0, 1.0, 1.0]), (3, [0, 0, 0, 0])):
        for name, value in zip(deploy.SOCKET_FIELDS, state, strict=True):
            row.loc[0, f"{name}_{i}"] = value
    r = post(url, row)
    assert r.status_code == 200, r.text
    (answer,) = r.json()["predictions"]
    delivered_kwh = answer["socket_kw_2"] * CHARGER_EFF  # one hour, battery side
    assert 0.8 * 4.6 <= delivered_kwh <= 0.8 * 4.6 * 1.0001
    assert answer["socket_kw_4"] == SOCKET_KW
    assert answer["socket_kw_3"] == 0.0


def store_ids(root: Path) -> dict[str, str]:
    client = store_client(root)
    exp = client.get_experiment_by_name("tiny")
    assert exp is not None
    return {r.data.tags["agent"]: r.info.run_id for r in client.search_runs([exp.experiment_id])}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("drop:soc_frac_2", "soc_frac_2"),
        ("nan:battery_soc_frac", "battery_soc_frac"),
        ("nan:load_kw", "load_kw"),
        ("set:battery_soc_frac=1.2", "battery_soc_frac"),
        ("set:soc_frac_1=-0.1", "soc_frac_1"),
        ("set:required_soc_frac_3=1.5", "required_soc_frac_3"),
        ("set:plugged_1=2", "plugged_1"),
        ("set:pv_kw=-1", "pv_kw"),
        ("sockets:5", "n_sockets"),
        ("sockets:3", "plugged_4"),
        ("set:time=yesterday", "time"),
    ],
)
def test_bad_requests_get_a_4xx_naming_the_field(
    served: tuple[str, str, Path], change: str, field: str
) -> None:
    agent, url, root = served
    from pvbess import deploy

    run_id = store_ids(root)[agent]
    frame = deploy.request_frame(timeseries(root, run_id), columns(run_id)).iloc[24:27]
    frame = frame.reset_index(drop=True).astype(object)
    kind, what = change.split(":", 1)
    if kind == "drop":
        frame = frame.drop(columns=[what])
    elif kind == "nan":
        frame.loc[1, what] = float("nan")
    elif kind == "set":
        col, value = what.split("=")
        frame.loc[1, col] = value if col == "time" else float(value)
    elif kind == "sockets":
        n = int(what)
        frame["n_sockets"] = n
        if n > 4:
            for c in ("plugged", "soc_frac", "hours_to_departure", "required_soc_frac"):
                frame[f"{c}_5"] = 0
        else:
            frame = frame.drop(columns=[c for c in frame.columns if c.endswith("_4")])
    r = post(url, frame)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    body = r.json()
    assert "predictions" not in body
    assert field in body["message"], body["message"]


def test_promote_registers_the_sites_champion(store: tuple[Path, dict[str, str]]) -> None:
    """promote=<run id> registers the controller as the model 'tiny' with the alias champion;
    a second promotion moves the alias; another site's run or a run without a served
    controller is refused (exit status 1)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    root, ids = store
    for k, agent in enumerate(("ppo", "rbc"), start=1):
        proc = run_module("pvbess.compare", ["site=tiny", f"promote={ids[agent]}"], root)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out[-3000:]
        assert f"tiny version {k} is models:/tiny@champion" in out
        store_client(root)
        version = MlflowClient().get_model_version_by_alias("tiny", "champion")
        assert int(version.version) == k and version.run_id == ids[agent]
    model = mlflow.pyfunc.load_model("models:/tiny@champion")
    assert model.metadata.run_id == ids["rbc"]
    from pvbess import deploy

    for run_id, site, message in (
        (ids["ppo"], "iquitos_mall", "not 'iquitos_mall'"),
        (ids["optimal"], "tiny", "logged no served controller"),
    ):
        with pytest.raises(deploy.PromoteError, match=message):
            deploy.promote(run_id, site)
    proc = run_module("pvbess.compare", ["site=tiny", f"promote={ids['optimal']}"], root)
    assert proc.returncode == 1 and "error: PromoteError" in proc.stderr, proc.stderr[-2000:]


def test_the_optimum_is_not_served(store: tuple[Path, dict[str, str]]) -> None:
    """The perfect-foresight LP has no decision from a step's state: its run finishes, tagged
    ``controller=not deployable``, with no model; every other run has one."""
    import mlflow
    from mlflow.exceptions import MlflowException

    root, ids = store
    client = store_client(root)
    run = client.get_run(ids["optimal"])
    assert run.info.status == "FINISHED"
    assert run.data.tags["controller"] == "not deployable"
    with pytest.raises(MlflowException):
        mlflow.models.get_model_info(f"runs:/{ids['optimal']}/controller")
    for agent in ("ppo", "rbc"):
        assert client.get_run(ids[agent]).data.tags["controller"] == "controller"
        info = mlflow.models.get_model_info(f"runs:/{ids[agent]}/controller")
        assert info.signature is not None and info.metadata["agent"] == agent


def test_make_serve_binds_the_loopback_address_locally() -> None:
    import subprocess

    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "-C", str(ROOT), "serve", "RUN=abc", "PORT=5123"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "mlflow models serve" in dry and "-m runs:/abc/controller" in dry
    assert "--host 127.0.0.1 --port 5123 --env-manager local" in dry
