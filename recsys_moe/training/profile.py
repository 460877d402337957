"""``train.profile_steps``: torch.profiler over a window of training steps, and what it shows.

    recsys-moe train --set train.profile_steps=20      # steps 21-40 of the run, then a report

After ``WAIT`` steps (warm-up: allocator, kernels' autotuning, the pipeline filling), ``WARMUP``
more steps are traced and dropped, then ``steps`` steps are recorded. The device is synchronised
at the window's two ends only. The report: the top ops by time on the device and by time on
the host (a host-bound step shows there), and the device's busy share: the share of the
window's wall time during which at least one kernel or copy ran (1 = never idle; a host-bound
step is far below it).
"""

from __future__ import annotations

import time

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, schedule

WAIT, WARMUP = 20, 2


class StepProfiler:
    """``step()`` after every training step; ``report`` and ``busy_share`` once the window has
    been recorded (empty / NaN before)."""

    def __init__(self, steps: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
        self.first = WAIT + WARMUP  # steps taken before the recorded window
        self.last = self.first + steps
        self.taken = 0
        self.report = ""
        self.busy_share = float("nan")
        self.window_s = 0.0
        self._t0 = 0.0
        self._prof = profile(
            activities=activities,
            schedule=schedule(wait=WAIT, warmup=WARMUP, active=steps, repeat=1),
            on_trace_ready=self._ready,
        )
        self._prof.start()

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def step(self) -> bool:
        """After each training step: whether that step's time is the profiler's (the step that
        starts the tracer, the traced ones, and the last, which makes the report)."""
        self.taken += 1
        if self.taken == self.first:
            self._sync()
            self._t0 = time.perf_counter()
        if self.taken == self.last:
            self._sync()
            self.window_s = time.perf_counter() - self._t0
        self._prof.step()
        return WAIT <= self.taken <= self.last

    def stop(self) -> None:
        self._prof.stop()

    def _ready(self, prof: profile) -> None:
        averages = prof.key_averages()
        tables = []
        for sort in (["self_device_time_total"] if self.cuda else []) + ["self_cpu_time_total"]:
            top = averages.table(sort_by=sort, row_limit=25, max_name_column_width=60)
            tables.append(f"top ops by {sort}, {self.last - self.first} steps\n{top}")
        self.report = "\n".join(tables)
        if self.cuda and self.window_s > 0:
            self.busy_share = busy_us(prof.events()) / 1e6 / self.window_s


def busy_us(events: list) -> float:
    """Microseconds in which at least one kernel or copy ran on the device: the union of their
    intervals (streams overlap; annotations on the device's timeline are ranges, not work)."""
    spans = sorted(
        (e.time_range.start, e.time_range.end)
        for e in events
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
    )
    total, end = 0.0, float("-inf")
    for a, b in spans:
        if b > end:
            total += b - max(a, end)
            end = b
    return total
