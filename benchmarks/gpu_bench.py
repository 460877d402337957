"""GPU training of the bench model (``configs/bench.toml``) end to end, and torch-rechub's
``MMOE`` as shipped on batches of the same rows, in one process.

    python benchmarks/gpu_bench.py prepare --work /tmp/bench --rows 4000000   # training set, once
    python benchmarks/gpu_bench.py train --work /tmp/bench --out gpu_bench.json --peer
    torchrun --standalone --nproc-per-node 2 benchmarks/gpu_bench.py train --work /tmp/bench \\
        --out gpu_bench_2gpu.json [--set train.sharding.types=['row_wise'] ...]

``prepare`` writes the bench model's training set in the project's own layout
(``pipelines.bench``). ``train`` runs ``recsys_moe.training.train.train`` on it exactly as
``recsys-moe train`` does (Parquet → loader → KJT → DistributedModelParallel → MMoE → losses →
fused optimizers, an MLflow run, validation each epoch) with ``train.profile_steps``, and reports:

- ``samples_per_s``: training samples per second over all ranks, every step but validation
  and the profiled window (``TrainResult.samples_per_s``); ``samples_per_s_steady``: the same
  after the first tenth of the first epoch (warm-up, compilation);
- ``step_ms_p50`` / ``p90``: wall time per step's iteration (at steady state the device holds
  the host back, so this is the step's time);
- ``step_ms_max``, ``stall_ms``: the slowest step; the time of the steps over 5x the median,
  beyond the median. The host runs ahead of the device, so a step that syncs (the flush of the
  losses at the last step) also waits there for the device's queued work; ``slowest_steps``:
  the five slowest, by step number (``last_step`` is the run's last); ``gc``: Python's garbage
  collections during the run, by generation (count, total ms, slowest ms);
- ``peak_gpu_gib``: ``torch.cuda.max_memory_allocated`` on rank 0;
- ``gpu_busy_share``: the profiled window's kernel time over its wall time;
- ``loader_rows_per_s``: the same loader alone, one epoch, synchronised at the end;
- ``peer``: torch-rechub 0.9.0's ``MMOE`` (one ``nn.Embedding`` per feature, dense Adam over
  everything, the loss of its ``MTLTrainer``) on the GPU on batches of the same rows, and our
  samples/s over its. One process only: it has no sharding.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "bench.toml"


def prepare(args: argparse.Namespace) -> None:
    from pipelines.bench import write_bench_dataset
    from recsys_moe.config import load_config

    cfg = load_config(CONFIG, args.set, workdir=args.work)
    t0 = time.perf_counter()
    manifest = write_bench_dataset(
        cfg.dataset_dir,
        cfg.feature_set(),
        rows=args.rows,
        valid_rows=args.valid_rows,
        test_rows=args.valid_rows,
    )
    print(f"wrote {cfg.dataset_dir} in {time.perf_counter() - t0:.0f} s: {manifest['rows']}")


def loader_rate(cfg, rank: int, world: int) -> float:  # noqa: ANN001
    """Rows per second of the configured loader alone over its second epoch (device
    synchronised at the end)."""
    from recsys_moe.config import label_columns
    from recsys_moe.training.dist import DistInfo
    from recsys_moe.training.train import train_loader

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not torch.cuda.is_available():
        device = torch.device("cpu")
    info = DistInfo(rank, world, device.index, device, owns_group=False)
    loader = train_loader(cfg.dataset_dir, cfg.train, cfg.feature_set(),
                          label_columns(cfg.tasks), info)  # fmt: skip
    for _ in loader:  # the first epoch warms up (kernels, allocator)
        pass
    rows, t0 = 0, time.perf_counter()
    for batch in loader:
        rows += len(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return rows / (time.perf_counter() - t0)


def peer(cfg, steps: int) -> float:  # noqa: ANN001
    """torch-rechub's MMOE as shipped, on the GPU: samples/s over ``steps`` steps."""
    from train_bench import rechub_mmoe  # this script's folder is on sys.path

    from recsys_moe.config import label_columns
    from recsys_moe.training.loader import MemoryLoader

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    features = cfg.feature_set()
    model = rechub_mmoe(cfg, features).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    bce, mse = nn.BCELoss(), nn.MSELoss()
    loader = MemoryLoader.from_split(
        cfg.dataset_dir, "train", features=features, labels=label_columns(cfg.tasks),
        batch_size=cfg.train.batch_size, shuffle=True, seed=0, device=device,
    )  # fmt: skip
    batches = []
    for b in loader:  # (x_dict, ys): ids padded to [B, 4] (0 = padding), dense [B], labels [B, 2]
        sparse = b.sparse.to_dict()
        x = {k: jt.to_padded_dense(desired_length=4, padding_value=0) for k, jt in sparse.items()}
        x |= {f.name: b.dense[:, i].contiguous() for i, f in enumerate(features.dense)}
        ys = torch.stack([b.labels["click"], b.labels["watch_time_s"]], dim=1)
        batches.append((x, ys))
        if len(batches) == 64:
            break

    def step(x: dict, ys: torch.Tensor) -> None:  # MTLTrainer.train_one_epoch, no tqdm
        y_pred = model(x)
        loss = (bce(y_pred[:, 0], ys[:, 0]) + mse(y_pred[:, 1], torch.log1p(ys[:, 1]))) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    for i in range(10):
        step(*batches[i % len(batches)])
    sync()
    t0 = time.perf_counter()
    for i in range(steps):
        step(*batches[i % len(batches)])
    sync()
    return steps * cfg.train.batch_size / (time.perf_counter() - t0)


# frames whose samples are not the steady training step: compilation, the profiler's report,
# validation
SKIPPED = frozenset({"convert_frame.py:_compile", "profile.py:step", "train.py:validate"})


class StackSampler:
    """A sampling profiler of the main thread in pure Python (py-spy is not on the device): a
    thread reads ``sys._current_frames()`` every ``interval`` s; samples inside the training loop
    (a frame of ``training/train.py:_loop``) after its warm-up steps (its ``warm``: compilation,
    the lazily compiled backward among it, runs there), but not in ``SKIPPED`` frames, are
    counted by function, inclusive and self (the innermost Python frame: time in a C call
    counts to the function that made it)."""

    def __init__(self, interval: float = 0.001) -> None:
        import threading

        self.interval, self.samples = interval, []
        self.main = threading.main_thread().ident
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_event.wait(self.interval):
            frame = sys._current_frames().get(self.main)
            stack, warm = [], True
            while frame is not None:
                code = frame.f_code
                name = f"{Path(code.co_filename).name}:{code.co_name}"
                if name == "train.py:_loop":  # its steps up to `warm` are the warm-up
                    local = frame.f_locals
                    warm = local.get("step", 0) <= local.get("warm", 0)
                stack.append(name)
                frame = frame.f_back
            if "train.py:_loop" in stack and not warm and not SKIPPED.intersection(stack):
                self.samples.append(stack)

    def __enter__(self) -> StackSampler:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_event.set()
        self.thread.join()

    def report(self, top: int = 40) -> str:
        from collections import Counter

        n = len(self.samples) or 1
        inclusive = Counter(f for s in self.samples for f in set(s))
        own = Counter(s[0] for s in self.samples)
        lines = [
            f"{len(self.samples)} samples in the training loop, every {self.interval * 1e3:g} ms"
        ]
        # the innermost frame with its caller: who makes the C calls (e.g. torch.ops' __call__)
        by_caller = Counter(" <- ".join(s[:2]) for s in self.samples)
        for title, counts in (
            ("inclusive", inclusive),
            ("self", own),
            ("self, by caller", by_caller),
        ):
            lines.append(f"-- {title} share of the loop's samples")
            lines += [f"{c / n:7.1%}  {f}" for f, c in counts.most_common(top)]
        return "\n".join(lines)


def train_run(args: argparse.Namespace) -> None:
    from recsys_moe.config import load_config
    from recsys_moe.training.train import train

    sets = ["train.profile_steps=20", *args.set]
    cfg = load_config(args.config, sets, workdir=args.work)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available()  # on a CPU: a smoke run of the same path, no GPU figures
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    if args.stacks:  # where the host's time goes in the loop (a diagnostic run, not a timed one)
        sys.setswitchinterval(0.0005)  # let the sampler take the GIL between the loop's ops
        with StackSampler() as sampler:
            result = train(cfg)
    else:
        with GcPauses() as gc_pauses:
            result = train(cfg)
    timed = list(result.step_s.items())[len(result.step_s) // 10 :]  # the first tenth: warm-up
    steps = sorted(took for _, took in timed)
    p50 = steps[len(steps) // 2]
    slowest = sorted(timed, key=lambda item: -item[1])[:5]
    report = {
        "gpus": world,
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "batch_size_per_gpu": cfg.train.batch_size,
        "settings": sets,
        "samples_per_s": result.samples_per_s,
        "samples_per_s_steady": result.samples_per_s_steady,
        "step_ms_p50": 1e3 * p50,
        "step_ms_p90": 1e3 * steps[int(len(steps) * 0.9)],
        "step_ms_max": 1e3 * steps[-1],
        # time of the steps that took over 5x the median, beyond the median: stalls
        "stall_ms": 1e3 * sum(s - p50 for s in steps if s > 5 * p50),
        # which steps those were (step number of the run, ms), and the run's last step
        "slowest_steps": [[step, round(1e3 * took, 2)] for step, took in slowest],
        "last_step": max(result.step_s, default=0),
        # Python's garbage collections during train() (all threads): count and time by generation
        "gc": None if args.stacks else gc_pauses.summary(),
        "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
        "gpu_busy_share": result.gpu_busy_share,
        "valid": result.valid,
        "run_id": result.run_id,
    }
    if world == 1:
        report["loader_rows_per_s"] = loader_rate(cfg, rank, world)
    if args.peer and world == 1:
        report["peer_samples_per_s"] = peer(cfg, args.peer_steps)
        report["ours_over_peer"] = report["samples_per_s"] / report["peer_samples_per_s"]
        # the peer's rate is its steady state (after 10 warm-up steps): against ours steady
        report["ours_steady_over_peer"] = (
            report["samples_per_s_steady"] / report["peer_samples_per_s"]
        )
    if rank == 0:
        text = json.dumps(report, indent=2)
        print(text)
        print(result.profile)
        if args.out:
            Path(args.out).write_text(text)
            Path(args.out).with_suffix(".profile.txt").write_text(result.profile)
        if args.stacks:
            print(sampler.report())
            if args.out:
                Path(args.out).with_suffix(".stacks.txt").write_text(sampler.report())
        print(f"{world} GPU(s): {report['samples_per_s']:,.0f} samples/s "
              f"(steady {report['samples_per_s_steady']:,.0f}), step p50 "
              f"{report['step_ms_p50']:.2f} ms (max {report['step_ms_max']:.1f}, stalls "
              f"{report['stall_ms']:.0f} ms), busy {report['gpu_busy_share']:.2f}, "
              f"valid click AUC {result.valid.get('click_auc', float('nan')):.4f}")  # fmt: skip
        print(f"median step {statistics.median(steps) * 1e3:.2f} ms over {len(steps)} steps; "
              f"slowest (step, ms) {report['slowest_steps']} of {report['last_step']}; "
              f"gc {report['gc']}")  # fmt: skip


class GcPauses:
    """Python's garbage collections while in the block: the time of each, by generation (a
    collection stops every thread, the training loop's included)."""

    def __init__(self) -> None:
        self.pauses: dict[int, list[float]] = {0: [], 1: [], 2: []}
        self._t0 = 0.0

    def _callback(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.pauses[info["generation"]].append(time.perf_counter() - self._t0)

    def __enter__(self) -> GcPauses:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)

    def summary(self) -> dict[str, list[float]]:
        """Generation -> [collections, total ms, slowest ms]."""
        return {
            f"gen{g}": [len(p), round(1e3 * sum(p), 2), round(1e3 * max(p, default=0.0), 2)]
            for g, p in self.pauses.items()
        }


SCORE_BATCHES = (8192, 32768, 131072, 262144)


def score_run(args: argparse.Namespace) -> None:
    """Pairs/s of the bench model's forward (scoring), bf16, eval mode, no grad, on batches of
    8k-256k training-split rows already on the device: the unsharded model (one
    ``nn.EmbeddingBag`` per table) and the DMP-sharded one (fbgemm's fused TBE), each eager and
    with the dense part compiled. Medians of ``--repeats`` timed passes of 10 forwards each."""
    from recsys_moe.config import label_columns, load_config
    from recsys_moe.data import iterate_batches
    from recsys_moe.model import build_model
    from recsys_moe.training import sharding
    from recsys_moe.training.dist import setup
    from recsys_moe.training.loader import read_mapped
    from recsys_moe.training.module import TrainLoss, TrainModule

    cfg = load_config(args.config, args.set, workdir=args.work)
    info = setup()
    device = info.device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    features, names = cfg.feature_set(), [t.name for t in cfg.tasks]
    data = read_mapped(cfg.dataset_dir, "train", features, label_columns(cfg.tasks))
    wanted = [int(b) for b in args.batches.split(",")] if args.batches else SCORE_BATCHES
    sizes = [s for s in wanted if s <= data.num_rows] or [data.num_rows]
    batches = {s: next(iterate_batches(data, s)).to(device) for s in sizes}
    del data

    def variants():  # noqa: ANN202  (name, model) pairs, built one at a time
        plain = build_model(features, cfg.model, names).to(device).eval()
        yield "plain", plain
        plain.mixture.compile(dynamic=False)
        for head in plain.heads.values():
            head.compile(dynamic=False)
        yield "plain+compile", plain
        del plain
        module = TrainModule(build_model(features, cfg.model, names, device="meta"),
                             TrainLoss.for_config(cfg.model, cfg.tasks))  # fmt: skip
        dmp, _ = sharding.shard(
            module,
            cfg.train.sharding,
            device=device,
            embedding_lr=0.01,
            bf16=device.type == "cuda",
            backward=False,
        )  # run under autocast below (forward only)
        model = dmp.module.model.eval()
        yield "sharded", model
        model.mixture.compile(dynamic=False)
        for head in model.heads.values():
            head.compile(dynamic=False)
        yield "sharded+compile", model

    report: dict[str, dict[str, float]] = {}
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    only = set(args.only.split(",")) if args.only else None
    for name, model in variants():
        if only is not None and name not in only:
            continue
        report[name] = {}
        for size, batch in batches.items():
            with torch.no_grad(), autocast:
                for _ in range(3):  # warm-up (and compiles)
                    model(batch.dense, batch.sparse)
                times = []
                for _ in range(args.repeats):
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(10):
                        model(batch.dense, batch.sparse)
                    sync()
                    times.append((time.perf_counter() - t0) / 10)
            report[name][str(size)] = size / statistics.median(times)
            print(f"score {name:>16} batch {size:>7,}: {report[name][str(size)]:,.0f} pairs/s")
        if args.profile:  # where the largest batch's forward goes, on the device
            with torch.no_grad(), autocast, torch.profiler.profile(record_shapes=True) as prof:
                for _ in range(3):
                    model(batch.dense, batch.sparse)
                sync()
            print(f"profile {name}, batch {size:,}, 3 forwards")
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=15))
            print(prof.key_averages(group_by_input_shape=True).table(
                sort_by="self_device_time_total", row_limit=12, max_name_column_width=40,
                max_shapes_column_width=80))  # fmt: skip
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "pairs_per_s": report, "repeats": args.repeats}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="write the bench training set")
    p.add_argument("--work", required=True, help="workdir (the dataset goes to WORK/dataset)")
    p.add_argument("--rows", type=int, default=4_000_000, help="training rows")
    p.add_argument("--valid-rows", type=int, default=200_000, help="validation rows")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.set_defaults(func=prepare)
    p = sub.add_parser("train", help="train on it and report")
    p.add_argument("--work", required=True, help="workdir of `prepare`")
    p.add_argument("--out", help="JSON report path (rank 0)")
    p.add_argument("--peer", action="store_true", help="also torch-rechub's MMOE (1 process)")
    p.add_argument("--peer-steps", type=int, default=100, help="timed steps of the peer")
    p.add_argument("--stacks", action="store_true", help="sample the host's Python stacks")
    p.add_argument("--config", type=Path, default=CONFIG, help="model config (default: bench)")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.set_defaults(func=train_run)
    p = sub.add_parser("score", help="pairs/s of the model's forward at scoring batch sizes")
    p.add_argument("--work", required=True, help="workdir of `prepare`")
    p.add_argument("--out", help="JSON report path")
    p.add_argument("--repeats", type=int, default=5, help="timed passes per batch size")
    p.add_argument("--config", type=Path, default=CONFIG, help="model config (default: bench)")
    p.add_argument("--only", help="comma-separated variants to run (default: all)")
    p.add_argument("--profile", action="store_true", help="print each variant's top device ops")
    p.add_argument("--batches", help="comma-separated batch sizes (default: 8k, 32k, 128k, 256k)")
    p.add_argument("--set", action="append", default=[], help="config override key=value")
    p.set_defaults(func=score_run)
    args = parser.parse_args(argv)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
