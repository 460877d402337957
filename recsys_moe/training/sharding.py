"""TorchRec sharding applied to an unchanged model: the one module importing torchrec.distributed.

    module (embedding tables on "meta") ─► fuse row-wise Adagrad into the tables' backward
        ─► planner (Topology, per-table sharding types) ─► DistributedModelParallel
        ─► CombinedOptimizer(fused table optimizer, Adam over the rest; with
            train.dense_optimizer muon, Muon over the dense matrices)

Also: the train step (TorchRec's ``TrainPipelineSparseDist`` on CUDA, a plain loop on CPU) and
the full, unsharded state dict on rank 0 for the model bundle.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection
from torchrec import optim as trec_optim
from torchrec.distributed.embedding_lookup import GroupedPooledEmbeddingsLookup
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.model_parallel import DataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardedModule, ShardingEnv, ShardingPlan, ShardingType
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys_moe.config import ShardingConfig
from recsys_moe.training.muon import Muon, is_matrix
from recsys_moe.training.step_graph import StepGraph

log = logging.getLogger(__name__)

SHARDING_TYPES = tuple(t.value for t in ShardingType)
# Row-wise variants have no CPU kernel in fbgemm-gpu-cpu (DESIGN.md, pitfalls).
CPU_DEFAULT_TYPES = ("table_wise", "column_wise")
# Not data_parallel: a replicated table gets a dense kernel and falls to the dense optimizer
# (Adam at the dense learning rate) instead of the fused row-wise Adagrad, so the same config
# learned differently on 2 GPUs (valid AUC 0.665) than on 1 (0.722), seen on the H200.
CUDA_DEFAULT_TYPES = tuple(t for t in SHARDING_TYPES if t != "data_parallel")
# One process: whole tables. There is nothing to distribute, and the planner's pick for the bench
# model on one H200 (table_column_wise: each table cut into column shards, joined again after
# the lookup) cost host time every step: 5.90 vs 5.54 ms per step with the dense step graphed
# (benchmarks/README.md, 2026-12-01 session 7).
SINGLE_PROCESS_TYPES = ("table_wise",)


def _tables(module: nn.Module) -> list[str]:
    return [
        c.name
        for m in module.modules()
        if isinstance(m, EmbeddingBagCollection)
        for c in m.embedding_bag_configs()
    ]


RESERVED_MEMORY = 0.15  # the planner's default share


def topology_for(device: torch.device, world_size: int) -> Topology:
    """The planner's view of the devices: ranks, ranks per host and, on CUDA, the memory this
    GPU really has (TorchRec's default is 32 GiB; an H200 has 141 GB)."""
    local = int(torch.cuda.device_count()) if device.type == "cuda" else world_size
    hardware = None
    if device.type == "cuda":
        hardware = HardwareConfig(
            hbm_cap_bytes=torch.cuda.get_device_properties(device).total_memory
        )
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=world_size, local_world_size=min(world_size, local or world_size)
        ),
        hardware_config=hardware,
        kernel_config=KernelConfig(compute_device=device.type),
    )


def default_types(device: torch.device, world_size: int) -> tuple[str, ...]:
    """The sharding types the planner may pick from when ``train.sharding.types`` is empty."""
    if world_size == 1:
        return SINGLE_PROCESS_TYPES
    return CPU_DEFAULT_TYPES if device.type == "cpu" else CUDA_DEFAULT_TYPES


def constraints_for(
    module: nn.Module, cfg: ShardingConfig, device: torch.device, world_size: int
) -> dict[str, ParameterConstraints]:
    """Planner constraints: ``cfg.constraints`` per table, ``cfg.types`` (else
    ``default_types``) for all the others."""
    tables = _tables(module)
    unknown = sorted(set(cfg.constraints) - set(tables))
    if unknown:
        raise ValueError(f"train.sharding.constraints: no table(s) {unknown}; tables are {tables}")
    default = list(cfg.types) or list(default_types(device, world_size))
    out: dict[str, ParameterConstraints] = {}
    for table in tables:
        types = list(cfg.constraints.get(table, default))
        if types:
            out[table] = ParameterConstraints(sharding_types=types)
    return out


class _Unwrapped(DataParallelWrapper):
    """No DDP around the dense part: with one process there is nothing to all-reduce, and DDP's
    bucketing and hooks cost 13-17 % of a CPU step of the demo model at batch 512."""

    def wrap(self, dmp: DistributedModelParallel, env: ShardingEnv, device: torch.device) -> None:
        dmp._dmp_wrapped_module.to(device)  # the dense part: what DDP's wrapping also does


# train.embedding_optimizer -> TorchRec's class for fbgemm's fused optimizer of that kind
EMBEDDING_OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "rowwise_adagrad": trec_optim.RowWiseAdagrad,
    "adagrad": trec_optim.Adagrad,
    "sgd": trec_optim.SGD,
    "adam": trec_optim.Adam,
    "rowwise_adam": trec_optim.PartialRowWiseAdam,
    "lamb": trec_optim.LAMB,
    "rowwise_lamb": trec_optim.PartialRowWiseLAMB,
}
CPU_EMBEDDING_OPTIMIZERS = ("rowwise_adagrad", "adagrad", "sgd")  # fbgemm-gpu-cpu's kernels


def embedding_optimizer(name: str, device: torch.device) -> type[torch.optim.Optimizer]:
    """TorchRec's optimizer class for ``train.embedding_optimizer``; a clear error where fbgemm
    has no kernel for it on ``device`` (the CPU build has the Adagrads and SGD only)."""
    if name not in EMBEDDING_OPTIMIZERS:
        raise ValueError(
            f"train.embedding_optimizer = {name!r}: expected one of {sorted(EMBEDDING_OPTIMIZERS)}"
        )
    if device.type != "cuda" and name not in CPU_EMBEDDING_OPTIMIZERS:
        raise ValueError(
            f"train.embedding_optimizer = {name!r} runs on CUDA only: fbgemm's CPU build has "
            f"{', '.join(CPU_EMBEDDING_OPTIMIZERS)}; train on a GPU or pick one of those"
        )
    return EMBEDDING_OPTIMIZERS[name]


def fused_params(
    cfg: ShardingConfig, device: torch.device, bf16: bool, *, backward: bool = True
) -> dict[str, Any]:
    """fbgemm TBE settings for the sharder: the lookups' output dtype and the bounds check
    (``train.sharding.embedding_output`` / ``bounds_check``). ``bf16``: the model runs under
    bf16 autocast; ``backward``: the lookups are trained. Auto: float32 where they are trained
    (the mean-pooled features' averaging in float32, as the saved model serves them; in the
    step graph it cost no speed on an H200, benchmarks/README.md session 11), bfloat16 for a
    forward alone under bf16 autocast on CUDA (``gpu_bench.py score``: the first layers cast
    to it anyway)."""
    out = cfg.embedding_output
    if out == "auto":
        forward_bf16 = bf16 and device.type == "cuda" and not backward
        out = "bfloat16" if forward_bf16 else "float32"
    return {
        "output_dtype": SparseType.BF16 if out == "bfloat16" else SparseType.FP32,
        "bounds_check_mode": BoundsCheckMode[cfg.bounds_check.upper()],
    }


def shard(
    module: nn.Module,
    cfg: ShardingConfig,
    *,
    device: torch.device,
    embedding_lr: float,
    embedding_weight_decay: float = 0.0,
    embedding_optimizer_name: str = "rowwise_adagrad",
    bf16: bool = False,
    backward: bool = True,
) -> tuple[DistributedModelParallel, ShardingPlan]:
    """``module`` with its embedding tables sharded over the default process group.

    The tables' optimizer (``embedding_optimizer_name``, train.embedding_optimizer; row-wise
    Adagrad by default) is fused into their backward: TorchRec's sharder reads it from the
    parameters, so it is attached before sharding. ``bf16``: the model runs under bf16
    autocast; ``backward``: the model will be trained, not only run forward (``fused_params``).
    """
    optimizer_class = embedding_optimizer(embedding_optimizer_name, device)
    for m in module.modules():
        if isinstance(m, EmbeddingBagCollection):
            _apply_optimizer_in_backward(
                optimizer_class,
                m.parameters(),
                {"lr": embedding_lr, "weight_decay": embedding_weight_decay},
            )
    pg = dist.group.WORLD
    world_size = dist.get_world_size()
    planner = EmbeddingShardingPlanner(
        topology=topology_for(device, world_size),
        constraints=constraints_for(module, cfg, device, world_size),
        # the share of each device's memory kept out of the plan (activations, the dense part and
        # its optimizer, input batches); TorchRec's default, a heuristic from the dense tensors'
        # sizes, warns on every run and is deprecated in torchrec 1.8 (FutureWarning)
        storage_reservation=FixedPercentageStorageReservation(RESERVED_MEMORY),
    )
    sharders = [
        EmbeddingBagCollectionSharder(
            fused_params=fused_params(cfg, device, bf16, backward=backward)
        )
    ]
    plan = planner.collective_plan(module, sharders, pg)
    model = DistributedModelParallel(
        module=module,
        device=device,
        env=ShardingEnv.from_process_group(pg),
        plan=plan,
        sharders=sharders,
        data_parallel_wrapper=_Unwrapped() if world_size == 1 else None,
    )
    if world_size == 1 and cfg.direct_lookup:
        direct_lookups(model)
    return model, plan


class _DirectLookup:
    """The forward of a ``ShardedEmbeddingBagCollection`` in one process whose tables are whole
    and one fused lookup (``train.sharding.direct_lookup``): fbgemm's kernel module called on
    the batch as it is, its output as the ``KeyedTensor`` TorchRec's forward returns.

    In one process TorchRec's input and output dists are identities that still cost host work
    every step: the awaitables, a recat index list built in Python and copied to the device
    (``_get_recat``, 7 % of the bench model's graphed loop on an H200), the batch's split by
    sharding type and by lookup group. A batch this path does not cover (other keys or key
    order, weights, variable batch per key) takes TorchRec's forward."""

    def __init__(self, module: ShardedEmbeddingBagCollection) -> None:
        lookup = module._lookups[0]
        config = lookup.grouped_configs[0]
        self.fallback = type(module).forward.__get__(module)
        self.kernel = lookup._emb_modules[0]  # TorchRec's module around fbgemm's TBE
        self.keys = list(config.feature_names())
        self.names = list(config.embedding_names())
        self.dims = list(config.embedding_dims())

    def __call__(self, features: KeyedJaggedTensor) -> KeyedTensor:
        if (
            features.keys() != self.keys
            or features.weights_or_none() is not None
            or features.variable_stride_per_key()
        ):
            return self.fallback(features)
        return KeyedTensor(keys=self.names, length_per_key=self.dims, values=self.kernel(features))


def direct_lookups(model: nn.Module) -> int:
    """Give every ``ShardedEmbeddingBagCollection`` of a one-process model whose tables are
    whole (``table_wise``) and one fused lookup, with nothing between the batch and the kernel
    (no feature processor, weights or tracker), the direct forward of ``_DirectLookup``; the
    others keep TorchRec's. The modules, their state dict and the fused optimizer are
    unchanged. The number given it."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError("direct lookups are for one process: several need TorchRec's dists")
    done = 0
    for m in model.modules():
        if (
            not isinstance(m, ShardedEmbeddingBagCollection)
            or len(m._lookups) != 1
            or list(getattr(m, "_sharding_types", [])) != [ShardingType.TABLE_WISE.value]
        ):  # whole tables only (the default in one process); a type forced on one process
            # (train.sharding.types) keeps TorchRec's dists, which reassemble its shards
            continue
        lookup = m._lookups[0]
        if (
            not isinstance(lookup, GroupedPooledEmbeddingsLookup)
            or len(lookup._emb_modules) != 1
            or len(lookup.grouped_configs) != 1
            or lookup.grouped_configs[0].is_weighted
            or lookup.grouped_configs[0].has_feature_processor
            or getattr(lookup, "optim_state_tracker_fn", None) is not None
            or any(getattr(lookup, "_feature_score_auto_collections", None) or [])
            or getattr(m, "post_lookup_tracker_fn", None) is not None
            or getattr(m, "_has_mean_pooling_callback", False)
        ):
            continue
        m.forward = _DirectLookup(m)
        done += 1
    return done


def plan_summary(plan: ShardingPlan) -> dict[str, dict[str, Any]]:
    """``table -> {sharding_type, compute_kernel, ranks}`` of a plan (for logs and MLflow)."""
    out: dict[str, dict[str, Any]] = {}
    for module_plan in plan.plan.values():
        for table, p in module_plan.items():  # type: ignore[union-attr]
            out[table] = {
                "sharding_type": p.sharding_type,
                "compute_kernel": p.compute_kernel,
                "ranks": list(p.ranks or []),
            }
    return out


def build_optimizer(
    model: DistributedModelParallel,
    lr: float,
    weight_decay: float,
    *,
    muon_lr: float = 0.0,
    muon_momentum: float = 0.95,
) -> Any:
    """The fused table optimizer and Adam over every parameter not optimized in backward
    (``fused=True``: one kernel over all dense parameters, ~8 % of a small CPU step).
    ``muon_lr`` > 0 (``train.dense_optimizer`` muon): the dense matrices (``muon.is_matrix``)
    are Muon's at that rate, a third part "muon"; Adam keeps the rest."""
    dense = dict(in_backward_optimizer_filter(model.named_parameters()))
    matrices = {k: p for k, p in dense.items() if muon_lr > 0 and is_matrix(p)}
    rest = {k: p for k, p in dense.items() if k not in matrices}
    parts: list[tuple[str, Any]] = [
        ("sparse", model.fused_optimizer),
        ("dense", KeyedOptimizerWrapper(rest, lambda ps: torch.optim.Adam(
            ps, lr=lr, weight_decay=weight_decay, fused=True))),
    ]  # fmt: skip

    def muon(ps: list[torch.Tensor]) -> Muon:
        return Muon(ps, lr=muon_lr, momentum=muon_momentum, weight_decay=weight_decay)

    if matrices:
        parts.append(("muon", KeyedOptimizerWrapper(matrices, muon)))
    return CombinedOptimizer(parts)


def train_step(
    model: DistributedModelParallel,
    optimizer: Any,
    device: torch.device,
    *,
    pipeline: str = "auto",
    step_graph: bool = False,
) -> tuple[Callable[[Iterator[Any]], Any], Callable[[], None]]:
    """``(progress, pause)``: ``progress(batches)`` trains on the next batch and returns the
    model's second output; ``pause()`` makes the model usable for plain forward calls (eval).

    With several processes on CUDA, TorchRec's ``TrainPipelineSparseDist`` overlaps the next
    batches' copy and input distribution (an all-to-all) with this one's compute; elsewhere, a
    plain step. ``model(batch)`` returns ``(loss, output)`` in both. ``pipeline``: auto (the
    pipeline on CUDA with several processes), sparse_dist, plain; a model without embedding
    tables (numeric features only) always takes plain steps. On one GPU the pipeline's own host
    work (its streams, awaitables and the fx-rewritten forward) outweighed what it overlaps:
    the bench model's graphed step took 5.54 ms with it and 3.88 ms plain, batches already on
    the GPU (benchmarks/README.md, 2026-12-01 session 7). ``step_graph``
    (``train.compile = "step"``): plain steps on CUDA (with ``pipeline`` auto or plain) whose
    dense part, with its backward, the gradients' mean over the ranks and Adam's update, is one
    CUDA graph (``step_graph.StepGraph``); on a CPU, plain steps.
    """
    if pipeline in ("sparse_dist", "auto") and not any(
        isinstance(m, ShardedModule) for m in model.modules()
    ):  # numeric-only: no tables, nothing to pipeline (and its fx trace needs a sharded module)
        if pipeline == "sparse_dist":
            log.info("train.pipeline sparse_dist: the model has no embedding tables; plain steps")
        pipeline = "plain"
    several = dist.is_initialized() and dist.get_world_size() > 1
    graphed = step_graph and device.type == "cuda" and pipeline != "sparse_dist"
    if pipeline == "sparse_dist" or (
        pipeline == "auto" and device.type == "cuda" and several and not graphed
    ):
        pipeline = TrainPipelineSparseDist(model, optimizer, device)
        return pipeline.progress, pipeline.detach  # progress re-attaches
    if graphed:
        step = StepGraph.of(model, optimizer, device)
        return step.progress, lambda: None

    def progress(batches: Iterator[Any]) -> Any:
        batch = next(batches).to(device)
        # Before the forward, as TorchRec's pipelines do: the fused optimizer's zero_grad hands
        # the scheduled learning rate to the kernels, and the lookup takes it at the forward.
        optimizer.zero_grad(set_to_none=True)
        loss, output = model(batch)
        loss.backward()
        optimizer.step()
        return output

    return progress, lambda: None


def local_snapshot(model: nn.Module) -> dict[str, Any]:
    """This rank's own copy of the model's state, without a collective: a sharded table's
    local shards (a list of tensors), a replicated tensor as it is. Gathering the tables
    instead (``full_state_dict``) at every epoch's end slowed every later training step on the
    CPU (demo: 55k -> 36k samples/s with ShardedTensor.gather; the cause is in TorchRec/gloo):
    the best epoch is kept this way and gathered once, at the end."""
    out: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "local_shards"):  # ShardedTensor
            out[key] = [s.tensor.detach().clone() for s in value.local_shards()]
        elif hasattr(value, "to_local"):  # DTensor
            out[key] = [value.to_local().detach().clone()]
        else:
            out[key] = value.detach().clone()
    return out


@torch.no_grad()
def restore_snapshot(model: nn.Module, snapshot: dict[str, Any]) -> None:
    """Write a ``local_snapshot`` back into the model's live weights (every rank its own)."""
    for key, value in model.state_dict().items():
        saved = snapshot[key]
        if hasattr(value, "local_shards"):
            for shard, tensor in zip(value.local_shards(), saved, strict=True):
                shard.tensor.copy_(tensor)
        elif hasattr(value, "to_local"):
            value.to_local().copy_(saved[0])
        else:
            value.copy_(saved)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """The unsharded state dict on rank 0 (CPU tensors), ``None`` on the other ranks.

    Collective: every rank calls it. Sharded tables (``ShardedTensor``, or ``DTensor`` where
    TorchRec emits those) are gathered; replicated tensors are taken from rank 0.
    """
    rank = dist.get_rank()
    device = (
        torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    )
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if hasattr(value, "local_shards") and hasattr(value, "gather"):  # ShardedTensor
            with warnings.catch_warnings():  # TorchRec emits ShardedTensors: not ours to change
                warnings.filterwarnings("ignore", "Please use DTensor", FutureWarning)
                shape, dtype = value.size(), value.dtype
                full = torch.empty(shape, dtype=dtype, device=device) if rank == 0 else None
                value.gather(dst=0, out=full)
            tensor = full
        elif hasattr(value, "full_tensor"):  # DTensor
            tensor = value.full_tensor()
        else:
            tensor = value
        if rank == 0 and tensor is not None:
            out[key] = tensor.detach().cpu()
    return out if rank == 0 else None
