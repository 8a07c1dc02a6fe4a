"""Small, general autotuning: time candidates, pick the fastest within a memory budget, cache the
winner (with the atomic file writes the cache needs)."""

from .cache import TuningCache, TuningCacheWarning, default_cache_dir, device_identity, software_versions, write_atomic
from .timing import measure, measure_interleaved, resolve_device, timed_calls
from .tuner import Measurement, TuneResult, tune

__all__ = [
    "Measurement",
    "TuneResult",
    "TuningCache",
    "TuningCacheWarning",
    "default_cache_dir",
    "device_identity",
    "measure",
    "measure_interleaved",
    "resolve_device",
    "software_versions",
    "timed_calls",
    "tune",
    "write_atomic",
]
