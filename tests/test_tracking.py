"""MLflow state that survives faults (recsys_moe/tracking.py): the SQLite store appears whole or
not at all, and runs left RUNNING by a killed process are ended by the next job."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from recsys_moe.config import DEMO_CONFIG, load_config
from recsys_moe.tracking import HOST_TAG, PID_TAG, client_for, ensure_experiment, run_owner_tags

CREATE = "from pathlib import Path; import sys; from recsys_moe.tracking import create_sqlite_store; create_sqlite_store(Path(sys.argv[1]))"  # noqa: E501


@pytest.mark.slow
def test_a_kill_while_the_store_is_created_leaves_no_broken_store(tmp_path: Path) -> None:
    """SIGKILL at several points of the store's creation (MLflow's migrations take a second or
    two); whatever was left, the next job opens the store, creates a run and ends it."""
    for i, delay in enumerate([0.3, 0.8, 1.3, 1.8, 2.5]):
        db = tmp_path / f"s{i}" / "mlflow.db"
        db.parent.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", CREATE, str(db)])
        time.sleep(delay)
        proc.kill()
        proc.wait()
        assert not db.exists() or db.stat().st_size > 0
        cfg = load_config(DEMO_CONFIG, [f"mlflow.tracking_uri=sqlite:///{db}"], workdir=db.parent)
        client = client_for(cfg)
        run = client.create_run(ensure_experiment(cfg))
        client.set_terminated(run.info.run_id, "FINISHED")
        assert client.get_run(run.info.run_id).info.status == "FINISHED"
        assert [p.name for p in db.parent.iterdir() if p.name.startswith(".")] == []


def test_the_next_job_ends_runs_whose_process_is_gone(tmp_path: Path) -> None:
    cfg = load_config(DEMO_CONFIG, ["mlflow.experiment=stale"], workdir=tmp_path)
    client: MlflowClient = client_for(cfg)
    exp = ensure_experiment(cfg)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    killed = client.create_run(exp, tags=run_owner_tags() | {PID_TAG: dead})
    alive = client.create_run(exp, tags=run_owner_tags())  # this process: still at work
    elsewhere = client.create_run(exp, tags={HOST_TAG: "another-host", PID_TAG: dead})
    ensure_experiment(cfg)  # what every training job does first
    status = [client.get_run(r.info.run_id).info.status for r in (killed, alive, elsewhere)]
    assert status == ["KILLED", "RUNNING", "RUNNING"]
