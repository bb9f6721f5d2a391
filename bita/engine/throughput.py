"""Samples/s and model-FLOPs utilisation between two log points.

Measured over a whole logging window, so no per-step device sync is needed: the loss read-out
at each log point already waits for the queued work.
"""

from __future__ import annotations

import time


class ThroughputMeter:
    """Counts optimizer steps between `measure` calls.

    MFU = flops_per_sample x samples/s / (peak_tflops x 1e12 x world_size); it is reported only
    when both the model's FLOPs estimate and the device peak (`hardware.peak_tflops`) are known.
    """

    def __init__(
        self,
        global_batch_size: int,
        world_size: int,
        flops_per_sample: float | None = None,
        peak_tflops: float | None = None,
    ) -> None:
        self.global_batch_size = global_batch_size
        self.flops_per_sample = flops_per_sample
        self.peak_flops = peak_tflops * 1e12 * world_size if peak_tflops else None
        self._start = time.perf_counter()
        self._steps = 0

    def step(self) -> None:
        self._steps += 1

    def measure(self) -> dict[str, float]:
        """Rates since the previous call, then restart the window."""
        now = time.perf_counter()
        elapsed = max(now - self._start, 1e-9)
        rates = {"samples_per_s": self._steps * self.global_batch_size / elapsed}
        if self.flops_per_sample and self.peak_flops:
            rates["mfu"] = self.flops_per_sample * rates["samples_per_s"] / self.peak_flops
        self._start, self._steps = now, 0
        return rates
