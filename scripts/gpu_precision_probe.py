"""Where do the GPU run's own validation predictions and the CPU bundle's part ways? (#4 notes)

    python scripts/gpu_precision_probe.py WORKDIR     # on a CUDA machine; writes WORKDIR/probe.json

Trains the GPU test's small config once on one GPU, keeps the predictions of its last validation
(sharded tables, fused TBE kernels, dense part on the GPU), then predicts the same rows with the
gathered bundle three ways: on the CPU, on the GPU (plain EmbeddingBagCollection, fp32 matmuls)
and on the GPU with TF32 matmuls allowed. Prints, per task, each variant's metric and the
largest and mean per-row differences of the raw outputs against the CPU bundle.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

import recsys_moe.training.train as train_mod
from pipelines.synth import synthesize
from recsys_moe.config import DEMO_CONFIG, label_columns, load_config
from recsys_moe.dataset import build_dataset
from recsys_moe.evaluation.predict import predict_tensors
from recsys_moe.model.objectives import output_name
from recsys_moe.training.loader import read_mapped
from recsys_moe.training.module import OnDevice

SETS = ["synth.users=3000", "synth.items=600", "synth.days=6", "train.epochs=2",
        "train.batch_size=2048", "train.log_every=5", "mlflow.experiment=probe"]  # fmt: skip


def main(work: Path) -> None:
    cfg = load_config(DEMO_CONFIG, SETS, workdir=work)
    s = cfg.synth
    synthesize(cfg.store_dir, users=s.users, items=s.items, days=s.days, seed=s.seed,
               task_conflict=s.task_conflict)  # fmt: skip
    build_dataset(cfg)
    captured: list[dict[str, np.ndarray]] = []
    original = train_mod.split_metrics

    def keep(tasks, preds, labels, manifest):  # the last epoch's predictions of the GPU run
        captured.append({k: v.copy() for k, v in preds.items()})
        return original(tasks, preds, labels, manifest)

    train_mod.split_metrics = keep
    try:
        result = train_mod.train(cfg)
    finally:
        train_mod.split_metrics = original
    data = read_mapped(cfg.dataset_dir, "valid", cfg.feature_set(), label_columns(cfg.tasks))
    manifest = json.loads((cfg.dataset_dir / "manifest.json").read_text())
    model = result.model
    variants = {"gpu_sharded_run": captured[-1]}
    variants["cpu_bundle"] = predict_tensors(model, data, cfg.tasks)
    if torch.cuda.is_available():
        dev = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False
        variants["gpu_plain_fp32"] = predict_tensors(OnDevice(model.to(dev), dev), data, cfg.tasks)
        torch.backends.cuda.matmul.allow_tf32 = True
        variants["gpu_plain_tf32"] = predict_tensors(OnDevice(model, dev), data, cfg.tasks)
        torch.backends.cuda.matmul.allow_tf32 = False
    precision = torch.get_float32_matmul_precision()
    report: dict = {"flags": {"float32_matmul_precision": precision}}
    ref = variants["cpu_bundle"]
    for name, preds in variants.items():
        labels = {k: v.numpy() for k, v in data.labels.items()}
        metrics = original(cfg.tasks, preds, labels, manifest)
        diffs = {}
        for t in cfg.tasks:
            a, b = preds[output_name(t)], ref[output_name(t)]
            if t.transform == "log1p":
                a, b = np.log1p(a), np.log1p(b)
            d = a - b
            m = data.labels[t.mask].numpy() > 0 if t.mask else np.ones(d.size, bool)
            diffs[t.name] = {"max_abs": float(np.abs(d).max()), "mean": float(d.mean()),
                             "mean_abs_masked": float(np.abs(d[m]).mean())}  # fmt: skip
        report[name] = {"metrics": metrics, "diff_vs_cpu_bundle": diffs}
        print(name, json.dumps(metrics), json.dumps(diffs), flush=True)
    (work / "probe.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
