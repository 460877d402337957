"""CPU training throughput (samples/s): our MMoE against torch-rechub's ``MMOE``, in one process.

Over 400 lines on purpose: a benchmark is one script a user runs and reads as a whole (data,
peers, variants, timing, report).

    .venv/bin/pip install --no-deps -r requirements/bench.txt      # torch-rechub, once
    .venv/bin/recsys-moe data synth --out /tmp/tb/data --users 12000 --items 1500
    .venv/bin/recsys-moe features build --workdir /tmp/tb
    .venv/bin/python benchmarks/train_bench.py --dataset /tmp/tb/dataset [--batch-sizes 512 4096]

Variants, all on the same batches (same rows, same order: the first rows of a seeded permutation
of the train split, as ``MemoryLoader``'s epoch 0), ``torch.set_num_threads(2)``:

- ``ours/dmp``: the training step of ``recsys_moe.training.train``: ``TrainModule`` sharded by
  ``sharding.shard`` in a process group of one (``DistributedModelParallel``, row-wise Adagrad
  fused into the tables' backward), ``sharding.build_optimizer`` (Adam on the dense part),
  ``sharding.train_step``'s step and the LR scheduler's step.
- ``ours/plain``: the same ``TrainModule``, unsharded (plain ``EmbeddingBagCollection``), one
  ``torch.optim.Adam`` over every parameter, tables included.
- ``peer/torch-rechub``: ``torch_rechub.models.multi_task.MMOE`` as shipped (one ``nn.Embedding``
  per feature, padded ``[B, L]`` multi-valued features with mean pooling over a padding mask,
  BatchNorm in every MLP layer, sigmoid output for the classification task), ``torch.optim.Adam``
  over every parameter, and the loop of torch-rechub's ``MTLTrainer``: BCE on the click
  probability, MSE on log1p(watch time), the mean of the two.

Shapes are the demo's (4 experts of [64, 32], towers [32], 2 tasks) with one change: every table
gets embedding dim 8, because torch-rechub 0.9's ``EmbeddingLayer`` concatenates ``[B, 1, D]``
embeddings along dim 1 and fails on mixed dims (the demo has 4s and 8s). Vocabulary sizes and
mapped ids are ours (``apply_mappings``); the lists hold no id 0 and no empty list, so
torch-rechub's ``padding_idx=0`` mask gives exactly our mean pooling.

``--item-rows`` resizes the item_id table (default: the demo's 5,001 rows, then 1,000,001) with
the same ids and data: a production-sized table, where the sparse path matters. TorchRec's fused
row-wise Adagrad touches only the rows a batch looks up; dense Adam over an ``nn.Embedding``
(peer, ours/plain) reads and writes every row of every table on every step.

Batches are built before timing (both input paths are excluded). Each repeat runs every variant
for ``--samples`` samples (``--samples // batch`` steps) in turn (interleaved, so load from other
jobs hits all of them alike), after ``--warmup`` steps per batch size.

The whole measurement runs once per ``OMP_WAIT_POLICY``, each in a fresh child process (OpenMP
reads it at load): PASSIVE (threads sleep between parallel regions) and ACTIVE (they spin). On a
quiet machine spinning is 1.3-4x faster for every variant, and most for the peer, whose step is
many small ops; on 2 cores shared with other jobs, spinning threads get descheduled and runs
swung 4.5k-134k samples/s in one earlier measurement. Median/min/max samples/s over the repeats
go to ``benchmarks/results/train.json`` and a table to stdout. ``--profile`` prints torch.profiler's
top ops of each variant's step instead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "demo.toml"
EMBEDDING_DIM = 8  # every table: torch-rechub cannot concatenate mixed dims
THREADS = 2
VARIANTS = ("ours/dmp", "ours/plain", "peer/torch-rechub")
PEER = "peer/torch-rechub"
ITEM = "item_id"  # the table --item-rows resizes
POLICIES = ("PASSIVE", "ACTIVE")  # OpenMP threads sleep / spin between parallel regions


# ---- data: one set of rows, two input formats --------------------------------------------------
def load(dataset: Path, rows: int, item_rows: int):
    """Config, feature set (dims 8, ``item_rows`` rows in the item_id table) and the first
    ``rows`` rows of a seeded permutation of the train split."""
    from feature_store import FeatureSet
    from pipelines.mappings import Mappings, apply_mappings
    from pipelines.training_set import load_split
    from recsys_moe.config import label_columns, load_config
    from recsys_moe.data import take_rows, to_tensor_data

    cfg = load_config(CONFIG, [], workdir=dataset.parent)
    text = cfg.features_path.read_text().replace(
        "embedding_dim = 4", f"embedding_dim = {EMBEDDING_DIM}"
    )
    features = FeatureSet.from_toml(text, where=f"{cfg.features_path} (dims {EMBEDDING_DIM})")
    feats = tuple(
        replace(f, num_embeddings=item_rows) if f.name == ITEM else f for f in features.features
    )
    features = replace(features, features=feats)
    mappings = Mappings.load(dataset / "mappings", features)
    raw = load_split(dataset, "train").collect()
    mapped = apply_mappings(raw.lazy(), features, mappings).collect()
    data = to_tensor_data(mapped, features, raw.select(label_columns(cfg.tasks)))
    order = torch.randperm(data.num_rows, generator=torch.Generator().manual_seed(cfg.train.seed))
    return cfg, features, take_rows(data, order[:rows])


def our_batches(data, batch_size: int) -> list:
    from recsys_moe.data import iterate_batches

    return list(iterate_batches(data, batch_size, drop_last=True))


def peer_batches(data, features, batch_size: int) -> list[tuple[dict[str, Tensor], Tensor]]:
    """torch-rechub's ``(x_dict, ys)``: ids ``[B]`` or padded ``[B, L]`` (0 = padding), dense
    ``[B]``, labels ``[B, 2]`` (click, watch time s)."""
    cols: dict[str, Tensor] = {}
    for f in features.sparse:
        col = data.sparse[f.name]
        if f.kind == "categorical":
            cols[f.name] = col.values
            continue
        lengths = col.lengths
        pos = torch.arange(int(lengths.max()))
        padded = torch.zeros(data.num_rows, len(pos), dtype=torch.int64)
        padded[pos[None, :] < lengths[:, None]] = col.values  # row-major: values in row order
        cols[f.name] = padded
    for i, f in enumerate(features.dense):
        cols[f.name] = data.dense[:, i].contiguous()
    ys = torch.stack([data.labels["click"], data.labels["watch_time_s"]], dim=1)
    n = data.num_rows - data.num_rows % batch_size
    return [
        ({k: v[b : b + batch_size] for k, v in cols.items()}, ys[b : b + batch_size])
        for b in range(0, n, batch_size)
    ]


# ---- variants: each is ``step(batch) -> None`` ---------------------------------------------------
def ours_dmp(cfg, features, total_steps: int):
    from recsys_moe.model import build_model
    from recsys_moe.training import sharding
    from recsys_moe.training.module import TrainLoss, TrainModule
    from recsys_moe.training.recipe import build_scheduler, scaled_rates

    tasks = [t.name for t in cfg.tasks]
    model = build_model(features, cfg.model, tasks, device="meta")
    module = TrainModule(model, TrainLoss.for_config(cfg.model, cfg.tasks))
    cpu = torch.device("cpu")
    dmp, _ = sharding.shard(
        module, cfg.train.sharding, device=cpu, embedding_lr=cfg.train.embedding_lr
    )
    optimizer = sharding.build_optimizer(dmp, cfg.train.lr, cfg.train.weight_decay)
    rates = scaled_rates(cfg.train, 1, total_steps)  # lr_schedule auto resolved
    scheduler = build_scheduler(optimizer, rates.schedule, total_steps,
                                cooldown_share=rates.cooldown_share)  # fmt: skip
    progress, _ = sharding.train_step(dmp, optimizer, cpu, pipeline=cfg.train.pipeline)
    dmp.train()

    def step(batch) -> None:
        progress(iter((batch,)))
        scheduler.step()

    return step


def ours_plain(cfg, features):
    from recsys_moe.model import build_model
    from recsys_moe.training.module import TrainLoss, TrainModule

    model = build_model(features, cfg.model, [t.name for t in cfg.tasks])
    module = TrainModule(model, TrainLoss.for_config(cfg.model, cfg.tasks)).train()
    optimizer = torch.optim.Adam(module.parameters(), lr=cfg.train.lr)

    def step(batch) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss, _ = module(batch)
        loss.backward()
        optimizer.step()

    return step


def rechub_mmoe(cfg, features) -> nn.Module:  # noqa: ANN001
    """torch-rechub's ``MMOE`` as shipped, for ``features`` and ``cfg.model``'s experts/towers
    (also used by gpu_bench.py)."""
    from torch_rechub.basic.features import DenseFeature, SequenceFeature, SparseFeature
    from torch_rechub.models.multi_task import MMOE

    feats = []
    for f in features.features:
        if f.kind == "categorical":
            feats.append(SparseFeature(f.name, f.num_embeddings, f.embedding_dim))
        elif f.kind == "multi_categorical":
            feats.append(SequenceFeature(f.name, f.num_embeddings, f.embedding_dim,
                                         pooling=f.pooling, padding_idx=0))  # fmt: skip
        else:
            feats.append(DenseFeature(f.name))
    m = cfg.model
    return MMOE(
        feats,
        task_types=["classification", "regression"],
        n_expert=m.num_experts,
        expert_params={"dims": list(m.expert_dims)},
        tower_params_list=[{"dims": list(m.tower_dims)} for _ in cfg.tasks],
    )


def peer(cfg, features):
    model = rechub_mmoe(cfg, features).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.train.lr)
    bce, mse = nn.BCELoss(), nn.MSELoss()

    def step(batch) -> None:  # torch-rechub's MTLTrainer.train_one_epoch, without its tqdm
        x, ys = batch
        y_pred = model(x)
        loss = (bce(y_pred[:, 0], ys[:, 0]) + mse(y_pred[:, 1], torch.log1p(ys[:, 1]))) / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    return step


# ---- timing --------------------------------------------------------------------------------------
def run(step, batches: list, steps: int) -> float:
    """Seconds for ``steps`` steps over ``batches`` (cycled)."""
    t0 = time.perf_counter()
    for i in range(steps):
        step(batches[i % len(batches)])
    return time.perf_counter() - t0


def profile(step, batches: list, steps: int, top: int = 12) -> str:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as prof

    with prof(activities=[ProfilerActivity.CPU]) as p:
        run(step, batches, steps)
    return p.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=top, max_name_column_width=60
    )


def measure(args: argparse.Namespace) -> dict:
    """Samples/s of every variant, batch size and repeat, in this process (its OMP policy)."""
    from recsys_moe.training.dist import setup, shutdown

    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    info = setup()  # a process group of one, as train.py
    cfg, features, data = load(args.dataset, args.samples, args.item_rows[0])
    total = args.runs * args.samples // min(args.batch_sizes) + args.warmup * len(args.batch_sizes)
    steppers = {
        "ours/dmp": ours_dmp(cfg, features, total),
        "ours/plain": ours_plain(cfg, features),
        PEER: peer(cfg, features),
    }
    load_start = os.getloadavg()
    runs: dict[str, dict[str, list[float]]] = {}
    for bs in args.batch_sizes:
        batches = {"ours": our_batches(data, bs), "peer": peer_batches(data, features, bs)}
        steps = args.samples // bs
        for name, step in steppers.items():
            run(step, batches[name.split("/")[0]], args.warmup)
        if args.profile:
            for name, step in steppers.items():
                print(f"\n## batch {bs}: {name}, {steps} steps\n")
                print(profile(step, batches[name.split("/")[0]], steps))
            continue
        runs[str(bs)] = {name: [] for name in steppers}
        for _ in range(args.runs):
            for name, step in steppers.items():
                seconds = run(step, batches[name.split("/")[0]], steps)
                runs[str(bs)][name].append(steps * bs / seconds)
    load_end = os.getloadavg()
    shutdown(info)
    config = {
        "dataset": str(args.dataset),
        "model": "mmoe; tasks click (BCE), watch_time (MSE on log1p)",
        "num_experts": cfg.model.num_experts,
        "expert_dims": list(cfg.model.expert_dims),
        "tower_dims": list(cfg.model.tower_dims),
        "tables": {f.name: [f.num_embeddings, f.embedding_dim] for f in features.sparse},
        "dense_features": [f.name for f in features.dense],
        "lr_dense": cfg.train.lr,
        "lr_tables_dmp": cfg.train.embedding_lr,
        "samples_per_repeat": args.samples,
        "warmup_steps": args.warmup,
        "runs": args.runs,
    }
    loads = {"load_avg_at_start": [round(x, 2) for x in load_start],
             "load_avg_at_end": [round(x, 2) for x in load_end]}  # fmt: skip
    return {"config": config, "load": loads, "runs": runs}


def summarize(runs: dict[str, dict[str, list[float]]], samples: int) -> dict:
    out = {}
    for bs, by_name in runs.items():
        res = {
            name: {
                "steps": samples // int(bs),
                "median_samples_per_s": round(statistics.median(v)),
                "min_samples_per_s": round(min(v)),
                "max_samples_per_s": round(max(v)),
                "runs_samples_per_s": [round(x) for x in v],
            }
            for name, v in by_name.items()
        }
        peer_median = res[PEER]["median_samples_per_s"]
        for name in ("ours/dmp", "ours/plain"):
            res[name]["ratio_over_peer"] = round(res[name]["median_samples_per_s"] / peer_median, 2)
        out[bs] = res
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--dataset", type=Path, default=Path("/tmp/tb/dataset"),
        help="training set of `recsys-moe features build` (demo synth data)",
    )  # fmt: skip
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[512, 4096], help="batch sizes"
    )
    parser.add_argument(
        "--samples", type=int, default=102_400,
        help="samples per timed repeat and batch size (steps = samples / batch)",
    )  # fmt: skip
    parser.add_argument(
        "--warmup", type=int, default=10, help="untimed steps per variant and batch size"
    )
    parser.add_argument("--runs", type=int, default=5, help="timed repeats (median reported)")
    parser.add_argument(
        "--item-rows", type=int, nargs="+", default=[5001, 1_000_001],
        help="rows of the item_id table, one measurement each (ids stay the data's ~1.7k)",
    )  # fmt: skip
    parser.add_argument(
        "--omp-policies", nargs="+", default=list(POLICIES), choices=POLICIES,
        help="OMP_WAIT_POLICY of each child process (one measurement per policy)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", action="store_true",
        help="in this process (its OMP_WAIT_POLICY): print profiler top ops, write nothing",
    )  # fmt: skip
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks/results/train.json", help="results JSON"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.profile:
        measure(args)
        return
    if args.child:  # one policy: one JSON line
        print(json.dumps(measure(args)))
        return

    common = [
        "--dataset", str(args.dataset), "--batch-sizes", *map(str, args.batch_sizes),
        "--samples", str(args.samples), "--warmup", str(args.warmup), "--runs", str(args.runs),
    ]  # fmt: skip
    children: dict[str, dict[str, dict]] = {}
    for item_rows in args.item_rows:
        for policy in args.omp_policies:
            env = dict(os.environ, OMP_WAIT_POLICY=policy)
            cmd = [sys.executable, __file__, *common, "--item-rows", str(item_rows), "--child"]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
            if proc.returncode:
                raise RuntimeError(f"{item_rows} rows, {policy} failed:\n{proc.stderr[-3000:]}")
            out = json.loads(proc.stdout.strip().splitlines()[-1])
            children.setdefault(str(item_rows), {})[policy] = out
    first = next(iter(next(iter(children.values())).values()))
    report = {
        "command": " ".join(["benchmarks/train_bench.py", *sys.argv[1:]]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": THREADS,
            "shared": "yes: other engineers' jobs may run concurrently",
            "load_avg": {
                f"{n} rows, {p}": r["load"] for n, c in children.items() for p, r in c.items()
            },  # fmt: skip
            "python": platform.python_version(),
        },
        "versions": {
            p: version(p) for p in ("torch", "torchrec", "fbgemm_gpu_cpu", "torch-rechub")
        },
        "config": first["config"] | {"item_id_rows": args.item_rows},
        "results": {  # item_id table rows -> OMP_WAIT_POLICY -> batch size -> variant
            n: {p: summarize(r["runs"], args.samples) for p, r in c.items()}
            for n, c in children.items()
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report))


def table(report: dict) -> str:
    lines = [
        "| item_id rows | OMP policy | batch | variant | median samples/s | min | max | × peer |",
        "| ---: | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    for rows, by_policy in report["results"].items():
        for policy, by_bs in by_policy.items():
            for bs, res in by_bs.items():
                for name, r in res.items():
                    lines.append(
                        f"| {int(rows):,} | {policy} | {int(bs):,} | {name} "
                        f"| {r['median_samples_per_s']:,} | {r['min_samples_per_s']:,} "
                        f"| {r['max_samples_per_s']:,} | {r.get('ratio_over_peer', 1.0):.2f} |"
                    )
    lines.append("")
    for what, load in report["machine"]["load_avg"].items():
        lines.append(f"{what}: load average {load['load_avg_at_start']} at start, "
                     f"{load['load_avg_at_end']} at end")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
