"""pipelines/atomic.py: a job's output folder is the old one or the new one, never a mix."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from pipelines.atomic import OWNER, check_output, replacing_dir, write_text_atomic


def test_replacing_dir_swaps_in_the_new_folder_and_leaves_no_siblings(tmp_path: Path) -> None:
    out = tmp_path / "scores"
    with replacing_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
        assert not out.exists()  # nothing visible before the block ends
    with replacing_dir(out) as tmp:
        (tmp / "b.txt").write_text("2")
        assert (out / "a.txt").read_text() == "1"  # the old one stays readable meanwhile
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"]  # replaced, not merged
    assert [p.name for p in tmp_path.iterdir()] == ["scores"]
    assert out.stat().st_mode & 0o055  # not mkdtemp's 0700


def test_an_error_inside_leaves_the_previous_folder(tmp_path: Path) -> None:
    out = tmp_path / "dataset"
    with replacing_dir(out) as tmp:
        (tmp / "manifest.json").write_text("old")
    with pytest.raises(RuntimeError, match="half way"), replacing_dir(out) as tmp:
        (tmp / "manifest.json").write_text("new")
        raise RuntimeError("half way")
    assert (out / "manifest.json").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["dataset"]


def test_write_text_atomic_replaces_whole_files(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "LATEST"
    write_text_atomic(path, "ckpt-1")
    write_text_atomic(path, "ckpt-2")
    assert path.read_text() == "ckpt-2"
    assert [p.name for p in path.parent.iterdir()] == ["LATEST"]


def test_abandoned_siblings_of_a_killed_writer_are_removed_by_the_next_one(tmp_path: Path) -> None:
    out = tmp_path / "scores"
    dead = tmp_path / ".scores.tmp-aaaaaaaaaaaa"  # a writer killed half way
    dead.mkdir()
    (dead / "part.parquet").write_text("half")
    (dead / OWNER).write_text(f"999999999 {socket.gethostname()}")  # no such process
    live = tmp_path / ".scores.tmp-bbbbbbbbbbbb"  # a writer still at work (this process)
    live.mkdir()
    (live / OWNER).write_text(f"{os.getpid()} {socket.gethostname()}")
    (tmp_path / ".scores.old-cccccccccccc").mkdir()  # left between two renames
    with replacing_dir(out) as tmp:
        (tmp / "a.txt").write_text("1")
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "scores"]
    assert sorted(p.name for p in out.iterdir()) == ["a.txt"]  # the owner marker is not kept


@pytest.mark.parametrize(
    "out, needle",
    [
        ("work", "is the workdir"),
        (".", "contains the workdir"),
        ("work/data", "is the store"),
        ("work/data/sub", "sits inside the store"),
        ("work/mlflow.db", "is the MLflow store"),
    ],
)
def test_an_output_may_not_replace_an_input_or_a_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, out: str, needle: str
) -> None:
    monkeypatch.chdir(tmp_path)
    work = tmp_path / "work"
    inputs = {"store": work / "data", "MLflow store": work / "mlflow.db"}
    with pytest.raises(ValueError, match=needle):
        check_output(out, what="--output", inputs=inputs, roots={"workdir": work})
    assert check_output("work/scores", what="--output", inputs=inputs, roots={"workdir": work})
