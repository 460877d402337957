"""The scoring job's output folder: which run it belongs to, and waiting for the other ranks.

``_run.json`` (what the output is) is written first by rank 0; a later job with another identity
is refused unless ``--overwrite``; the other ranks wait for rank 0's file. The ranks meet in the
folder (no collective): a rank polls for the files the others write.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from feature_store import DataError
from pipelines.atomic import write_text_atomic

RUN = "_run.json"
POLL_S = 0.2
# how long a rank waits for the others' shards (torchrun stops every rank when one fails)
WAIT_S = 24 * 3600.0


def _differences(a: dict, b: dict) -> list[str]:
    return [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def same_run(output: Path, identity: dict, *, overwrite: bool, python: bool = False) -> bool:
    """Whether ``output`` holds (part of) this run: its ``_run.json`` equals ``identity``. False
    when there is no ``output`` (or an empty one), or ``overwrite`` (the caller replaces it); a
    ``ValueError`` for another run's output (another model version, as-of, candidate set, ...)
    or a folder that is not a scoring output. ``python``: the messages name the Python
    arguments (``output=``, ``overwrite=True``) instead of the CLI's options."""
    if not output.exists():
        return False
    run_file = output / RUN
    previous = json.loads(run_file.read_text()) if run_file.is_file() else None
    if previous == identity:
        return True
    if overwrite:
        return False
    what, replace = ("output", "overwrite=True") if python else ("--output", "--overwrite")
    others = [p.name for p in output.iterdir() if p.name != RUN]
    if previous is None and others:
        raise ValueError(
            f"{what} {output} exists and is not a scoring output of this job (no {RUN}; "
            f"holds {others[:5]}); choose another folder or pass {replace} to replace it"
        )
    if previous is not None:
        diff = ", ".join(f"{k}: {previous.get(k)!r} there, {identity.get(k)!r} now"
                         for k in _differences(previous, identity))  # fmt: skip
        raise ValueError(
            f"{what} {output} holds scores of another run ({diff}); refusing to mix them. "
            f"Write to a new folder, or pass {replace} to replace it"
        )
    return False


def open_output(output: Path, identity: dict, *, rank: int, overwrite: bool) -> None:
    """Make ``output`` this run's: new, or an earlier attempt of the same run (resumed), else a
    ``ValueError`` (``same_run``). Rank 0 decides; the others wait for its ``_run.json``."""
    run_file = output / RUN
    if rank != 0:
        wait_for(lambda: run_file.is_file() and json.loads(run_file.read_text()) == identity,
              f"{run_file} of this run (written by rank 0)")  # fmt: skip
        return
    if same_run(output, identity, overwrite=overwrite):
        return
    if overwrite and output.exists():
        old = output.parent / f".{output.name}.old-{os.getpid()}"
        os.rename(output, old)
        shutil.rmtree(old)
    output.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_file, json.dumps(identity, indent=2, sort_keys=True))


def wait_for(ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not ready():
        if time.monotonic() > deadline:
            raise DataError(f"gave up waiting for {what} after {WAIT_S:.0f} s")
        time.sleep(POLL_S)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
