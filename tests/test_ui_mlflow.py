"""The MLflow UI as a person sees it: a real training run through the CLI into a SQLite store,
``mlflow server`` on that store, the pages rendered in headless Chromium (the system's, driven by
Playwright's Python client) in a fresh profile at 1440x900:

a. the experiment's link as the project gives it (``tracking.ui_link``) opens on the runs list,
   with the run's name;
b. the run's "Model metrics" tab: the ``train/loss`` chart entirely within the first screen, the
   ``train`` and ``valid`` sections first (no ``test`` or gate section before them); the
   "System metrics" tab has the CPU chart;
c. the same after ``recsys-moe evaluate``;
d. after ``recsys-moe register``: the model version's page shows its alias, description and
   test metrics.

Screenshots go to the test's temporary folder, or to ``RECSYS_MOE_UI_SHOTS`` (a folder) when
set. Needs ``make ui-setup`` (Playwright) and Chromium (Debian's ``chromium``; another binary:
``RECSYS_MOE_CHROMIUM``); without them the test is skipped, or fails where
``RECSYS_MOE_REQUIRE_UI=1`` (CI, .ci/run)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fixtures import small_demo_work

from recsys_moe.config import DEMO_CONFIG, load_config
from recsys_moe.tracking import client_for, run_name, ui_link

pytestmark = [pytest.mark.ui, pytest.mark.slow]

REQUIRE_UI = "RECSYS_MOE_REQUIRE_UI"  # "1" (CI): a missing browser fails the test
CHROMIUM = os.environ.get("RECSYS_MOE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
# without the background-networking flags Chromium keeps calling out of a closed network
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
SCREEN = {"width": 1440, "height": 900}
SETS = [
    "synth.users=150", "synth.items=60", "synth.days=4", "train.epochs=2", "train.log_every=2",
    "mlflow.system_metrics_interval_s=1",
]  # fmt: skip
WAIT_MS = 90_000  # a page on a busy 2-core machine


def _need_browser() -> None:
    missing = [what for what, ok in (
        ("the playwright package (make ui-setup)", importlib.util.find_spec("playwright")),
        (f"Chromium at {CHROMIUM} (apt-get install chromium)", shutil.which(CHROMIUM)),
    ) if not ok]  # fmt: skip
    if missing and os.environ.get(REQUIRE_UI) == "1":
        pytest.fail(f"{REQUIRE_UI}=1 but missing: {', '.join(missing)}")
    if missing:
        pytest.skip(f"missing: {', '.join(missing)}; with {REQUIRE_UI}=1 a failure")


def _cli(work: Path, *args: str) -> str:
    sets = [a for s in SETS for a in ("--set", s)]
    proc = subprocess.run(
        [sys.executable, "-m", "recsys_moe.cli", *args, "--workdir", str(work), *sets],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A trained run's workdir and ``mlflow server`` on its store (without its job runner: one
    uvicorn process instead of eight), stopped (its process group) and removed at the end."""
    _need_browser()
    work = small_demo_work("ui-", SETS)
    _cli(work, "train")
    cfg = load_config(DEMO_CONFIG, SETS, workdir=work)
    port = _free_port()
    log = tmp_path_factory.mktemp("mlflow-server") / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", cfg.tracking_uri(),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=work,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "mlflow server not up in 180 s\n" + log.read_text()
            time.sleep(1)
        yield {"work": work, "cfg": cfg, "base": base}
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="module")
def browser(server: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Chromium in a fresh profile (nothing remembered from an earlier visit)."""
    from playwright.sync_api import sync_playwright

    profile = tmp_path_factory.mktemp("chromium-profile")
    with sync_playwright() as p:
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True,
            viewport=SCREEN,
        )  # fmt: skip
        context.set_default_timeout(WAIT_MS)
        yield context
        context.close()


def _shots(tmp_path: Path) -> Path:
    where = Path(os.environ.get("RECSYS_MOE_UI_SHOTS") or tmp_path)
    where.mkdir(parents=True, exist_ok=True)
    return where


def _check_run_page(page: Any, link: str, shot: Path) -> None:
    """(b) the loss chart within the first screen, the train and valid sections first."""
    page.goto(link)
    loss = page.locator('[data-testid="experiment-view-compare-runs-card"]').filter(
        has=page.locator('h4[title="train/loss"]')
    )
    loss.locator(".js-plotly-plot path.js-line").first.wait_for()  # the curve is drawn
    page.wait_for_timeout(1000)  # and the cards after it
    page.screenshot(path=shot)
    box = loss.bounding_box()
    assert box is not None and box["y"] >= 0 and box["y"] + box["height"] <= SCREEN["height"], box
    headers = page.locator('[data-testid="experiment-view-compare-runs-section-header"]')
    sections = [h.split("(")[0].strip() for h in headers.all_inner_texts()]
    assert sections[:2] == ["train", "valid"], sections
    assert not [s for s in sections if s.startswith(("test", "gates"))], sections


def test_the_mlflow_ui_shows_the_training_first(
    server: dict[str, Any], browser: Any, tmp_path: Path
) -> None:
    shots, cfg, base = _shots(tmp_path), server["cfg"], server["base"]
    client = client_for(cfg)
    exp = client.get_experiment_by_name(cfg.mlflow.experiment)
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.run_name == run_name(cfg)
    page = browser.new_page()

    # a. the experiment's link opens on the runs list, with the run
    page.goto(ui_link(exp.experiment_id, base=base))
    page.get_by_text(run.info.run_name, exact=True).first.wait_for(state="visible")
    assert "/runs" in page.url and "overview" not in page.url, page.url
    page.wait_for_timeout(1000)
    page.screenshot(path=shots / "mlflow-experiment.png")

    # b. the run's charts: the loss curves first; system metrics on their own tab
    link = ui_link(exp.experiment_id, run.info.run_id, base=base)
    _check_run_page(page, link, shots / "mlflow-run-page.png")
    page.get_by_role("tab", name="System metrics").click()
    page.locator('h4[title="system/cpu_utilization_percentage"]').wait_for(state="visible")

    # c. still so after the evaluation
    _cli(server["work"], "evaluate", "--run-id", run.info.run_id, "--set", "eval.bootstrap=5")
    _check_run_page(page, link, shots / "mlflow-run-page-evaluated.png")

    # d. the registered version: alias, description, test metrics
    out = _cli(server["work"], "register", "--run-id", run.info.run_id)
    name = cfg.mlflow.registered_model
    version = client.get_model_version_by_alias(name, "champion")
    assert f"version {version.version}" in out, out
    page.goto(f"{base}/#/models/{name}/versions/{version.version}")
    page.get_by_text("@ champion").first.wait_for(state="visible")
    page.get_by_text(f"Trained by run {run.info.run_id}").first.wait_for(state="visible")
    row = page.get_by_role("row").filter(has_text="test/click_auc").first
    row.wait_for(state="visible")
    assert version.tags["test/click_auc"] in row.inner_text(), row.inner_text()
    page.screenshot(path=shots / "mlflow-model-version.png")
