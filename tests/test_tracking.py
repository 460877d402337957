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
from recsys_moe.training.loggers import StepSender

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


def _sender(tmp_path: Path) -> tuple[MlflowClient, str, StepSender]:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("steps")).info.run_id
    return client, run_id, StepSender(client, run_id)


def _history(client: MlflowClient, run_id: str, name: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))


def test_the_step_sender_stores_every_window_in_order(tmp_path: Path) -> None:
    """Windows queued one after the other are all in the store after ``close``, every step once
    with its own values, a window of more than MLflow's 1000 metrics included."""
    client, run_id, sender = _sender(tmp_path)
    names = ["train/loss", "train/loss_click", "train/loss_watch_time"]
    windows = [range(1, 401), range(401, 406), range(406, 1006)]  # 1,200 / 15 / 1,800 metrics
    for steps in windows:
        sender.submit(names, [(s, 1000 * s, [s + 0.5, s + 0.25, s + 0.125]) for s in steps])
    sender.wait()  # (what a checkpoint waits for): every window in the store, sender still open
    assert [s for s, _ in _history(client, run_id, "train/loss")] == list(range(1, 1006))
    sender.submit(names, [(1006, 0, [1006.5, 1006.25, 1006.125])])
    sender.close()
    for j, name in enumerate(names):
        assert _history(client, run_id, name) == [
            (s, s + (0.5, 0.25, 0.125)[j]) for s in range(1, 1007)
        ]


def test_the_step_sender_raises_the_stores_error_and_sends_nothing_after_it(
    tmp_path: Path,
) -> None:
    """A window the store refuses is an error of ``close``, and the windows behind it stay
    unsent: the store holds a prefix of the steps, as resume expects. A closed sender takes
    no more windows."""
    client, run_id, sender = _sender(tmp_path)
    sender.submit(["train/loss"], [(s, 0, [0.5]) for s in range(1, 11)])
    sender.submit(["bad/../name"], [(11, 0, [0.5])])  # MLflow refuses this name
    sender.submit(["train/loss"], [(s, 0, [0.5]) for s in range(12, 21)])
    with pytest.raises(RuntimeError, match="sending the per-step losses to MLflow failed.*name"):
        sender.close()
    assert [s for s, _ in _history(client, run_id, "train/loss")] == list(range(1, 11))
    with pytest.raises(RuntimeError, match="closed"):
        sender.submit(["train/loss"], [(21, 0, [0.5])])
