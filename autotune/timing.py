"""Time a zero-argument callable and measure the extra device memory it needs."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

__all__ = ["measure", "resolve_device"]


def resolve_device(device: torch.device | str | None = None) -> torch.device:
    """Return ``device`` as a ``torch.device``; ``None`` means the current CUDA device, else CPU."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"unsupported device type {device.type!r}: expected 'cuda' or 'cpu'")
    return device


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 3,
    repeat: int = 10,
    device: torch.device | str | None = None,
) -> tuple[float, int]:
    """Run ``fn`` ``warmup`` times untimed, then ``repeat`` times timed.

    Returns ``(median milliseconds, peak extra bytes)``. On CUDA each call is timed with a pair of
    events and the peak is ``max_memory_allocated`` above what was allocated before the timed calls.
    On CPU each call is timed with ``time.perf_counter`` and peak memory is not measured (always 0).
    """
    if warmup < 0 or repeat < 1:
        raise ValueError(f"need warmup >= 0 and repeat >= 1, got {warmup=} {repeat=}")
    device = resolve_device(device)
    if device.type == "cuda":
        return _measure_cuda(fn, warmup, repeat, device)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), 0


def _measure_cuda(fn: Callable[[], object], warmup: int, repeat: int, device: torch.device) -> tuple[float, int]:
    with torch.cuda.device(device):
        # Warm-up first so compilation, autotuning and allocator growth are not charged to the timing.
        for _ in range(warmup):
            fn()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeat)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    return statistics.median([start.elapsed_time(end) for start, end in events]), max(peak, 0)
