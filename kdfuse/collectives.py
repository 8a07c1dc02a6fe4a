"""Every collective kdfuse issues, through three functions that count what they send.

A vocab-parallel call (``fused_linear_distill(..., process_group=group)``) communicates only
through :func:`all_reduce` and :func:`all_gather_columns` (:func:`shard_layout`, once per call,
all-reduces the ranks' shard sizes). :func:`counting` records the calls and bytes inside a block,
so a test (or a user) can check what a call sends::

    with kdfuse.collectives.counting() as sent:
        loss = fused_linear_distill(..., process_group=group)
    sent.calls, sent.bytes  # this rank's collectives and the bytes of its input tensors
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = [
    "Sent",
    "Shard",
    "all_gather_columns",
    "all_reduce",
    "counting",
    "gathered",
    "group_of",
    "local_rows",
    "shard_layout",
]


@dataclass
class Sent:
    """What this rank sent inside a :func:`counting` block: collectives by kind, and the bytes of
    their input tensors (an all-reduce of a (C, 4) float32 tensor counts 16·C bytes)."""

    calls: Counter = field(default_factory=Counter)
    bytes: int = 0

    def add(self, kind: str, t: Tensor) -> None:
        self.calls[kind] += 1
        self.bytes += t.numel() * t.element_size()


_active: list[Sent] = []


@contextlib.contextmanager
def counting() -> Iterator[Sent]:
    """Record the collectives this process issues through this module inside the block."""
    sent = Sent()
    _active.append(sent)
    try:
        yield sent
    finally:
        _active.remove(sent)


def _record(kind: str, t: Tensor) -> None:
    for sent in _active:
        sent.add(kind, t)


def all_reduce(t: Tensor, op: dist.ReduceOp, group: dist.ProcessGroup) -> Tensor:
    """``t`` reduced over ``group`` in place (and returned)."""
    _record(f"all_reduce_{str(op).split('.')[-1].lower()}", t)
    dist.all_reduce(t, op=op, group=group)
    return t


@dataclass(frozen=True)
class Shard:
    """This rank's part of a vocabulary split over ``group``: contiguous rows, in rank order."""

    group: dist.ProcessGroup
    rank: int  # in the group
    sizes: tuple[int, ...]  # rows per rank, in rank order (they may differ, and be 0)

    @property
    def start(self) -> int:
        """This rank's first row of the full vocabulary."""
        return sum(self.sizes[: self.rank])

    @property
    def rows(self) -> int:
        return self.sizes[self.rank]

    @property
    def vocab(self) -> int:
        """The full vocabulary V (the sum of the shards)."""
        return sum(self.sizes)


def shard_layout(group: dist.ProcessGroup, rows: int, device: torch.device) -> Shard:
    """The layout of a vocabulary of which this rank holds ``rows`` rows: one all-reduce of the
    ranks' sizes (W integers) and a host sync, on every call. Not memoised: a rank cannot tell
    from its own row count alone that another rank's changed (its shard may keep its size while
    the others' move), and a stale layout would pair collectives wrongly."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    sizes = torch.zeros(world, dtype=torch.int64, device=device)
    sizes[rank] = rows
    all_reduce(sizes, dist.ReduceOp.SUM, group)
    return Shard(group, rank, tuple(sizes.tolist()))


def all_gather_columns(x: Tensor, shard: Shard) -> Tensor:
    """(C, V): every rank's (C, V_r) columns side by side, in rank order. Gloo gathers only equal
    sizes, so each rank sends its columns padded to the largest shard."""
    widest = max(shard.sizes)
    padded = torch.nn.functional.pad(x, (0, widest - x.shape[1]))
    _record("all_gather", padded)
    parts = [torch.empty_like(padded) for _ in shard.sizes]
    dist.all_gather(parts, padded.contiguous(), group=shard.group)
    return torch.cat([p[:, :size] for p, size in zip(parts, shard.sizes)], dim=1)


# --------------------------------------------------------------------------------------------
# Weights given as DTensors.
# --------------------------------------------------------------------------------------------


def group_of(process_group: object) -> dist.ProcessGroup:
    """A ``process_group=`` argument as a process group: a group as it is, or a 1-D
    ``DeviceMesh``'s group (tensor parallelism over that mesh)."""
    get_group = getattr(process_group, "get_group", None)
    if get_group is None:
        return process_group
    if process_group.ndim != 1:
        raise ValueError(
            f"process_group: a DeviceMesh must be 1-D (its tensor-parallel dim), got {process_group.ndim}-D"
        )
    return get_group()


def _is_dtensor(t: object) -> bool:
    if not (isinstance(t, Tensor) and dist.is_available()):
        return False
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def local_rows(t: Tensor | None, name: str) -> Tensor | None:
    """A tensor-parallel weight's (or bias's) rows on this rank: a DTensor sharded on dim 0 over
    a 1-D mesh becomes its local shard (differentiably: its gradient comes back as a DTensor of
    the same placement); a plain tensor is already this rank's rows."""
    if not _is_dtensor(t):
        return t
    from torch.distributed.tensor import Shard as ShardPlacement

    if t.device_mesh.ndim != 1 or tuple(t.placements) != (ShardPlacement(0),):
        raise ValueError(f"{name}: a DTensor weight must be sharded on dim 0 over a 1-D mesh, got {t.placements}")
    return t.to_local()


def gathered(t: Tensor | None) -> Tensor | None:
    """A DTensor parameter sharded by FSDP2 (not vocabulary parallelism: every rank has its own
    data) as the full tensor, gathered once per call. Its gradient is reduce-scattered back to
    the shards and averaged over the mesh, as FSDP2 averages every gradient by default; without
    gradient (a frozen teacher's weight) it is only gathered. A plain tensor is returned as is."""
    if not _is_dtensor(t):
        return t
    if not t.requires_grad:
        with torch.no_grad():
            return t.full_tensor()
    from torch.distributed.tensor import Partial

    return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)
