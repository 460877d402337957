"""pipelines/atomic.py: a job's output folder is the old one or the new one, never a mix."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.atomic import replacing_dir, write_text_atomic


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
