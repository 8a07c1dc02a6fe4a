"""The public chunked fused-linear distillation loss: check the call, flatten it into an engine
:class:`~kdfuse.engine.Problem`, pick the chunk size, run the chunk loop (:mod:`kdfuse.engine`)."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

from .chunk import ChunkSpec, with_kernel
from .collectives import Shard, all_reduce, gathered, group_of, local_rows, raise_together, shard_layout
from .contract import DistillOutput, Impl, Reduction
from .divergences import Parametrized
from .engine import Problem, distill
from .registry import DivergenceLike, resolve
from .sweep import BenchProblem, tune_in_process
from .teacher import HiddenTeacher, LogitsTeacher, TopkTeacher, flat_teacher
from .tuning import Sweep, Tune, TuningKey, resolve_chunk_size
from .validate import check_inputs, check_logit_transforms, check_normalizer, start_value_check

__all__ = ["DistillOutput", "Impl", "Reduction", "distill_logits", "fused_linear_distill"]


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


def _to_device(values: list[float], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a 1-D tensor on ``device`` without a host sync: ``torch.tensor(values,
    device="cuda")`` copies from pageable memory, which waits for the stream to drain (the device
    then idles while the host queues the rest of the step). From pinned memory the copy is queued
    like a kernel; the caching host allocator keeps the buffer until the copy has run."""
    cuda = device.type == "cuda"
    return torch.tensor(values, dtype=dtype, pin_memory=cuda).to(device, non_blocking=cuda)


def _labels(labels: Tensor | None, rows: int, ignore_index: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """(labels (N,) int64, valid (N,) bool); without labels every row counts."""
    if labels is None:
        return torch.full((rows,), ignore_index, dtype=torch.long, device=device), torch.ones(
            rows, dtype=torch.bool, device=device
        )
    flat = labels.reshape(-1).long()
    return flat, flat != ignore_index


def _normalizer(reduction: str, normalizer: float | Tensor | None, valid: Tensor, dtype: torch.dtype) -> Tensor | None:
    """What the summed loss is divided by: the caller's ``normalizer``, else the number of valid
    rows (at least 1) for ``"mean"``; ``None`` for ``"sum"`` and ``"none"``."""
    if reduction == "none":
        return None
    if normalizer is None:
        return valid.sum().clamp_min(1).to(dtype) if reduction == "mean" else None
    if isinstance(normalizer, Tensor):
        return normalizer.to(valid.device, dtype).reshape(())
    return _to_device([normalizer], dtype, valid.device).reshape(())


def _tuner(p: Problem, div: Parametrized, labels: Tensor | None, options: dict) -> Tune:
    """``tune(key, preferred)`` for resolve_chunk_size: a sweep on this call's own tensors
    (detached leaves: the sweep's gradients touch neither the caller's graph nor ``.grad``)."""

    def tune(key: TuningKey, preferred: int) -> Sweep | None:
        def leaf(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.detach().requires_grad_(key.with_grad)

        t = p.teacher
        hidden = isinstance(t, HiddenTeacher)
        problem = BenchProblem(
            key,
            leaf(p.hidden),
            leaf(p.weight),
            student_bias=leaf(p.bias),
            labels=labels,
            divergence=div,
            teacher_hidden=t.hidden if hidden else None,
            teacher_weight=t.weight if hidden else None,
            teacher_bias=t.bias if hidden else None,
            teacher_logits=t.logits if isinstance(t, LogitsTeacher) else None,
            teacher_topk=(t.ids, t.logprobs) if isinstance(t, TopkTeacher) else None,
            options=options,
        )
        return tune_in_process(key, preferred, device=p.hidden.device, problem=problem, distill=fused_linear_distill)

    return tune


def _prepare(
    student_hidden, student_weight, student_bias, teacher, labels, div: Parametrized, options: dict, shard: Shard | None
) -> tuple[Problem, Tensor, bool]:
    """(the engine's problem with chunk_size still 0, the valid rows (N,), whether gradients are
    needed) of a checked call; ``teacher`` is (form, hidden, weight, bias, logits, topk)."""
    vocab, width = (student_hidden.shape[-1],) * 2 if student_weight is None else student_weight.shape
    hidden = student_hidden.reshape(-1, width)
    device = hidden.device
    flat_labels, valid = _labels(labels, hidden.shape[0], options["ignore_index"], device)
    teacher = flat_teacher(teacher[0], hidden.shape[0], vocab, valid, *teacher[1:])
    compute = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    s_cap, t_cap, temperature = options["student_softcap"], options["teacher_softcap"], options["temperature"]
    spec = ChunkSpec(
        div.fn,
        len(div.args),
        teacher.form == "topk",
        options["hard_weight"] != 0,
        s_cap is not None,
        options["ignore_index"],
        compute,
        with_grad=False,
        compiled=options["impl"] == "compile",
        wide_grad=hidden.dtype == torch.float16,
        parallel=shard is not None,
        teacher_softcap=t_cap is not None and teacher.form != "topk",
        entropy=options["entropy"],
    )
    if shard is None:  # the hand-written kernels see whole rows
        spec = with_kernel(spec, device.type, temperature)
    values = [1.0 / temperature, options["soft_weight"], options["hard_weight"], s_cap or 1.0, t_cap or 1.0, *div.args]
    scalars = _to_device(values, compute, device)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, student_weight, student_bias)
    )
    return (
        Problem(
            hidden,
            student_weight,
            student_bias,
            teacher,
            flat_labels,
            valid,
            scalars,
            spec,
            0,
            shard,
            options["student_logit_scale"],
            options["teacher_logit_scale"],
            options["fp32_logits"],
        ),
        valid,
        needs_grad,
    )


def _unwrapped(group, student_hidden, teacher_hidden, *weights: Tensor | None) -> list[Tensor | None]:
    """The (student weight, bias, teacher weight, bias) as plain tensors: a tensor-parallel
    DTensor's local rows over ``group``, or without a group an FSDP2 DTensor gathered in its
    model's hidden states' dtype (see kdfuse.collectives)."""
    names = ("student_weight", "student_bias", "teacher_weight", "teacher_bias")
    dtypes = [getattr(h, "dtype", None) for h in (student_hidden, student_hidden, teacher_hidden, teacher_hidden)]
    if group is None:
        return [gathered(t, dtype) for t, dtype in zip(weights, dtypes)]
    return [local_rows(t, name) for t, name in zip(weights, names)]


def _options(
    temperature, soft_weight, hard_weight, ignore_index: int, impl: str, entropy: bool, fp32_logits: bool, transforms
) -> dict:
    """The checked options, numbers as Python floats (NumPy scalars pass the checks): they key
    the compile and tuning caches. ``transforms``: kdfuse.validate.check_logit_transforms'."""
    student_softcap, teacher_softcap, student_logit_scale, teacher_logit_scale = transforms
    return {
        "temperature": float(temperature),
        "soft_weight": float(soft_weight),
        "hard_weight": float(hard_weight),
        "student_softcap": student_softcap,
        "teacher_softcap": teacher_softcap,
        "student_logit_scale": student_logit_scale,
        "teacher_logit_scale": teacher_logit_scale,
        "ignore_index": ignore_index,
        "impl": impl,
        "entropy": bool(entropy),
        "fp32_logits": bool(fp32_logits),
    }


def _check_teacher_rows(student_weight: Tensor, teacher: tuple) -> None:
    """With a process group the teacher's shard must be the student's vocabulary rows.
    ``teacher`` is (form, hidden, weight, bias, logits, topk)."""
    form, _, teacher_weight, _, teacher_logits, _ = teacher
    rows = student_weight.shape[0]
    teacher_rows = {"hidden": lambda: teacher_weight.shape[0], "logits": lambda: teacher_logits.shape[-1]}
    if form in teacher_rows and teacher_rows[form]() != rows:
        name = "teacher_weight's rows" if form == "hidden" else "teacher_logits' last dim"
        raise ValueError(
            f"with a process_group the teacher's shard must be the student's vocabulary rows: {name} is "
            f"{teacher_rows[form]()}, student_weight has {rows} (pad the teacher's vocabulary to the student's, "
            "or cut it, before sharding)"
        )


def _shard(group, student_hidden: Tensor, student_weight: Tensor, teacher: tuple, chunk_size) -> Shard:
    """The vocabulary's layout over ``group``, agreed with the other ranks (with the call's N and
    int chunk size). ``teacher`` is (form, hidden, weight, bias, logits, topk)."""
    tokens = student_hidden.numel() // max(student_hidden.shape[-1], 1)
    chunk = chunk_size if isinstance(chunk_size, int) else 0
    shard = shard_layout(group, student_weight.shape[0], student_hidden.device, tokens, chunk)
    topk = teacher[5]
    if teacher[0] == "topk" and topk[0].shape[-1] > shard.vocab:
        raise ValueError(f"teacher_topk has k={topk[0].shape[-1]} > the student's vocabulary {shard.vocab}")
    return shard


def _chunk_size(p: Problem, chunk_size, div: Parametrized, needs_grad: bool, memory_budget, labels, options) -> int:
    """``chunk_size``, or for ``"auto"`` the memoised, cached, tuned (in process, on this call's
    tensors) or heuristic choice; over a process group the smallest of the ranks' choices, never
    tuned in process (their collectives must pair up chunk by chunk: one tiny all-reduce and host
    sync per call; an int ``chunk_size`` skips it)."""
    if chunk_size != "auto":
        return chunk_size
    tune = None
    if p.shard is None and p.weight is not None:
        keys = ("temperature", "student_softcap", "teacher_softcap", "student_logit_scale", "teacher_logit_scale")
        tune = _tuner(p, div, labels, {k: options[k] for k in (*keys, "ignore_index")})
    size = resolve_chunk_size(
        chunk_size,
        rows=p.rows,
        vocab=p.vocab,
        student_hidden=0 if p.weight is None else p.weight.shape[1],
        teacher=p.teacher.form,
        teacher_dim=p.teacher.dim,
        dtype=p.hidden.dtype,
        device=p.hidden.device,
        divergence=div.__name__,
        with_ce=p.spec.has_ce,
        with_grad=needs_grad,
        memory_budget=memory_budget,
        impl="compile" if p.spec.compiled else "eager",
        fp32_logits=p.fp32_logits,
        tune=tune,
    )
    if p.shard is not None:
        agreed = torch.tensor([size], device=p.hidden.device)
        size = int(all_reduce(agreed, dist.ReduceOp.MIN, p.shard.group).item())
    return size


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
    process_group: object = None,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    return_entropy: bool = False,
    fp32_logits: bool = False,
) -> Tensor | DistillOutput | tuple[Tensor | DistillOutput, Tensor]:
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
            or an API; needs a sparse divergence (:mod:`kdfuse.topk`, ``"topk_..."`` names, or
            a function ``(student, ids, logprobs) -> (R,)``), and the temperature and softcap
            then apply to the student only.
        labels: token ids for the hard cross-entropy; rows equal to ``ignore_index`` contribute
            nothing to either term. ``None``: every row counts (then ``hard_weight`` must be 0).
        divergence: a built-in's name, a :class:`kdfuse.divergences.Parametrized`, or any pure
            function :data:`kdfuse.divergences.Divergence`.
        temperature: divides both models' logits inside the divergence (not the hard CE).
        soft_weight, hard_weight: ``loss = soft_weight·D + hard_weight·CE`` per row.
        reduction: ``"mean"`` (sum over valid rows / number of valid rows, at least 1),
            ``"sum"``, or ``"none"`` (per-row losses shaped like the leading dims).
        normalizer: with ``"mean"``/``"sum"``, divide the summed loss by this instead (e.g. the
            global number of tokens across gradient-accumulation steps and ranks).
        chunk_size: rows per chunk, or ``"auto"`` (autotuned or heuristic, see kdfuse.tuning).
        student_bias, teacher_bias: lm_head biases; the student's gets a gradient.
        softcap: Gemma-2 style ``softcap·tanh(logits/softcap)`` on both models' logits, after
            their scales; ``student_softcap`` / ``teacher_softcap`` give a model its own cap.
        student_logit_scale, teacher_logit_scale: each model's logits are its lm_head's output
            times this (Cohere's ``logit_scale``; Granite's ``1 / logits_scaling``), before the
            softcap and the temperature; for ``teacher_logits`` the given logits times it.
        return_parts: return ``DistillOutput(loss, soft_loss, hard_loss)``; the parts are the
            unweighted terms reduced like the loss, detached.
        return_entropy: also the student's entropy at the temperature (after its scale and
            softcap), reduced like the loss, detached: the result is ``(result, entropy)``.
        fp32_logits: with 16-bit inputs, keep both models' logits as the matmuls' float32
            accumulators instead of rounding them to the inputs' dtype (as TRL's kernel does);
            the logit gradient is still rounded to that dtype for the gradient matmuls. Closer
            to a float32 reference (loss and gradients), for float32 blocks of logits: about twice
            the chunk memory at the same chunk size (docs/benchmarks.md has the cost).
        impl: ``"compile"``: the fastest compiled per-chunk work (on CUDA the hand-written Triton
            kernels of the built-ins that have one, :mod:`kdfuse.triton_chunk` and
            :mod:`kdfuse.triton_topk`; ``torch.compile`` of the pure divergence otherwise), or
            ``"eager"``: the same pure functions, uncompiled.
        memory_budget: bounds ``chunk_size="auto"`` (bytes, or a fraction of free device memory;
            default ``KDFUSE_MEMORY_BUDGET``).
        validate: also check tensor *values* (labels and top-k ids inside the vocabulary),
            which costs one device-to-host sync per call (waited for once the first chunk's
            logits matmuls are queued, so the device keeps computing meanwhile); shapes, dtypes
            and devices are always checked, for free. Turn off in a hot loop whose data you trust.
        process_group: the vocabulary is split over this ``torch.distributed`` group (tensor
            parallelism, Megatron's layout): every rank passes the same hidden states and labels,
            and its contiguous rows of each lm_head (and bias), in rank order, ``(V_r, H)``
            (``V_r`` may differ between ranks); ``teacher_logits`` are this rank's ``(..., V_r)``
            columns, ``teacher_topk`` global ids (the same on every rank). Every rank returns the
            loss of the whole vocabulary; the hidden states' gradient is the whole gradient on
            every rank (all-reduced, as a column-parallel lm_head's input gradient is), each
            weight's gradient this rank's rows. A 1-D ``DeviceMesh`` stands for its group, and
            weights may then be DTensors sharded on dim 0 over it (their gradients come back as
            such). Every rank must backpropagate the same gradient of the loss. A rank whose
            inputs fail the checks makes every rank raise. Without a group, a DTensor weight is
            an FSDP2 shard: it is gathered once per call in its model's hidden states' dtype,
            its gradient averaged back to the shards as FSDP2 averages. See
            :mod:`kdfuse.vocab_parallel` for what is communicated.

    Under ``torch.autocast`` the logits are computed in its dtype, as ``F.linear`` would compute
    them there: the hidden states, weights and biases are cast to it first (float64 excepted), and
    the rest, backward included, runs with autocast off, so every chunk sees the same dtypes.

    Returns:
        The loss in the compute dtype (float32; float64 for float64 inputs).
    """
    return _distill_call(locals())


def distill_logits(
    student_logits: Tensor,  # (..., V)
    teacher_logits: Tensor | None = None,  # (..., Vt), Vt >= V
    *,
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
    softcap: float | None = None,
    return_parts: bool = False,
    impl: Impl = "compile",
    validate: bool = True,
    student_softcap: float | None = None,
    teacher_softcap: float | None = None,
    student_logit_scale: float = 1.0,
    teacher_logit_scale: float = 1.0,
    return_entropy: bool = False,
) -> Tensor | DistillOutput | tuple[Tensor | DistillOutput, Tensor]:
    """:func:`fused_linear_distill` from logits you already hold: the student's ``(..., V)``
    (differentiable) and the teacher's dense logits or top-k. The rows go chunk by chunk, so the
    loss's float32 intermediates never exceed a chunk (a full-logits loss makes several
    ``(N, V)`` float32 copies); the gradient is ``student_logits``'s. Same options and semantics
    (the student's logits take the place of ``student_hidden @ student_weight.T``); the chunk
    size is the cache's or the heuristic's choice, never tuned in process."""
    return _distill_call(
        dict(
            locals(),
            student_hidden=student_logits,
            student_weight=None,
            teacher_hidden=None,
            teacher_weight=None,
            student_bias=None,
            teacher_bias=None,
            memory_budget=None,
            process_group=None,
            fp32_logits=False,
        )
    )


def _distill_call(args: dict) -> Tensor | DistillOutput | tuple[Tensor | DistillOutput, Tensor]:
    """The body of :func:`fused_linear_distill` (and :func:`distill_logits`): ``args`` are its
    arguments by name (``student_weight=None``: ``student_hidden`` holds the student's logits)."""
    a = SimpleNamespace(**args)
    group = None if a.process_group is None else group_of(a.process_group)
    try:
        student_hidden, student_weight, student_bias, teacher, div, options = _checked(a, group)
    except (TypeError, ValueError) as error:
        if group is None:
            raise
        device = a.student_hidden.device if isinstance(a.student_hidden, Tensor) else torch.device("cpu")
        raise_together(group, device, error)
    shard = None if group is None else _shard(group, student_hidden, student_weight, teacher, a.chunk_size)
    p, valid, needs_grad = _prepare(
        student_hidden, student_weight, student_bias, teacher, a.labels, div, options, shard
    )
    return _run_call(p, a, div, valid, needs_grad, options, shard)


def _checked(a, group) -> tuple:
    """The call's checked inputs: (student hidden, weight, bias, teacher, divergence, options),
    the teacher as (form, hidden, weight, bias, logits, topk). Everything here is local to the
    rank: with a group, a rank whose inputs fail tells the others before it raises."""
    student_weight, student_bias, teacher_weight, teacher_bias = _unwrapped(
        group, a.student_hidden, a.teacher_hidden, a.student_weight, a.student_bias, a.teacher_weight, a.teacher_bias
    )
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = _autocast_inputs(
        a.student_hidden, student_weight, student_bias, a.teacher_hidden, teacher_weight, teacher_bias
    )
    form = check_inputs(
        student_hidden,
        student_weight,
        teacher_hidden,
        teacher_weight,
        a.teacher_logits,
        a.labels,
        teacher_topk=a.teacher_topk,
        student_bias=student_bias,
        teacher_bias=teacher_bias,
        temperature=a.temperature,
        soft_weight=a.soft_weight,
        hard_weight=a.hard_weight,
        reduction=a.reduction,
        chunk_size=a.chunk_size,
        softcap=a.softcap,
        impl=a.impl,
        ignore_index=a.ignore_index,
        memory_budget=a.memory_budget,
        sharded=group is not None,
    )
    check_normalizer(a.normalizer, a.reduction)
    teacher = (form, teacher_hidden, teacher_weight, teacher_bias, a.teacher_logits, a.teacher_topk)
    if group is not None:
        _check_teacher_rows(student_weight, teacher)
    div = resolve(a.divergence, sparse=form == "topk")
    transforms = check_logit_transforms(
        a.softcap, a.student_softcap, a.teacher_softcap, a.student_logit_scale, a.teacher_logit_scale
    )
    options = _options(
        a.temperature, a.soft_weight, a.hard_weight, a.ignore_index, a.impl, a.return_entropy, a.fp32_logits, transforms
    )
    return student_hidden, student_weight, student_bias, teacher, div, options


def _run_call(p: Problem, a, div, valid: Tensor, needs_grad: bool, options: dict, shard: Shard | None):
    """The chunk size, the value checks, the chunk loop, the result as the caller asked for it."""
    p = replace(p, chunk_size=_chunk_size(p, a.chunk_size, div, needs_grad, a.memory_budget, a.labels, options))
    # The value checks' one host sync waits for everything queued before it; queued here, after
    # the host-side set-up, and waited for only once the first chunk's logits matmuls are queued
    # (see kdfuse.engine), it leaves the device busy rather than idle while the host waits.
    ids = p.teacher.ids if isinstance(p.teacher, TopkTeacher) else None
    vocab = p.vocab if shard is None else shard.vocab
    check = start_value_check(vocab, a.ignore_index, labels=a.labels, topk_ids=ids) if a.validate else None
    norm = _normalizer(a.reduction, a.normalizer, valid, p.spec.compute_dtype)
    loss, soft, hard, entropy = distill(p, a.reduction, norm, check, needs_grad)
    if a.reduction == "none":
        loss, soft, hard, entropy = (x.reshape(a.student_hidden.shape[:-1]) for x in (loss, soft, hard, entropy))
    out = DistillOutput(loss, soft, hard) if a.return_parts else loss
    return (out, entropy) if a.return_entropy else out
