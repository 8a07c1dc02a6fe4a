"""CUDA: the compiled path in bf16/fp16/fp32 (dense and top-k teachers) against the float64
reference, and the compile count.

Every test here is marked ``gpu`` and skipped without CUDA (see conftest.py). Shapes are moderate
(N = 1000 rows, V = 3001, a prime, Hs = 64 != Ht = 96) so that vocabulary-long reductions and
chunk tails are exercised while the float64 reference still fits easily.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import STUDENT, run_student
from torch._dynamo.utils import counters

from kdfuse import divergences as D
from kdfuse import fused_linear_distill, fused_linear_distill_ref

pytestmark = pytest.mark.gpu

N, V, HS, HT = 1000, 3001, 64, 96
CHUNK = 384  # 1000 = 2·384 + 232: a tail

# Norm-relative error bounds against the float64 reference fed exact float64 copies of the same
# rounded inputs, as derived in helpers.py (LOW_PRECISION_BOUNDS): loss 2.5u; gradients 6u
# beyond the unavoidable rounding of the exact gradient to the output dtype (``inherent``: for
# fp16 "mean" gradients over 1000 rows, mostly below fp16's smallest normal 6.1e-5, that rounding
# alone is 5-10u). Measured on an H100 (4 seeds; teacher hidden and logits; mean and none):
# loss ≤ 0.13u, gradients ≤ 3.1u beyond ``inherent`` for both bf16 and fp16 (jsd the largest).
# For fp32 (TF32 disabled below) the float32 reductions over V = 3001 and the N-long grad_weight
# accumulation dominate: measured ≤ 3e-6, allowed 2e-5.
_U = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}
BOUNDS = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2.5 * _U[torch.float16], 6 * _U[torch.float16]),
    torch.bfloat16: (2.5 * _U[torch.bfloat16], 6 * _U[torch.bfloat16]),
}


@pytest.fixture(autouse=True)
def _full_fp32_matmuls():
    """fp32 comparisons assume IEEE fp32 matmuls, not TF32 (10-bit mantissa)."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def make_inputs(n: int, dtype: torch.dtype, seed: int = 0, teacher_logits: bool = False) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32) * scale).to(dtype)

    inputs = dict(
        student_hidden=randn(n, HS),
        student_weight=randn(V, HS, scale=3 / math.sqrt(HS)),  # logits of magnitude ~3
        student_bias=randn(V, scale=0.5),
        labels=torch.randint(0, V, (n,), generator=gen, device="cuda").masked_fill(
            torch.rand(n, generator=gen, device="cuda") < 0.2, -100
        ),
    )
    if teacher_logits:  # dense, with padded vocabulary columns that must be dropped
        inputs["teacher_logits"] = randn(n, V + 7, scale=3.0)
    else:
        inputs["teacher_hidden"] = randn(n, HT)
        inputs["teacher_weight"] = randn(V + 7, HT, scale=3 / math.sqrt(HT))
    return inputs


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def rel_err(actual, expected) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm().clamp_min(1e-30)).item()


def check(inputs, dtype, grad_output=None, bounds=None, **kwargs):
    out, grads = run_student(fused_linear_distill, inputs, grad_output=grad_output, impl="compile", **kwargs)
    # The reference gets exact float64 copies of the rounded inputs, so its gradients are exact
    # (with the low-precision leaves themselves, autograd would round them to the leaf dtype).
    exact = {k: v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in inputs.items()}
    ref, ref_grads = run_student(
        fused_linear_distill_ref, exact, grad_output=None if grad_output is None else grad_output.double(), **kwargs
    )
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    loss_bound, grad_bound = BOUNDS[dtype] if bounds is None else bounds
    assert rel_err(out, ref) < loss_bound, ("loss", rel_err(out, ref))
    for name, g, r in zip(STUDENT, grads, ref_grads):
        assert r.dtype == torch.float64
        assert g.dtype == dtype and torch.isfinite(g).all(), name
        inherent = rel_err(r.to(dtype), r)  # the exact gradient rounded to the output dtype
        assert rel_err(g, r) < grad_bound + inherent, (name, rel_err(g, r), inherent)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize(
    "kwargs",
    [dict(divergence="forward_kl", hard_weight=0.5, temperature=2.0), dict(divergence=D.jsd(0.5))],
    ids=["forward_kl+ce", "jsd"],
)
def test_compiled_matches_reference(dtype, kwargs):
    check(make_inputs(N, dtype), dtype, chunk_size=CHUNK, **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [dict(divergence="forward_kl", hard_weight=0.5), dict(divergence=D.jsd(0.5))],
    ids=["forward_kl+ce", "jsd"],
)
def test_compiled_fp16_matches_reference(kwargs):
    check(make_inputs(N, torch.float16, seed=1), torch.float16, chunk_size=CHUNK, **kwargs)


@pytest.mark.parametrize("teacher_logits", [False, True], ids=["teacher_hidden", "teacher_logits"])
def test_compiled_reduction_none_bf16(teacher_logits):
    inputs = make_inputs(N, torch.bfloat16, seed=2, teacher_logits=teacher_logits)
    go = torch.randn(N, device="cuda", generator=torch.Generator(device="cuda").manual_seed(3))
    check(
        inputs,
        torch.bfloat16,
        grad_output=go,
        reduction="none",
        chunk_size=CHUNK,
        divergence="forward_kl",
        hard_weight=0.5,
        temperature=2.0,
    )


def test_auto_chunk_size_bf16(tmp_path, monkeypatch):
    """chunk_size="auto" (tuned in process on CUDA) gives the same numbers; the tuning cache goes
    to a temporary directory, not the user's."""
    monkeypatch.setenv("KDFUSE_CACHE_DIR", str(tmp_path))
    check(make_inputs(N, torch.bfloat16, seed=4), torch.bfloat16, divergence="forward_kl", hard_weight=0.5)


def test_no_recompile_across_row_counts_on_gpu():
    """The torch.compile path (a divergence the Triton kernel does not implement) compiles one
    graph for every row count, temperature, weight and divergence parameter. (skew_kl runs in no
    other test here: the graphs counted are this test's own, counted as a difference of Dynamo's
    counters, see test_compile.py.)"""
    start = unique_graphs()
    base = dict(divergence=D.skew_kl(0.1), hard_weight=0.5, chunk_size=CHUNK, impl="compile")
    for n in (1000, 777, 1531, 64, 2049, 1):  # single chunks, tails of 9, 1 (merged), 129, N = 1
        inputs = make_inputs(n, torch.bfloat16, seed=n)
        run_student(fused_linear_distill, inputs, **base)
    assert unique_graphs() - start == 1
    inputs = make_inputs(900, torch.bfloat16, seed=5)
    for temperature, soft, hard in ((0.5, 1.0, 0.1), (3.0, 0.2, 2.0)):
        run_student(
            fused_linear_distill, inputs, **dict(base, temperature=temperature, soft_weight=soft, hard_weight=hard)
        )
    for n, alpha in ((1000, 0.3), (555, 0.6)):
        inputs = make_inputs(n, torch.bfloat16)
        run_student(fused_linear_distill, inputs, **dict(base, divergence=D.skew_kl(alpha)))
    assert unique_graphs() - start == 1


def _with_topk(inputs: dict, k: int) -> dict:
    """``inputs`` with the dense teacher replaced by its top-k (kdfuse.teacher_topk, T = 1), some
    rows padded (log-prob −inf, id 0) after their first k // 2 entries."""
    from kdfuse import teacher_topk

    hidden, weight = inputs.pop("teacher_hidden"), inputs.pop("teacher_weight")
    ids, logprobs = teacher_topk(hidden, weight, k, vocab=V)
    padded = torch.arange(ids.shape[0], device="cuda")[:, None] % 5 == 0
    tail = torch.arange(k, device="cuda") >= k // 2
    inputs["teacher_topk"] = (ids.masked_fill(padded & tail, 0), logprobs.masked_fill(padded & tail, float("-inf")))
    return inputs


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("divergence", ["topk_forward_kl_bucket", "topk_soft_ce_renormalize", "topk_forward_kl_ignore"])
def test_topk_teacher_matches_reference(dtype, divergence):
    """The fused top-k path (kdfuse.triton_topk) with CE and a temperature."""
    inputs = _with_topk(make_inputs(N, dtype, seed=6), k=64)
    check(inputs, dtype, chunk_size=CHUNK, divergence=divergence, hard_weight=0.5, temperature=2.0)


# fp32_logits: float32 logits, so the loss is float32-accurate (the fp32 bound) and the gradients
# carry one rounding of the logit gradient to bf16 besides the output's (CPU: ≤ 0.22u, see
# test_fused.py), bound 1u; bf16 logits give up to 3.1u (above).
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(divergence="forward_kl", hard_weight=0.5, temperature=2.0),
        dict(divergence=D.jsd(0.5)),
        dict(divergence="topk_forward_kl_bucket", hard_weight=0.5),
    ],
    ids=["forward_kl+ce", "jsd", "topk"],
)
def test_fp32_logits_matches_reference(kwargs):
    inputs = make_inputs(N, torch.bfloat16, seed=8)
    if isinstance(kwargs["divergence"], str) and kwargs["divergence"].startswith("topk"):
        inputs = _with_topk(inputs, k=64)
    bounds = (BOUNDS[torch.float32][0], _U[torch.bfloat16])
    check(inputs, torch.bfloat16, bounds=bounds, chunk_size=CHUNK, fp32_logits=True, **kwargs)


def test_topk_no_recompile_across_row_counts():
    """The top-k path's compiled (C, k) part: one graph for every row count, N = 1 included.
    (topk_soft_ce_bucket runs in no other test here, and the (C, k) part is compiled once per
    divergence, CE and gradient: the graph counted is this test's own.)"""
    start = unique_graphs()
    for n in (1000, 777, 1, 64, 2049):
        inputs = _with_topk(make_inputs(n, torch.bfloat16, seed=n), k=16)
        run_student(fused_linear_distill, inputs, divergence="topk_soft_ce_bucket", hard_weight=0.5, chunk_size=CHUNK)
    assert unique_graphs() - start == 1


@pytest.mark.parametrize("teacher", ["dense", "topk"])
def test_value_check_on_cuda(teacher):
    """validate=True on CUDA: the counts come back through pinned memory behind an event
    (validate.start_value_check), waited for once the first chunk's logits are queued. An
    out-of-range label (or id) is a ValueError before any kernel reads it (a device-side assert
    would poison the CUDA context), and the device is usable after it."""
    inputs = make_inputs(N, torch.bfloat16, seed=7)
    if teacher == "topk":
        inputs = _with_topk(inputs, k=16)
        kw = dict(divergence="topk_forward_kl_bucket")
        ids = inputs["teacher_topk"][0].clone()
        # The last counted row: in the last chunk, so the first chunk's work is queued before the
        # check fails (an ignored row's ids are padding, never read nor checked).
        last = int((inputs["labels"] != -100).nonzero()[-1, 0])
        assert last >= 2 * CHUNK
        ids[last, 0] = V
        bad = dict(inputs, teacher_topk=(ids, inputs["teacher_topk"][1]))
        match = r"teacher_topk ids has 1 value\(s\) outside"
    else:
        kw = {}
        labels = inputs["labels"].clone()
        labels[N - 1] = V
        bad = dict(inputs, labels=labels)
        match = r"labels has 1 value\(s\) outside"
    for grad in (True, False):
        with pytest.raises(ValueError, match=match), torch.set_grad_enabled(grad):
            fused_linear_distill(**bad, chunk_size=CHUNK, hard_weight=0.5, **kw)
    torch.cuda.synchronize()
    check(inputs, torch.bfloat16, chunk_size=CHUNK, hard_weight=0.5, **kw)


@pytest.mark.parametrize("teacher", ["dense", "topk"])
@pytest.mark.parametrize("validate", [False, True])
def test_step_does_not_sync_the_stream(teacher, validate):
    """A forward + backward queues its work without waiting for the device (no stream or device
    sync: a sync makes the device idle while the host queues what follows; a pageable
    host-to-device copy was one). With validate=True the one wait is an event's, which the sync
    debug mode does not count: the check's wait covers its own counts only."""
    inputs = make_inputs(N, torch.bfloat16, seed=8)
    kw = dict(divergence="topk_forward_kl_bucket") if teacher == "topk" else dict(divergence=D.jsd(0.3))
    if teacher == "topk":
        inputs = _with_topk(inputs, k=16)
    kw.update(chunk_size=CHUNK, hard_weight=0.5, temperature=2.0, validate=validate)
    run_student(fused_linear_distill, inputs, **kw)  # compile and warm up outside the watched call
    run_student(fused_linear_distill, inputs, normalizer=123.0, **kw)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_student(fused_linear_distill, inputs, **kw)
        run_student(fused_linear_distill, inputs, normalizer=123.0, **kw)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_on_cuda(reduction):
    """Under CUDA autocast with float32 parameters, the compiled path (the Triton kernel) gives
    exactly what it gives for the same call with bf16 inputs, and float32 gradients."""
    inputs = make_inputs(N, torch.float32, seed=7)
    kwargs = dict(divergence="forward_kl", hard_weight=0.5, temperature=2.0, chunk_size=CHUNK, reduction=reduction)
    go = None if reduction == "mean" else torch.rand(N, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out, grads = run_student(fused_linear_distill, inputs, grad_output=go, **kwargs)
    cast = {k: v.bfloat16() if v.is_floating_point() else v for k, v in inputs.items()}
    want, want_grads = run_student(fused_linear_distill, cast, grad_output=go, **kwargs)
    assert torch.equal(out, want)
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32 and torch.equal(g, w.float())


def test_topk_ignored_rows_may_hold_anything_on_cuda():
    """The Triton top-k path: NaN log-probs and out-of-range ids on ignored rows change nothing."""
    inputs = _with_topk(make_inputs(N, torch.bfloat16, seed=8), k=16)
    ignored = (inputs["labels"] == -100).nonzero()[:, 0]
    ids, logprobs = (t.clone() for t in inputs["teacher_topk"])
    ids[ignored] = V + 5
    logprobs[ignored] = float("nan")
    kwargs = dict(divergence="topk_forward_kl_bucket", hard_weight=0.5, chunk_size=CHUNK)
    out, grads = run_student(fused_linear_distill, dict(inputs, teacher_topk=(ids, logprobs)), **kwargs)
    want, want_grads = run_student(fused_linear_distill, inputs, **kwargs)
    assert len(ignored) > 0 and torch.equal(out, want)
    for g, w in zip(grads, want_grads):
        assert torch.equal(g, w)


@pytest.mark.parametrize(
    "kwargs",
    [dict(divergence="forward_kl", hard_weight=0.5, temperature=2.0), dict(divergence=D.jsd(0.5), reduction="none")],
    ids=["forward_kl+ce", "jsd-none"],
)
def test_teacher_logits_in_blocks_match_reference(monkeypatch, kwargs):
    """Chunks of 384 rows whose teacher logits come 100 rows at a time (blocks 100, 100, 100, 84,
    and 100, 100, 32 in the 232-row tail), in the kernel that writes each block's gradient over
    its rows of the student's block."""
    from kdfuse import engine

    monkeypatch.setattr(engine, "TEACHER_ROWS", 100)
    go = None
    if kwargs.get("reduction") == "none":
        go = torch.randn(N, device="cuda", generator=torch.Generator(device="cuda").manual_seed(9))
    check(make_inputs(N, torch.bfloat16, seed=9), torch.bfloat16, grad_output=go, chunk_size=CHUNK, **kwargs)


def test_teacher_logits_in_blocks_bound_the_peak(monkeypatch):
    """One 4096-row chunk at V = 32768: the student's block (256 MiB) lives through the chunk,
    the teacher's logits only 1024 rows at a time (64 MiB, not 256)."""
    from kdfuse import engine

    monkeypatch.setattr(engine, "TEACHER_ROWS", 1024)
    n, v, h = 4096, 32768, 64
    gen = torch.Generator(device="cuda").manual_seed(10)
    hidden, teacher_hidden = (torch.randn(n, h, generator=gen, device="cuda").bfloat16() for _ in range(2))
    weight, teacher_weight = (torch.randn(v, h, generator=gen, device="cuda").bfloat16() / 8 for _ in range(2))
    hidden.requires_grad_()
    weight.requires_grad_()
    kwargs = dict(hard_weight=0.5, labels=torch.randint(0, v, (n,), generator=gen, device="cuda"), chunk_size=n)
    fused_linear_distill(hidden, weight, teacher_hidden, teacher_weight, **kwargs).backward()  # compile, warm
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fused_linear_distill(hidden, weight, teacher_hidden, teacher_weight, **kwargs).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    mib = 2**20
    # student block 256 + teacher block 64 + float32 grad_weight 8 + bf16 grads ~4.5, small tensors
    assert extra < (256 + 2 * 64 + 32) * mib, extra / mib


@pytest.mark.parametrize(
    "teacher,fp32_logits,one_chunk",
    [
        ("hidden", False, False),
        ("logits", False, False),
        ("topk", False, False),
        ("hidden", True, False),
        ("hidden", False, True),
        ("hidden", True, True),
    ],
)
def test_estimate_bytes_is_the_measured_peak(teacher, fp32_logits, one_chunk):
    """kdfuse.tuning.estimate_bytes for the Triton kernels' path against the measured peak of a
    fwd+bwd step (two 2048-row chunks, V = 32768): equal up to what lives across chunks (the
    bf16 gradients, grad_hidden in float32, per-row values: ~6 MiB), neither under nor over.
    Teacher logits the caller gives are read in place; estimating a teacher block for them (as
    before) would put the estimate 128 MiB above the peak. ``one_chunk``: 1024 rows and a float32
    grad_weight (128 MiB) twice the teacher's block; counting it beside the teacher's block (as
    when it was allocated before the chunk) would put the estimate 64 MiB above the peak."""
    from kdfuse import teacher_topk, tuning

    n, chunk, v, h = (1024, 1024, 32768, 1024) if one_chunk else (4096, 2048, 32768, 64)
    gen = torch.Generator(device="cuda").manual_seed(11)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, device="cuda") * scale).bfloat16()

    hidden, weight = randn(n, h).requires_grad_(), randn(v, h, scale=h**-0.5).requires_grad_()
    kwargs = dict(
        hard_weight=0.5,
        labels=torch.randint(0, v, (n,), generator=gen, device="cuda"),
        chunk_size=chunk,
        fp32_logits=fp32_logits,
    )
    t_hidden, t_weight = randn(n, h), randn(v, h, scale=h**-0.5)
    if teacher == "hidden":
        kwargs.update(teacher_hidden=t_hidden, teacher_weight=t_weight)
    elif teacher == "logits":
        kwargs.update(teacher_logits=(t_hidden @ t_weight.t()))
    else:
        kwargs.update(teacher_topk=teacher_topk(t_hidden, t_weight, 64), divergence="topk_forward_kl_bucket")
    for _ in range(2):  # the first call compiles and warms the allocator; the second is measured
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fused_linear_distill(hidden, weight, **kwargs).backward()
        torch.cuda.synchronize()
        hidden.grad = weight.grad = None
    extra = torch.cuda.max_memory_allocated() - base
    estimate = tuning.estimate_bytes(chunk, v, h, torch.bfloat16, True, teacher, True, fp32_logits, rows=n)
    mib = 2**20
    assert estimate - 2 * mib < extra < estimate + 12 * mib, (extra / mib, estimate / mib)


def test_inside_a_users_compiled_step():
    """A step the user compiles with torch.compile, calling fused_linear_distill inside, gets the
    eager step's loss and gradients. V = 8200 > 4096: the Triton chunk kernel and (on Hopper) the
    promoted gradient GEMM both run under it."""
    n, v = 700, 8200
    gen = torch.Generator(device="cuda").manual_seed(3)
    h, w, th, tw = (
        (torch.randn(*shape, generator=gen, device="cuda") * scale).bfloat16()
        for shape, scale in (((n, HS), 1.0), ((v, HS), 3 / math.sqrt(HS)), ((n, HT), 1.0), ((v, HT), 3 / math.sqrt(HT)))
    )
    labels = torch.randint(0, v, (n,), generator=gen, device="cuda")

    def step(h, w):
        loss = fused_linear_distill(h, w, th, tw, labels=labels, hard_weight=0.5, chunk_size=256)
        return loss, torch.autograd.grad(loss, (h, w))

    leaves = [t.detach().requires_grad_() for t in (h, w)]
    loss, grads = step(*leaves)
    c_loss, c_grads = torch.compile(step)(*leaves)
    assert rel_err(c_loss, loss) < 1e-6, (c_loss.item(), loss.item())
    for got, want in zip(c_grads, grads):
        assert got.dtype == want.dtype and rel_err(got, want) < 2.0**-8, rel_err(got, want)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_inputs_on_a_gpu_other_than_the_current_one():
    # Triton launches on the current device: kdfuse makes the inputs' GPU current for the call.
    inputs = {
        k: v.to("cuda:1") if isinstance(v, torch.Tensor) else v
        for k, v in make_inputs(N, torch.bfloat16, seed=3).items()
    }
    with torch.cuda.device(0):
        check(inputs, torch.bfloat16, chunk_size=CHUNK, divergence="forward_kl", hard_weight=0.5)
