"""The work on one chunk of rows: its per-row losses and their gradient w.r.t. the student logits.

Two paths, one semantics:

* generic: ``torch.func.grad`` of the pure per-row loss (:func:`row_losses`), so any user
  divergence works, compiled by ``torch.compile`` once per :class:`ChunkSpec` (each spec with a
  code object of its own: :mod:`kdfuse.compiled`);
* fast: a built-in's hand-written Triton kernel (the registry entry's ``kernel``:
  :mod:`kdfuse.triton_chunk` for dense teachers, :mod:`kdfuse.triton_topk` for top-k ones), on
  CUDA, which writes the logit gradient over the chunk's student logits.

Everything numeric that may change between calls travels in the scalars tensor
(:mod:`kdfuse.scalars`), so a new temperature, weight or divergence parameter never recompiles.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

from . import scalars as S
from .compiled import compile_bound
from .divergences import LOGPROB_FLOOR
from .registry import entry_of

__all__ = ["ChunkSpec", "call", "chunk_fn", "fast_kernel", "loss_and_grad", "row_losses", "with_kernel"]


@dataclass(frozen=True)
class ChunkSpec:
    """What a chunk function is specialised on (one compiled graph, or one kernel variant, each)."""

    fn: Callable[..., Tensor]  # the divergence's pure function (kdfuse.divergences.Parametrized.fn)
    n_args: int  # its tensor arguments, read from the scalars from S.PARAMS on
    sparse: bool  # the teacher is top-k (ids, logprobs), not dense logits
    has_ce: bool
    softcap: bool  # the student's logits are capped (the teacher's: teacher_softcap)
    ignore_index: int
    compute_dtype: torch.dtype
    with_grad: bool
    compiled: bool
    kernel: str | None = None  # the hand-written kernel that runs the chunk; None: the generic path
    ce_power: int = 0  # the dense kernel's CE from the soft softmax at T = 1 or 2 (triton_chunk.ce_power)
    wide_grad: bool = False  # return the logit gradient in the compute dtype (float16 inputs)
    parallel: bool = False  # the vocabulary is split over a process group (kdfuse.vocab_parallel)
    teacher_softcap: bool = False
    entropy: bool = False  # also the student's entropy at the temperature, per row


def entropy(scaled: Tensor) -> Tensor:
    """(R,) −Σ p log p of softmax(``scaled``) (R, V)."""
    logp = scaled.log_softmax(-1)
    return -(logp.exp() * logp.clamp_min(LOGPROB_FLOOR)).sum(-1)


def row_losses(
    spec: ChunkSpec,
    student: Tensor,  # (C, V) raw student logits, any float dtype
    teacher: tuple[Tensor, ...],  # ((C, V) raw teacher logits,) or top-k ((C, k) ids, (C, k) logprobs)
    labels: Tensor,  # (C,) int64; only read when spec.has_ce
    valid: Tensor,  # (C,) bool
    scalars: Tensor,  # (S.PARAMS + n_args,) compute dtype
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Per-row (loss, soft, hard, entropy), each (C,), zero on invalid rows (entropy: the
    student's at the temperature, 0 unless ``spec.entropy``)."""
    s = S.cap(student.to(spec.compute_dtype), scalars, S.S_CAP, spec.softcap)
    args = tuple(scalars[S.PARAMS + i] for i in range(spec.n_args))
    if spec.sparse:  # the temperature and softcap apply to the student only (see kdfuse.topk)
        ids, logprobs = teacher
        soft = spec.fn(s * scalars[S.INV_T], ids, logprobs.to(spec.compute_dtype), *args)
    else:
        # Ignored rows may hold anything (padding stored as an all -inf teacher row): give the
        # divergence a neutral row there, or its nan gradient times a 0 row weight is still nan.
        t = torch.where(valid[:, None], teacher[0].to(spec.compute_dtype), 0)
        t = S.cap(t, scalars, S.T_CAP, spec.teacher_softcap)
        soft = spec.fn(s * scalars[S.INV_T], t * scalars[S.INV_T], *args)
    if soft.shape != valid.shape:  # shapes are static: this costs nothing, even when traced
        name = getattr(spec.fn, "__name__", repr(spec.fn))
        raise ValueError(
            f"divergence {name} returned shape {tuple(soft.shape)}, expected per-row losses {tuple(valid.shape)}"
        )
    soft = torch.where(valid, soft, 0)
    if spec.has_ce:
        hard = F.cross_entropy(s, labels, ignore_index=spec.ignore_index, reduction="none")
    else:
        hard = torch.zeros_like(soft)
    ent = torch.where(valid, entropy(s.detach() * scalars[S.INV_T]), 0) if spec.entropy else torch.zeros_like(soft)
    return scalars[S.SOFT_W] * soft + scalars[S.HARD_W] * hard, soft, hard, ent


def loss_and_grad(
    spec: ChunkSpec,
    student: Tensor,  # (C, V)
    teacher: tuple[Tensor, ...],  # see row_losses
    labels: Tensor,  # (C,)
    valid: Tensor,  # (C,)
    row_weight: Tensor,  # (C,) compute dtype: d(result)/d(row loss), up to a global scale
    scalars: Tensor,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """(d Σ_r w_r·loss_r / d student  (C, V) in student's dtype (the compute dtype with
    ``spec.wide_grad``), (loss, soft, hard, entropy))."""

    def weighted_total(s: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        parts = row_losses(spec, s, teacher, labels, valid, scalars)
        return (parts[0] * row_weight).sum(), parts

    return torch.func.grad(weighted_total, has_aux=True)(student.to(spec.compute_dtype) if spec.wide_grad else student)


def _kernel_step(spec: ChunkSpec, student: Tensor, teacher: tuple[Tensor, ...], labels, valid, *rest: Tensor):
    """A chunk through the hand-written kernel (imports Triton: the CUDA path only). The student
    logits are this chunk's own temporary: the kernels overwrite them with their gradient, so a
    chunk holds two (C, V) blocks (one for a top-k teacher), not three."""
    from . import triton_chunk, triton_topk

    row_weight, scalars = (rest[0], rest[1]) if spec.with_grad else (None, rest[0])
    if spec.kernel == "topk":
        reduced = entry_of(spec.fn).reduced
        dlogits, parts = triton_topk.chunk_step(
            reduced, spec.has_ce, student, *teacher, labels, valid, row_weight, scalars, compiled=spec.compiled
        )
        parts = (*parts, torch.zeros_like(parts[0]))  # (no entropy: fast_kernel)
    else:
        out = None
        if spec.with_grad:  # float16: a compute-dtype block (see engine.half_with_scale)
            out = (
                torch.empty(student.shape, dtype=spec.compute_dtype, device=student.device)
                if spec.wide_grad
                else student
            )
        dlogits, parts = triton_chunk.chunk_step(
            spec.kernel,
            spec.has_ce,
            (spec.softcap, spec.teacher_softcap),
            spec.ignore_index,
            student,
            teacher[0],
            labels,
            valid,
            row_weight,
            scalars,
            out=out,
            ce_power=spec.ce_power,
            entropy=spec.entropy,
        )
    return (dlogits, parts) if spec.with_grad else parts


# Bounded: a divergence created anew every step (a lambda) is a new spec each time; it recompiles
# every step (pass one function object), and must not also keep every compiled version alive.
@functools.lru_cache(maxsize=64)
def chunk_fn(spec: ChunkSpec) -> Callable:
    """The chunk function of ``spec``: ``fn(student, teacher, labels, valid[, row_weight], scalars)``,
    with the vocabulary's ``shard`` (kdfuse.collectives.Shard) last for a parallel spec."""
    if spec.parallel:
        from . import vocab_parallel  # imports torch.distributed: only where it is used

        return vocab_parallel.chunk_step(spec, chunk_fn(replace(spec, parallel=False)))
    if spec.kernel is not None:
        return functools.partial(_kernel_step, spec)
    # dynamic=False: the vocabulary stays static (it shapes the reductions); the row dim is
    # marked dynamic per call (see call), so every chunk length shares one graph.
    return compile_bound(loss_and_grad if spec.with_grad else row_losses, spec, compiled=spec.compiled)


def call(
    spec: ChunkSpec,
    fn: Callable,
    student: Tensor,
    teacher: tuple[Tensor, ...],
    rest: list[Tensor],
    scalars: Tensor,
    shard: object = None,
):
    """``fn`` on one block: its student logits, teacher, (labels, valid[, row_weight]), the
    scalars and, for a parallel spec, the vocabulary's shard (kdfuse.collectives.Shard).
    torch.compile specialises a dim of size 1, so a lone row (N = 1; a 1-row *tail* is merged
    into the chunk before it) would compile a second graph: it runs doubled, and the copy's rows
    are dropped (rows are independent, so the result is exact)."""
    args = [student, *teacher, *rest]
    # torch.compile'd code: all of the generic path, the (C, k) part of the top-k kernel.
    compiled = spec.compiled and spec.kernel in (None, "topk")
    lone = compiled and student.shape[0] == 1
    if lone:
        args = [torch.cat([a, a]) for a in args]
    if compiled and spec.kernel is None:
        for t in args:
            torch._dynamo.maybe_mark_dynamic(t, 0)
    extra = () if shard is None else (shard,)
    out = fn(args[0], tuple(args[1 : len(teacher) + 1]), *args[len(teacher) + 1 :], scalars, *extra)
    return _first_row(out) if lone else out


def _first_row(out):
    """``out`` (nested tuples of per-row tensors) cut back to its first row."""
    return tuple(_first_row(x) for x in out) if isinstance(out, tuple) else out[:1]


def fast_kernel(
    fn: Callable[..., Tensor],
    *,
    softcap: bool,
    compute_dtype: torch.dtype,
    device_type: str,
    compiled: bool,
    wide_grad: bool,
    entropy: bool = False,
) -> str | None:
    """The hand-written kernel that runs ``fn``'s chunks, or ``None`` (the generic path): a
    built-in's (the registry's ``kernel``), compiled, on CUDA, in float32 compute; the top-k
    kernel also needs no softcap (capping would turn its −inf marks into −cap), no float16 wide
    gradient (it writes the gradient over the 16-bit logits) and no entropy (it never sums over
    the whole row)."""
    entry = entry_of(fn)
    if entry is None or entry.kernel is None or not compiled:
        return None
    if device_type != "cuda" or compute_dtype != torch.float32:
        return None
    if entry.sparse and (softcap or wide_grad or entropy):
        return None
    return entry.kernel


def with_kernel(spec: ChunkSpec, device_type: str, temperature: float) -> ChunkSpec:
    """``spec`` with its hand-written kernel where one applies, and the dense kernel's CE shortcut
    at T = 1 and 2 (:func:`kdfuse.triton_chunk.ce_power`)."""
    kernel = fast_kernel(
        spec.fn,
        softcap=spec.softcap,
        compute_dtype=spec.compute_dtype,
        device_type=device_type,
        compiled=spec.compiled,
        wide_grad=spec.wide_grad,
        entropy=spec.entropy,
    )
    if kernel is None:
        return spec
    ce_power = 0
    if spec.has_ce and kernel != "topk":
        from . import triton_chunk  # (imports Triton: CUDA only)

        ce_power = triton_chunk.ce_power(temperature)
    return replace(spec, kernel=kernel, ce_power=ce_power)
