"""train.profile_steps (recsys_moe/training/profile.py): the window and the device's busy time."""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch.autograd import DeviceType

from recsys_moe.training.profile import WAIT, WARMUP, StepProfiler, busy_us


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
