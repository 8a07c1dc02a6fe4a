"""The chunked fused-linear distillation loss.

Rows are the flattened leading dims of the hidden states, N = B*T. For each chunk of rows the
student logits (and the teacher's, when it is given as hidden states + weight) are computed by
matmuls, the divergence, the hard cross-entropy and their gradient w.r.t. the student logits are
computed by one compiled function (``torch.func.grad`` of the per-row loss, so any user divergence
works), and the logit gradient is folded back into ``grad_hidden`` and a float32 ``grad_weight``
accumulator right away. The full ``(N, V)`` logits never exist. Where the hand-written kernel
runs, the teacher's logits come in blocks of a chunk's rows (``_Problem.teacher_blocks``).

When the result is a scalar (``reduction="mean"`` or ``"sum"``) the gradients are computed in the
forward pass and the backward only multiplies them by ``grad_output`` (a device tensor: no host
sync). With ``reduction="none"`` the per-row weights are only known in backward, so the backward
recomputes the chunks.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass, replace
from typing import Callable, Literal, NamedTuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import divergences as D
from . import topk as K
from .tuning import TEACHER_ROWS as _TEACHER_ROWS
from .tuning import resolve_chunk_size
from .validate import check_inputs, check_normalizer, start_value_check

__all__ = ["fused_linear_distill", "DistillOutput", "Reduction", "Impl"]

Reduction = Literal["mean", "sum", "none"]
Impl = Literal["compile", "eager"]
DivergenceLike = Union[str, D.Divergence, K.SparseDivergence]


class DistillOutput(NamedTuple):
    """``return_parts=True`` result: the loss and its two unweighted, detached parts.
    ``hard_loss`` is 0 when ``hard_weight`` is 0: the cross-entropy is then not computed."""

    loss: Tensor
    soft_loss: Tensor
    hard_loss: Tensor


# --------------------------------------------------------------------------------------------
# The per-chunk function: pure, compiled once per _Spec.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    """What the compiled chunk function is specialised on. Everything numeric that may change
    between calls (temperature, weights, softcap, divergence parameters) travels as tensors."""

    kernel: Callable[..., Tensor]
    n_params: int
    has_ce: bool
    softcap: bool
    ignore_index: int
    compute_dtype: torch.dtype
    with_grad: bool
    compiled: bool
    sparse: bool = False  # teacher given as top-k (ids, logprobs) instead of dense logits
    triton: bool = False  # run the hand-written kernel (kdfuse.triton_chunk) instead
    wide_grad: bool = False  # return the logit gradient in the compute dtype (float16 inputs)


# Layout of the per-call scalar tensor handed to the chunk function.
_INV_T, _SOFT_W, _HARD_W, _CAP, _N_FIXED = 0, 1, 2, 3, 4


def _cap(logits: Tensor, scalars: Tensor, spec: _Spec) -> Tensor:
    if not spec.softcap:
        return logits
    cap = scalars[_CAP]
    return cap * torch.tanh(logits / cap)


def _row_losses(
    spec: _Spec,
    student: Tensor,  # (C, V) raw student logits, any float dtype
    teacher: tuple[Tensor, ...],  # ((C, V) raw teacher logits,) or top-k ((C, k) ids, (C, k) logprobs)
    labels: Tensor,  # (C,) int64; only read when spec.has_ce
    valid: Tensor,  # (C,) bool
    scalars: Tensor,  # (_N_FIXED + n_params,) compute dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row (loss, soft, hard), each (C,), zero on invalid rows."""
    s = _cap(student.to(spec.compute_dtype), scalars, spec)
    if spec.sparse:  # the temperature and softcap apply to the student only (see kdfuse.topk)
        ids, logprobs = teacher
        soft = spec.kernel(s * scalars[_INV_T], ids, logprobs.to(spec.compute_dtype))
    else:
        # Ignored rows may hold anything (padding stored as an all -inf teacher row): give the
        # divergence a neutral row there, or its nan gradient times a 0 row weight is still nan.
        t = torch.where(valid[:, None], teacher[0].to(spec.compute_dtype), 0)
        t = _cap(t, scalars, spec)
        params = tuple(scalars[_N_FIXED + i] for i in range(spec.n_params))
        soft = spec.kernel(s * scalars[_INV_T], t * scalars[_INV_T], *params)
    if soft.shape != valid.shape:  # shapes are static: this costs nothing, even when traced
        name = getattr(spec.kernel, "__name__", repr(spec.kernel))
        raise ValueError(f"divergence {name} returned shape {tuple(soft.shape)}, expected per-row losses {tuple(valid.shape)}")
    soft = torch.where(valid, soft, 0)
    if spec.has_ce:
        hard = F.cross_entropy(s, labels, ignore_index=spec.ignore_index, reduction="none")
    else:
        hard = torch.zeros_like(soft)
    return scalars[_SOFT_W] * soft + scalars[_HARD_W] * hard, soft, hard


def _loss_and_grad(
    spec: _Spec,
    student: Tensor,  # (C, V)
    teacher: tuple[Tensor, ...],  # see _row_losses
    labels: Tensor,  # (C,)
    valid: Tensor,  # (C,)
    row_weight: Tensor,  # (C,) compute dtype: d(result)/d(row loss), up to a global scale
    scalars: Tensor,
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
    """(d Σ_r w_r·loss_r / d student  (C, V) in student's dtype (the compute dtype with
    ``spec.wide_grad``), (loss, soft, hard))."""

    def weighted_total(s: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor]]:
        parts = _row_losses(spec, s, teacher, labels, valid, scalars)
        return (parts[0] * row_weight).sum(), parts

    return torch.func.grad(weighted_total, has_aux=True)(student.to(spec.compute_dtype) if spec.wide_grad else student)


def _triton_step(spec: _Spec, student, teacher, labels, valid, *rest):
    # Imports Triton: only on the CUDA path.
    from . import triton_chunk, triton_topk

    row_weight, scalars = (rest[0], rest[1]) if spec.with_grad else (None, rest[0])
    # The student logits are this chunk's own temporary: the kernels overwrite them with their
    # gradient, so a chunk holds two (C, V) blocks (one for a top-k teacher), not three.
    if spec.sparse:
        dlogits, parts = triton_topk.chunk_step(
            spec.kernel, spec.has_ce, student, *teacher, labels, valid, row_weight, scalars, compiled=spec.compiled
        )
    else:
        dlogits, parts = triton_chunk.chunk_step(
            spec.kernel, spec.has_ce, spec.softcap, spec.ignore_index, student, teacher[0], labels, valid,
            row_weight, scalars, out=_dlogits_buffer(spec, student) if spec.with_grad else None,
        )  # fmt: skip
    return (dlogits, parts) if spec.with_grad else parts


def _dlogits_buffer(spec: _Spec, student: Tensor) -> Tensor:
    """Where the kernel writes the logit gradient: over the student logits (this chunk's own
    temporary), or a compute-dtype block for float16 (see _half_with_scale)."""
    return torch.empty(student.shape, dtype=spec.compute_dtype, device=student.device) if spec.wide_grad else student


# Bounded: a divergence created anew every step (a lambda) is a new spec each time; it recompiles
# every step (pass one function object), and must not also keep every compiled version alive.
@functools.lru_cache(maxsize=64)
def _chunk_fn(spec: _Spec) -> Callable:
    if spec.triton:
        return functools.partial(_triton_step, spec)
    fn = functools.partial(_loss_and_grad if spec.with_grad else _row_losses, spec)
    # dynamic=False: the vocabulary stays static (it shapes the reductions); the row dim is
    # marked dynamic per call (see _mark_rows_dynamic), so every chunk length shares one graph.
    return torch.compile(fn, dynamic=False) if spec.compiled else fn


def _mark_rows_dynamic(*tensors: Tensor) -> None:
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


# --------------------------------------------------------------------------------------------
# Inputs, flattened and checked once per call.
# --------------------------------------------------------------------------------------------


@dataclass
class _Problem:
    student_hidden: Tensor  # (N, Hs)
    student_weight: Tensor  # (V, Hs)
    student_bias: Tensor | None  # (V,)
    teacher_hidden: Tensor | None  # (N, Ht)
    teacher_weight: Tensor | None  # (V, Ht) — already cut to the student's vocabulary
    teacher_bias: Tensor | None  # (V,)
    teacher_logits: Tensor | None  # (N, V) — already cut to the student's vocabulary
    teacher_topk_ids: Tensor | None  # (N, k) int64
    teacher_topk_logprobs: Tensor | None  # (N, k)
    labels: Tensor  # (N,) int64, ignore_index where missing
    valid: Tensor  # (N,) bool
    scalars: Tensor  # see _row_losses
    spec: _Spec
    chunk_size: int

    @property
    def rows(self) -> int:
        return self.student_hidden.shape[0]

    def chunks(self):
        """Row slices of ``chunk_size`` rows; a 1-row tail joins the chunk before it, because a
        dim of size 1 is specialised by torch.compile and would cost a recompile."""
        starts = list(range(0, self.rows, self.chunk_size))
        if len(starts) > 1 and self.rows - starts[-1] == 1:
            starts.pop()
        for start, stop in zip(starts, [*starts[1:], self.rows]):
            yield slice(start, stop)

    def student_logits(self, rows: slice) -> Tensor:
        """The student's (C, V) raw logits for ``rows``."""
        return F.linear(self.student_hidden[rows], self.student_weight, self.student_bias)

    def teacher(self, rows: slice) -> tuple[Tensor, ...]:
        """The teacher's rows as _row_losses takes them: ((C, V) raw logits,) or top-k (ids, logprobs)."""
        if self.teacher_topk_ids is not None:
            return self.teacher_topk_ids[rows], self.teacher_topk_logprobs[rows]
        if self.teacher_logits is not None:
            return (self.teacher_logits[rows],)
        return (F.linear(self.teacher_hidden[rows], self.teacher_weight, self.teacher_bias),)

    def teacher_blocks(self, rows: slice) -> list[slice]:
        """The parts of the chunk ``rows`` whose teacher logits are computed at a time.

        The whole chunk, except where the hand-written kernel writes the logit gradient over the
        student's block: rows are independent, so the teacher's logits (a matmul per chunk) can
        then come ``_TEACHER_ROWS`` rows at a time, each block freed before the next is computed,
        while the student's block, which feeds the gradient matmuls, keeps the chunk's length.
        At 4096-row chunks and V = 128256 that is 0.5 GiB of teacher logits instead of 1 GiB.
        """
        spec = self.spec
        in_place = spec.triton and not spec.sparse and not spec.wide_grad
        if not in_place or self.teacher_hidden is None:
            return [rows]
        return [slice(s, min(s + _TEACHER_ROWS, rows.stop)) for s in range(rows.start, rows.stop, _TEACHER_ROWS)]


def _doubled(args: list[Tensor]) -> list[Tensor]:
    """The chunk's per-row tensors with their row repeated.

    torch.compile specialises a dim of size 1, so a lone row (N = 1; a 1-row *tail* is merged
    into the chunk before it) would compile a second graph; two rows share the dynamic one. Rows
    are independent (a row's loss depends on its own logits only), so dropping the copy's loss
    and logit-gradient rows afterwards (:func:`_first_row`) leaves the exact result.
    """
    return [torch.cat([a, a]) for a in args]


def _first_row(out):
    """``out`` (nested tuples of per-row tensors) cut back to its first row."""
    return tuple(_first_row(x) for x in out) if isinstance(out, tuple) else out[:1]


def _chunk(
    p: _Problem,
    spec: _Spec,
    fn: Callable,
    rows: slice,
    row_weight: Tensor | None,
    after_logits: Callable[[], None] | None = None,
) -> tuple[Tensor | None, tuple[Tensor, Tensor, Tensor]]:
    """(dlogits (C, V) or None, (loss, soft, hard)) of one chunk. A function of its own so the
    teacher's logits are freed on return, before the gradient matmuls run.
    ``after_logits`` runs once the first logits matmuls are queued (see _run's ``check``)."""
    student = p.student_logits(rows)
    outs = []
    for i, block in enumerate(p.teacher_blocks(rows)):
        teacher = p.teacher(block)
        if i == 0 and after_logits is not None:
            after_logits()
        part = slice(block.start - rows.start, block.stop - rows.start)
        rest = [p.labels[block], p.valid[block]] + ([] if row_weight is None else [row_weight[part]])
        outs.append(_call(spec, fn, student[part], teacher, rest, p.scalars))
        del teacher  # freed before the next block's teacher logits are computed
    if row_weight is None:
        outs = [(None, out) for out in outs]
    if len(outs) == 1:
        return outs[0]
    # Several blocks only where the kernel wrote each block's gradient over its student rows.
    return (None if row_weight is None else student), tuple(map(torch.cat, zip(*(out for _, out in outs))))


def _call(spec: _Spec, fn: Callable, student: Tensor, teacher: tuple[Tensor, ...], rest: list[Tensor], scalars: Tensor):
    """``fn`` on one block: its student logits, teacher, (labels, valid[, row_weight]) and the scalars."""
    args = [student, *teacher, *rest]
    # torch.compile'd code: all of the generic path, the (C, k) part of the top-k kernel.
    compiled = spec.compiled and (spec.sparse or not spec.triton)
    lone = compiled and student.shape[0] == 1
    if lone:  # N = 1: see _doubled
        args = _doubled(args)
    if compiled and not spec.triton:
        _mark_rows_dynamic(*args)
    out = fn(args[0], tuple(args[1 : len(teacher) + 1]), *args[len(teacher) + 1 :], scalars)
    return _first_row(out) if lone else out


def _half_with_scale(dlogits: Tensor) -> tuple[Tensor, float]:
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


# Reductions longer than this run through kdfuse.triton_mm's promoted GEMM on a Hopper GPU: a
# cuBLAS bf16 GEMM drifts from exact by about 1.2e-9·K there (docs/benchmarks.md, "Gradient
# error"): 1.5e-4 at K = V = 128256 (grad_hidden), 5e-6 at K = 8192 (grad_weight of an 8192-row
# chunk), enough to put the gradient 2.2e-4 from exact in bf16; at 4096 it is 1.6e-4.
_PROMOTED_MIN_K = 4096


def _accumulate_mm(acc: Tensor, a: Tensor, b: Tensor, first: bool, alpha: float = 1.0) -> None:
    """acc = alpha · a @ b (first chunk) or acc += alpha · a @ b, acc float32/float64, a and b
    maybe half.

    On CUDA the product is written straight into the wide accumulator (no rounding of each
    chunk's contribution to bf16, which is where Liger's 2e-3 grad_weight error comes from): by
    the promoted GEMM for reductions over more than ``_PROMOTED_MIN_K`` (grad_hidden's over the
    vocabulary, grad_weight's over a chunk of more rows), by cuBLAS otherwise. The first chunk
    overwrites instead of adding, which saves zero-filling and re-reading the (V, H) float32
    accumulator once.
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


class _Grads(NamedTuple):
    hidden: Tensor | None
    weight: Tensor | None
    bias: Tensor | None


def _run(
    p: _Problem,
    row_weight: Tensor | None,
    need: tuple[bool, bool, bool],
    check: Callable[[], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, _Grads]:
    """:func:`_run_chunks` with the inputs' GPU current: Triton launches its kernels on the
    current device, which need not be the one the tensors are on."""
    device = p.student_hidden.device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _run_chunks(p, row_weight, need, check)


def _run_chunks(
    p: _Problem,
    row_weight: Tensor | None,  # (N,) compute dtype, or None for loss only
    need: tuple[bool, bool, bool],  # grads for (hidden, weight, bias)
    check: Callable[[], None] | None = None,
) -> tuple[Tensor, Tensor, Tensor, _Grads]:
    """One pass over the chunks: per-row (loss, soft, hard) (N,) and unscaled gradients.

    ``check`` (the value checks, see validate.start_value_check) is waited for once the first
    chunk's logits matmuls are queued: they read no labels or ids, so they cannot fault on bad
    values, and they keep the device busy while the host waits for the check's one sync.
    """
    n, cdt = p.rows, p.spec.compute_dtype
    device = p.student_hidden.device
    loss, soft, hard = (torch.zeros(n, dtype=cdt, device=device) for _ in range(3))
    want_hidden, want_weight, want_bias = need
    # grad_hidden is written in the compute dtype and rounded once at the end: a GEMM may otherwise
    # reduce a bf16 product's long V-dim split-K partials in bf16.
    grad_h = torch.empty(p.student_hidden.shape, dtype=cdt, device=device) if want_hidden else None
    # The first chunk overwrites grad_w, so it needs zeros (a 1 GiB fill at V=128k, H=2048) only
    # when there is no chunk at all.
    alloc = torch.empty if n else torch.zeros
    grad_w = alloc(p.student_weight.shape, dtype=cdt, device=device) if want_weight else None
    grad_b = torch.zeros(p.student_weight.shape[0], dtype=cdt, device=device) if want_bias else None
    spec = p.spec if row_weight is None else replace(p.spec, with_grad=True)
    fn = _chunk_fn(spec)
    for i, rows in enumerate(p.chunks()):
        with torch.no_grad():
            dlogits, out = _chunk(p, spec, fn, rows, None if row_weight is None else row_weight[rows], check if i == 0 else None)
            if dlogits is not None:
                inv = 1.0
                if spec.wide_grad:
                    dlogits, inv = _half_with_scale(dlogits)
                if grad_h is not None:
                    _accumulate_mm(grad_h[rows], dlogits, p.student_weight, first=True, alpha=inv)
                if grad_w is not None:
                    _accumulate_mm(grad_w, dlogits.t(), p.student_hidden[rows], first=i == 0, alpha=inv)
                if grad_b is not None:
                    grad_b += dlogits.sum(0, dtype=cdt) * inv
            loss[rows], soft[rows], hard[rows] = out
            # Free this chunk's (C, V) block before the next chunk allocates its own.
            del dlogits, out
    if check is not None and not n:
        check()
    return loss, soft, hard, _Grads(grad_h, grad_w, grad_b)


def _scaled_cast(g: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``g * scale`` as ``dtype``, in one pass: one read of the wide accumulator, one write."""
    if g.is_cuda and g.dtype == torch.float32 and dtype != torch.float32:
        from .triton_cast import scaled_cast  # imports Triton: only on CUDA

        return scaled_cast(g, scale, dtype)
    return torch.mul(g, scale, out=torch.empty_like(g, dtype=dtype))


def _scaled(grads: _Grads, scale: Tensor, dtypes: tuple) -> _Grads:
    """Gradients times a device scalar, cast back to the parameters' dtypes (hidden, weight, bias)."""
    return _Grads(*(None if g is None else _scaled_cast(g, scale, dtype) for g, dtype in zip(grads, dtypes)))


# The tensors of a _Problem. They travel to backward through ``ctx.save_for_backward`` (not as
# ctx attributes), so autograd frees them after a backward without ``retain_graph`` and a
# ``retain_graph=True`` graph can be backpropagated through again.
_PROBLEM_TENSORS = (
    "student_hidden", "student_weight", "student_bias", "teacher_hidden", "teacher_weight",
    "teacher_bias", "teacher_logits", "teacher_topk_ids", "teacher_topk_logprobs", "labels", "valid", "scalars",
)  # fmt: skip


class _FusedDistill(torch.autograd.Function):
    """Inputs are (problem, student_hidden, student_weight, student_bias, reduction, normalizer,
    check); the tensors are passed explicitly only so autograd tracks them."""

    @staticmethod
    def forward(ctx, p: _Problem, hidden, weight, bias, reduction: str, normalizer, check):
        need = ctx.needs_input_grad[1:4]
        ctx.reduction, ctx.need = reduction, need
        ctx.dtypes = tuple(None if t is None else t.dtype for t in (p.student_hidden, p.student_weight, p.student_bias))
        if reduction == "none":
            loss, soft, hard, _ = _run(p, None, (False, False, False), check)
            # Backward recomputes the chunks: it needs the whole problem.
            ctx.save_for_backward(*(getattr(p, name) for name in _PROBLEM_TENSORS))
            ctx.skeleton = replace(p, **{name: None for name in _PROBLEM_TENSORS})
            ctx.mark_non_differentiable(soft, hard)
            return loss, soft, hard
        # The 1/normalizer is folded into the row weights, so the logit gradient is rounded to
        # the input dtype exactly as autograd would round it for the normalised loss (bf16
        # grads then match a full-logits bf16 step to fp32 summation order; float16 scales each
        # chunk into its range, see _half_with_scale). grad_output is applied in backward.
        scale = 1.0 if normalizer is None else 1.0 / normalizer
        loss, soft, hard, grads = _run(p, p.valid.to(p.spec.compute_dtype) * scale, need, check)
        ctx.save_for_backward(*grads)
        out = tuple(x.sum() * scale for x in (loss, soft, hard))
        ctx.mark_non_differentiable(out[1], out[2])
        return out

    @staticmethod
    def backward(ctx, grad_loss, _grad_soft, _grad_hard):
        if ctx.reduction == "none":
            p = replace(ctx.skeleton, **dict(zip(_PROBLEM_TENSORS, ctx.saved_tensors)))
            # Normalise the incoming per-row weights so half-precision dlogits stay in range.
            weights = grad_loss.to(p.spec.compute_dtype) * p.valid
            # (amax of an empty tensor is an error: with no rows any scale will do.)
            scale = weights.abs().amax() if weights.numel() else weights.new_ones(())
            scale = scale.clamp_min(torch.finfo(weights.dtype).tiny)
            # A backward run inside an autocast region must recompute what forward computed.
            with _autocast_off(p.student_hidden.device.type):
                grads = _run(p, weights / scale, ctx.need)[3]
        else:
            grads, scale = _Grads(*ctx.saved_tensors), grad_loss
        return (None, *_scaled(grads, scale, ctx.dtypes), None, None, None)


# --------------------------------------------------------------------------------------------
# Public entry point.
# --------------------------------------------------------------------------------------------


def _autocast_inputs(*tensors: Tensor | None) -> tuple[Tensor | None, ...]:
    """The logits matmuls' inputs as ``F.linear`` under the active autocast would cast them (to
    its dtype; float64 and non-tensors, left to the input checks, unchanged); as given when
    autocast is off. The casts are outside the autograd Function, so gradients flow back to the
    parameters in their own dtype."""
    device_type = tensors[0].device.type if isinstance(tensors[0], Tensor) else "cpu"
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return tensors  # (no autocast on e.g. "meta": the device check reports the mix of devices)
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t: Tensor | None) -> Tensor | None:
        eligible = isinstance(t, Tensor) and t.is_floating_point() and t.dtype != torch.float64
        return t.to(dtype) if eligible else t

    return tuple(cast(t) for t in tensors)


def _autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast disabled for ``device_type`` (nothing to disable where it has none, e.g. "meta")."""
    available = torch.amp.is_autocast_available(device_type)
    return torch.autocast(device_type, enabled=False) if available else contextlib.nullcontext()


def _stable_name(divergence: DivergenceLike) -> str:
    """The divergence's name in tuning keys, the same in every process: a string as given, a
    function's ``__name__`` (the factories' names carry their parameters), else the qualified name
    of the function a ``functools.partial`` wraps or of a callable object's type. Never its
    repr, which holds an address: every process would miss the cache and tune again."""
    if isinstance(divergence, str):
        return divergence
    name = getattr(divergence, "__name__", None)
    if isinstance(name, str):
        return name
    wrapped = getattr(divergence, "func", None)
    return getattr(wrapped, "__qualname__", None) or type(divergence).__qualname__


def _resolve(divergence: DivergenceLike) -> Callable[..., Tensor]:
    if isinstance(divergence, str):
        return K.get(divergence) if divergence.startswith("topk_") else D.get(divergence)
    return divergence


def _kernel_of(divergence: DivergenceLike) -> tuple[Callable[..., Tensor], tuple[float, ...]]:
    fn = _resolve(divergence)
    if not callable(fn):
        raise TypeError(f"divergence must be a name or a callable, got {type(divergence).__name__}")
    return getattr(fn, "__kdfuse_kernel__", fn), tuple(getattr(fn, "__kdfuse_params__", ()))


def _triton_supports(spec: _Spec, device: torch.device) -> bool:
    if device.type != "cuda" or not spec.compiled:
        return False
    from . import triton_chunk, triton_topk

    if spec.sparse:  # (it writes the gradient over float16 logits: not for float16's wide gradient)
        return not spec.wide_grad and triton_topk.supported(spec.kernel, spec.compute_dtype, device, spec.softcap)
    return triton_chunk.supported(spec.kernel, spec.compute_dtype, device)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _flatten(x: Tensor | None, width: int | None) -> Tensor | None:
    if x is None:
        return None
    return x.reshape(-1) if width is None else x.reshape(-1, width)


def _to_device(values: list[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a 1-D tensor on ``device`` without a host sync.

    ``torch.tensor(values, device="cuda")`` copies from pageable memory, which waits for the
    stream to drain: the device then idles while the host queues the rest of the step (measured:
    ~2 ms of a 36 ms step). From pinned memory the copy is queued like a kernel; the caching host
    allocator keeps the buffer until the copy has run.
    """
    cuda = device.type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=cuda).to(device, non_blocking=cuda)


def fused_linear_distill(
    student_hidden: Tensor,  # (..., Hs)
    student_weight: Tensor,  # (V, Hs)
    teacher_hidden: Tensor | None = None,  # (..., Ht)
    teacher_weight: Tensor | None = None,  # (Vt, Ht), Vt >= V
    *,
    teacher_logits: Tensor | None = None,  # (..., Vt), Vt >= V
    teacher_topk: tuple[Tensor, Tensor] | None = None,  # ((..., k) int ids, (..., k) logprobs)
    labels: Tensor | None = None,  # (...) int
    divergence: DivergenceLike = "forward_kl",
    temperature: float = 1.0,
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    normalizer: float | Tensor | None = None,
    chunk_size: int | Literal["auto"] = "auto",
    student_bias: Tensor | None = None,  # (V,)
    teacher_bias: Tensor | None = None,  # (Vt,)
    softcap: float | None = None,
    return_parts: bool = False,
    impl: Impl = "compile",
    memory_budget: int | float | None = None,
    validate: bool = True,
) -> Tensor | DistillOutput:
    """Knowledge-distillation loss from hidden states, never materialising the full logits.

    Computes exactly what :func:`kdfuse.fused_linear_distill_ref` computes (see there for the
    semantics), chunk by chunk over the N = prod(leading dims) rows.

    Args:
        student_hidden, student_weight: student final hidden states and lm_head weight.
        teacher_hidden, teacher_weight: the teacher's; its logits are computed per chunk with no
            gradient. Give these *or* ``teacher_logits`` (dense, precomputed, any float dtype,
            e.g. bf16 logits stored offline) *or* ``teacher_topk``. Teacher columns beyond the
            student's vocabulary V are dropped (padded embeddings).
        teacher_topk: a sparse teacher ``(ids, logprobs)``, e.g. from :func:`kdfuse.teacher_topk`
            or an API; needs a sparse divergence from :mod:`kdfuse.topk` (``"topk_..."`` names),
            and the temperature and softcap then apply to the student only.
        labels: token ids for the hard cross-entropy; rows equal to ``ignore_index`` contribute
            nothing to either term. ``None``: every row counts (then ``hard_weight`` must be 0).
        divergence: a :data:`kdfuse.divergences.Divergence`, or a built-in's name.
        temperature: divides both models' logits inside the divergence (not the hard CE).
        soft_weight, hard_weight: ``loss = soft_weight·D + hard_weight·CE`` per row.
        reduction: ``"mean"`` (sum over valid rows / number of valid rows, at least 1),
            ``"sum"``, or ``"none"`` (per-row losses shaped like the leading dims).
        normalizer: with ``"mean"``/``"sum"``, divide the summed loss by this instead (e.g. the
            global number of tokens across gradient-accumulation steps and ranks).
        chunk_size: rows per chunk, or ``"auto"`` (autotuned or heuristic, see kdfuse.tuning).
        student_bias, teacher_bias: lm_head biases; the student's gets a gradient.
        softcap: Gemma-2 style ``softcap·tanh(logits/softcap)`` on both models' logits, first.
        return_parts: return ``DistillOutput(loss, soft_loss, hard_loss)``; the parts are the
            unweighted terms reduced like the loss, detached (``hard_loss`` is 0 when
            ``hard_weight`` is 0: the cross-entropy is then not computed).
        impl: ``"compile"``: the fastest compiled per-chunk work (on CUDA, the hand-written
            Triton kernels of :mod:`kdfuse.triton_chunk` for ``forward_kl``, ``soft_ce``,
            ``reverse_kl`` and ``jsd``, and of :mod:`kdfuse.triton_topk` for the built-in
            sparse divergences without softcap; ``torch.compile`` of the pure divergence
            otherwise), or
            ``"eager"``: the same pure functions, uncompiled.
        memory_budget: bounds ``chunk_size="auto"`` (bytes, or a fraction of free device memory;
            default ``KDFUSE_MEMORY_BUDGET``).
        validate: also check tensor *values* (labels and top-k ids inside the vocabulary),
            which costs one device-to-host sync per call (waited for once the first chunk's
            logits matmuls are queued, so the device keeps computing meanwhile); shapes, dtypes
            and devices are always checked, for free. Turn off in a hot loop whose data you trust.

    Under ``torch.autocast`` the logits are computed in its dtype, as ``F.linear`` would compute
    them there: the hidden states, weights and biases are cast to it first (float64 excepted), and
    the rest, backward included, runs with autocast off, so every chunk sees the same dtypes.

    Returns:
        The loss in the compute dtype (float32; float64 for float64 inputs).
    """
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = _autocast_inputs(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias
    )
    leading = student_hidden.shape[:-1]
    check_inputs(
        student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits, labels,
        teacher_topk=teacher_topk, divergence=_resolve(divergence),
        student_bias=student_bias, teacher_bias=teacher_bias, temperature=temperature,
        soft_weight=soft_weight, hard_weight=hard_weight, reduction=reduction, chunk_size=chunk_size,
        softcap=softcap, impl=impl, ignore_index=ignore_index, memory_budget=memory_budget,
    )  # fmt: skip
    # NumPy scalars pass the checks: as Python floats they key the compile and tuning caches.
    temperature, soft_weight, hard_weight = float(temperature), float(soft_weight), float(hard_weight)
    softcap = None if softcap is None else float(softcap)
    vocab, width = student_weight.shape
    check_normalizer(normalizer, reduction)
    cdt = _compute_dtype(student_hidden.dtype)
    device = student_hidden.device
    hidden = student_hidden.reshape(-1, width)
    n = hidden.shape[0]
    if labels is None:
        flat_labels = torch.full((n,), ignore_index, dtype=torch.long, device=device)
        valid = torch.ones(n, dtype=torch.bool, device=device)
    else:
        flat_labels = labels.reshape(-1).long()
        valid = flat_labels != ignore_index
    kernel, params = _kernel_of(divergence)
    spec = _Spec(
        kernel=kernel,
        n_params=len(params),
        has_ce=hard_weight != 0,
        softcap=softcap is not None,
        ignore_index=ignore_index,
        compute_dtype=cdt,
        with_grad=False,
        compiled=impl == "compile",
        sparse=teacher_topk is not None,
        wide_grad=student_hidden.dtype == torch.float16,
    )
    spec = replace(spec, triton=_triton_supports(spec, device))
    scalars = _to_device([1.0 / temperature, soft_weight, hard_weight, softcap or 1.0, *params], cdt, device)
    t_weight = None if teacher_weight is None else teacher_weight[:vocab]
    t_bias = None if teacher_bias is None else teacher_bias[:vocab]
    t_hidden = _flatten(teacher_hidden, None if teacher_hidden is None else teacher_hidden.shape[-1])
    # An explicit last dim: reshape(n, -1) is ambiguous (an error) when n == 0.
    t_logits = None if teacher_logits is None else teacher_logits.reshape(n, teacher_logits.shape[-1])[:, :vocab]
    topk_ids, topk_lp = None, None
    if teacher_topk is not None:
        topk_ids, topk_lp = K.ignored_rows_as_padding(*(t.reshape(n, t.shape[-1]) for t in teacher_topk), valid)
    tensors = (hidden, student_weight, student_bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    size = resolve_chunk_size(
        chunk_size, rows=n, vocab=vocab, student_hidden=width,
        teacher_hidden=None if t_hidden is None else t_hidden.shape[-1],
        teacher_topk=None if topk_ids is None else topk_ids.shape[-1], dtype=student_hidden.dtype, device=device,
        divergence=_stable_name(divergence), with_ce=spec.has_ce, with_grad=needs_grad, memory_budget=memory_budget,
    )  # fmt: skip
    problem = _Problem(
        hidden, student_weight, student_bias, t_hidden, t_weight, t_bias, t_logits,
        None if topk_ids is None else topk_ids.long(), topk_lp, flat_labels, valid, scalars, spec, size,
    )  # fmt: skip

    if reduction != "none" and normalizer is None:
        norm = valid.sum().clamp_min(1).to(cdt) if reduction == "mean" else None
    elif reduction != "none":
        norm = normalizer.to(device, cdt) if isinstance(normalizer, Tensor) else _to_device([normalizer], cdt, device)
        norm = norm.reshape(())
    else:
        norm = None

    # The value checks' one host sync waits for everything queued before it; queued here, after
    # the host-side set-up, and waited for only once the first chunk's logits matmuls are queued
    # (see _run), it leaves the device busy rather than idle while the host waits.
    check = None
    if validate:
        check = start_value_check(vocab, ignore_index, labels=labels, topk_ids=topk_ids)
    with _autocast_off(device.type):
        if needs_grad:
            loss, soft, hard = _FusedDistill.apply(problem, *tensors, reduction, norm, check)
        else:
            with torch.no_grad():
                loss, soft, hard, _ = _run(problem, None, (False, False, False), check)
            if reduction != "none":
                scale = 1.0 if norm is None else 1.0 / norm
                loss, soft, hard = (x.sum() * scale for x in (loss, soft, hard))
    if reduction == "none":
        loss, soft, hard = (x.reshape(leading) for x in (loss, soft, hard))
    return DistillOutput(loss, soft, hard) if return_parts else loss

