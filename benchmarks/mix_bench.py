"""The mixture's gate-weighted sum of expert outputs, formulated several ways, on one GPU.

    python benchmarks/mix_bench.py --out mix_bench.json

``mixed[t, b] = Σ_e gates[t, b, e] · relu(outs[e, b])``: T tasks, E experts, H outputs each,
the bench model's shapes (T 2, E 8, H 256) by default. Each variant is compiled as the model's
dense part is (``torch.compile``, static shapes) and timed forward at a scoring batch and
forward + backward at a training batch: medians of ``--repeats`` passes of 20 calls. Every
variant's result is checked against the first's before it is timed.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor


def broadcast(g: Tensor, o: Tensor) -> Tensor:  # mixture.mix as of session 7
    return (g.transpose(-1, -2).unsqueeze(-1) * o).sum(-3)


def broadcast_bf16(g: Tensor, o: Tensor) -> Tensor:  # the gates in the experts' dtype
    return (g.to(o.dtype).transpose(-1, -2).unsqueeze(-1) * o).sum(-3)


def einsum(g: Tensor, o: Tensor) -> Tensor:
    return torch.einsum("tbe,ebh->tbh", g.to(o.dtype), o)


def bmm_rows(g: Tensor, o: Tensor) -> Tensor:  # one [T, E] @ [E, H] per row, no copy of o
    return torch.bmm(g.to(o.dtype).permute(1, 0, 2), o.transpose(0, 1)).transpose(0, 1)


def unrolled(g: Tensor, o: Tensor) -> Tensor:  # E reads of o per task, fused pointwise
    g = g.to(o.dtype)
    out = g[..., 0, None] * o[0]
    for e in range(1, o.shape[0]):
        out = out + g[..., e, None] * o[e]
    return out


VARIANTS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "broadcast": broadcast,
    "broadcast_bf16": broadcast_bf16,
    "einsum": einsum,
    "bmm_rows": bmm_rows,
    "unrolled": unrolled,
}


DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds per call."""
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / 20)
    return statistics.median(times)


def measure(
    fn: Callable[[Tensor, Tensor], Tensor], phase: str, b: int, shape: tuple, repeats: int
) -> tuple[float, float]:
    """(median ms, max abs difference from ``broadcast``) of compiled ``fn`` at batch ``b``."""
    t, e, h = shape
    compiled = torch.compile(lambda g, pre: fn(g, torch.relu(pre)), dynamic=False)
    torch.manual_seed(0)
    train = phase != "forward"
    logits = torch.randn(t, b, e, device=DEVICE, requires_grad=train)
    pre = torch.randn(e, b, h, device=DEVICE, dtype=torch.bfloat16).requires_grad_(train)
    ref = broadcast(logits.softmax(-1), torch.relu(pre)).detach().float()
    with torch.set_grad_enabled(train):
        got = compiled(logits.softmax(-1), pre)
    grad = torch.randn_like(got)

    def call() -> None:
        with torch.set_grad_enabled(train):
            out = compiled(logits.softmax(-1), pre)
        if train:
            out.backward(grad)

    err = (got.detach().float() - ref).abs().max().item()
    if err > 0.05 * ref.abs().max().item():
        raise SystemExit(f"{phase}: differs from broadcast by {err}")
    return timed(call, repeats) * 1e3, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--score-batch", type=int, default=262_144)
    parser.add_argument("--train-batch", type=int, default=8192)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="JSON report path")
    parser.add_argument("--device", default="cuda", help="cuda (cpu: a smoke run)")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    torch._dynamo.config.recompile_limit = 64  # one lambda's code object, compiled per variant
    t, e, h = args.tasks, args.experts, args.hidden
    report: dict[str, dict[str, float]] = {}
    for name, fn in VARIANTS.items():
        report[name] = {}
        for phase, b in (("forward", args.score_batch), ("forward_backward", args.train_batch)):
            ms, err = measure(fn, phase, b, (t, e, h), args.repeats)
            report[name] |= {f"{phase}_ms": ms, f"{phase}_batch": b}
            print(f"{name:>15} {phase:>16} batch {b:>7,}: {ms:.3f} ms (max err {err:.3g})")
    out = {
        "device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu",
        "T": t,
        "E": e,
        "H": h,
        "variants": report,
    }
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
