"""A persistent JSON cache of tuning results: one file per device, entries tagged with software versions."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import torch

from .timing import resolve_device

try:
    import fcntl
except ImportError:  # Windows: writes stay atomic, but concurrent writers may drop each other's entries.
    fcntl = None

__all__ = [
    "TuningCache",
    "TuningCacheWarning",
    "default_cache_dir",
    "device_identity",
    "software_versions",
    "write_atomic",
]

Key = Mapping[str, object] | str


class TuningCacheWarning(UserWarning):
    """A cache file could not be read or written; the cache carries on (rebuilt, or in memory)."""


_warned: set[tuple[str, Path]] = set()  # (reason, path) pairs already reported by this process


def _warn_once(reason: str, path: Path, message: str) -> None:
    if (reason, path) not in _warned:
        _warned.add((reason, path))
        warnings.warn(message, TuningCacheWarning, stacklevel=3)


def default_cache_dir(app_name: str) -> Path:
    """``$XDG_CACHE_HOME/app_name``, or ``~/.cache/app_name`` when that variable is unset or not absolute."""
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / app_name


def device_identity(device: torch.device | str | None = None) -> str:
    """Name the hardware tuning results belong to: e.g. ``"NVIDIA H100 80GB HBM3 (sm_90)"`` or ``"cpu:<model>"``."""
    device = resolve_device(device)
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    return f"cpu:{_cpu_model()}"


def _cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine() or "unknown"


def software_versions(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Versions that invalidate tuning results: torch, triton (``"none"`` if absent), python, plus ``extra``."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"torch": torch.__version__, "triton": triton_version, "python": platform.python_version(), **(extra or {})}


def _read_umask() -> int:
    """The process's umask, left as it was."""
    # os.umask reads the mask only by setting it, process-wide: a file another thread creates
    # meanwhile gets the restrictive 0o077 (private), never 0 (world-writable).
    umask = os.umask(0o077)
    os.umask(umask)
    return umask


# Read once, at import, rather than racing other threads on every write.
_UMASK = _read_umask()


def write_atomic(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """``write(file)`` into a temporary file beside ``path`` (``.<name>.<random>.tmp``), flushed to
    disk, then renamed over ``path``: readers see the old file or the complete new one, never a
    partial one, and concurrent writers never share a temporary. The file gets the mode ``open``
    would give it (0666 & ~umask, the umask as it was at import): ``mkstemp`` makes it 0600
    whatever the umask, which would lock the other users of a shared directory out."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")


def _canonical(key: Key) -> str:
    return key if isinstance(key, str) else json.dumps(dict(key), sort_keys=True, separators=(",", ":"))


class TuningCache:
    """Tuning results for one device, stored in ``cache_dir/<device slug>.json``.

    The file holds ``{"device": identity, "entries": {key: {"versions": ..., "value": ...}}}``. An entry
    hits only when its stored versions equal ``versions`` (default: :func:`software_versions`), so a
    software upgrade misses instead of reusing stale results (``identity`` and ``versions`` are kept as
    attributes). Mapping keys are serialised canonically.
    Values must be JSON-serialisable; they come back as JSON would return them (tuples as lists).

    Every call reads the file, so entries written by other processes are seen; callers memoise hot
    lookups. Writes merge under an exclusive ``flock`` and land by atomic rename, so concurrent
    writers neither lose each other's entries nor leave a torn file; the file gets the mode ``open``
    would give it (0666 & ~umask, the umask as it was at import). A corrupt file is reported once
    and rebuilt; a location that cannot be written is reported once and the cache continues in memory.
    """

    def __init__(
        self,
        cache_dir: str | os.PathLike[str],
        device: torch.device | str | None = None,
        versions: Mapping[str, str] | None = None,
    ) -> None:
        self.identity = device_identity(device)
        self.versions = dict(software_versions() if versions is None else versions)
        self._path = Path(cache_dir) / f"{_slug(self.identity)}.json"
        self._memory: dict[str, dict] | None = None  # set once the file cannot be written

    @property
    def path(self) -> Path:
        return self._path

    def get(self, key: Key) -> object | None:
        """The value stored under ``key`` with the current versions, else ``None``."""
        entry = self._entries().get(_canonical(key))
        return entry.get("value") if entry is not None and entry.get("versions") == self.versions else None

    def put(self, key: Key, value: object) -> None:
        """Store ``value`` under ``key`` for the current versions, replacing any previous entry."""
        # The JSON round trip rejects unserialisable values before any I/O, and makes memory mode
        # return exactly what the file would (tuples as lists).
        name, entry = _canonical(key), json.loads(json.dumps({"versions": self.versions, "value": value}))
        self._update(lambda entries: entries.update({name: entry}))

    def entries(self) -> dict[str, object]:
        """Every ``{key: value}`` stored with the current versions."""
        return {k: e.get("value") for k, e in self._entries().items() if e.get("versions") == self.versions}

    def clear(self) -> None:
        """Remove every entry, whatever its versions."""
        self._update(dict.clear)

    def _entries(self) -> dict[str, dict]:
        return self._memory if self._memory is not None else self._read()

    def _read(self) -> dict[str, dict]:
        try:
            with open(self._path, encoding="utf-8") as f:
                doc = json.load(f)
        except (FileNotFoundError, NotADirectoryError):  # nothing stored yet
            return {}
        except (OSError, ValueError) as exc:  # ValueError covers JSONDecodeError and UnicodeDecodeError
            _warn_once("corrupt", self._path, f"ignoring unreadable tuning cache {self._path} ({exc}); rebuilding it")
            return {}
        valid = (
            isinstance(doc, dict)
            and doc.get("device") == self.identity
            and isinstance(doc.get("entries"), dict)
            and all(isinstance(e, dict) for e in doc["entries"].values())
        )
        if not valid:
            _warn_once("corrupt", self._path, f"ignoring malformed tuning cache {self._path}; rebuilding it")
            return {}
        return doc["entries"]

    def _update(self, change: Callable[[dict[str, dict]], object]) -> None:
        """Apply ``change`` to the entries: read-merge-write under the lock, or in memory."""
        if self._memory is None:
            try:
                self._path.parent.mkdir(parents=True, exist_ok=True)
                with self._locked():
                    entries = self._read()
                    change(entries)
                    self._write({"device": self.identity, "entries": entries})
                return
            except OSError as exc:
                message = f"cannot write tuning cache {self._path} ({exc}); keeping results in memory"
                _warn_once("unwritable", self._path, message)
                self._memory = self._read()
        change(self._memory)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        if fcntl is None:
            yield
            return
        # A sibling lock file, because the data file itself is replaced (a new inode) on every write.
        # Opened read-only (flock needs no more), so another user of a shared cache directory can
        # lock a lock file that their umask-0644 colleague created.
        fd = os.open(self._path.with_name(self._path.name + ".lock"), os.O_RDONLY | os.O_CREAT, 0o666)
        with os.fdopen(fd) as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            yield

    def _write(self, doc: dict) -> None:
        write_atomic(self._path, lambda f: f.write(json.dumps(doc, indent=1, sort_keys=True).encode()))
