"""The MLflow UI a user opens (``make ui``), in headless Chromium: the site's experiment is a
model-training one and lists its runs with their ``eval/*`` metrics.

Marker ``ui`` (``make test-ui``: Debian's chromium and the ``ui`` extra, Playwright, which
drives that chromium; no browser is downloaded). Not in the default run.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from .conftest import ROOT, child_env, run_module, store_client
from .services import answers, free_port, make_command, start_group, stop_group, wait_for
from .test_sweep import TINY

sync_api = pytest.importorskip("playwright.sync_api", reason="needs the ui extra: make test-ui")
CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.ui,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium: make test-ui"),
]
# Headless Chromium that reaches nothing but the page: no sandbox (root), no GPU, no
# background traffic, a fresh profile (Playwright's own temporary one).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def test_the_ui_lists_the_sites_runs_with_their_eval_metrics(tmp_path: Path) -> None:
    # Two runs of their own (a sweep's runs are nested under its parent's row, folded).
    for args in ([*TINY, "agent=ppo"], ["site=tiny", "agent=uncontrolled"]):
        proc = run_module("pvbess.train", [*args, "env.eval_backend=twin"], tmp_path)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    client = store_client(tmp_path)
    exp = client.get_experiment_by_name("tiny")
    assert exp is not None
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"

    port = free_port()
    store = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    argv = make_command(
        ROOT, "ui", PORT=str(port), STORE=store, ARTIFACTS=f"{tmp_path}/mlruns/artifacts"
    )
    log = tmp_path / "ui.log"
    server = start_group(argv, child_env(tmp_path), log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: answers(f"{base}/health"), "mlflow ui", log)
        # The experiment's runs as charts, in the "Model training" view (see make ui).
        url = f"{base}/#/experiments/{exp.experiment_id}/runs"
        text = _page_text(f"{url}?workflowType=machine_learning&compareRunsMode=CHART")
    finally:
        stop_group(server)
    for name in ("ppo-balanced-s0", "uncontrolled-balanced-s0"):
        assert name in text
    # The eval section holds a chart per eval/ metric of the runs (drawn as they scroll in).
    keys = {k for r in client.search_runs([exp.experiment_id]) for k in r.data.metrics}
    evals = {k for k in keys if k.startswith("eval/")}
    assert len(evals) > 20 and "eval/co2_kg" in text
    assert re.search(r"\beval\s*\((\d+)\)", text)[1] == str(len(evals))  # type: ignore[index]


def _page_text(url: str) -> str:
    """The page's text once its first eval/ chart is drawn."""
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            page.goto(url)
            page.get_by_text("eval/co2_kg").first.wait_for(timeout=60_000)
            return page.inner_text("body")
        finally:
            browser.close()
