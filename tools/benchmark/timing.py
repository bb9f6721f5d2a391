"""Timing phases side by side: warm-up, median of timed calls, failures recorded, profiles."""

from __future__ import annotations

import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

from .presets import Step


class Bench:
    """Times phases, the stacks interleaved call by call (ours, theirs, ours, ...) so that load
    from other processes on a shared CPU falls on both alike. A failure is recorded and the
    rest still runs, so limited GPU time still yields every figure it can. With `profile`, one
    more call per side and phase runs under torch.profiler, and its busiest operators are
    appended to that file: where the time of a step goes. On CUDA the profiler stays attached
    after it ends (pytorch/pytorch#144455): on the H200, captioning timed after a profile ran
    10 and 21 % slower than in a run without one, so figures come from runs without it."""

    def __init__(self, device: torch.device, warmup: int, iters: int, profile: Path | None = None):
        self.device, self.warmup, self.iters, self.profile = device, warmup, iters, profile
        self.rates: dict[str, dict[str, float]] = {"ours": {}, "theirs": {}}
        self.errors: dict[str, str] = {}

    def measure(self, phase: str, batch: int, makers: dict[str, Callable[[], Step]]) -> None:
        """Images/s of each side's step: `warmup` untimed calls, then the median of `iters`."""
        calls = {}
        for side, make in makers.items():
            try:
                calls[side] = make()
            except Exception as err:  # noqa: BLE001 - recorded in the report, run continues
                self._fail(side, phase, err)
        times: dict[str, list[float]] = {side: [] for side in calls}
        for i in range(self.warmup + self.iters):
            for side in list(calls):
                try:
                    seconds = self._seconds(calls[side])
                except Exception as err:  # noqa: BLE001
                    self._fail(side, phase, err)
                    del calls[side]
                    continue
                if i >= self.warmup:
                    times[side].append(seconds)
        for side in calls:
            self.rates[side][phase] = batch / statistics.median(times[side])
            print(f"  {side:6s} {phase:9s} {self.rates[side][phase]:10.1f} img/s", file=sys.stderr)
            if self.profile:
                self._profile(side, phase, calls[side])

    def _profile(self, side: str, phase: str, step: Step) -> None:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU]
        if self.device.type == "cuda":
            activities.append(ProfilerActivity.CUDA)
        try:
            with profile(activities=activities) as prof:
                self._seconds(step)
            sort = "self_device_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=25, max_name_column_width=60)
        except Exception as err:  # noqa: BLE001 - a profile is extra; the figures stand
            self._fail(side, f"{phase}.profile", err)
            return
        with self.profile.open("a") as out:
            out.write(f"## {side} {phase}\n{table}\n")

    def _seconds(self, step: Step) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        start = time.perf_counter()
        step()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter() - start

    def _fail(self, side: str, phase: str, err: Exception) -> None:
        traceback.print_exc()
        self.errors[f"{side}.{phase}"] = repr(err)[:300]


def release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
