"""Gate statistics: expert usage, gate entropy, polarization, usage by group (heatmaps).

Notation: T tasks, B examples, E experts, G groups. Input is ``ModelOutput.gates`` ``[T, B, E]``
(every mixture reports this shape; see ``model/mixture.py``), concatenated over batches along B
(``recsys_moe.evaluation.predict.predict_with_gates``). ``support`` (``[T, E]`` bool,
``model.gate_support()``) names the experts each task's gate ranges over: CGC/PLE tasks see only
their own and the shared experts, and entropy is normalised by the log of that count. Without
it every expert counts.

Polarization (Zhao et al. 2019 saw MMoE gates collapse onto one expert): a task whose busiest
expert takes more than ``max_share`` of the usage, or whose normalised entropy is under
``min_entropy``, is reported by ``polarization_warning``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import torch
from torch import Tensor


def _support(gates: Tensor, support: Tensor | None) -> Tensor:
    if support is None:
        return torch.ones(gates.shape[0], gates.shape[2], dtype=torch.bool, device=gates.device)
    return support.to(gates.device, torch.bool)


def expert_usage(gates: Tensor) -> Tensor:
    """``[T, E]``: mean gate weight of each expert per task (rows sum to 1)."""
    return gates.float().mean(1)


def top1_share(gates: Tensor) -> Tensor:
    """``[T, E]``: fraction of examples whose largest gate weight is on each expert."""
    top = gates.argmax(-1)  # [T, B]
    return torch.nn.functional.one_hot(top, gates.shape[-1]).float().mean(1)


def gate_entropy(gates: Tensor, support: Tensor | None = None) -> Tensor:
    """``[T]``: mean per-example entropy of each task's gate, divided by log(#experts it sees)
    (1 = uniform, 0 = one expert; 0 when a task sees a single expert)."""
    g = gates.float()
    ent = -(g * torch.log(g.clamp_min(1e-12))).sum(-1).mean(1)  # [T]
    n = _support(gates, support).sum(-1).float()
    return torch.where(n > 1, ent / torch.log(n.clamp_min(2.0)), torch.zeros_like(ent))


def gate_stats(
    gates: Tensor, task_names: list[str], support: Tensor | None = None
) -> dict[str, float]:
    """Flat metrics for logging: ``gates/<task>/usage_e<i>``, ``…/top1_e<i>``, ``…/entropy``."""
    usage, top1, ent = expert_usage(gates), top1_share(gates), gate_entropy(gates, support)
    sup = _support(gates, support)
    out: dict[str, float] = {}
    for t, name in enumerate(task_names):
        out[f"gates/{name}/entropy"] = float(ent[t])
        for e in range(gates.shape[-1]):
            if sup[t, e]:
                out[f"gates/{name}/usage_e{e}"] = float(usage[t, e])
                out[f"gates/{name}/top1_e{e}"] = float(top1[t, e])
    return out


def polarization_warning(
    gates: Tensor,
    task_names: list[str],
    support: Tensor | None = None,
    *,
    max_share: float = 0.9,
    min_entropy: float = 0.1,
) -> str | None:
    """A warning naming each polarized task (module doc), or None if no task is.

    A task whose gate sees a single expert (shared_bottom, single_task) is never reported."""
    usage, ent = expert_usage(gates), gate_entropy(gates, support)
    n = _support(gates, support).sum(-1)
    found = []
    for t, name in enumerate(task_names):
        if n[t] < 2:
            continue
        share, e = usage[t].max(0)
        if share > max_share or ent[t] < min_entropy:
            found.append(
                f"task {name!r}: expert {int(e)} takes {float(share):.2f} of the gate weight, "
                f"normalised gate entropy {float(ent[t]):.3f}"
            )
    if not found:
        return None
    return "polarized gates (one expert does the task's work; try gate_dropout): " + "; ".join(
        found
    )


def usage_by_group(gates: Tensor, groups: Tensor, num_groups: int) -> np.ndarray:
    """``[T, G, E]``: mean gate weight per expert over the examples of each group.

    ``groups`` ``[B]`` int in ``[0, num_groups)`` (a categorical column's ids, e.g. user segment);
    a group without examples gets NaN."""
    t, b, e = gates.shape
    groups = groups.long().to(gates.device)
    sums = torch.zeros(t, num_groups, e, dtype=torch.float64, device=gates.device)
    sums.index_add_(1, groups, gates.double())
    counts = torch.bincount(groups, minlength=num_groups).double()
    return (sums / counts[None, :, None]).cpu().numpy()  # 0/0 -> NaN for empty groups


def plot_expert_heatmap(
    usage_by_group: np.ndarray,
    group_names: list[str],
    path: str | Path,
    *,
    task_names: list[str] | None = None,
    title: str = "expert usage by group",
) -> Path:
    """One heatmap per task (``[G, E]`` or ``[T, G, E]`` input) side by side, saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    usage = np.asarray(usage_by_group, dtype=np.float64)
    if usage.ndim == 2:
        usage = usage[None]
    t, g, e = usage.shape
    if len(group_names) != g:
        raise ValueError(f"{len(group_names)} group names for {g} groups")
    names = task_names or [f"task {i}" for i in range(t)]
    fig, axes = plt.subplots(1, t, figsize=(1.2 + 0.6 * e * t + 1.5, 1.0 + 0.35 * g), squeeze=False)
    vmax = float(np.nanmax(usage)) if np.isfinite(usage).any() else 1.0
    for i, ax in enumerate(axes[0]):
        im = ax.imshow(usage[i], aspect="auto", cmap="viridis", vmin=0.0, vmax=vmax)
        ax.set_title(names[i])
        ax.set_xlabel("expert")
        ax.set_xticks(range(e))
        ax.set_yticks(range(g))
        ax.set_yticklabels(group_names if i == 0 else [""] * g)
    fig.colorbar(im, ax=axes[0].tolist(), label="mean gate weight")
    fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def expert_heatmaps(
    gates: Tensor,
    frame: pl.DataFrame,
    columns: list[str],
    task_names: list[str],
    out_dir: Path,
    *,
    split: str = "valid",
) -> list[Path]:
    """Expert usage by each of ``columns`` of ``frame`` (the rows ``gates [T, N, E]`` belong to;
    absent columns skipped), one PNG each: ``out_dir/experts_by_<column>.png``."""
    out = []
    for col in (c for c in columns if c in frame.columns):
        values = frame[col].cast(pl.String).fill_null("(missing)")
        names = sorted(values.unique().to_list())
        codes = values.replace_strict(names, list(range(len(names))), return_dtype=pl.Int64)
        usage = usage_by_group(gates, torch.tensor(codes.to_numpy()), len(names))
        out.append(
            plot_expert_heatmap(
                usage, names, out_dir / f"experts_by_{col}.png",
                task_names=task_names, title=f"expert usage by {col} ({split} split)",
            )
        )  # fmt: skip
    return out
