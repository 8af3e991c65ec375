"""hydra/launcher=ray on a real Ray head: a sweep's jobs run as Ray tasks and land in MLflow.

Marker ``ray`` (``make test-ray``, which installs the ``ray`` extra); not in the default run.
The head is started here with token authentication on and stopped, with everything it
started (its process group), at the end of the module.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import optuna
import pytest

from pvbess.experiment import tracking

from .conftest import child_env, run_module, store_client, store_runs
from .services import free_port, start_group, stop_group
from .test_sweep import TINY, check_complete, check_sweep

pytest.importorskip("ray", reason="needs the ray extra: make install-ray")
pytestmark = pytest.mark.ray

RAY = str(Path(sys.executable).with_name("ray"))


@dataclass
class RayHead:
    address: str  # host:port of its GCS, what hydra.launcher.ray.init.address takes
    env: dict[str, str]  # RAY_AUTH_MODE and RAY_AUTH_TOKEN: what a client needs to join
    # PVBESS_ROOT of the head's workers and of the sweeps started here: jobs resolve the
    # project root where they run, as on a cluster where it is the same path on every node.
    root: Path

    def auth(self) -> dict[str, str]:
        return {k: self.env[k] for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A local Ray head with 2 CPUs, token authentication on, its workers writing to a
    temporary PVBESS_ROOT; stopped with `ray stop --force` and a kill of its group."""
    root = tmp_path_factory.mktemp("ray-root")
    # Short: Ray's unix sockets live under it (a socket path has at most 107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    port = free_port()
    # A token of our own (not ~/.ray/auth_token): clients without it are refused.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    env = child_env(root, auth)  # the workers inherit it: PVBESS_ROOT, CITYLEARN_OFFLINE
    argv = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}"]
    argv += ["--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats"]
    argv += [f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}"]
    argv += [f"--dashboard-agent-listen-port={free_port()}"]
    log = root / "ray-start.log"
    head = start_group(argv, env, log)
    try:
        assert head.wait(timeout=180) == 0, log.read_text()[-3000:]
        yield RayHead(f"127.0.0.1:{port}", env, root)
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, check=False)
        stop_group(head)  # the daemons `ray start` left in its group, if any survived
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_token_authentication_is_on(ray_head: RayHead, tmp_path: Path) -> None:
    """A client without the cluster's token is refused."""
    env = {k: v for k, v in ray_head.env.items() if k != "RAY_AUTH_TOKEN"}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    code = f"import ray; ray.init(address={ray_head.address!r})"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode != 0
    assert "AuthenticationError" in proc.stderr, proc.stderr[-2000:]


def test_a_sweep_runs_on_the_ray_head(ray_head: RayHead) -> None:
    """4 jobs through hydra/launcher=ray: 4 finished child runs of one parent, complete."""
    sweep = [*TINY, "env.eval_backend=twin", "seed=0,1,2,3"]
    launcher = ["hydra/launcher=ray", f"hydra.launcher.ray.init.address={ray_head.address}"]
    args = ["--multirun", *launcher, *sweep]
    proc = run_module("pvbess.train", args, ray_head.root, 600, ray_head.auth())
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "(_run_job pid=" in out  # the jobs' logs, forwarded by Ray from its workers
    kids = check_sweep(ray_head.root, 4, " ".join(sweep))
    client = store_client(ray_head.root)
    check_complete(client, kids)
    for kid in kids:
        assert {"eval/co2_kg", "eval/reward_total_mean"} <= set(kid.data.metrics)
        assert kid.data.tags[tracking.PARENT_TAG]
    assert sorted(k.data.tags["seed"] for k in kids) == ["0", "1", "2", "3"]
    parent = client.get_run(kids[0].data.tags[tracking.PARENT_TAG])
    assert parent.data.tags["launcher"] == "ray"


def test_a_search_runs_its_trials_on_the_ray_head(ray_head: RayHead) -> None:
    """pvbess.tune with hydra/launcher=ray: each trial a one-job multirun on Ray, a child
    run of the search's parent (no sweep parent of its own), the study complete."""
    launcher = ["hydra/launcher=ray", f"hydra.launcher.ray.init.address={ray_head.address}"]
    args = ["hparams_search=ppo_optuna", *TINY, "agent.batch_size=32", "env.eval_backend=twin"]
    args += ["tracking.experiment=tiny_tune", "tune.n_trials=2", "tune.n_jobs=2"]
    args += ["tune.study_name=on_ray", "tune.preset=''", *launcher]
    proc = run_module("pvbess.tune", args, ray_head.root, 600, ray_head.auth())
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    logs = list(ray_head.root.glob("multirun/*/*_ppo_optuna/*/stdout.log"))
    assert len(logs) == 2 and all("(_run_job pid=" in f.read_text() for f in logs)

    storage = f"sqlite:///{ray_head.root}/mlruns/optuna.db"
    study = optuna.load_study(study_name="on_ray", storage=storage)
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    runs = store_runs(ray_head.root, "tiny_tune")
    (parent,) = [r for r in runs if r.data.tags.get("kind") in ("sweep", "search")]
    assert parent.data.tags["kind"] == "search" and parent.info.status == "FINISHED"
    kids = [r for r in runs if r is not parent]
    assert len(kids) == 2 and all(k.info.status == "FINISHED" for k in kids)
    assert all(k.data.tags[tracking.PARENT_TAG] == parent.info.run_id for k in kids)
    key = "eval/reward_total_mean"
    values = {int(k.data.tags[tracking.JOB_TAG]): k.data.metrics[key] for k in kids}
    assert values == pytest.approx({t.number: t.value for t in study.trials})
