"""Folders that appear whole or not at all: every job's output (data set, training set, model
bundle, scores) is written into a hidden sibling and renamed into place.

    with replacing_dir(out) as tmp:
        write_parquet(tmp / "part-00000.parquet")
        ...                       # an error or a kill here leaves ``out`` as it was
    # now ``out`` holds exactly what was written to ``tmp``

An existing ``out`` is moved aside just before the rename and removed once the new folder is in
place (put back if the rename fails), so readers see the old folder or the new one, never a mix.
A killed process may leave a ``.<name>.tmp-*`` or ``.<name>.old-*`` sibling behind; nothing
reads those, and the next ``replacing_dir`` of the same ``out`` removes the ones whose writer is
gone (a ``tmp`` folder records its process id and host until it is renamed).

``check_output`` refuses an output path that would destroy an input: one that is, contains or
sits inside an input (the store, the MLflow store, the candidates, ...), or that is or contains
a root (the workdir), before anything is written.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

OWNER = ".owner"  # inside a tmp folder while it is written: "<pid> <host>"


def check_output(
    out: str | Path,
    *,
    what: str,
    inputs: dict[str, Path] | None = None,
    roots: dict[str, Path] | None = None,
) -> Path:
    """``out`` resolved, or a ``ValueError`` if writing it would replace or delete an input:
    ``out`` may not be, contain or sit inside any of ``inputs``, and may not be or contain any
    of ``roots`` (it may sit inside a root: the workdir holds every output). Names in the dicts
    say what each path is, for the message."""
    o = Path(out).resolve()
    for name, path in (roots or {}).items():
        p = Path(path).resolve()
        if o == p or p.is_relative_to(o):
            how = "is" if o == p else "contains"
            raise ValueError(
                f"{what} {out} {how} the {name} ({p}), which holds other jobs' inputs and "
                "outputs; write to a folder inside it instead"
            )
    for name, path in (inputs or {}).items():
        p = Path(path).resolve()
        how = "is" if o == p else "contains" if p.is_relative_to(o) else "sits inside"
        if o == p or p.is_relative_to(o) or o.is_relative_to(p):
            raise ValueError(
                f"{what} {out} {how} the {name} ({p}): writing it would replace or delete that "
                "input; choose an output path outside it"
            )
    return o


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (one we may not signal counts as running)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _gone(tmp: Path) -> bool:
    """Whether the writer of an abandoned-looking sibling is gone (its process no longer runs
    on this host); a folder without a readable owner is gone once it is an hour old."""
    try:
        pid_text, host = (tmp / OWNER).read_text().split()
    except (OSError, ValueError):
        try:
            return time.time() - tmp.stat().st_mtime > 3600
        except OSError:
            return False
    if host != socket.gethostname() or not pid_text.isdigit():
        return False  # another machine's writer (a shared file system): leave it
    return not process_alive(int(pid_text))


def _remove_abandoned(out: Path) -> None:
    for sibling in out.parent.glob(f".{out.name}.*-*"):
        kind = sibling.name.removeprefix(f".{out.name}.").split("-", 1)[0]
        if kind == "old" or (kind == "tmp" and _gone(sibling)):
            shutil.rmtree(sibling, ignore_errors=True)


@contextmanager
def replacing_dir(out: str | Path) -> Iterator[Path]:
    """Yield a new empty sibling folder of ``out``; when the block ends without an error it
    becomes ``out`` (replacing any previous one). On an error it is removed and ``out`` is left
    as it was."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_abandoned(out)
    tmp = out.parent / f".{out.name}.tmp-{secrets.token_hex(6)}"
    tmp.mkdir()  # not mkdtemp: its 0700 mode would stay on the renamed folder
    (tmp / OWNER).write_text(f"{os.getpid()} {socket.gethostname()}")
    old: Path | None = None
    try:
        yield tmp
        (tmp / OWNER).unlink(missing_ok=True)
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
