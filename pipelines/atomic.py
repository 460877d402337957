"""Folders that appear whole or not at all: every job's output (data set, training set, model
bundle, scores) is written into a hidden sibling and renamed into place.

    with replacing_dir(out) as tmp:
        write_parquet(tmp / "part-00000.parquet")
        ...                       # an error or a kill here leaves ``out`` as it was
    # now ``out`` holds exactly what was written to ``tmp``

An existing ``out`` is moved aside just before the rename and removed once the new folder is in
place (put back if the rename fails), so readers see the old folder or the new one, never a mix.
A killed process may leave a ``.<name>.tmp-*`` or ``.<name>.old-*`` sibling behind; nothing
reads those.
"""

from __future__ import annotations

import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing_dir(out: str | Path) -> Iterator[Path]:
    """Yield a new empty sibling folder of ``out``; when the block ends without an error it
    becomes ``out`` (replacing any previous one). On an error it is removed and ``out`` is left
    as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would stay on the renamed folder
    old: Path | None = None
    try:
        yield tmp
        if out.exists():
            old = out.parent / f".{out.name}.old-{secrets.token_hex(6)}"
            os.rename(out, old)
        try:
            os.rename(tmp, out)
        except BaseException:
            if old is not None:
                os.rename(old, out)  # put the previous folder back
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    """``path`` with content ``text``, or unchanged: a temporary sibling, flushed to disk, then
    renamed over it (a reader never sees a partial file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{secrets.token_hex(6)}"
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
