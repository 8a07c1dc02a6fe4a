"""``kdfuse.DistillLoss`` (kdfuse.module): the module holds the options and forwards to the
functional call, per-call arguments override them, and the divergence object reaches the engine
as itself (not a copy: a copy would be a new compile-cache key every step)."""

from __future__ import annotations

import torch
from helpers import assert_close_scaled, fixed_problem

from kdfuse import DistillLoss, DistillOutput, fused_linear_distill, fused_linear_distill_ref
from kdfuse import divergences as D


def test_distill_loss_module_matches_functional():
    prob = fixed_problem(n=10, hard_weight=0.5)
    t = prob.tensors
    opts = dict(divergence=D.jsd(0.3), temperature=2.0, hard_weight=0.5, chunk_size=3, impl="eager")
    module = DistillLoss(**opts)
    assert "jsd_beta0.3" in repr(module) and "temperature=2.0" in repr(module)
    args = (t["student_hidden"], t["student_weight"], t["teacher_hidden"], t["teacher_weight"])
    expected = fused_linear_distill(*args, labels=t["labels"], student_bias=t["student_bias"], **opts)
    got = module(*args, labels=t["labels"], student_bias=t["student_bias"])
    assert torch.equal(got, expected)
    # Per-call overrides win over the stored options.
    got = module(*args, labels=t["labels"], reduction="none", return_parts=True)
    ref = fused_linear_distill_ref(*args, labels=t["labels"], **{**opts, "reduction": "none"}, return_parts=True)
    assert isinstance(got, DistillOutput) and got.loss.shape == (10,)
    for a, b in zip(got, ref):
        assert_close_scaled(a, b, 1e-9)


def test_distill_loss_module_passes_the_divergence_object_itself():
    """A callable-object divergence must reach the kernel as the same object on every call (a
    copy would be a new compile-cache key, i.e. a recompile per step)."""

    class Counting:
        def __init__(self):
            self.calls = 0

        def __call__(self, student, teacher):
            self.calls += 1
            return D.forward_kl(student, teacher)

    div = Counting()
    module = DistillLoss(divergence=div, impl="eager")
    prob = fixed_problem(n=4)
    t = prob.tensors
    for _ in range(2):
        module(t["student_hidden"], t["student_weight"], t["teacher_hidden"], t["teacher_weight"])
    assert div.calls >= 2
    assert module.options.divergence is div
