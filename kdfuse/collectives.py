"""Every collective kdfuse issues, through three functions that count what they send.

A vocab-parallel call (``fused_linear_distill(..., process_group=group)``) communicates only
through :func:`all_reduce` and :func:`all_gather_columns` (:func:`shard_layout`, once per call,
all-reduces the ranks' shard sizes and what they must agree on). :func:`counting` records the
calls and bytes inside a block, so a test (or a user) can check what a call sends::

    with kdfuse.collectives.counting() as sent:
        loss = fused_linear_distill(..., process_group=group)
    sent.calls, sent.bytes  # this rank's collectives and the bytes of its input tensors
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import NoReturn

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
    "raise_together",
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


def _exchange(group: dist.ProcessGroup, device: torch.device, row: list[int]) -> list[list[int]]:
    """Every rank's ``row`` of integers, in rank order: one all-reduce and a host sync."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    table = torch.zeros(world, len(row), dtype=torch.int64, device=device)
    table[rank] = torch.tensor(row, dtype=torch.int64)
    all_reduce(table, dist.ReduceOp.SUM, group)
    return table.tolist()


def shard_layout(group: dist.ProcessGroup, rows: int, device: torch.device, tokens: int, chunk_size: int) -> Shard:
    """The layout of a vocabulary of which this rank holds ``rows`` rows, agreed on every call
    with one all-reduce of four integers per rank (and a host sync): its rows, its ``tokens``
    (the call's N), its int ``chunk_size`` (0 for ``"auto"``) and whether it failed (see
    :func:`raise_together`). Not memoised: a rank cannot tell from its own row count that
    another rank's changed, and a stale layout would pair the collectives wrongly. Raises on
    every rank if a rank failed, or if the ranks' N or chunk sizes differ (their collectives
    would not pair up)."""
    table = _exchange(group, device, [rows, tokens, chunk_size, 0])
    failed = [r for r, row in enumerate(table) if row[3]]
    if failed:
        raise RuntimeError(
            f"ranks {failed} of the process group rejected their inputs (their errors say why); every rank "
            "raises, so that none waits in a collective the others never enter"
        )
    for column, what in ((1, "rows (student_hidden's N)"), (2, "chunk_size")):
        values = [row[column] for row in table]
        if len(set(values)) > 1:
            shown = ["auto" if column == 2 and v == 0 else v for v in values]
            raise ValueError(f"with a process_group every rank passes the same {what}; by rank: {shown}")
    return Shard(group, dist.get_rank(group), tuple(row[0] for row in table))


def raise_together(group: dist.ProcessGroup, device: torch.device, error: BaseException) -> NoReturn:
    """Raise ``error`` on this rank after telling the others, which then raise too (from
    :func:`shard_layout`, which this pairs with): a rank that raised alone would leave the
    others blocked in the call's first collective."""
    _exchange(group, device, [0, 0, 0, 1])
    raise error


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


def gathered(t: Tensor | None, dtype: torch.dtype | None = None) -> Tensor | None:
    """A DTensor parameter sharded by FSDP2 (not vocabulary parallelism: every rank has its own
    data) as the full tensor, gathered once per call. A floating shard is first cast to
    ``dtype`` (its model's hidden states' dtype: under an FSDP2 mixed-precision policy the
    shards stay float32 outside the module's forward, and the forward would compute in
    ``param_dtype``), which also halves the bytes gathered. Its gradient is reduce-scattered
    back to the shards and averaged over the mesh, as FSDP2 averages every gradient by default;
    without gradient (a frozen teacher's weight) it is only gathered. A plain tensor is returned
    as is."""
    if not _is_dtensor(t):
        return t
    if dtype is not None and t.is_floating_point() and t.dtype != dtype:
        t = t.to(dtype)  # (local: a DTensor's cast casts its shard; differentiable)
    if not t.requires_grad:
        with torch.no_grad():
            return t.full_tensor()
    from torch.distributed.tensor import Partial

    return t.full_tensor(grad_placements=[Partial("avg")] * t.device_mesh.ndim)
