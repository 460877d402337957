"""train.profile_steps (recsys_moe/training/profile.py): the window and the device's busy time."""

from __future__ import annotations

import gc
from types import SimpleNamespace

import torch
from torch.autograd import DeviceType

from recsys_moe.training.profile import WAIT, WARMUP, StepProfiler, busy_us
from recsys_moe.training.train import LoopGc


def event(start: float, end: float, *, device: bool = True, annotation: bool = False):
    kind = DeviceType.CUDA if device else DeviceType.CPU
    span = SimpleNamespace(start=start, end=end)
    return SimpleNamespace(time_range=span, device_type=kind, is_user_annotation=annotation)


def test_busy_time_is_the_union_of_kernel_intervals() -> None:
    events = [
        event(0, 10),
        event(5, 12),  # another stream, overlapping: counted once
        event(20, 25),
        event(0, 100, annotation=True),  # a range on the device's timeline, not work
        event(30, 90, device=False),  # host work
    ]
    assert busy_us(events) == 12 + 5
    assert busy_us([]) == 0


def test_profiler_records_its_window_and_reports_top_ops() -> None:
    prof = StepProfiler(3, torch.device("cpu"))
    x = torch.randn(64, 64)
    for _ in range(WAIT + WARMUP + 3 + 2):
        x = torch.tanh(x @ x)
        prof.step()
    prof.stop()
    assert prof.window_s > 0
    assert "aten::mm" in prof.report and "aten::tanh" in prof.report
    assert prof.busy_share != prof.busy_share  # NaN: no device on a CPU run


def test_the_loop_collects_its_young_generations_every_n_steps_and_nothing_else() -> None:
    started: list[int] = []

    def record(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(info["generation"])

    assert gc.isenabled()
    gc.callbacks.append(record)
    try:
        with LoopGc(3) as loop_gc:
            assert started[-1] == 2 and not gc.isenabled()  # one full collection, then off
            started.clear()
            for step in range(1, 8):
                cycles = [[] for _ in range(20_000)]  # would set off automatic collections
                for a, b in zip(cycles, cycles[1:], strict=False):
                    a.append(b)
                loop_gc.step(step)
            assert started == [1, 1]  # steps 3 and 6, the young generations only
        assert gc.isenabled()
        gc.disable()  # no automatic collection below: any collection would be LoopGc's
        started.clear()
        with LoopGc(0) as loop_gc:  # 0: the collector left alone
            loop_gc.step(3)
        assert started == [] and not gc.isenabled()
    finally:
        gc.enable()
        gc.callbacks.remove(record)
