"""A tracking server (``make server``): a sweep's jobs log runs and artifacts over HTTP only,
``pvbess.compare`` reads them back through it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from pvbess.experiment import tracking

from .conftest import ROOT, artifact_paths, child_env, run_module
from .services import answers, free_port, make_command, start_group, stop_group, wait_for
from .test_sweep import ARTIFACTS, TINY


def server_command(port: int, store: str, artifacts: Path) -> list[str]:
    """The command ``make server`` runs."""
    return make_command(ROOT, "server", PORT=str(port), STORE=store, ARTIFACTS=str(artifacts))


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[str]:
    """``make server`` on a free port with a store of its own; its URI. Stopped with all its
    workers (its process group)."""
    port, store = free_port(), tmp_path / "server"
    store.mkdir()
    argv = server_command(port, f"sqlite:///{store}/mlflow.db", store / "artifacts")
    log = tmp_path / "server.log"
    proc = start_group(argv, child_env(store), log)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(f"{uri}/health"), "mlflow server", log)
        yield uri
    finally:
        stop_group(proc)


def test_server_binds_the_loopback_address_only() -> None:
    argv = server_command(5000, "sqlite:////x/mlflow.db", Path("/x/artifacts"))
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert "--serve-artifacts" in argv and argv[argv.index("--artifacts-destination") + 1]


# Slow (35-95 s with its server): make test-all runs it.
@pytest.mark.slow
def test_a_sweep_logs_over_http_only(server: str, tmp_path: Path) -> None:
    """2 jobs against the server: runs and artifacts in the server's store, readable through
    it; nothing in the client's own mlruns/; pvbess.compare works against the server."""
    client_root = tmp_path / "client"
    sweep = [*TINY, "env.eval_backend=twin", "seed=0,1", f"tracking.uri={server}"]
    proc = run_module("pvbess.train", ["--multirun", *sweep], client_root, 600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert not (client_root / "mlruns").exists()  # no local store, no local artifacts

    client = MlflowClient(tracking_uri=server)
    exp = client.get_experiment_by_name("tiny")
    assert exp is not None and exp.artifact_location.startswith("mlflow-artifacts:")
    runs = client.search_runs([exp.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("kind") == "sweep"]
    kids = [r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == parent.info.run_id]
    assert parent.info.status == "FINISHED" and parent.data.metrics["sweep/jobs_finished"] == 2
    assert sorted(k.data.tags["seed"] for k in kids) == ["0", "1"]
    for kid in kids:
        assert kid.info.status == "FINISHED"
        assert kid.info.artifact_uri.startswith("mlflow-artifacts:")  # through the proxy
        assert artifact_paths(client, kid.info.run_id) == ARTIFACTS
        path = client.download_artifacts(kid.info.run_id, "result.json", str(tmp_path))
        kpis = json.loads(Path(path).read_text())["kpis"]
        assert {f"eval/{k}": v for k, v in kpis.items()}.items() <= kid.data.metrics.items()
    # The files are where the server keeps artifacts.
    assert list((tmp_path / "server" / "artifacts").rglob("result.json"))

    proc = run_module("pvbess.compare", ["site=tiny", f"tracking.uri={server}"], client_root)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "Controllers compared" in out and "ppo" in out
    runs = client.search_runs([exp.experiment_id], "tags.kind = 'comparison'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
