"""One chunk of rows when the vocabulary is split over a process group (Megatron's layout: each
rank holds contiguous rows of both lm_heads, in rank order; the hidden states are the same on
every rank).

The built-ins never send a ``(chunk, V)`` block. Each is a sum over the vocabulary of per-entry
terms of the log-probs (kdfuse.divergences.Terms), or a top-k loss of a few numbers per row
(kdfuse.topk.reduced_parts), so a rank needs only row statistics of the others' columns:

* dense teachers, three all-reduces of (C, ·) per chunk: the rows' maxima (of the student and
  teacher logits at the temperature, and of the student's at 1 for the CE), then their sums of
  exponentials and the CE's label logit (from the rank that holds it), then the divergence's
  local term sums and, for its gradient, the local sums of ∂terms/∂log p_s: with D = Σ_v f(ls_v,
  lt_v) and ls = τs − lse(τs), ∂D/∂s_v = τ (∂f/∂ls_v − p_s,v Σ_u ∂f/∂ls_u);
* top-k teachers, two: the maxima of the student's logits outside the top-k, then their sums of
  exponentials with the logits at the k ids and the label (each from the rank that holds it);
  the student's entropy adds one column to the sums.

A divergence of the user's is a function of whole rows: its chunk's logits are all-gathered,
(C, V) per rank per chunk, and every rank computes the rows' loss and keeps its columns of the
gradient. Every rank computes the same per-row losses; each returns the gradient of its own
columns, and the engine all-reduces the hidden states' gradient once per call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from . import scalars as S
from .collectives import Shard, all_gather_columns, all_reduce
from .compiled import compile_bound
from .registry import entry_of
from .topk import reduced_grads, reduced_parts

__all__ = ["chunk_step"]

_MAX, _SUM = dist.ReduceOp.MAX, dist.ReduceOp.SUM


def _row_max(x: Tensor) -> Tensor:
    """(C,) maxima of (C, V_r), −inf for an empty shard."""
    return x.amax(-1) if x.shape[-1] else x.new_full(x.shape[:1], float("-inf"))


def _lse(m: Tensor, z: Tensor) -> Tensor:
    """log Σ e^x from the global max ``m`` and the sum of e^(x − m)."""
    return torch.where(torch.isneginf(m), m, m + z.log())


def _shifted_exp(x: Tensor, m: Tensor) -> Tensor:
    """e^(x − m) per row, 0 where the row's max is −inf."""
    return (x - torch.where(torch.isneginf(m), 0, m)[:, None]).exp()


def _owned(ids: Tensor, shard: Shard) -> tuple[Tensor, Tensor]:
    """(local column of each global id, clamped into range; whether this rank holds it)."""
    local = ids - shard.start
    held = (local >= 0) & (local < shard.rows)
    return local.clamp(0, max(shard.rows - 1, 0)), held


def _held_values(x: Tensor, ids: Tensor, shard: Shard) -> Tensor:
    """x at the global column ``ids`` (C, k) where this rank holds it, else 0 (a sum over ranks
    gives every value once)."""
    local, held = _owned(ids, shard)
    if not shard.rows:
        return torch.zeros(ids.shape, dtype=x.dtype, device=x.device)
    return torch.where(held, x.gather(1, local), 0)


# --------------------------------------------------------------------------------------------
# Dense teachers, built-in divergences: row statistics only.
# --------------------------------------------------------------------------------------------


def _dense_logits(spec, student: Tensor, teacher: Tensor, valid: Tensor, scalars: Tensor):
    """(s, a, b): the capped student logits and both models' at the temperature. Ignored rows'
    teachers are neutral (they may hold anything, even a row of −inf)."""
    s = S.cap(student.to(spec.compute_dtype), scalars, S.S_CAP, spec.softcap)
    t = S.cap(torch.where(valid[:, None], teacher.to(spec.compute_dtype), 0), scalars, S.T_CAP, spec.teacher_softcap)
    return s, s * scalars[S.INV_T], t * scalars[S.INV_T]


def _dense_maxima(spec, student, teacher, valid, scalars) -> Tensor:
    s, a, b = _dense_logits(spec, student, teacher, valid, scalars)
    return torch.stack([_row_max(a), _row_max(b), _row_max(s)], 1)


def _dense_sums(spec, student, teacher, labels, valid, scalars, maxima, shard) -> Tensor:
    """(C, 4): Σ e^(x − max) of τs, τt and s, the label's logit where held; with the entropy a
    fifth column, Σ e^(τs − m)·(τs − m) (the entropy is log z − that / z)."""
    s, a, b = _dense_logits(spec, student, teacher, valid, scalars)
    e = [_shifted_exp(x, maxima[:, i]) for i, x in enumerate((a, b, s))]
    columns = [x.sum(-1) for x in e] + [_held_values(s, labels[:, None], shard)[:, 0]]
    if spec.entropy:
        m = torch.where(torch.isneginf(maxima[:, 0]), 0, maxima[:, 0])[:, None]
        columns.append((e[0] * (a - m)).nan_to_num(0.0).sum(-1))
    return torch.stack(columns, 1)


def _dense_terms(spec, student, teacher, valid, scalars, lse, with_grad: bool):
    """(local term sums (C,), local Σ ∂f/∂x_s (C,), ∂f/∂x_s (C, V_r) or None)."""
    terms = entry_of(spec.fn).terms
    _, a, b = _dense_logits(spec, student, teacher, valid, scalars)
    if terms.of == "logprobs":
        a, b = a - lse[:, :1], b - lse[:, 1:2]
    args = tuple(scalars[S.PARAMS + i] for i in range(spec.n_args))
    if not with_grad:
        return terms.fn(a, b, *args).sum(-1), None, None

    def total(x: Tensor):
        values = terms.fn(x, b, *args).sum(-1)
        return values.sum(), values

    grad, values = torch.func.grad(total, has_aux=True)(a)
    return values, grad.sum(-1), grad


def _dense_grad(
    spec, student, teacher, valid, scalars, lse, grad, total_grad, row_weight, label_column, label_held, vocab: int
) -> Tensor:
    """d Σ_r w_r·loss_r / d student (C, V_r) from the terms' gradient and the global sums;
    ``label_column`` (C,) is each row's label's column here where ``label_held``."""
    terms = entry_of(spec.fn).terms
    s, a, _ = _dense_logits(spec, student, teacher, valid, scalars)
    if terms.of == "logprobs":
        grad = grad - (a - lse[:, :1]).exp() * total_grad[:, None]
    if terms.mean:
        grad = grad / vocab
    da = scalars[S.SOFT_W] * scalars[S.INV_T] * grad
    if spec.has_ce and da.shape[1]:  # (an empty shard has no columns to write)
        one_hot = torch.zeros_like(da).scatter(1, label_column[:, None], label_held[:, None].to(da.dtype))
        da = da + scalars[S.HARD_W] * ((s - lse[:, 2:3]).exp() - one_hot)
    da = da * row_weight[:, None]
    if spec.softcap:
        da = da * (1 - (s / scalars[S.S_CAP]).square())
    return da


def _dense_step(spec, fns, shard, student, teacher, labels, valid, row_weight, scalars):
    maxima = all_reduce(fns["maxima"](student, teacher, valid, scalars), _MAX, shard.group)
    sums = all_reduce(fns["sums"](student, teacher, labels, valid, scalars, maxima, shard), _SUM, shard.group)
    lse = _lse(maxima, sums[:, :3])  # (C, 3): τs, τt and s (for the CE)
    values, local_grad, grad = fns["terms"](student, teacher, valid, scalars, lse, row_weight is not None)
    totals = values[:, None] if local_grad is None else torch.stack([values, local_grad], 1)
    totals = all_reduce(totals, _SUM, shard.group)  # (C, 1), or (C, 2) with the gradient's sums
    soft = totals[:, 0] / shard.vocab if entry_of(spec.fn).terms.mean else totals[:, 0]
    soft = torch.where(valid, soft, 0)
    hard = torch.where(valid, lse[:, 2] - sums[:, 3], 0) if spec.has_ce else torch.zeros_like(soft)
    ent = torch.where(valid, sums[:, 0].log() - sums[:, 4] / sums[:, 0], 0) if spec.entropy else torch.zeros_like(soft)
    parts = (scalars[S.SOFT_W] * soft + scalars[S.HARD_W] * hard, soft, hard, ent)
    if row_weight is None:
        return None, parts
    column, held = _owned(labels, shard)
    da = fns["grad"](student, teacher, valid, scalars, lse, grad, totals[:, 1], row_weight, column, held, shard.vocab)
    return da, parts


# --------------------------------------------------------------------------------------------
# Top-k teachers, built-in divergences: the student's logits at the ids, and the log-sum-exps of
# the rest of the vocabulary.
# --------------------------------------------------------------------------------------------


def _topk_logits(spec, student, ids, logprobs, scalars, shard):
    """(x capped, τx, the real top-k's mask (C, V_r) of this rank's columns, real (C, k))."""
    x = S.cap(student.to(spec.compute_dtype), scalars, S.S_CAP, spec.softcap)
    real = ~torch.isneginf(logprobs)
    local, held = _owned(ids, shard)
    # A count, not a scatter of booleans: a padding entry may repeat a real id.
    counts = torch.zeros_like(x).scatter_add(1, local, (real & held).to(x.dtype)) if shard.rows else x
    return x, x * scalars[S.INV_T], counts > 0, real


def _topk_maxima(spec, student, ids, logprobs, scalars, shard) -> Tensor:
    x, xa, in_topk, _ = _topk_logits(spec, student, ids, logprobs, scalars, shard)
    return torch.stack(
        [_row_max(xa.masked_fill(in_topk, float("-inf"))), _row_max(x.masked_fill(in_topk, float("-inf")))], 1
    )


def _topk_sums(spec, student, ids, logprobs, labels, scalars, maxima, shard) -> Tensor:
    """(C, 3 + k): the complement's Σ e^(x − max) at the temperature and at 1, the label's logit
    and the logits at the k ids where held; with the entropy a last column, the complement's
    Σ e^(τx − m)·(τx − m) (the top-k's share is added from the gathered logits)."""
    x, xa, in_topk, _ = _topk_logits(spec, student, ids, logprobs, scalars, shard)
    e_t = _shifted_exp(xa, maxima[:, 0]).masked_fill(in_topk, 0)
    z_1 = _shifted_exp(x, maxima[:, 1]).masked_fill(in_topk, 0).sum(-1)
    gathered = _held_values(x, ids, shard)
    columns = [e_t.sum(-1)[:, None], z_1[:, None], _held_values(x, labels[:, None], shard), gathered]
    if spec.entropy:
        m = torch.where(torch.isneginf(maxima[:, 0]), 0, maxima[:, 0])[:, None]
        columns.append((e_t * (xa - m)).nan_to_num(0.0).sum(-1)[:, None])
    return torch.cat(columns, 1)


def _topk_entropy(stats: Tensor, tail: Tensor, gathered: Tensor, real: Tensor, scalars: Tensor) -> Tensor:
    """(C,) the student's entropy at the temperature, log Z − Σ_v e^(a_v − M)(a_v − M) / Z over
    the whole vocabulary, a = τx: the complement's (max, log Σ e^(a − max)) in ``stats[:, :2]``
    and its Σ e^(a − max)(a − max) in ``tail``, with the real top-k ids' logits ``gathered``."""
    a = torch.where(real, gathered * scalars[S.INV_T], float("-inf"))
    m_c = stats[:, 0]
    top = torch.cat([m_c[:, None], a], 1).amax(-1)  # M, finite: a row has some logit
    e = torch.exp(a - top[:, None])  # (0 at padding)
    shift = torch.where(torch.isneginf(m_c), 0, m_c - top)
    z_c = torch.where(torch.isneginf(m_c), 0, stats[:, 1].exp())
    w_c = torch.where(torch.isneginf(m_c), 0, tail)
    z = shift.exp() * z_c + e.sum(-1)
    w = shift.exp() * (w_c + shift * z_c) + (e * torch.where(real, a - top[:, None], 0)).sum(-1)
    return z.log() - w / z


def _topk_grad(spec, student, ids, logprobs, labels, scalars, stats, d_gathered, d_label, d_lz_t, d_lz_1, shard):
    """d Σ_r w_r·loss_r / d student (C, V_r) from the gradients w.r.t. the few numbers."""
    x, xa, in_topk, real = _topk_logits(spec, student, ids, logprobs, scalars, shard)
    lse_t, lse_1 = stats[:, 0] + stats[:, 1], stats[:, 2] + stats[:, 3]
    dx = d_lz_t[:, None] * scalars[S.INV_T] * _shifted_exp(xa, lse_t) + d_lz_1[:, None] * _shifted_exp(x, lse_1)
    dx = dx.masked_fill(in_topk, 0)
    # The label's gradient goes with the top-k's where the label is a real top-k id.
    at_label = real & (ids == labels[:, None])
    d_gathered = d_gathered + torch.where(at_label, d_label[:, None], 0)
    d_label = torch.where(at_label.any(-1), 0, d_label)
    local, held = _owned(labels[:, None], shard)
    if shard.rows:
        dx = dx.scatter_add(1, local, torch.where(held, d_label[:, None], 0))
        local, held = _owned(ids, shard)
        dx = dx.scatter_add(1, local, torch.where(held & real, d_gathered, 0))
    if spec.softcap:
        dx = dx * (1 - (x / scalars[S.S_CAP]).square())
    return dx


def _topk_step(spec, fns, shard, student, ids, logprobs, labels, valid, row_weight, scalars):
    maxima = all_reduce(fns["maxima"](student, ids, logprobs, scalars, shard), _MAX, shard.group)
    sums = all_reduce(fns["sums"](student, ids, logprobs, labels, scalars, maxima, shard), _SUM, shard.group)
    # The complement's (max, log Σ e^(x − max)) at the temperature and at 1, as kdfuse.topk reads them.
    log_z = torch.where(torch.isneginf(maxima), float("-inf"), sums[:, :2].log())
    stats = torch.stack([maxima[:, 0], log_z[:, 0], maxima[:, 1], log_z[:, 1]], 1)
    label_logit, gathered = sums[:, 2], sums[:, 3 : 3 + ids.shape[1]]
    real = ~torch.isneginf(logprobs)
    ent = _topk_entropy(stats, sums[:, -1], gathered, real, scalars) if spec.entropy else None
    reduced = entry_of(spec.fn).reduced
    args = (
        gathered,
        label_logit,
        stats[:, 1],
        stats[:, 3],
        stats,
        logprobs.to(spec.compute_dtype),
        real,
        valid,
    )
    if row_weight is None:
        parts = fns["loss"](reduced, *args, scalars)
        return None, (*parts, torch.zeros_like(parts[0]) if ent is None else torch.where(valid, ent, 0))
    (d_gathered, d_label, d_lz_t, d_lz_1), parts = fns["loss"](reduced, *args, row_weight, scalars)
    dx = fns["grad"](student, ids, logprobs, labels, scalars, stats, d_gathered, d_label, d_lz_t, d_lz_1, shard)
    return dx, (*parts, torch.zeros_like(parts[0]) if ent is None else torch.where(valid, ent, 0))


# --------------------------------------------------------------------------------------------
# A divergence of the user's: the chunk's whole rows, gathered.
# --------------------------------------------------------------------------------------------


def _gathered_step(spec, generic: Callable, shard, student, teacher: tuple, labels, valid, row_weight, scalars):
    """The generic chunk function (kdfuse.chunk) on the all-gathered (C, V) logits; this rank's
    columns of the gradient. The CE's labels are global ids, as the gathered rows are."""
    full = all_gather_columns(student, shard)
    if not spec.sparse:
        teacher = (all_gather_columns(teacher[0], shard),)
    if spec.compiled:  # new tensors: their rows must be marked dynamic again (see kdfuse.chunk.call)
        for t in (full, *teacher):
            torch._dynamo.maybe_mark_dynamic(t, 0)
    rest = [labels, valid] + ([] if row_weight is None else [row_weight])
    out = generic(full, teacher, *rest, scalars)
    if row_weight is None:
        return None, out
    dlogits, parts = out
    return dlogits[:, shard.start : shard.start + shard.rows].contiguous(), parts


# --------------------------------------------------------------------------------------------
# Dispatch.
# --------------------------------------------------------------------------------------------


def _rows_dynamic(fn: Callable) -> Callable:
    """``fn`` with every tensor argument of the chunk's row count marked dynamic in its rows: the
    statistics made between the collectives are new tensors on every call, and a compiled phase
    would otherwise compile again for each new last-chunk length (up to Dynamo's limit, then
    run eagerly)."""

    def call(*args):
        rows = next(a.shape[0] for a in args if isinstance(a, Tensor))
        for a in args:
            if isinstance(a, Tensor) and a.dim() and a.shape[0] == rows:
                torch._dynamo.maybe_mark_dynamic(a, 0)
        return fn(*args)

    return call


def _phases(spec) -> dict[str, Callable]:
    """The local work between a built-in's collectives, compiled per spec (kdfuse.compiled)."""
    if spec.sparse:
        loss = reduced_grads if spec.with_grad else reduced_parts
        fns = {
            "maxima": (_topk_maxima, spec),
            "sums": (_topk_sums, spec),
            "loss": (lambda reduced, *a: loss(reduced, spec.has_ce, *a),),
            "grad": (_topk_grad, spec),
        }
    else:
        fns = {name: (fn, spec) for name, fn in (("maxima", _dense_maxima), ("sums", _dense_sums))}
        fns.update(terms=(_dense_terms, spec), grad=(_dense_grad, spec))
    phases = {name: compile_bound(*bound, compiled=spec.compiled, name="kdfuse_vp") for name, bound in fns.items()}
    return {name: _rows_dynamic(fn) for name, fn in phases.items()} if spec.compiled else phases


def chunk_step(spec, generic: Callable) -> Callable:
    """``step(student, teacher, labels, valid[, row_weight], scalars, shard)`` for ``spec``: the
    built-ins' row-statistics path, or ``generic`` (kdfuse.chunk's chunk function for the spec)
    on gathered rows for a divergence of the user's."""
    entry = entry_of(spec.fn)
    builtin = entry is not None and (entry.reduced if spec.sparse else entry.terms) is not None
    if not builtin:
        step = _gathered_step
        fns = generic
    else:
        step = _topk_step if spec.sparse else _dense_step
        fns = _phases(spec)

    def run(student, teacher, labels, valid, *rest):
        *row_weight, scalars, shard = rest
        row_weight = row_weight[0] if row_weight else None
        teacher = (teacher,) if step is _gathered_step else teacher
        out = step(spec, fns, shard, student, *teacher, labels, valid, row_weight, scalars)
        return out if row_weight is not None else out[1]

    return run
