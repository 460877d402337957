"""Process group set-up: one group for every run, a group of 1 when not started by torchrun.

Under ``torchrun`` (``WORLD_SIZE`` etc. in the environment) the group joins the launcher's
rendezvous; alone, a one-process group over a ``FileStore`` in a temporary folder (no port to
pick). NCCL on CUDA, gloo on CPU. With one code path, a single-process run shards its tables the
same way as a multi-process one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    owns_group: bool  # created here, so destroyed by ``shutdown``
    store_path: str = ""  # the one-process group's FileStore file, removed by ``shutdown``

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(timeout_s: float = 300.0) -> DistInfo:
    """The default process group (created unless one exists) and this rank's device.

    ``timeout_s``: how long a collective waits for the other ranks before it raises (a stopped
    or lost rank ends the job with an error instead of hanging)."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    owns = not dist.is_initialized()
    path = ""
    timeout = timedelta(seconds=timeout_s)
    if owns and "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend=backend, timeout=timeout)
    elif owns:
        path = tempfile.mktemp(prefix="recsys-moe-pg-")  # FileStore creates it
        dist.init_process_group(
            backend=backend, store=dist.FileStore(path, 1), rank=0, world_size=1, timeout=timeout
        )
    return DistInfo(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=device,
        owns_group=owns,
        store_path=path,
    )


def shutdown(info: DistInfo) -> None:
    if info.owns_group and dist.is_initialized():
        dist.destroy_process_group()
    if info.store_path:
        with contextlib.suppress(FileNotFoundError):
            os.remove(info.store_path)


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """``obj`` of rank ``src`` on every rank."""
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def mean_across_ranks(values: Tensor) -> Tensor:
    """Element-wise mean of a CPU tensor over ranks (same shape on every rank): one all-reduce."""
    if dist.get_world_size() == 1:
        return values
    t = values.to(torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return (t / dist.get_world_size()).cpu().to(values.dtype)
