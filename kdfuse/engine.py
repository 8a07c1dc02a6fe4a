"""The chunk loop: logits chunk by chunk, each chunk's logit gradient folded into the parameters'
gradients right away, so the full ``(N, V)`` logits never exist.

For each chunk of rows the student logits (and the teacher's, for a
:class:`~kdfuse.teacher.HiddenTeacher`) are computed by matmuls, the chunk function
(:mod:`kdfuse.chunk`) gives the per-row losses and the gradient w.r.t. the student logits, and
that gradient goes into ``grad_hidden`` and a float32 ``grad_weight`` accumulator at once.

When the result is a scalar (``reduction="mean"`` or ``"sum"``) the gradients are computed in the
forward pass and the backward only multiplies them by ``grad_output`` (a device tensor: no host
sync). With ``reduction="none"`` the per-row weights are only known in backward, so the backward
recomputes the chunks.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .chunk import ChunkSpec, call, chunk_fn
from .collectives import Shard, all_reduce
from .teacher import TEACHER_ROWS, HiddenTeacher, Teacher, TopkTeacher, project, tensors_of

__all__ = ["Problem", "autocast_off", "chunk_starts", "distill"]


def chunk_starts(rows: int, chunk_size: int) -> list[int]:
    """Where each chunk of ``chunk_size`` rows starts; a 1-row tail joins the chunk before it,
    because a dim of size 1 is specialised by torch.compile and would cost a recompile."""
    starts = list(range(0, rows, chunk_size))
    if len(starts) > 1 and rows - starts[-1] == 1:
        starts.pop()
    return starts


@dataclass(frozen=True)
class Problem:
    """A call's inputs, flattened to N rows and checked, and how to compute them."""

    hidden: Tensor  # (N, Hs), or the student's logits (N, V) when weight is None
    weight: Tensor | None  # (V, Hs)
    bias: Tensor | None  # (V,)
    teacher: Teacher
    labels: Tensor  # (N,) int64, ignore_index where missing
    valid: Tensor  # (N,) bool
    scalars: Tensor  # kdfuse.scalars' layout
    spec: ChunkSpec
    chunk_size: int
    shard: Shard | None = None  # the vocabulary's split over a process group, if it is split
    student_scale: float = 1.0  # each model's logits are its lm_head's output times its scale
    teacher_scale: float = 1.0
    fp32_logits: bool = False  # the logits matmuls' outputs stay float32 (kdfuse.teacher.project)

    @property
    def vocab(self) -> int:
        return self.hidden.shape[1] if self.weight is None else self.weight.shape[0]

    def student_logits(self, rows: slice) -> Tensor:
        """The student's (C, V) logits of ``rows``: scale·(h Wᵀ + b), or the given logits times
        the scale (a copy where a kernel writes the gradient over them, never the caller's)."""
        if self.weight is None:
            logits = self.hidden[rows]
            copy = self.spec.kernel is not None or self.student_scale != 1
            return logits * self.student_scale if copy else logits
        logits = project(self.hidden[rows], self.weight, self.bias, self.fp32_logits)
        return logits if self.student_scale == 1 else logits.mul_(self.student_scale)

    def teacher_rows(self, rows: slice) -> tuple[Tensor, ...]:
        """The teacher's rows as the chunk functions take them, its dense logits scaled."""
        hidden = isinstance(self.teacher, HiddenTeacher)
        teacher = self.teacher.rows(rows, self.fp32_logits) if hidden else self.teacher.rows(rows)
        if self.teacher_scale == 1 or isinstance(self.teacher, TopkTeacher):
            return teacher
        return (teacher[0] * self.teacher_scale,)

    @property
    def rows(self) -> int:
        return self.hidden.shape[0]

    def chunks(self) -> Iterator[slice]:
        """Row slices of ``chunk_size`` rows (see :func:`chunk_starts`)."""
        starts = chunk_starts(self.rows, self.chunk_size)
        for start, stop in zip(starts, [*starts[1:], self.rows]):
            yield slice(start, stop)

    def teacher_blocks(self, rows: slice) -> list[slice]:
        """The parts of the chunk ``rows`` whose teacher logits are computed at a time: the whole
        chunk, except where the dense kernel writes the logit gradient over the student's block.
        Rows are independent, so the teacher's logits (a matmul) can then come ``TEACHER_ROWS``
        rows at a time, each block freed before the next, while the student's block, which
        feeds the gradient matmuls, keeps the chunk's length."""
        spec = self.spec
        in_place = spec.kernel not in (None, "topk") and not spec.wide_grad
        if not (in_place and isinstance(self.teacher, HiddenTeacher)):
            return [rows]
        return [slice(s, min(s + TEACHER_ROWS, rows.stop)) for s in range(rows.start, rows.stop, TEACHER_ROWS)]


def _chunk(
    p: Problem,
    spec: ChunkSpec,
    fn: Callable,
    rows: slice,
    row_weight: Tensor | None,
    after_logits: Callable[[], None] | None,
) -> tuple[Tensor | None, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """(dlogits (C, V) or None, per-row (loss, soft, hard, entropy)) of one chunk. A function of its own so the
    teacher's logits are freed on return, before the gradient matmuls run. ``after_logits`` runs
    once the first logits matmuls are queued (see :func:`_run_chunks`)."""
    student = p.student_logits(rows)
    outs = []
    for i, block in enumerate(p.teacher_blocks(rows)):
        teacher = p.teacher_rows(block)
        if i == 0 and after_logits is not None:
            after_logits()
        part = slice(block.start - rows.start, block.stop - rows.start)
        rest = [p.labels[block], p.valid[block]] + ([] if row_weight is None else [row_weight[part]])
        outs.append(call(spec, fn, student[part], teacher, rest, p.scalars, p.shard))
        del teacher  # freed before the next block's teacher logits are computed
    if row_weight is None:
        outs = [(None, out) for out in outs]
    if len(outs) == 1:
        return outs[0]
    # Several blocks only where the kernel wrote each block's gradient over its student rows.
    return (None if row_weight is None else student), tuple(map(torch.cat, zip(*(out for _, out in outs))))


def half_with_scale(dlogits: Tensor) -> tuple[Tensor, float]:
    """A float32 logit gradient as float16 ``d16`` and ``inv`` with dlogits ≈ inv · d16.

    float16 holds neither the large (a row's reverse-KL gradient against a masked teacher at a low
    temperature can pass 65504) nor the small (~1e-9 entries of a 1/N-weighted gradient at
    V = 128k lie below its subnormals) end of a logit gradient. So each chunk's gradient is scaled
    by a power of two that puts its largest entry at 2^14 (dynamic loss scaling, per chunk) and
    the scale is undone, exactly, by the gradient matmuls' alpha. The scale is read on the host:
    one sync per chunk, for float16 only.
    """
    amax = dlogits.abs().amax().item() if dlogits.numel() else 0.0
    if not (0 < amax < math.inf):  # nothing to scale; non-finite gradients stay what they are
        return dlogits.half(), 1.0
    exponent = max(min(14 - math.ceil(math.log2(amax)), 126), -126)
    return (dlogits * 2.0**exponent).half(), 2.0**-exponent


# Reductions longer than this run through kdfuse.triton_mm's promoted GEMM on a Hopper GPU, whose
# cuBLAS bf16 GEMM drifts from exact in proportion to the reduction's length (docs/benchmarks.md,
# "Gradient error"): grad_hidden's over V and grad_weight's over a chunk of more rows than this.
_PROMOTED_MIN_K = 4096


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor, first: bool, alpha: float = 1.0) -> None:
    """acc = alpha · a @ b (first chunk) or acc += alpha · a @ b, acc float32/float64, a and b
    maybe half.

    On CUDA the product is written straight into the wide accumulator (no rounding of each
    chunk's contribution to bf16): by the promoted GEMM for reductions over more than
    ``_PROMOTED_MIN_K``, by cuBLAS otherwise. The first chunk overwrites instead of adding, which
    saves zero-filling and re-reading the (V, H) float32 accumulator once.
    """
    if a.is_cuda and a.shape[1] > _PROMOTED_MIN_K:
        from . import triton_mm  # imports Triton: only on CUDA

        if triton_mm.supported(acc, a, b):
            triton_mm.promoted_mm(acc, a, b, accumulate=not first, alpha=alpha)
            return
    if a.dtype != acc.dtype and not a.is_cuda:
        a, b = a.to(acc.dtype), b.to(acc.dtype)
    wide = {"out_dtype": acc.dtype} if a.dtype != acc.dtype else {}
    if first and alpha == 1.0:
        torch.mm(a, b, out=acc, **wide)
    else:  # beta = 0: acc's old contents are not read (nor its NaNs propagated)
        torch.addmm(acc, a, b, beta=0.0 if first else 1.0, alpha=alpha, out=acc, **wide)


class Grads(NamedTuple):
    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None


def _grad_buffers(p: Problem, need: tuple[bool, bool, bool]) -> Grads:
    cdt, device = p.spec.compute_dtype, p.hidden.device
    # grad_hidden is written in the compute dtype and rounded once at the end: a GEMM may otherwise
    # reduce a bf16 product's long V-dim split-K partials in bf16.
    hidden = torch.empty(p.hidden.shape, dtype=cdt, device=device) if need[0] else None
    # The first chunk overwrites grad_weight, so it needs zeros (a 1 GiB fill at V=128k, H=2048)
    # only when there is no chunk at all.
    alloc = torch.empty if p.rows else torch.zeros
    weight = alloc(p.weight.shape, dtype=cdt, device=device) if need[1] else None
    bias = torch.zeros(p.vocab, dtype=cdt, device=device) if need[2] else None
    return Grads(hidden, weight, bias)


def _fold(p: Problem, grads: Grads, rows: slice, dlogits: Tensor, first: bool) -> None:
    """Fold one chunk's logit gradient into the parameters' gradients (through the logits' scale)."""
    inv = p.student_scale
    if p.spec.wide_grad:
        dlogits, unscale = half_with_scale(dlogits)
        inv *= unscale
    elif dlogits.dtype != p.hidden.dtype:  # float32 logits (fp32_logits): the matmuls take the inputs' dtype
        dlogits = dlogits.to(p.hidden.dtype)
    if grads.hidden is not None and p.weight is None:  # the logits themselves
        torch.mul(dlogits, inv, out=grads.hidden[rows])
    elif grads.hidden is not None:
        _accumulate_mm(grads.hidden[rows], dlogits, p.weight, first=True, alpha=inv)
    if grads.weight is not None:
        _accumulate_mm(grads.weight, dlogits.t(), p.hidden[rows], first=first, alpha=inv)
    if grads.bias is not None:
        grads.bias.add_(dlogits.sum(0, dtype=grads.bias.dtype), alpha=inv)


def _run_chunks(
    p: Problem,
    row_weight: Tensor | None,  # (N,) compute dtype, or None for the loss only
    need: tuple[bool, bool, bool],  # grads for (hidden, weight, bias)
    check: Callable[[], None] | None = None,
) -> tuple[tuple[Tensor, ...], Grads]:
    """One pass over the chunks: per-row (loss, soft, hard, entropy), each (N,), and the unscaled
    gradients.

    ``check`` (the value checks, see validate.start_value_check) is waited for once the first
    chunk's logits matmuls are queued: they read no labels or ids, so they cannot fault on bad
    values, and they keep the device busy while the host waits for the check's one sync.
    """
    parts = tuple(torch.zeros(p.rows, dtype=p.spec.compute_dtype, device=p.hidden.device) for _ in range(4))
    _announce_cpu_compile(p)
    chunks = list(p.chunks())
    # A one-chunk call allocates its gradients once the chunk's teacher logits are freed, so its
    # float32 grad_weight (V, Hs) never lives beside them (a lower peak). With several chunks they
    # come first, as every later chunk holds them anyway: allocated after the first chunk, small
    # buffers split the teacher's freed block, whose next use then needed new device memory.
    grads = None if len(chunks) == 1 else _grad_buffers(p, need)
    spec = p.spec if row_weight is None else replace(p.spec, with_grad=True)
    fn = chunk_fn(spec)
    for i, rows in enumerate(chunks):
        with torch.no_grad():
            weights = None if row_weight is None else row_weight[rows]
            dlogits, out = _chunk(p, spec, fn, rows, weights, check if i == 0 else None)
            if grads is None:
                grads = _grad_buffers(p, need)
            if dlogits is not None:
                _fold(p, grads, rows, dlogits, first=i == 0)
            for part, value in zip(parts, out):
                part[rows] = value
            del dlogits, out  # free this chunk's (C, V) block before the next chunk allocates its own
    if check is not None and not p.rows:
        check()
    if p.shard is not None and grads.hidden is not None:  # each rank's columns gave a part of it
        all_reduce(grads.hidden, dist.ReduceOp.SUM, p.shard.group)
    return parts, grads


_log = logging.getLogger("kdfuse")
_announced: list[bool] = []


def _announce_cpu_compile(p: Problem) -> None:
    """Say once per process that the first compiled call on a CPU compiles (silence would look
    like a hang)."""
    if p.spec.compiled and p.hidden.device.type == "cpu" and not _announced:
        _announced.append(True)
        _log.warning(
            "kdfuse: compiling the chunk function with torch.compile; on a CPU the first call of each "
            "configuration takes seconds to tens of seconds, later calls reuse it (impl='eager' skips compiling)"
        )


def _run(p: Problem, row_weight: Tensor | None, need: tuple[bool, bool, bool], check=None):
    """:func:`_run_chunks` with the inputs' GPU current: Triton launches its kernels on the
    current device, which need not be the one the tensors are on."""
    device = p.hidden.device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _run_chunks(p, row_weight, need, check)


def _scaled_cast(g: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``g * scale`` as ``dtype``, in one pass: one read of the wide accumulator, one write."""
    if g.is_cuda and g.dtype == torch.float32 and dtype != torch.float32:
        from .triton_cast import scaled_cast  # imports Triton: only on CUDA

        return scaled_cast(g, scale, dtype)
    return torch.mul(g, scale, out=torch.empty_like(g, dtype=dtype))


def _scaled(grads: Grads, scale: Tensor, dtypes: tuple) -> Grads:
    """Gradients times a device scalar, cast back to the parameters' dtypes (hidden, weight, bias)."""
    return Grads(*(None if g is None else _scaled_cast(g, scale, dtype) for g, dtype in zip(grads, dtypes)))


_PROBLEM_TENSORS = ("hidden", "weight", "bias", "labels", "valid", "scalars")


def _flat_tensors(p: Problem) -> list[Tensor | None]:
    """The problem's tensors, the teacher's included, in a fixed order (see :func:`_rebuilt`)."""
    return [*tensors_of(p.teacher), *(getattr(p, name) for name in _PROBLEM_TENSORS)]


def _rebuilt(skeleton: Problem, tensors: tuple[Tensor | None, ...]) -> Problem:
    """:func:`_flat_tensors`' inverse: ``skeleton`` (a problem) with those tensors back in place."""
    n = len(fields(skeleton.teacher))
    teacher = type(skeleton.teacher)(*tensors[:n])
    return replace(skeleton, teacher=teacher, **dict(zip(_PROBLEM_TENSORS, tensors[n:])))


class _FusedDistill(torch.autograd.Function):
    """Inputs are (problem, student hidden, weight, bias, reduction, normalizer, check); the
    tensors are passed explicitly only so autograd tracks them. Outputs: (loss, soft, hard,
    entropy), the last three not differentiable."""

    @staticmethod
    def forward(ctx, p: Problem, hidden, weight, bias, reduction: str, normalizer, check):
        need = ctx.needs_input_grad[1:4]
        ctx.reduction, ctx.need = reduction, need
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (p.hidden, p.weight, p.bias))
        if reduction == "none":
            parts, _ = _run(p, None, (False, False, False), check)
            # Backward recomputes the chunks: it needs the whole problem. Through
            # save_for_backward (not ctx attributes), so autograd frees the tensors after a
            # backward without retain_graph, and a retain_graph=True graph can run again.
            tensors = _flat_tensors(p)
            ctx.save_for_backward(*tensors)
            ctx.skeleton = _rebuilt(p, (None,) * len(tensors))
            ctx.mark_non_differentiable(*parts[1:])
            return parts
        # The 1/normalizer is folded into the row weights, so the logit gradient is rounded to
        # the input dtype exactly as autograd would round it for the normalised loss (float16
        # scales each chunk into its range, see half_with_scale). grad_output is applied in backward.
        scale = 1.0 if normalizer is None else 1.0 / normalizer
        parts, grads = _run(p, p.valid.to(p.spec.compute_dtype) * scale, need, check)
        ctx.save_for_backward(*grads)
        out = tuple(x.sum() * scale for x in parts)
        ctx.mark_non_differentiable(*out[1:])
        return out

    @staticmethod
    def backward(ctx, grad_loss, *_grad_parts):
        if ctx.reduction == "none":
            p = _rebuilt(ctx.skeleton, ctx.saved_tensors)
            # Normalise the incoming per-row weights so half-precision dlogits stay in range.
            weights = grad_loss.to(p.spec.compute_dtype) * p.valid
            # (amax of an empty tensor is an error: with no rows any scale will do.)
            scale = weights.abs().amax() if weights.numel() else weights.new_ones(())
            scale = scale.clamp_min(torch.finfo(weights.dtype).tiny)
            # A backward run inside an autocast region must recompute what forward computed.
            with autocast_off(p.hidden.device.type):
                grads = _run(p, weights / scale, ctx.need)[1]
        else:
            grads, scale = Grads(*ctx.saved_tensors), grad_loss
        return (None, *_scaled(grads, scale, ctx.dtypes), None, None, None)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device_type`` (nothing to disable where it has none, e.g. "meta")."""
    available = torch.amp.is_autocast_available(device_type)
    return torch.autocast(device_type, enabled=False) if available else contextlib.nullcontext()


def distill(
    p: Problem, reduction: str, normalizer: Tensor | None, check: Callable[[], None] | None, needs_grad: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, soft, hard, entropy) of the problem: scalars reduced by ``normalizer`` (None: no
    division) unless ``reduction == "none"`` (per-row, (N,)). The loss is differentiable w.r.t.
    the student's hidden states, weight and bias when ``needs_grad``."""
    with autocast_off(p.hidden.device.type):
        if needs_grad:
            return _FusedDistill.apply(p, p.hidden, p.weight, p.bias, reduction, normalizer, check)
        with torch.no_grad():
            parts, _ = _run(p, None, (False, False, False), check)
    if reduction == "none":
        return parts
    scale = 1.0 if normalizer is None else 1.0 / normalizer
    return tuple(x.sum() * scale for x in parts)
