"""What training wraps around the model: losses, their weighting, head initialisation.

    TrainModule(model, TrainLoss(tasks, weighting, aux_weight)): Batch -> (loss, (loss, per task))

The shape TorchRec's train pipelines expect (torchrec's golden training example). Everything
here is training-only state: the model bundle saves ``TrainModule.model`` alone, so a registered
model carries inference weights only; the loss weighting's parameters are trained and
checkpointed with the module (``TrainModule.loss``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torchrec import KeyedJaggedTensor

from recsys_moe.config import ModelConfig, TaskConfig
from recsys_moe.data import Batch
from recsys_moe.model import ModelOutput
from recsys_moe.training.losses import UncertaintyWeighting, combine_losses, task_losses

LossOutput = tuple[Tensor, tuple[Tensor, dict[str, Tensor]]]


class TrainLoss(nn.Module):
    """Per-task losses, combined: ``(outputs, labels) -> (loss, (loss, per-task losses))``.

    A module of its own, holding no sharded part, so that the fx trace of TorchRec's train
    pipeline keeps it as one leaf call instead of tracing through the dict and mask logic. Owns
    the loss weighting (``UncertaintyWeighting`` or none for fixed weights) and the weight of the
    mixture's load-balancing loss."""

    def __init__(
        self,
        tasks: list[TaskConfig],
        weighting: nn.Module | None,
        aux_loss_weight: float = 0.0,
        scales: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.tasks = tasks
        self.weighting = weighting
        self.aux_loss_weight = aux_loss_weight
        self.scales = dict(scales or {})  # mse tasks: the label's training std

    @classmethod
    def for_config(
        cls, model: ModelConfig, tasks: list[TaskConfig], label_stats: dict | None = None
    ) -> TrainLoss:
        """``label_stats``: task name -> its training-split stats (``task_label_stats``); an mse
        task's loss is divided by its label's variance (``label_scales``)."""
        uncertainty = model.loss_weighting == "uncertainty"
        weighting = UncertaintyWeighting([t.name for t in tasks]) if uncertainty else None
        return cls(tasks, weighting, model.aux_loss_weight, label_scales(tasks, label_stats or {}))

    def forward(self, out: ModelOutput, labels: dict[str, Tensor]) -> LossOutput:
        out = out._replace(logits={k: v.float() for k, v in out.logits.items()})
        losses = task_losses(out, labels, self.tasks, self.scales)
        aux = None if out.aux_loss is None else self.aux_loss_weight * out.aux_loss
        loss = combine_losses(losses, self.tasks, self.weighting, aux_loss=aux)
        if aux is not None:
            losses["aux"] = aux
        return loss, (loss.detach(), {k: v.detach() for k, v in losses.items()})


class TrainModule(nn.Module):
    """Model and losses: ``forward(batch) -> (loss, (loss, per-task losses))``, outputs detached.
    bf16 autocast over the model where enabled; losses in float32."""

    def __init__(self, model: nn.Module, loss: TrainLoss, *, autocast: bool = False) -> None:
        super().__init__()
        self.model = model
        self.loss = loss
        self.autocast = autocast
        self.dense_step = self._dense_step  # compile_dense replaces it with its compiled form
        self.graphed = False  # the dense step replays CUDA graphs (compile = "cudagraphs")

    def _dense_step(
        self,
        pooled: Tensor | None,
        lengths: Tensor | None,
        dense: Tensor,
        labels: dict[str, Tensor],
    ) -> LossOutput:
        """Everything after the tables' lookups: the tower's averaging and concat
        (``EmbeddingTower.combine``), mixture, heads (bf16 autocast) and losses (float32)."""
        dtype = torch.bfloat16 if self.autocast else None
        # no cast cache: a cached bf16 copy of a weight would be a stale input to a CUDA graph
        # that captured this step (train.compile = "step"); each weight is cast once a step
        with torch.autocast(
            "cuda", dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False
        ):
            x = self.model.tower.combine(pooled, lengths, dense, dtype)
            out = self.model.top(x)
        return self.loss(out, labels)

    def lookups(self, sparse: KeyedJaggedTensor) -> tuple[Tensor | None, Tensor | None]:
        """The eager part of a step: the tables' pooled lookups ``[B, sum of dims]`` (None
        without tables) and the bag sizes of the mean-pooled features (``EmbeddingTower``)."""
        tower = self.model.tower
        lengths = tower.bag_sizes(sparse)  # (first: it checks the batch's keys)
        # the lookups' output dtype is fbgemm's setting (train.sharding.embedding_output), not
        # autocast's: no autocast around them
        return tower.lookup(sparse), lengths

    def forward(self, batch: Batch) -> LossOutput:
        args = (*self.lookups(batch.sparse), batch.dense, batch.labels)
        if not self.graphed or isinstance(batch.dense, torch.fx.Proxy):  # (TorchRec's trace)
            return self.dense_step(*args)
        torch.compiler.cudagraph_mark_step_begin()  # one training step per replay
        loss, (total, per_task) = self.dense_step(*args)
        # the graphs' outputs live in their memory pool and the next replay overwrites them:
        # what outlives the step (the logged losses) is copied out
        return loss, (total.clone(), {k: v.clone() for k, v in per_task.items()})


class OnDevice(nn.Module):
    """``model(dense, sparse)`` with inputs moved to ``device`` and logits back to the CPU (the
    sharded model's inner module, used for validation between epochs)."""

    def __init__(self, model: nn.Module, device: torch.device) -> None:
        super().__init__()
        self.model = model
        self.device = device

    def forward(self, dense: Tensor, sparse: KeyedJaggedTensor) -> Any:
        out = self.model(dense.to(self.device), sparse.to(self.device))
        return out._replace(logits={k: v.float().cpu() for k, v in out.logits.items()})


def compile_dense(module: TrainModule, mode: bool | str = True) -> None:
    """``torch.compile`` the dense part of the step in place (``train.compile``): the tower's
    averaging and concat, the mixture, the heads and the losses as one graph
    (``TrainModule.dense_step``); the tables' lookups stay eager (fbgemm's kernels).
    ``mode``: true / "kernels" (fused kernels), "cudagraphs" (those replayed as CUDA graphs,
    forward and backward: ``mode="reduce-overhead"``) or "step" (fused kernels, which the step
    captures with its backward and Adam's update: ``step_graph.StepGraph``). The modules are
    unchanged: state-dict keys, checkpoints and the saved bundle are the eager ones, and
    validation's plain forward runs eager."""
    # TorchRec 1.6's pipeline fx-traces through the step (1.8 too, into a compiled function):
    # let the trace, which only finds the sharded modules' inputs, run the eager code
    torch._dynamo.config.error_on_nested_fx_trace = False
    mark_autocast_cacheable()
    graphs = mode == "cudagraphs"  # ("step": kernels, which step_graph.StepGraph captures)
    module.dense_step = torch.compile(
        module._dense_step, dynamic=False, mode="reduce-overhead" if graphs else None
    )
    module.graphed = graphs


AUTOCAST_NODES = (
    "torch.amp.autocast_mode._enter_autocast",
    "torch.amp.autocast_mode._exit_autocast",
)


def mark_autocast_cacheable() -> None:
    """Let AOTAutograd's cache keep a graph that enters autocast (the dense step does, for its
    bf16 part, and on the CPU with autocast off). torch 2.13's allowlist lacks autocast's enter
    and exit nodes (torch 2.11 on the H200 cached the graph without this mark), so such a graph
    bypasses the cache and every run traces the forward and backward again and
    re-partitions them (pytorch/pytorch#191106). They are safe to cache: what they do is fixed
    by their arguments, constants of the graph that the cache key hashes. Marked through
    inductor's ``unsafe_marked_cacheable_functions``, keyed by torch's version."""
    import torch._inductor.config

    marked = getattr(torch._inductor.config, "unsafe_marked_cacheable_functions", None)
    if marked is None:  # (a torch without the setting: the cache is bypassed, as before)
        return
    torch._inductor.config.unsafe_marked_cacheable_functions = marked | {
        name: torch.__version__ for name in AUTOCAST_NODES
    }


def label_scales(tasks: list[TaskConfig], label_stats: dict) -> dict[str, float]:
    """Each mse task's label standard deviation on the training split (1 where the stats lack
    it or it is 0: a constant label)."""
    out = {}
    for t in tasks:
        std = (label_stats.get(t.name) or {}).get("train_std")
        if t.objective == "mse":
            out[t.name] = float(std) if std and math.isfinite(std) and std > 0 else 1.0
    return out


def init_head_biases(model: nn.Module, tasks: list[TaskConfig], label_stats: dict) -> None:
    """Start each head's output at the constant predictor of its label (training-split mean):
    logit(rate) for BCE, the mean of the fitted target for mse_log1p; an mse head outputs
    std·h + mean of its label (``TaskHead.set_output_affine``) with h starting at 0. Without it
    a head on a far-off scale (ratings near 3.5) spends its first epochs, and the shared
    experts, on the offset.

    ``label_stats``: task name → the training split's means (``evaluation.metrics.
    task_label_stats``; a masked task's are those where its mask is 1)."""
    for t in tasks:
        s = label_stats.get(t.name)
        if not s:
            continue
        if t.objective == "bce":
            rate = min(max(s["train_mean"], 1e-4), 1 - 1e-4)
            value = math.log(rate / (1 - rate))
        elif t.objective == "mse_log1p" and "train_mean_log1p" in s:
            value = s["train_mean_log1p"]
        elif t.objective == "mse":  # the layers fit the standardised label
            scale = label_scales([t], label_stats).get(t.name, 1.0)
            model.heads[t.name].set_output_affine(scale, s["train_mean"])
            value = 0.0
        else:
            continue
        model.heads[t.name].init_output_bias(value)
