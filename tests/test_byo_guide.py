"""The README's "Your own data" guide, run as written: its one bash block (a made-up Parquet
file of rows with no time column → features build → train → evaluate → register) in a fresh
folder, with the repository's .venv. Real TorchRec, a real SQLite MLflow store, no fixtures."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import polars as pl
import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # four CLI jobs, up to 20 short epochs: ~1 min on 2 cores


def guide_script() -> str:
    """The first ```bash block of the README's "### Your own data" section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("### Your own data", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", section, flags=re.S)
    assert blocks, "the guide has no bash block"
    return blocks[0]


def test_the_guide_trains_a_plain_table_without_a_time_column(tmp_path: Path) -> None:
    (tmp_path / ".venv").symlink_to(ROOT / ".venv")  # the guide calls .venv/bin/...
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(["bash", "-euo", "pipefail", "-c", guide_script()], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]

    work = tmp_path / "mydata-run"
    rows = pl.read_parquet(work / "data" / "rows.parquet")
    assert not any(dtype.is_temporal() for dtype in rows.schema.values())  # no time at all
    manifest = json.loads((work / "dataset" / "manifest.json").read_text())
    assert manifest["event_time"] == "" and manifest["splits"] == {}
    counts = manifest["rows"]  # 60/20/20 by a seeded hash of row_id
    assert sum(counts.values()) == rows.height
    assert all(n > 0.15 * rows.height for n in counts.values())
    (report,) = (work / "eval").glob("*-test.json")
    metrics = json.loads(report.read_text())["metrics"]
    for task in ("a", "b"):  # defaults alone beat predicting the training mean by a wide margin
        assert metrics[f"{task}_rmse"] < 0.5 * metrics[f"{task}_rmse_mean_predictor"], metrics
    assert "registered mydata version 1" in done.stdout
