"""Experts, gates, and the mixtures built from them (one per ``ModelConfig.mixture``).

Over 400 lines on purpose: the seven mixtures side by side over the same two parts, so that a
comparison at matched compute (``model_cost``) reads in one file; each class is short.

Notation: B batch, T tasks, E experts, D_in input dim, H expert output dim (last of ``dims``).

Every mixture is ``forward(x [B, D_in]) -> MixtureOutput(mixed [T, B, H], gates [T, B, E], ...)``
and receives its parts (``Experts``, ``Gate``) by keyword, as torchtune's ``MoE(*, experts,
router)``. ``gates[t, b]`` is task t's weight over the E experts of the mixture and sums to 1;
experts a task cannot use (another task's experts in CGC/PLE, the other bottoms of
``SingleTask``) carry weight 0, so ``gates`` is one tensor for every mixture and
``gate_support()`` ([T, E] bool) says which experts each task's gate ranges over.

    single_task    T bottoms, task t uses bottom t               gates = one-hot [T, B, T]
    shared_bottom  one bottom for all tasks                      gates = ones [T, B, 1]
    omoe           E experts, one gate shared by all tasks       (Ma et al. 2018, baseline)
    mmoe           E experts, one gate per task                  (Ma et al. 2018)
    topk_mmoe      MMoE with top-k routing, only routed experts computed, Switch balance loss
    cgc / ple      per-task + shared experts, per-task gates; PLE stacks CGC levels (Tang 2020)

Gate dropout (Zhao et al. 2019) lives in ``Gate`` and so applies to every gated mixture.
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class MixtureOutput(NamedTuple):
    mixed: Tensor  # [T, B, H]: the input of task t's head
    gates: Tensor  # [T, B, E]
    balance_loss: Tensor | None = None  # topk_mmoe: Σ_t E·Σ_e f_e·P_e (unweighted)
    drop_rate: Tensor | None = None  # topk_mmoe: share of routed (row, expert) pairs dropped


# The experts' first GEMM pads its inner dimension (the tower's width, e.g. 26 x 64 + 13 = 1677)
# to a multiple of this on CUDA: cuBLAS runs bf16 GEMMs whose leading dimensions are not multiples
# of 8 on old, alignment-2 tensor-core kernels (seen on the H200: an sm75 ``s1688gemm`` kernel at
# ~84 TFLOP/s for the bench model's experts). Zero columns change no product.
ALIGN = 8


class Experts(nn.Module):
    """E MLPs with identical shapes, run together: weights ``[E, in, out]``, ReLU after each layer.

    ``forward(x [B, D_in] | [E, B, D_in]) -> [E, B, H]``: x shared by all experts, or one input per
    expert (PLE's upper levels). The first layer is one GEMM (or baddbmm) against all experts, the
    others ``torch.baddbmm`` over the expert dimension: no loop over experts. ``expert(e, x)`` runs
    a single expert (top-k dispatch).
    """

    def __init__(self, num_experts: int, in_dim: int, dims: list[int]) -> None:
        super().__init__()
        if num_experts < 1 or not dims:
            raise ValueError(
                f"Experts needs num_experts >= 1 and non-empty dims, got "
                f"num_experts={num_experts}, dims={dims}"
            )
        self.num_experts = num_experts
        self.in_dim = in_dim
        self.dims = list(dims)
        sizes = [in_dim, *dims]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, i, o)) for i, o in pairwise(sizes)
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_experts, 1, o)) for o in sizes[1:]
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same distribution as nn.Linear's default, per expert.
        for w, b in zip(self.weights, self.biases, strict=True):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound)
            nn.init.uniform_(b, -bound, bound)

    @property
    def out_dim(self) -> int:
        return self.dims[-1]

    def flops_per_expert(self) -> int:
        """Multiply-adds × 2 of one expert on one example."""
        return sum(2 * w.shape[1] * w.shape[2] for w in self.weights)

    def forward(self, x: Tensor) -> Tensor:
        w0, b0 = self.weights[0], self.biases[0]
        if x.dim() == 2:  # one GEMM against all experts: [B, D_in] @ [D_in, E·H1]
            e, d_in, h1 = w0.shape
            w = w0.transpose(0, 1).reshape(d_in, e * h1)
            pad = -d_in % ALIGN
            if pad and x.is_cuda:  # see ALIGN
                x, w = F.pad(x, (0, pad)), F.pad(w, (0, 0, 0, pad))
            h = torch.addmm(b0.reshape(e * h1), x, w).view(-1, e, h1).transpose(0, 1)
            h = torch.relu(h)
        else:
            h = torch.relu(torch.baddbmm(b0, x, w0))
        # indexed, not sliced: torch 2.11's dynamo breaks the graph at a ParameterList slice
        for i in range(1, len(self.weights)):
            w, b = self.weights[i], self.biases[i]
            h = torch.relu(torch.baddbmm(b, h, w))  # [E, B, in] @ [E, in, out] + [E, 1, out]
        return h

    def expert(self, e: int, x: Tensor) -> Tensor:
        """Expert ``e`` alone: ``x [N, D_in] -> [N, H]``."""
        for w, b in zip(self.weights, self.biases, strict=True):
            x = torch.relu(torch.addmm(b[e], x, w[e]))
        return x


class Gate(nn.Module):
    """G softmax gates over n experts each: ``forward(x) -> [G, B, n]``, rows sum to 1.

    ``x`` is ``[B, D_in]`` (all gates read the same input) or ``[G, B, D_in]`` (gate g reads
    ``x[g]``, PLE's upper levels). The G gates are one weight ``[G * n, D_in]``. With
    ``dropout = p`` in training, each logit is masked with probability p per example and gate;
    where that would mask every expert, one expert chosen uniformly at random is kept.
    """

    def __init__(self, in_dim: int, num_gates: int, num_experts: int, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"gate_dropout must be in [0, 1), got {dropout}")
        self.num_gates, self.num_experts, self.dropout = num_gates, num_experts, dropout
        self.weight = nn.Parameter(torch.empty(num_gates * num_experts, in_dim))
        self.bias = nn.Parameter(torch.empty(num_gates * num_experts))
        bound = 1.0 / math.sqrt(in_dim)  # nn.Linear's default distribution
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def flops(self) -> int:
        return 2 * self.weight.numel()

    def logits(self, x: Tensor) -> Tensor:
        g, n = self.num_gates, self.num_experts
        if x.dim() == 2:
            logits = F.linear(x, self.weight, self.bias).view(x.shape[0], g, n).transpose(0, 1)
        else:
            w = self.weight.view(g, n, -1)
            logits = torch.einsum("gbd,gnd->gbn", x, w) + self.bias.view(g, 1, n)
        if self.training and self.dropout > 0.0:
            drop = torch.rand_like(logits) < self.dropout
            keep = torch.randint(n, logits.shape[:-1], device=logits.device)
            rescue = drop.all(dim=-1, keepdim=True) & F.one_hot(keep, n).bool()
            logits = logits.masked_fill(drop & ~rescue, float("-inf"))
        return logits

    def forward(self, x: Tensor) -> Tensor:
        return self.logits(x).softmax(dim=-1)


def mix(gates: Tensor, outs: Tensor) -> Tensor:
    """Gate-weighted sum of expert outputs: ``gates [..., B, E]``, ``outs [..., E, B, H]`` ->
    ``[..., B, H]``. A broadcast multiply-sum: the equivalent einsum runs as B tiny matmuls,
    2.7x slower forward + backward at B=512, E=4, H=32 on CPU.

    Compiled for a GPU, the same sum written as E multiply-adds: Inductor fuses them into one
    pointwise kernel, where the broadcast form became a reduction over E that read the experts'
    outputs at a quarter of the H200's bandwidth (bench shapes T 2, E 8, H 256, bf16: 0.58 vs
    2.57 ms forward at B 262,144, 0.96 vs 1.21 ms forward + backward at B 8192;
    ``benchmarks/mix_bench.py``). Eager, that form is 2E small kernels instead of two."""
    if outs.is_cuda and torch.compiler.is_compiling():
        return mix_unrolled(gates, outs)
    return (gates.transpose(-1, -2).unsqueeze(-1) * outs).sum(-3)


def mix_unrolled(gates: Tensor, outs: Tensor) -> Tensor:
    """``mix`` as E multiply-adds, the gates in the experts' dtype (bfloat16 under autocast)."""
    gates = gates.to(outs.dtype)
    out = gates[..., 0, None] * outs[..., 0, :, :]
    for e in range(1, outs.shape[-3]):
        out = out + gates[..., e, None] * outs[..., e, :, :]
    return out


def _full_support(num_tasks: int, num_experts: int, device: torch.device) -> Tensor:
    return torch.ones(num_tasks, num_experts, dtype=torch.bool, device=device)


class SingleTask(nn.Module):
    """T independent bottoms (one per task) over the shared tower: ``bottoms`` has E = T experts.

    Task t reads bottom t only, so gates are fixed one-hot; a task's loss reaches only its own
    bottom (and the embeddings).
    """

    def __init__(self, *, bottoms: Experts) -> None:
        super().__init__()
        self.bottoms = bottoms
        self.num_tasks = bottoms.num_experts

    @property
    def out_dim(self) -> int:
        return self.bottoms.out_dim

    def gate_support(self) -> Tensor:
        return torch.eye(self.num_tasks, dtype=torch.bool, device=self.bottoms.weights[0].device)

    def flops_per_example(self) -> int:
        return self.num_tasks * self.bottoms.flops_per_expert()

    def forward(self, x: Tensor) -> MixtureOutput:
        eye = torch.eye(self.num_tasks, dtype=x.dtype, device=x.device)
        gates = eye[:, None, :].expand(-1, x.shape[0], -1)
        return MixtureOutput(self.bottoms(x), gates)


class SharedBottom(nn.Module):
    """One bottom MLP (``Experts`` with E = 1) whose output feeds every task's head."""

    def __init__(self, *, bottom: Experts, num_tasks: int) -> None:
        super().__init__()
        if bottom.num_experts != 1:
            raise ValueError(f"SharedBottom takes one bottom, got {bottom.num_experts} experts")
        self.bottom = bottom
        self.num_tasks = num_tasks

    @property
    def out_dim(self) -> int:
        return self.bottom.out_dim

    def gate_support(self) -> Tensor:
        return _full_support(self.num_tasks, 1, self.bottom.weights[0].device)

    def flops_per_example(self) -> int:
        return self.bottom.flops_per_expert()

    def forward(self, x: Tensor) -> MixtureOutput:
        h = self.bottom(x)  # [1, B, H]
        gates = x.new_ones(self.num_tasks, x.shape[0], 1)
        return MixtureOutput(h.expand(self.num_tasks, -1, -1), gates)


class OMoE(nn.Module):
    """One-gate mixture of experts: one softmax gate (``gate.num_gates == 1``) for all tasks."""

    def __init__(self, *, experts: Experts, gate: Gate, num_tasks: int) -> None:
        super().__init__()
        if gate.num_gates != 1 or gate.num_experts != experts.num_experts:
            raise ValueError(
                f"OMoE needs one gate over {experts.num_experts} experts, got "
                f"{gate.num_gates} gate(s) over {gate.num_experts}"
            )
        self.experts, self.gate, self.num_tasks = experts, gate, num_tasks

    @property
    def out_dim(self) -> int:
        return self.experts.out_dim

    def gate_support(self) -> Tensor:
        return _full_support(self.num_tasks, self.experts.num_experts, self.gate.weight.device)

    def flops_per_example(self) -> int:
        return self.experts.num_experts * self.experts.flops_per_expert() + self.gate.flops()

    def forward(self, x: Tensor) -> MixtureOutput:
        gates = self.gate(x)  # [1, B, E]
        mixed = mix(gates, self.experts(x))
        return MixtureOutput(
            mixed.expand(self.num_tasks, -1, -1), gates.expand(self.num_tasks, -1, -1)
        )


class MMoE(nn.Module):
    """Multi-gate mixture of experts: one softmax gate per task (``gate.num_gates = T``)."""

    def __init__(self, *, experts: Experts, gate: Gate) -> None:
        super().__init__()
        if gate.num_experts != experts.num_experts:
            raise ValueError(
                f"gate is over {gate.num_experts} experts, the mixture has {experts.num_experts}"
            )
        self.experts, self.gate, self.num_tasks = experts, gate, gate.num_gates

    @property
    def out_dim(self) -> int:
        return self.experts.out_dim

    def gate_support(self) -> Tensor:
        return _full_support(self.num_tasks, self.experts.num_experts, self.gate.weight.device)

    def flops_per_example(self) -> int:
        return self.experts.num_experts * self.experts.flops_per_expert() + self.gate.flops()

    def forward(self, x: Tensor) -> MixtureOutput:
        gates = self.gate(x)  # [T, B, E]
        return MixtureOutput(mix(gates, self.experts(x)), gates)


class TopKMMoE(nn.Module):
    """MMoE with top-k routing: per example and task only the k best experts are used, and only
    the experts some task routed an example to run on it.

    Gates: softmax over all E, keep the top k, renormalise (``gates`` holds these, zeros
    elsewhere). Dispatch: for each expert, gather the rows any task routed to it, run the expert
    on those rows once (shared by the tasks that chose it), scatter back; a loop over E experts,
    since the compute is conditional. Capacity (training only, so that inference does not depend
    on the batch): with ``capacity_factor = cf > 0`` an expert takes at most ``⌈cf·B·k/E⌉`` rows,
    those of highest gate weight; a dropped row's output from that expert is zero. Per example the
    compute is then at most ≈ cf·k experts. ``balance_loss`` is Switch/GShard's
    ``Σ_t E·Σ_e f_{t,e}·P_{t,e}`` (f: share of task t's routing slots given to e, P: mean gate
    probability of e), T at perfect balance.
    """

    def __init__(
        self, *, experts: Experts, gate: Gate, top_k: int, capacity_factor: float = 0.0
    ) -> None:
        super().__init__()
        if gate.num_experts != experts.num_experts:
            raise ValueError(
                f"gate is over {gate.num_experts} experts, the mixture has {experts.num_experts}"
            )
        if not 1 <= top_k <= experts.num_experts:
            raise ValueError(f"model.top_k must be in [1, {experts.num_experts}], got {top_k}")
        if capacity_factor < 0:
            raise ValueError(f"model.capacity_factor must be >= 0, got {capacity_factor}")
        self.experts, self.gate, self.num_tasks = experts, gate, gate.num_gates
        self.top_k, self.capacity_factor = top_k, capacity_factor
        self.last_experts_per_example = 0.0  # measured: expert rows computed / B, last forward

    @property
    def out_dim(self) -> int:
        return self.experts.out_dim

    def gate_support(self) -> Tensor:
        return _full_support(self.num_tasks, self.experts.num_experts, self.gate.weight.device)

    def flops_per_example(self) -> int:
        """Upper bound: each example runs on the union of its tasks' top-k experts."""
        k_eff = min(self.experts.num_experts, self.num_tasks * self.top_k)
        return k_eff * self.experts.flops_per_expert() + self.gate.flops()

    def forward(self, x: Tensor) -> MixtureOutput:
        probs = self.gate(x)  # [T, B, E]
        num_tasks, batch, num_experts = probs.shape
        top_w, top_i = probs.topk(self.top_k, dim=-1)
        gates = torch.zeros_like(probs).scatter(-1, top_i, top_w)
        gates = gates / gates.sum(-1, keepdim=True)
        routed = gates > 0  # experts masked by gate dropout have weight 0: not routed
        slots = routed.float()
        f = slots.sum(1) / slots.sum((1, 2)).unsqueeze(-1)  # [T, E]
        balance = num_experts * (f * probs.mean(1)).sum()

        need = routed.any(0)  # [B, E]: rows each expert must compute
        priority = gates.detach().amax(0)  # [B, E]
        capacity = batch
        if self.training and self.capacity_factor > 0:
            capacity = math.ceil(self.capacity_factor * batch * self.top_k / num_experts)
        outs, computed, dropped = [], 0, 0
        for e in range(num_experts):
            rows = need[:, e].nonzero().squeeze(1)
            if rows.numel() > capacity:
                dropped += rows.numel() - capacity
                rows = rows[priority[rows, e].topk(capacity).indices]
            out = x.new_zeros(batch, self.experts.out_dim)
            if rows.numel():
                out = out.index_copy(0, rows, self.experts.expert(e, x[rows]))
            outs.append(out)
            computed += rows.numel()
        mixed = mix(gates, torch.stack(outs))
        self.last_experts_per_example = computed / max(batch, 1)
        drop_rate = torch.tensor(dropped / max(computed + dropped, 1), device=x.device)
        return MixtureOutput(mixed, gates, balance, drop_rate)


class CGCLevel(nn.Module):
    """One Customized Gate Control level (Tang et al. 2020, "Progressive Layered Extraction").

    ``experts`` holds E = T·n_task + n_shared experts, ordered [task 0's n_task, task 1's, …,
    shared n_shared], run as one batched op. ``task_gates`` (G = T, n = n_task + n_shared): task
    t's gate over its own and the shared experts. ``shared_gate`` (G = 1, n = E; absent on the last
    level): the shared stream's gate over all experts, feeding the next level.

    ``forward(x [B, D_in] | [T + 1, B, D_in]) -> (task_out [T, B, H], shared_out [B, H] | None,
    gates [T, B, E])``; with per-stream input, task t's experts and gate read ``x[t]`` and the
    shared experts and gate read ``x[T]``.
    """

    def __init__(
        self,
        *,
        experts: Experts,
        task_gates: Gate,
        shared_gate: Gate | None,
        num_task_experts: int,
        num_shared_experts: int,
    ) -> None:
        super().__init__()
        t, nt, ns = task_gates.num_gates, num_task_experts, num_shared_experts
        if experts.num_experts != t * nt + ns or task_gates.num_experts != nt + ns:
            raise ValueError(
                f"CGC with {t} tasks, {nt} task and {ns} shared experts needs {t * nt + ns} "
                f"experts and task gates over {nt + ns}; got {experts.num_experts} and "
                f"{task_gates.num_experts}"
            )
        if shared_gate is not None and shared_gate.num_experts != experts.num_experts:
            raise ValueError(f"the shared gate must range over all {experts.num_experts} experts")
        self.experts, self.task_gates, self.shared_gate = experts, task_gates, shared_gate
        self.num_tasks = t
        shared = list(range(t * nt, t * nt + ns))
        index = [list(range(i * nt, (i + 1) * nt)) + shared for i in range(t)]
        self.register_buffer("task_index", torch.tensor(index), persistent=False)  # [T, n]
        stream = [i for i in range(t) for _ in range(nt)] + [t] * ns
        self.register_buffer("expert_stream", torch.tensor(stream), persistent=False)  # [E]

    def gate_support(self) -> Tensor:
        shape = (self.num_tasks, self.experts.num_experts)
        support = torch.zeros(shape, dtype=torch.bool, device=self.task_index.device)
        return support.scatter(1, self.task_index, True)

    def flops_per_example(self) -> int:
        shared = self.shared_gate.flops() if self.shared_gate is not None else 0
        e = self.experts
        return e.num_experts * e.flops_per_expert() + self.task_gates.flops() + shared

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor]:
        if x.dim() == 2:
            expert_in, task_in, shared_in = x, x, x
        else:
            expert_in, task_in, shared_in = x[self.expert_stream], x[: self.num_tasks], x[-1]
        out = self.experts(expert_in)  # [E, B, H]
        g = self.task_gates(task_in)  # [T, B, n]
        task_out = mix(g, out[self.task_index])
        index = self.task_index[:, None, :].expand(-1, g.shape[1], -1)
        gates = g.new_zeros(self.num_tasks, g.shape[1], self.experts.num_experts)
        gates = gates.scatter(-1, index, g)
        shared_out = None
        if self.shared_gate is not None:
            shared_out = mix(self.shared_gate(shared_in)[0], out)
        return task_out, shared_out, gates


class PLE(nn.Module):
    """Progressive Layered Extraction: CGC levels stacked; CGC is PLE with one level.

    Level l + 1 reads level l's T task outputs and its shared output as T + 1 streams. Every level
    but the last has a shared gate; ``gates`` are the last level's task gates (those that feed the
    heads), ``[T, B, E_last]``.
    """

    def __init__(self, *, levels: list[CGCLevel]) -> None:
        super().__init__()
        if not levels:
            raise ValueError("PLE needs at least one CGC level")
        if any(lv.shared_gate is None for lv in levels[:-1]) or levels[-1].shared_gate is not None:
            raise ValueError("every PLE level but the last needs a shared gate; the last has none")
        self.levels = nn.ModuleList(levels)
        self.num_tasks = levels[-1].num_tasks

    @property
    def out_dim(self) -> int:
        return self.levels[-1].experts.out_dim

    def gate_support(self) -> Tensor:
        return self.levels[-1].gate_support()

    def flops_per_example(self) -> int:
        return sum(lv.flops_per_example() for lv in self.levels)

    def forward(self, x: Tensor) -> MixtureOutput:
        for level in self.levels[:-1]:
            task_out, shared_out, _ = level(x)
            x = torch.cat([task_out, shared_out.unsqueeze(0)])  # [T + 1, B, H]
        task_out, _, gates = self.levels[-1](x)
        return MixtureOutput(task_out, gates)
