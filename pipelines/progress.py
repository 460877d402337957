"""Progress bars of the long jobs: tqdm on stderr, shown when stderr is a terminal.

``recsys-moe ... --quiet`` turns them off (``set_mode("never")``); ``RECSYS_MOE_PROGRESS=always``
shows them even when stderr is a file or a pipe (a CI log), ``never`` hides them. Every layer
uses this one helper (``pipelines`` sits below ``recsys_moe``), so one flag governs all jobs.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm

MODES = ("auto", "always", "never")
_mode = {"value": ""}  # "" = not set by the CLI: the environment's, else auto


def set_mode(mode: str | None) -> None:
    """``auto`` (a bar when stderr is a terminal), ``always`` or ``never``; None: back to the
    environment's (``RECSYS_MOE_PROGRESS``, else auto)."""
    if mode is not None and mode not in MODES:
        raise ValueError(f"progress mode {mode!r}: expected one of {MODES}")
    _mode["value"] = mode or ""


def mode() -> str:
    env = os.environ.get("RECSYS_MOE_PROGRESS", "auto").strip().lower()
    return _mode["value"] or (env if env in MODES else "auto")


def bar(
    total: int | None = None, *, desc: str, unit: str, initial: int = 0, leave: bool = True
) -> tqdm:
    """A tqdm bar on stderr, disabled by ``--quiet`` or when stderr is not a terminal."""
    disable: dict[str, Any] = {"auto": None, "always": False, "never": True}
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        initial=initial,
        leave=leave,
        file=sys.stderr,
        disable=disable[mode()],
        dynamic_ncols=True,
        mininterval=0.5,
    )
