"""The dense part of a training step, with its backward and the dense optimizers' update (Adam,
and Muon's on the matrices where ``train.dense_optimizer`` resolves to muon), as one CUDA graph
(``train.compile = "step"``: CUDA, plain steps, one process or several).

    step = StepGraph(module, sparse_optimizers, [adam, muon], device)
    output = step(batch)        # batch on the device; returns the step's (loss, per task)

Each step runs the tables' lookups eagerly (fbgemm's kernels, their row ids vary in number),
copies their pooled output and the batch's dense features and labels into fixed buffers and
replays one graph: the tower's averaging and concat, the mixture, the heads, the losses, their
backward down to the pooled lookups, and the update of every dense parameter (Adam's; Muon's
momentum, Newton-Schulz iterations and update on its matrices: a hundred small kernels a step
eagerly, one launch in the graph). The gradient
the graph leaves for the pooled lookups then goes through the tables' backward, which applies
their fused optimizer (eager, as in a plain step).

With several processes the lookups are TorchRec's sharded forward (its all-to-alls, eager) and
the graph also averages the dense gradients over the ranks before Adam's update: one
all-reduce of them all, captured (NCCL can be), where a plain step has DDP's bucketed hooks.
DDP's wrapper stays around the dense part (it made the ranks' first weights equal) but is not
called. Every rank steps on the same shapes (the loader's sharding rule), so a batch of
another shape is another shape on every rank at the same step.

Against ``train.compile = "cudagraphs"`` (torch.compile's CUDA graph trees, forward and backward
replayed through autograd) this leaves out the host work between the graphs: the autograd
engine over the dense part, the gradients' accumulation, the graphs' input checks and copies
and Adam's Python (its per-parameter bookkeeping and launches), which made most of the bench
model's host-bound step on an H200 (benchmarks/README.md, session 10).

What the graph needs, and how it is kept:

- fixed shapes: the batch size is fixed (``train.drop_last``'s auto leaves the short last
  batch out with a compiled step); a batch of another shape takes an eager step;
- fixed addresses: the gradients of the dense parameters are the graph's own tensors (made by
  the captured backward) and stay the parameters' ``.grad``; Adam's and Muon's state is updated
  in place (made by the eager warm-up steps);
- the learning rate as a device tensor: during the capture every dense optimizer's groups hold
  one (Adam's also ``capturable``; Muon multiplies by it), refilled from the scheduler's float
  before each replay; outside it they hold the float, so checkpoints and the scheduler see the
  usual optimizers;
- no host sync in the dense step: ``train`` refuses "step" for ``model.mixture =
  "topk_mmoe"``, whose experts take the rows routed to them (``nonzero``); any other step that
  reads a value back fails at the capture, with a message that names the other modes.
- every dense parameter's gradient made by the dense step: a table sharded ``data_parallel``
  is updated by Adam with a gradient its lookup's backward makes after the graph, so it is
  refused (``StepGraph`` names the setting).

``graph=False`` runs the same body eagerly on the same buffers each step instead of replaying
a graph: the data flow without a GPU (the tests compare it with the plain step on the CPU).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torchrec.distributed.types import ShardedModule

from recsys_moe.training.module import LossOutput, TrainModule

log = logging.getLogger(__name__)

Args = tuple[Tensor | None, Tensor | None, Tensor, dict[str, Tensor]]


class StepGraph:
    """One training step, its dense part captured once and replayed (the module's docstring).

    ``module``: the sharded model's ``TrainModule`` (unwrapped: with several processes the
    dense gradients are averaged here, not by DDP);
    ``sparse``: the tables' fused optimizers (their ``zero_grad`` hands the scheduled rate to
    fbgemm's kernels); ``dense``: the optimizers of every dense parameter (torch's Adam, and
    ``muon.Muon`` over the matrices; one optimizer or several); ``warmup``: eager steps before
    the capture (compiles the dense step, makes the optimizers' state; on a side stream, as
    CUDA graph capture asks)."""

    def __init__(
        self,
        module: TrainModule,
        sparse: list[torch.optim.Optimizer],
        dense: torch.optim.Optimizer | list[torch.optim.Optimizer],
        device: torch.device,
        *,
        warmup: int = 3,
        graph: bool = True,
    ) -> None:
        if graph and device.type != "cuda":
            raise ValueError(f"a CUDA graph of the step needs a CUDA device, not {device}")
        if warmup < 1:
            raise ValueError(f"StepGraph: warmup must be >= 1 (optimizer state), not {warmup}")
        self.dense = dense if isinstance(dense, list) else [dense]
        self.module, self.sparse = module, sparse
        self.device, self.warmup, self.use_graph = device, warmup, graph
        self.groups = [g for opt in self.dense for g in opt.param_groups]
        self.params = [p for g in self.groups for p in g["params"]]
        tables = {id(p) for m in module.modules() if isinstance(m, ShardedModule)
                  for p in m.parameters()}  # fmt: skip
        if any(id(p) in tables for p in self.params):
            raise ValueError(
                "train.compile = 'step' needs the tables' fused optimizers: a table sharded "
                "data_parallel is trained by Adam with a gradient made after the graph's update; "
                "leave data_parallel out of train.sharding.types (and constraints) or use "
                "train.compile = 'cudagraphs' or true"
            )
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.steps = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static: Args | None = None
        self.out: tuple[Tensor, dict[str, Tensor]] | None = None
        # each group's rate as a device tensor, read by the captured update
        self.lr = [torch.tensor(float(g["lr"]), device=device) for g in self.groups]
        self.lr_set = [float(g["lr"]) for g in self.groups]
        self.side = torch.cuda.Stream(device) if graph else None
        self.sparse_lr: list[list[float] | None] = [None] * len(sparse)
        self.stepped: Any = None  # an optimizer to mark as stepped (``of``)

    @classmethod
    def of(
        cls, model: nn.Module, optimizer: Any, device: torch.device, *, graph: bool = True
    ) -> StepGraph:
        """For a sharded model (``DistributedModelParallel`` around a ``TrainModule``; its
        ``module`` is the unwrapped one) and its ``sharding.build_optimizer``: TorchRec's
        ``CombinedOptimizer`` of the tables' fused optimizer ("sparse"), Adam ("dense") and,
        under ``train.dense_optimizer`` muon, Muon ("muon")."""
        parts = dict(optimizer.optimizers)
        sparse = [parts["sparse"]] if "sparse" in parts else []
        dense = [parts[k]._optimizer for k in ("dense", "muon") if k in parts]
        step = cls(model.module, sparse, dense, device, graph=graph)
        # the combined optimizer steps through its parts (Adam in the graph, the tables in their
        # backward), never through its own step(): torch's LR scheduler, which checks that one
        # was called before its own first step, is told so (else it warns on every run)
        step.stepped = optimizer
        return step

    # ---- the step ---------------------------------------------------------------------------
    def __call__(self, batch: Any) -> tuple[Tensor, dict[str, Tensor]]:
        if self.stepped is not None:
            self.stepped._opt_called = True  # (torch.optim.lr_scheduler's flag)
        for i, opt in enumerate(self.sparse):
            lrs = [g["lr"] for g in opt.param_groups]
            if lrs != self.sparse_lr[i]:  # the scheduled rate to the tables' kernels, before
                opt.zero_grad()  # the lookup (all a fused optimizer's zero_grad does)
                self.sparse_lr[i] = lrs
        pooled, lengths = self.module.lookups(batch.sparse)
        args: Args = (pooled, lengths, batch.dense, batch.labels)
        if self.static is None:
            self.static = _buffers(args)
        if not _fits(self.static, args):
            return self._plain(args)
        _copy_into(self.static, args)
        self.steps += 1
        if self.graph is None and self.use_graph and self.steps > self.warmup:
            self._capture()
        if self.graph is not None:
            for i, g in enumerate(self.groups):
                lr = float(g["lr"])
                if lr != self.lr_set[i]:
                    self.lr[i].fill_(lr)
                    self.lr_set[i] = lr
            self.graph.replay()
            assert self.out is not None
            total, per_task = self.out
        else:  # warm-up, or graph=False: the same body, eagerly, on the same buffers
            total, per_task = self._eager_body()
        static_pooled = self.static[0]
        if pooled is not None and pooled.requires_grad and static_pooled is not None:
            pooled.backward(static_pooled.grad)  # the tables' backward and fused update
        # the graph's outputs are overwritten by the next replay: what is logged is copied
        return total.clone(), {k: v.clone() for k, v in per_task.items()}

    def progress(self, batches: Iterator[Any]) -> tuple[Tensor, dict[str, Tensor]]:
        """``train_step``'s ``progress``: the next batch, moved to the device, one step."""
        return self(next(batches).to(self.device))

    def _body(self, args: Args) -> LossOutput:
        """What the graph holds (on the buffers): the dense step, its backward, the gradients'
        mean over the ranks, the dense optimizers' update. On a batch's own tensors
        (``_plain``) the backward goes on through the tables'."""
        loss, output = self.module.dense_step(*args)
        loss.backward()
        if self.world > 1:
            self._average_grads()
        for opt in self.dense:
            opt.step()
        return loss, output

    def _average_grads(self) -> None:
        """Each dense gradient's mean over the ranks, as DDP's hooks make it (divided by the
        world size, then summed): one all-reduce per dtype of all of them, flattened. A
        parameter the step left without a gradient gets zeros (every rank sends the same
        layout)."""
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            by_dtype.setdefault(p.grad.dtype, []).append(p.grad)
        for grads in by_dtype.values():
            flat = _flatten_dense_tensors(grads)
            flat.div_(self.world)
            dist.all_reduce(flat)
            for g, mean in zip(grads, _unflatten_dense_tensors(flat, grads), strict=True):
                g.copy_(mean)

    def _eager_body(self) -> tuple[Tensor, dict[str, Tensor]]:
        """The body without a graph: fresh gradients; on a side stream where a graph will be
        captured (CUDA graph capture wants its warm-up there)."""
        assert self.static is not None
        self._clear_grads()
        if self.side is None:
            return self._body(self.static)[1]
        current = torch.cuda.current_stream(self.device)
        self.side.wait_stream(current)
        with torch.cuda.stream(self.side):
            _, out = self._body(self.static)
        current.wait_stream(self.side)
        return out

    def _plain(self, args: Args) -> tuple[Tensor, dict[str, Tensor]]:
        """A plain eager step, for a batch of another shape than the buffers'; the captured
        gradients are put back after it."""
        captured = [p.grad for p in self.params]
        self._clear_grads(pooled=False)  # (the graph's gradient of the pooled lookups stays)
        _, (total, per_task) = self._body(args)
        if self.graph is not None:
            for p, g in zip(self.params, captured, strict=True):
                p.grad = g
        return total, per_task

    def _clear_grads(self, *, pooled: bool = True) -> None:
        for p in self.params:
            p.grad = None
        if pooled and self.static is not None and self.static[0] is not None:
            self.static[0].grad = None

    def _capture(self) -> None:
        """Capture the body (fresh gradients: allocated by the captured backward, in the
        graph's memory). The dense optimizers' groups hold the rate tensors (and Adam's
        ``capturable``) meanwhile (their values are set before each replay, this step's too)."""
        assert self.static is not None
        self._clear_grads()
        groups = self.groups
        saved = [(g["lr"], g.get("capturable")) for g in groups]
        for g, lr in zip(groups, self.lr, strict=True):
            g["lr"] = lr
            if "capturable" in g:  # Adam's (Muon takes a tensor rate as it is)
                g["capturable"] = True
        graph = torch.cuda.CUDAGraph()
        try:
            # thread_local: the loaders' threads may allocate pinned memory meanwhile; only
            # this thread's calls are checked against the capture
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                _, self.out = self._body(self.static)
        except RuntimeError as e:
            raise RuntimeError(
                f"train.compile = 'step' could not capture the dense step as a CUDA graph ({e}). "
                "A step that reads values back to the host (a mixture routing rows by data, "
                "a Python branch on a tensor) cannot be captured: use train.compile = "
                "'cudagraphs' or true"
            ) from e
        finally:
            for g, (lr, capturable) in zip(groups, saved, strict=True):
                g["lr"] = lr
                if capturable is not None:
                    g["capturable"] = capturable
        self.graph = graph
        log.info("train.compile = step: the dense step captured as one CUDA graph at step %d",
                 self.steps)  # fmt: skip


def _buffers(args: Args) -> Args:
    """The graph's inputs: copies of the first batch's (the pooled lookups as a leaf whose
    gradient the backward fills)."""
    pooled, lengths, dense, labels = args
    return (
        None if pooled is None else pooled.detach().clone().requires_grad_(True),
        None if lengths is None else lengths.clone(),
        dense.clone(),
        {k: v.clone() for k, v in labels.items()},
    )


def _fits(static: Args, args: Args) -> bool:
    """Whether ``args`` have the captured buffers' shapes and dtypes (and the same labels)."""
    pairs = list(zip(static[:3], args[:3], strict=True))
    if static[3].keys() != args[3].keys():
        return False
    pairs += [(static[3][k], args[3][k]) for k in static[3]]
    return all(
        (a is None) == (b is None) and (a is None or (a.shape == b.shape and a.dtype == b.dtype))
        for a, b in pairs
    )


@torch.no_grad()
def _copy_into(static: Args, args: Args) -> None:
    for dst, src in zip(static[:3], args[:3], strict=True):
        if dst is not None and src is not None:
            dst.copy_(src, non_blocking=True)
    for k, dst in static[3].items():
        dst.copy_(args[3][k], non_blocking=True)
