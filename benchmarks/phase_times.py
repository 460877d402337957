"""Where a ``recsys-moe train`` command's wall time goes, phase by phase.

    .venv/bin/python benchmarks/phase_times.py [--out F.json] -- train --workdir W -q [--set ...]

Runs the CLI command given after ``--`` in this process, with each of ``training/train.py``'s
top-level calls wrapped to add up its wall time (``time.perf_counter``): the imports, the data,
sharding, the MLflow run's start and close, the loop (its validations included, and also listed
alone), the bundle and the heatmaps; then prints a table and writes it as JSON (``--out``,
default ``benchmarks/results/phase_times.json``).
cProfile gave inconsistent cumulative times for the same run on the H200 (Python 3.12, the
pipeline's threads and Dynamo), which is why this exists (``benchmarks/README.md``, session 15).
The wrappers only time; the run trains, logs and saves as the same command would. A phase that
was not called (``compile_dense`` in an eager run) is left out.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

T0 = time.perf_counter()
RESULTS = Path(__file__).resolve().parent / "results"

TRAIN_CALLS = (
    "check_dataset", "train_loader", "read_mapped", "build_model", "compile_dense", "_loop",
    "predict_sharded", "split_metrics", "gate_stats", "save_bundle", "heatmaps", "_train",
)  # fmt: skip
SHARDING_CALLS = ("shard", "build_optimizer", "full_state_dict")
LOGGER_CALLS = ("log_params", "log_text", "log_dict", "log_metrics", "log_artifacts", "close")


def timed(times: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` adding its wall time to ``times[name]``."""

    @functools.wraps(fn)
    def inner(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[name] = times.get(name, 0.0) + time.perf_counter() - start

    return inner


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(RESULTS / "phase_times.json"), help="JSON to write")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- train --workdir W ...")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if command[:1] != ["train"]:
        parser.error("give a train command after --, e.g. -- train --workdir W -q")

    import recsys_moe.cli as cli
    import recsys_moe.training.sharding as sharding
    import recsys_moe.training.train as train_module

    times: dict[str, float] = {"imports": time.perf_counter() - T0}
    for name in TRAIN_CALLS:
        setattr(train_module, name, timed(times, name, getattr(train_module, name)))
    for name in SHARDING_CALLS:
        setattr(sharding, name, timed(times, f"sharding.{name}", getattr(sharding, name)))
    start_logger = train_module.metric_logger

    def metric_logger(*a: Any, **k: Any) -> Any:
        logger = timed(times, "MLflow run start", start_logger)(*a, **k)
        for method in LOGGER_CALLS:
            setattr(logger, method, timed(times, f"logger.{method}", getattr(logger, method)))
        return logger

    train_module.metric_logger = metric_logger
    started = time.perf_counter()
    rc = cli.main(command)
    times["command"] = time.perf_counter() - started
    times["whole process"] = time.perf_counter() - T0
    listed = ("imports", "compile_dense", "sharding.shard", "MLflow run start", "_loop")
    times["the rest"] = times["whole process"] - sum(times.get(k, 0.0) for k in listed)
    print(f"{'phase':<28} {'s':>8}")
    for name, seconds in times.items():
        print(f"{name:<28} {seconds:8.2f}")
    record = {"command": command, "rc": rc, "seconds": times}
    Path(args.out).write_text(json.dumps(record, indent=1))
    print(f"wrote {args.out}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
