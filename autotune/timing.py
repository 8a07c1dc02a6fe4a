"""Time a zero-argument callable and measure the extra device memory it needs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Hashable, Mapping
from typing import TypeVar

import torch

__all__ = ["measure", "measure_interleaved", "resolve_device", "timed_calls"]

K = TypeVar("K", bound=Hashable)


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
    times, peak = timed_calls(fn, warmup=warmup, repeat=repeat, device=device)
    return statistics.median(times), peak


def measure_interleaved(
    fns: Mapping[K, Callable[[], object]],
    *,
    rounds: int = 3,
    warmup: int = 3,
    repeat: int = 10,
    device: torch.device | str | None = None,
    settle: float = 0.0,
) -> dict[K, tuple[float, int]]:
    """:func:`measure` for several functions, in ``rounds`` rounds that each run every function
    (``warmup`` untimed calls, and more until ``settle`` seconds have passed, then ``repeat``
    timed, back to back).

    Returns ``{key: (median milliseconds over all its timed calls, largest peak extra bytes)}``.
    Why rounds: a GPU at its power limit changes its clocks within a second or so of load, so
    functions timed one after the other see different clocks and their ratios depend on their
    order; interleaved, they share the device's recent history. A few untimed calls leave each
    function's timed ones with the clock its predecessor's load left; ``settle`` (about a second
    is enough on a Hopper GPU) runs each one long enough to time it at the clock its own load
    settles at, the clock it runs at when called over and over, as a training loop calls it.
    """
    if rounds < 1:
        raise ValueError(f"need rounds >= 1, got {rounds}")
    _check_counts(warmup, repeat)
    device = resolve_device(device)
    times: dict[K, list[float]] = {key: [] for key in fns}
    peaks = dict.fromkeys(fns, 0)
    for _ in range(rounds):
        for key, fn in fns.items():
            calls, peak = timed_calls(fn, warmup=warmup, repeat=repeat, device=device, settle=settle)
            times[key] += calls
            peaks[key] = max(peaks[key], peak)
    return {key: (statistics.median(times[key]), peaks[key]) for key in fns}


def _check_counts(warmup: int, repeat: int) -> None:
    if warmup < 0 or repeat < 1:
        raise ValueError(f"need warmup >= 0 and repeat >= 1, got {warmup=} {repeat=}")


def timed_calls(
    fn: Callable[[], object],
    *,
    warmup: int = 3,
    repeat: int = 10,
    device: torch.device | str | None = None,
    settle: float = 0.0,
) -> tuple[list[float], int]:
    """:func:`measure`'s calls, each one's time kept: ``([milliseconds per timed call], peak extra
    bytes)``, e.g. to watch the clocks drift over back-to-back calls. The untimed calls go on past
    ``warmup`` until ``settle`` seconds have passed (see :func:`measure_interleaved`)."""
    _check_counts(warmup, repeat)
    if settle < 0:
        raise ValueError(f"need settle >= 0, got {settle}")
    device = resolve_device(device)
    if device.type == "cuda":
        return _timed_calls_cuda(fn, warmup, repeat, device, settle)
    _warm_up(fn, warmup, settle, sync=lambda: None)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return times, 0


def _warm_up(fn: Callable[[], object], warmup: int, settle: float, sync: Callable[[], None]) -> None:
    """``warmup`` calls, and more until ``settle`` seconds have passed. Each call past the first
    ``warmup`` waits for the device (``sync``): the seconds are the device's, not those of a
    host running ahead of it."""
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    while time.perf_counter() - start < settle:
        fn()
        sync()


def _timed_calls_cuda(
    fn: Callable[[], object], warmup: int, repeat: int, device: torch.device, settle: float
) -> tuple[list[float], int]:
    with torch.cuda.device(device):
        # Warm-up first so compilation, autotuning and allocator growth are not charged to the timing.
        _warm_up(fn, warmup, settle, sync=torch.cuda.synchronize)
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
    return [start.elapsed_time(end) for start, end in events], max(peak, 0)
