"""Hypothesis fuzz of the public API: every valid draw ends in the reference's result.

``test_fuzz_public_api`` draws a whole call of :func:`kdfuse.fused_linear_distill`
(helpers.valid_calls; impl="eager": CPU compiles would cost ~10 s per new graph) - shapes
including N = 0, every input dtype, the three teacher forms, labels with ignored rows, every
built-in and a user divergence, temperatures from 0.05 to 20, softcap, reductions, normalizers,
chunk sizes, ``validate``, which leaves need a gradient; every tensor entry drawn - and requires a
finite loss (of the right shape and dtype) and finite gradients equal to the float64 reference's
(:func:`kdfuse.fused_linear_distill_ref`) within the tolerance below. (The same draws with one
mistake each, which must raise that mistake's error, are test_validate.py's.)

Tolerance. Inputs are drawn on a grid every dtype holds exactly, such that the logits (at most 6
products of grid values plus a bias) are exact in bfloat16 too; so the fused path's logits equal
the reference's and the remaining error is (a) the float32 compute (float64 for float64 inputs)
and (b) rounding the logit gradient D and the gradient matmuls' outputs to the input dtype:

* float64: |fused - ref| <= 1e-9 |ref| + 1e-12 M (loss) or + err(D) propagated as below with
  err(D) = 1e-9 |D| + 1e-13 M_r (1 + 1/T) (gradients), M the magnitude of the terms that cancel
  (log-probabilities up to max|z|/T, the 1e4 log-probability floor in rows with masked teacher
  entries): the same function summed in another order;
* others, the loss (and parts): |fused - ref| <= 8 |ref32 - ref| + 1e-6 (|ref| + 1e-6), where
  ref32 is the reference computed at ``precision=float32``: what float32 math cannot resolve is
  allowed, but no more than 8 times what the reference itself loses;
* others, gradients, elementwise: |g - e| <= E + u |e| + floors, u the dtype's unit roundoff
  (2^-24, 2^-11, 2^-8), E the error of the logit gradient D propagated through the matmuls that
  form each gradient: with err(D) = 2u |D| (D and the matmul output rounded to the dtype) + 8x
  the float32 reference's worst error in that row of D (float32 cancellations, e.g. p_s - p_t
  at T = 20) + 2 eps32 M_r (1 + 1/T) (M_r as for float64: float32's rounding of the terms D is
  formed from, for rows where the float32 reference happens to be exact), E = err(D) @ |W| for
  the hidden states, err(D)^T @ |H| for the weight, and the column sums for the bias. D is
  exact (the reference with the logits as inputs). Floors: float32
  underflow (2^-126 per term) and float16 subnormals: 2^-25 for the returned gradients, and
  2^-38 max|D| for D (each chunk's D is scaled to a largest entry of 2^14 before rounding).

A float16 draw whose exact gradient lies beyond float16's range is counted as an event, not
checked (no float16 result can hold it).
Ignored rows whose teacher row is entirely -inf (padding) are drawn; valid rows always keep some
teacher support (a distribution with none has no divergence).
Out-of-range labels are drawn with ``validate=False`` only, and only without the cross-entropy (on
CPU torch's cross_entropy would raise an IndexError: with ``validate=False`` the caller vouches for
the labels); with ``validate=True`` they are a mistake (test_validate.py).

Profiles (tests/conftest.py): ``ci`` (default) runs 20 examples; ``--hypothesis-profile long``
runs 10 000 (about 15 min on one CPU core); ``--hypothesis-show-statistics`` lists the outcomes.
"""

from __future__ import annotations

import math

import torch
from helpers import STUDENT, Call, valid_calls
from hypothesis import event, given, note
from hypothesis import strategies as st

from kdfuse import fused_linear_distill, fused_linear_distill_ref

F64 = torch.float64
UNIT = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}


# --------------------------------------------------------------------------------------------
# Checking a valid call against the reference
# --------------------------------------------------------------------------------------------


def _grad_output(c: Call):
    """The drawn weights of a per-row result's rows (float32 values: the same on both sides)."""
    return c.grad_output if c.kwargs["reduction"] == "none" else None


def _parts(out):
    return tuple(out) if isinstance(out, tuple) else (out,)


def _run(fn, c: Call, go, **extra):
    """(parts of the result, {name: gradient}) with fresh leaves."""
    args, leaves = c.args(dtype=F64 if fn is fused_linear_distill_ref else None)
    out = fn(**{**args, **extra})
    loss = _parts(out)[0]
    grads = {}
    if leaves:
        g_out = None if go is None else go.to(loss.dtype)
        grads = dict(
            zip(
                leaves,
                torch.autograd.grad(
                    loss, list(leaves.values()), grad_outputs=g_out, allow_unused=True, materialize_grads=True
                ),
            )
        )
    return _parts(out), grads, leaves


def _logit_grad(c: Call, go, precision=F64) -> torch.Tensor:
    """d(result)/d(student logits) (n, V) from the reference with the logits as hidden states and
    an identity lm_head: exact at ``precision=float64``; float32's own error at float32."""
    t = c.tensors
    logits = t["student_hidden"] @ t["student_weight"].T
    if t.get("student_bias") is not None:
        logits = logits + t["student_bias"]
    leaf = logits.detach().clone().requires_grad_()
    args, _ = Call(F64, c.leading, {k: v for k, v in t.items() if k not in STUDENT}, c.kwargs, ()).args()
    out = _parts(fused_linear_distill_ref(leaf, torch.eye(logits.shape[-1], dtype=F64), **args, precision=precision))[0]
    (d,) = torch.autograd.grad(out, leaf, grad_outputs=go, allow_unused=True, materialize_grads=True)
    return d.reshape(c.rows, -1)


def check_valid(c: Call) -> float:
    """Assert the fused result equals the reference's (see the module docstring); returns the
    worst error / allowed ratio seen (for calibration)."""
    go = _grad_output(c)
    out, grads, leaves = _run(fused_linear_distill, c, go)
    ref, ref_grads, _ = _run(fused_linear_distill_ref, c, go)
    per_row = c.kwargs["reduction"] == "none"
    compute = F64 if c.dtype == F64 else torch.float32
    assert len(out) == (3 if c.kwargs["return_parts"] else 1)
    for a in out:
        assert a.shape == (c.leading if per_row else ()) and a.dtype == compute
        assert torch.isfinite(a).all()
    for name, g in grads.items():
        assert g.shape == leaves[name].shape and g.dtype == c.dtype, name
        assert torch.isfinite(g).all(), name
    worst = 0.0
    row_weight, magnitude = _magnitudes(c, go)
    if c.dtype == F64:
        # The float64 compute's own error, ~eps64 times the magnitude of the terms that cancel
        # (log-probabilities up to max|z|/T, the 1e4 floor where the teacher has -inf entries).
        for what, a, e, floor in zip(("loss", "soft", "hard"), out, ref, _part_floors(c, magnitude)):
            e = e.detach()
            allowed = 1e-9 * e.abs() + 1e-12 * floor + 1e-300
            err = (a.detach() - e).abs()
            worst = max(worst, (err / allowed).max().item() if e.numel() else 0.0)
            assert (err <= allowed).all(), (what, err.max().item())
        if not grads or not c.rows:
            return worst
        exact = _logit_grad(c, go)
        d_err = 1e-9 * exact.abs() + 1e-13 * (row_weight * magnitude * (1 + 1 / c.kwargs["temperature"]))[:, None]
        return max(worst, _check_grads(c, grads, ref_grads, d_err, rel=1e-9, floor=0.0))
    u = UNIT[c.dtype]
    ref32_args, _ = c.args(dtype=F64, leaves=False)
    ref32 = _parts(fused_linear_distill_ref(**ref32_args, precision=torch.float32))
    for what, a, e, e32, floor in zip(("loss", "soft", "hard"), out, ref, ref32, _part_floors(c, magnitude)):
        e, a = e.detach(), a.detach().to(F64)
        allowed = 8 * (e32.detach() - e).abs() + 1e-6 * e.abs() + 2.0**-24 * floor + 1e-300
        err = (a - e).abs()
        worst = max(worst, (err / allowed).max().item() if e.numel() else 0.0)
        assert (err <= allowed).all(), (what, a, e, e32)
    if not grads or not c.rows:
        return worst
    # Error of the logit gradient D, per element: rounding to the dtype (u |D|), float32's own
    # error in that row (8x the float32 reference's worst in the row: cancellations such as
    # p_s - p_t at T = 20 are judged against what float32 can do there), and underflow/subnormals.
    exact = _logit_grad(c, go)
    row_err = 8 * (_logit_grad(c, go, precision=torch.float32) - exact).abs().amax(-1, keepdim=True)
    # ... and at least float32's rounding of the terms D is formed from (in case the float32
    # reference happens to be exact in a row): eps32 * the row's magnitude * (1 + 1/T), twice.
    row_err = row_err + 2 * 2.0**-24 * (row_weight * magnitude * (1 + 1 / c.kwargs["temperature"]))[:, None]
    # float16 scales each chunk's D so that its largest entry is 2^14 (engine.half_with_scale):
    # its subnormal rounding (2^-25) is then at most 2^-38 times the chunk's largest entry.
    half_ulp = 2.0**-38 * exact.abs().max().item() if c.dtype == torch.float16 and exact.numel() else 0.0
    row_err = row_err + 2.0**-126 + half_ulp
    d_err = 2 * u * exact.abs() + row_err  # (u/2 for D, u/2 for the matmul output, with margin)
    floor = 2.0**-25 if c.dtype == torch.float16 else 0.0  # the gradients' own float16 subnormals
    return max(worst, _check_grads(c, grads, ref_grads, d_err, rel=u, floor=floor))


def _check_grads(c: Call, grads, ref_grads, d_err, rel, floor) -> float:
    """|g - e| <= err(D) propagated through the gradient matmuls + rel |e| + floor, elementwise."""
    hidden = c.tensors["student_hidden"].reshape(c.rows, -1)
    terms = {
        "student_hidden": (d_err @ c.tensors["student_weight"].abs()).reshape(c.tensors["student_hidden"].shape),
        "student_weight": d_err.T @ hidden.abs(),
        "student_bias": d_err.sum(0),
    }
    worst = 0.0
    for name, g in grads.items():
        e = ref_grads[name]
        allowed = terms[name] + rel * e.abs() + floor + 1e-300
        err = (g.to(F64) - e).abs()
        worst = max(worst, (err / allowed).max().item())
        assert (err <= allowed).all(), (name, err.max().item())
    return worst


def _magnitudes(c: Call, go):
    """(row weight (n,): d(result)/d(row loss), magnitude (n,) of the terms in a row's loss:
    sw (F + max|z|/T + log V + 1) + hw (max|z| + log V + 1), F = 1e4 (the log-probability floor)
    where the teacher row has -inf entries, z the row's finite student and teacher logits)."""
    t, kw = c.tensors, c.kwargs
    n, vocab = c.rows, t["student_weight"].shape[0]

    def rows(x):  # (n, last dim); explicit, since reshape(0, -1) is ambiguous
        return x.reshape(n, x.shape[-1])

    logits = rows(t["student_hidden"]) @ t["student_weight"].T
    if "teacher_hidden" in t:
        teacher = rows(t["teacher_hidden"]) @ t["teacher_weight"][:vocab].T
    elif "teacher_logits" in t:
        teacher = rows(t["teacher_logits"])[:, :vocab]
    else:
        teacher = rows(t["teacher_logprobs"]).to(F64)
    finite = torch.where(torch.isfinite(teacher), teacher, 0).abs()
    zmax = torch.maximum(
        logits.abs().amax(-1) if vocab else logits.new_zeros(n),
        finite.amax(-1) if finite.shape[-1] else finite.new_zeros(n),
    )
    floored = torch.isneginf(teacher).any(-1).to(F64) * 1e4
    log_v = math.log(max(vocab, 1)) + 1
    magnitude = abs(kw["soft_weight"]) * (floored + zmax / kw["temperature"] + log_v) + abs(kw["hard_weight"]) * (
        zmax + log_v
    )
    labels = t.get("labels")
    valid = torch.ones(n, dtype=F64) if labels is None else (labels.reshape(n) != kw["ignore_index"]).to(F64)
    if kw["reduction"] == "none":
        weight = valid if go is None else go.reshape(n).abs() * valid
    elif kw.get("normalizer") is not None:
        weight = valid / float(kw["normalizer"])
    elif kw["reduction"] == "mean":
        weight = valid / max(valid.sum().item(), 1.0)
    else:
        weight = valid
    return weight, magnitude


def _reduce_like_loss(c: Call, magnitude):
    """The magnitude reduced as the loss is (per row for "none"; without grad_output weights)."""
    weight, _ = _magnitudes(c, None)
    if c.kwargs["reduction"] == "none":
        return (weight * magnitude).reshape(c.leading)
    return (weight * magnitude).sum()


def _part_floors(c: Call, magnitude):
    """The magnitudes of (loss, soft, hard) reduced like the loss: the parts are unweighted, so
    theirs are the magnitude with soft_weight = 1, hard_weight = 0 and the other way round."""

    def with_weights(soft: float, hard: float) -> Call:
        return Call(c.dtype, c.leading, c.tensors, {**c.kwargs, "soft_weight": soft, "hard_weight": hard}, c.grad_names)

    parts = (_magnitudes(with_weights(1.0, 0.0), None)[1], _magnitudes(with_weights(0.0, 1.0), None)[1])
    return [_reduce_like_loss(c, m) for m in (magnitude, *parts)]


def _float16_out_of_range(c: Call) -> str | None:
    """Why a float16 draw is not checked, or None: an exact gradient beyond float16's range
    cannot come back finite at all."""
    if c.dtype != torch.float16 or not c.grad_names or not c.rows:
        return None
    _, exact, _ = _run(fused_linear_distill_ref, c, _grad_output(c))
    if any(g.abs().max().item() >= 6e4 for g in exact.values()):
        return "the exact gradient beyond float16's range"
    return None


# --------------------------------------------------------------------------------------------
# The fuzz test
# --------------------------------------------------------------------------------------------


@given(call=valid_calls(), data=st.data())
def test_fuzz_public_api(call, data):
    unchecked = not call.kwargs["validate"] and "labels" in call.tensors and call.kwargs["hard_weight"] == 0
    # validate=False with out-of-range labels: no check, and without CE they are ordinary rows.
    # (On a row that is already valid: an ignored row's teacher may be all -inf, i.e. no support.)
    if unchecked and data.draw(st.booleans(), label="unchecked out-of-range labels"):
        flat = call.tensors["labels"].view(-1)
        valid_rows = (flat != call.kwargs["ignore_index"]).nonzero()
        if len(valid_rows):
            flat[valid_rows[0, 0]] = call.tensors["student_weight"].shape[0] + 3  # ignore_index: -100, -1 or V
    skip = _float16_out_of_range(call)
    if skip is not None:
        event(f"valid, not checked: {skip}")
        return
    note(f"dtype={call.dtype} leading={call.leading} kwargs={call.kwargs} leaves={call.grad_names}")
    worst = check_valid(call)
    bucket = next(b for b in (1e-3, 1e-2, 0.1, 0.5, 1.0) if worst <= b)
    event(f"valid: worst error / allowed <= {bucket:g}")
    event(f"valid: {'N=0' if call.rows == 0 else call.dtype} - matches the reference")
