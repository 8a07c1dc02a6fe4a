"""Persistent worlds for the distributed tests: gloo on the CPU (loopback only) by default, NCCL
on GPUs when asked.

``world(n)`` starts n ranks once per pytest run and ``run(fn, *args)`` runs a module-level
function on every rank, returning the ranks' results in rank order, so many cases share one
world (a case costs milliseconds, a world's start about a second). Ranks are forked from a
forkserver that has imported torch (a plain ``fork`` of a pytest process that ran OpenMP work
hangs on the child's first parallel op; ``spawn`` re-imports torch per rank; importing torch does
not initialise CUDA, so NCCL ranks fork from it too) and meet through a fresh ``file://`` store
(no free-port race). A rank that raises makes ``run`` fail at once with every rank's traceback
(the others may be blocked in a collective the failed rank never entered: the world is killed
and the next ``run`` starts a new one); the backend's timeout bounds a collective that never
completes, and ``run`` has a deadline of its own.

Environment (read once, at import):

* ``KDFUSE_DIST_BACKEND``: ``gloo`` (default: CPU tensors, what CI runs) or ``nccl`` (rank r
  works on ``cuda:r``; a world larger than the visible GPUs is skipped, with the reason). A
  rank's code puts its tensors on :func:`rank_device`.
* ``KDFUSE_DIST_WORLDS``: the world sizes the tests parametrise over, comma-separated
  (default ``2,3``; e.g. ``2,4,8`` on an 8-GPU machine).

With NCCL the ranks keep NVLink multicast off (``NCCL_NVLS_ENABLE=0``,
``TORCH_SYMM_MEM_DISABLE_MULTICAST=1``, ``NVSHMEM_DISABLE_NVLS=1``) unless the environment sets
those variables already.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    import torch

__all__ = ["BACKEND", "WORLDS", "WorkerError", "close_worlds", "rank_device", "world"]

_COLLECTIVE_TIMEOUT_S = 180  # (ranks compiling on a loaded 2-core CI machine wait on each other)
_BACKENDS = ("gloo", "nccl")
# Multicast over NVLink can take a host's shared GPUs out of service: never let a test enable it.
_NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def _backend() -> str:
    backend = os.environ.get("KDFUSE_DIST_BACKEND", "") or "gloo"
    if backend not in _BACKENDS:
        raise ValueError(f"KDFUSE_DIST_BACKEND must be one of {_BACKENDS}, got {backend!r}")
    return backend


def _worlds() -> list[int]:
    text = os.environ.get("KDFUSE_DIST_WORLDS", "") or "2,3"
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"KDFUSE_DIST_WORLDS must be comma-separated integers, got {text!r}") from None
    if any(size < 2 for size in sizes):
        raise ValueError(f"KDFUSE_DIST_WORLDS: a world has at least 2 ranks, got {text!r}")
    return sizes


BACKEND = _backend()
WORLDS = _worlds()


def rank_device() -> torch.device:
    """The device this rank's tensors live on: ``cuda:rank`` with NCCL, else the CPU."""
    import torch

    return torch.device("cuda", torch.cuda.current_device()) if BACKEND == "nccl" else torch.device("cpu")


class WorkerError(AssertionError):
    """A rank raised: pytest shows it as a failed assertion, with every rank's traceback."""


def _init(rank: int, size: int, init_method: str) -> None:
    """This rank's process group (with NCCL: bound to ``cuda:rank``, multicast off)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)  # several ranks share the CI machine's cores
    device = None
    if BACKEND == "nccl":
        for name, value in _NO_MULTICAST.items():
            os.environ.setdefault(name, value)
        torch.cuda.set_device(rank)
        device = torch.device("cuda", rank)
    dist.init_process_group(
        BACKEND,
        init_method=init_method,
        rank=rank,
        world_size=size,
        timeout=timedelta(seconds=_COLLECTIVE_TIMEOUT_S),
        device_id=device,
    )


def _serve(rank: int, size: int, init_method: str, conn) -> None:
    import torch.distributed as dist

    try:
        _init(rank, size, init_method)
        conn.send(("ok", None))
    except BaseException:
        conn.send(("err", traceback.format_exc()))
        return
    parent = mp.parent_process()
    while parent is None or parent.is_alive():  # an orphan (pytest killed) exits by itself
        if not conn.poll(1.0):
            continue
        message = conn.recv()
        if message is None:
            break
        fn, args = message
        try:
            conn.send(("ok", fn(*args)))
        except BaseException:
            conn.send(("err", traceback.format_exc()))
    dist.destroy_process_group()


class _World:
    def __init__(self, size: int) -> None:
        self.size = size
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(["torch", "torch.distributed"])  # (only before the server starts)
        self._store = tempfile.TemporaryDirectory(prefix=f"kdfuse-{BACKEND}-")
        init = f"file://{self._store.name}/store"  # a store file must not be reused by another world
        self.procs, self.conns = [], []
        for rank in range(self.size):
            ours, theirs = ctx.Pipe()
            proc = ctx.Process(target=_serve, args=(rank, self.size, init, theirs), daemon=True)
            proc.start()
            theirs.close()
            self.procs.append(proc)
            self.conns.append(ours)
        self._collect("init_process_group", _COLLECTIVE_TIMEOUT_S + 30)

    def close(self, kill: bool = False) -> None:
        for conn in self.conns:
            if not kill:
                with contextlib.suppress(OSError):
                    conn.send(None)
        for proc in self.procs:
            proc.join(0 if kill else 5)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []
        self._store.cleanup()

    def run(self, fn: Callable[..., Any], *args: Any, timeout_s: float = 120) -> list[Any]:
        """``fn(*args)`` on every rank; the results in rank order. ``fn`` must be a module-level
        function of an importable module (the test module is one)."""
        __tracebackhide__ = True
        if len(self.procs) != self.size or not all(proc.is_alive() for proc in self.procs):
            if self.procs:
                self.close(kill=True)
            self._start()
        for conn in self.conns:
            conn.send((fn, args))
        return self._collect(fn.__qualname__, timeout_s)

    def _collect(self, what: str, timeout_s: float) -> list[Any]:
        __tracebackhide__ = True
        deadline = time.monotonic() + timeout_s
        results, errors = {}, {}
        pending = {conn: rank for rank, conn in enumerate(self.conns)}
        while pending and not errors:
            ready = mpc.wait([*pending, *(p.sentinel for p in self.procs)], max(0.0, deadline - time.monotonic()))
            if not ready:
                self.close(kill=True)
                raise TimeoutError(f"{what}: ranks {sorted(pending.values())} gave no result in {timeout_s:.0f} s")
            for conn in [c for c in ready if c in pending]:
                rank = pending.pop(conn)
                try:
                    status, payload = conn.recv()
                except EOFError:
                    status, payload = "err", f"rank {rank} closed its pipe"
                (results if status == "ok" else errors)[rank] = payload
            for rank, proc in enumerate(self.procs):
                if not proc.is_alive() and self.conns[rank] in pending and not self.conns[rank].poll(0):
                    pending.pop(self.conns[rank])
                    errors[rank] = f"rank {rank} died (exit code {proc.exitcode})"
        if errors:
            self.close(kill=True)
            body = "\n".join(f"----- rank {rank} -----\n{text}" for rank, text in sorted(errors.items()))
            raise WorkerError(f"{what} failed on rank(s) {sorted(errors)} of {self.size}:\n{body}")
        return [results[rank] for rank in range(self.size)]


_worlds: dict[int, _World] = {}


def world(size: int) -> _World:
    """This pytest run's world of ``size`` ranks, started on first use; with NCCL, a test that needs
    more ranks than there are visible GPUs (one per rank) is skipped."""
    if BACKEND == "nccl":
        import torch

        visible = torch.cuda.device_count()
        if visible < size:
            pytest.skip(f"a world of {size} ranks with NCCL needs {size} GPUs, {visible} visible")
    if size not in _worlds:
        _worlds[size] = _World(size)
    return _worlds[size]


def close_worlds() -> None:
    while _worlds:
        _worlds.popitem()[1].close()
