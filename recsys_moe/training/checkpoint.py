"""Checkpoints with ``torch.distributed.checkpoint`` (DCP): written aside, then made current.

Layout, one folder per MLflow run::

    <train.checkpoint.dir>/<run id>/
        ckpt-<step>/
            *.distcp, .metadata    DCP: model (sharded tables as shards) and the optimizers
            rank-<r>.pt            per rank: torch (and CUDA) RNG state, LR scheduler state
            .complete              JSON loop state: step, run id, the loader's position
        LATEST                     "ckpt-<step>": the newest complete checkpoint
        best-weights-rank<r>.pt    train.select = "best": rank r's part of the best
                                   validation's weights (tensors only; weights_only=True)

A save writes ``ckpt-<step>`` (every rank), then rank 0 writes ``.complete`` and replaces
``LATEST`` atomically (temporary file + rename). A process killed before that leaves the
previous checkpoint current; a folder without ``.complete`` is never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict

from pipelines.atomic import write_text_atomic

log = logging.getLogger(__name__)

LATEST = "LATEST"
BEST_WEIGHTS = "best-weights-rank{rank}.pt"
COMPLETE = ".complete"
# Test hook: "<step>" makes the process exit after writing ckpt-<step>, before committing it.
FAULT_ENV = "RECSYS_MOE_CHECKPOINT_FAULT"


@dataclass
class LoopState:
    step: int  # optimizer steps done
    run_id: str
    data: dict[str, Any] = field(default_factory=dict)  # the loader's position after that step
    selection: dict[str, Any] = field(default_factory=dict)  # training.selection.Selection's


def _step_of(path: Path) -> int:
    return int(path.name.removeprefix("ckpt-"))


def save(
    run_dir: Path,
    loop: LoopState,
    *,
    model: torch.nn.Module,
    optimizer: Any,
    scheduler: Any,
    keep: int = 0,
) -> Path:
    """Write ``run_dir/ckpt-<step>`` and make it current. Collective: every rank calls it."""
    rank = dist.get_rank()
    ckpt = run_dir / f"ckpt-{loop.step}"
    if rank == 0:
        if ckpt.exists():  # left by a killed attempt at the same step
            shutil.rmtree(ckpt)
        ckpt.mkdir(parents=True)
    dist.barrier()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    dcp.save(state, checkpoint_id=str(ckpt))
    torch.save(_rank_state(scheduler), ckpt / f"rank-{rank}.pt")
    dist.barrier()
    if os.environ.get(FAULT_ENV) == str(loop.step):
        os._exit(17)
    if rank == 0:
        write_text_atomic(ckpt / COMPLETE, json.dumps(asdict(loop)))
        write_text_atomic(run_dir / LATEST, ckpt.name)
        _prune(run_dir, current=ckpt, keep=keep)
    dist.barrier()
    log.info("checkpoint %s", ckpt)
    return ckpt


def write_weights_atomic(state: dict[str, Any], path: Path) -> None:
    """``torch.save`` a dict of tensors under a temporary name, then rename it to ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load(ckpt: Path, *, model: torch.nn.Module, optimizer: Any, scheduler: Any) -> LoopState:
    """Restore ``model``, ``optimizer``, ``scheduler`` and this rank's RNG; the loop state."""
    loop = LoopState(**json.loads((ckpt / COMPLETE).read_text()))
    # A fresh optimizer has no state: loading into its state_dict() would drop Adam's moments.
    optimizer.init_state()
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict()}
    check_keys(ckpt, state)
    dcp.load(state, checkpoint_id=str(ckpt))
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    rank_file = ckpt / f"rank-{dist.get_rank()}.pt"
    if rank_file.is_file():
        _restore_rank_state(torch.load(rank_file, weights_only=True), scheduler, optimizer)
    else:  # more ranks than when saved: no RNG state for this one
        log.warning("checkpoint %s has no %s; RNG not restored", ckpt, rank_file.name)
    return loop


def check_keys(ckpt: Path, state: dict[str, Any]) -> None:
    """Refuse, by name, a checkpoint whose keys are not ``state``'s: one this run needs and the
    checkpoint lacks (another optimizer, another model), or model weights this run's model
    lacks (a smaller model would load the rest silently). The keys compared are DCP's own: its
    metadata's, and ``state`` flattened as ``dcp.load`` flattens it (which otherwise fails
    with a ``CheckpointException``, a BaseException, per rank)."""
    saved = set(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    wanted = set(flatten_state_dict(state)[0])
    # weights first, then the optimizers' state (the telling keys), then their settings
    order = ("model.", "optimizer.state.", "")
    missing = sorted(wanted - saved, key=lambda k: (next(i for i, o in enumerate(order)
                                                         if k.startswith(o)), k))  # fmt: skip
    extra = sorted(k for k in saved - wanted if k.startswith("model."))
    if not missing and not extra:
        return
    what = []
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        what.append(f"has no {missing[0]}{more}")
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        what.append(f"holds {extra[0]}{more}, which this run's model lacks")
    raise ValueError(
        f"checkpoint {ckpt} {' and '.join(what)}: it was written by a run with another model "
        "or other optimizers (train.dense_optimizer, which auto picks from the batch size; "
        "train.embedding_optimizer; model.*). Resume with the settings it was trained with, "
        "or start a new run without train.resume"
    )


def _rank_state(scheduler: Any) -> dict[str, Any]:
    out = {"torch_rng": torch.get_rng_state(), "scheduler": scheduler.state_dict()}
    if torch.cuda.is_available():
        out["cuda_rng"] = torch.cuda.get_rng_state()
    return out


def _restore_rank_state(state: dict[str, Any], scheduler: Any, optimizer: Any) -> None:
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])
    scheduler.load_state_dict(state["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr(), strict=True):
        group["lr"] = lr


def _prune(run_dir: Path, *, current: Path, keep: int) -> None:
    """Delete older checkpoints beyond the ``keep`` newest complete ones, and unfinished ones."""
    older = sorted(
        (p for p in run_dir.glob("ckpt-*") if p != current and _step_of(p) < _step_of(current)),
        key=_step_of,
        reverse=True,
    )
    complete = [p for p in older if (p / COMPLETE).is_file()]
    doomed = [p for p in older if not (p / COMPLETE).is_file()]
    if keep > 0:
        doomed += complete[keep - 1 :]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)


def resolve(resume: bool | str, root: Path) -> Path | None:
    """The checkpoint folder that ``train.resume`` names, or ``None`` to start afresh.

    ``true``/``"latest"``: the current checkpoint of the run under ``root`` whose ``LATEST``
    changed last (none yet: start afresh, as a restarted job's first attempt does). A path: a
    run's folder (its ``LATEST``) or one ``ckpt-<step>`` folder, which must be complete.
    """
    if resume is False or str(resume).lower() in ("", "false"):
        return None
    if resume is True or str(resume).lower() in ("true", "latest"):
        pointers = sorted(root.glob(f"*/{LATEST}"), key=lambda p: p.stat().st_mtime)
        if not pointers:
            log.warning("train.resume: no checkpoint under %s; starting afresh", root)
            return None
        path = pointers[-1].parent
    else:
        path = Path(resume)
    if (path / LATEST).is_file():
        path = path / (path / LATEST).read_text().strip()
    if not (path / COMPLETE).is_file():
        raise ValueError(
            f"train.resume={resume!r}: {path} is not a complete checkpoint (no {COMPLETE}); "
            f"pass a run's checkpoint folder (with {LATEST}) or a complete ckpt-<step> folder"
        )
    return path
