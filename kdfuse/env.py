"""Every environment knob kdfuse reads, in one place, all under the ``KDFUSE_`` prefix.

* ``KDFUSE_AUTOTUNE`` (default ``1``): ``0`` never measures; ``chunk_size="auto"`` then uses
  cached results (e.g. from ``kdfuse tune``) or else the heuristic.
* ``KDFUSE_CACHE_DIR`` (default ``autotune.default_cache_dir("kdfuse")``, i.e.
  ``$XDG_CACHE_HOME/kdfuse`` or ``~/.cache/kdfuse``): where tuning results are stored, one file
  per device.
* ``KDFUSE_PRINT_AUTOTUNING`` (default ``0``): ``1`` prints each ``chunk_size="auto"`` choice
  to stderr, once per shape and process, with where it came from (cache, tuning, heuristic).
* ``KDFUSE_FORCE_RETUNE`` (default ``0``): ``1`` ignores cached results and measures again.
* ``KDFUSE_MEMORY_BUDGET`` (default: none): bytes (``8e9``, ``16GiB``, ``512MB``), or a
  fraction in (0, 1] of the CUDA device's free memory (``0.5``; no bound on a CPU).

Booleans accept ``1/0``, ``true/false``, ``yes/no``, ``on/off``; an unset or empty variable means
the default, anything else unparsable raises ``ValueError`` naming the variable.

:func:`settings` reads ``os.environ`` on every call (parsing is memoised on the raw strings), so
a change to the environment, e.g. ``monkeypatch.setenv`` in a test, applies to the next call.
"""

from __future__ import annotations

import functools
import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path

from autotune import default_cache_dir

__all__ = ["PREFIX", "MemoryBudget", "Settings", "check_memory_budget", "parse_memory_budget", "settings"]

PREFIX = "KDFUSE_"

MemoryBudget = int | float
"""An ``int`` > 1 is a number of bytes; a ``float`` in (0, 1] is a fraction of free device memory."""

_NAMES = ("AUTOTUNE", "CACHE_DIR", "PRINT_AUTOTUNING", "FORCE_RETUNE", "MEMORY_BUDGET")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip
_SIZE = re.compile(r"^\s*(?P<number>[0-9.eE+-]+)\s*(?P<unit>[A-Za-z]*)\s*$")


@dataclass(frozen=True)
class Settings:
    """The parsed ``KDFUSE_*`` environment (hashable, so it can be part of a memo key)."""

    autotune: bool
    cache_dir: Path
    print_autotuning: bool
    force_retune: bool
    memory_budget: MemoryBudget | None


def check_memory_budget(value: float) -> MemoryBudget:
    """Normalise a budget, any real number (NumPy scalars too) but a bool: a value in (0, 1]
    becomes a ``float`` fraction, a larger one an ``int`` number of bytes (it must be whole).
    Raises ``ValueError`` for anything else."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value <= 0:
        raise ValueError(
            f"memory budget must be bytes > 1 (e.g. 16 * 2**30) or a fraction in (0, 1] of free device "
            f"memory (e.g. 0.5), got {value!r}"
        )
    if value <= 1:
        return float(value)
    if value != int(value):
        raise ValueError(f"a memory budget above 1 is a number of bytes and must be whole, got {value!r}")
    return int(value)


def parse_memory_budget(text: str) -> MemoryBudget:
    """Parse ``"0.5"`` (a fraction), ``"8000000000"``, ``"8e9"``, ``"16GiB"`` or ``"512MB"`` (bytes)."""
    match = _SIZE.match(text)
    unit = match["unit"].lower() if match else ""
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot parse memory budget {text!r}: expected e.g. 0.5, 8e9, 16GiB or 512MB")
    try:
        number = float(match["number"])
    except ValueError:
        raise ValueError(f"cannot parse memory budget {text!r}: expected e.g. 0.5, 8e9, 16GiB or 512MB") from None
    if unit:  # with a unit it is always bytes, even "0.5GiB"
        if not (math.isfinite(number) and number * _UNITS[unit] > 1):
            raise ValueError(f"memory budget {text!r} must be more than 1 byte")
        return int(number * _UNITS[unit])
    return check_memory_budget(number)


def _flag(raw: str, name: str, default: bool) -> bool:
    raw = raw.strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ValueError(f"{PREFIX}{name}={raw!r}: expected one of {', '.join(_TRUE + _FALSE)}")


def _memory_budget(raw: str) -> MemoryBudget | None:
    if not raw.strip():
        return None
    try:
        return parse_memory_budget(raw)
    except ValueError as exc:
        raise ValueError(f"{PREFIX}MEMORY_BUDGET: {exc}") from None


# The variables settings() depends on: ours, and those default_cache_dir reads.
_VARIABLES = tuple(PREFIX + name for name in _NAMES) + ("XDG_CACHE_HOME", "HOME")


@functools.lru_cache(maxsize=16)
def _parse(autotune: str, cache_dir: str, print_: str, force: str, budget: str, *_defaults: str) -> Settings:
    """Settings from raw values; memoised on them (``_defaults`` only key the default cache dir)."""
    return Settings(
        autotune=_flag(autotune, "AUTOTUNE", True),
        cache_dir=Path(cache_dir.strip()).expanduser() if cache_dir.strip() else default_cache_dir("kdfuse"),
        print_autotuning=_flag(print_, "PRINT_AUTOTUNING", False),
        force_retune=_flag(force, "FORCE_RETUNE", False),
        memory_budget=_memory_budget(budget),
    )


def settings() -> Settings:
    """The current ``KDFUSE_*`` settings, read from ``os.environ`` now (parsing is memoised on
    the raw values, so this costs a few dict lookups)."""
    return _parse(*(os.environ.get(name, "") for name in _VARIABLES))
