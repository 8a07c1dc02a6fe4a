"""Measuring chunk sizes: benchmark problems, the distill step and its GEMM floor, sweeps over the
candidates (``kdfuse tune``), and the in-process tuning of ``chunk_size="auto"``.

The distillation function is passed in (``distill=kdfuse.fused_linear_distill``) rather than
imported: the combinator calls this module to tune, so importing it here would be a cycle.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor

from autotune import Measurement, measure, tune

from . import registry
from .registry import DivergenceLike
from .tuning import (
    TIME_SLACK,
    Sweep,
    TuningKey,
    candidate_chunk_sizes,
    format_bytes,
    key_estimate,
    nearest_first,
    working_set,
)

__all__ = [
    "AUTO_TIME_BUDGET_S",
    "BenchProblem",
    "Distill",
    "available_memory",
    "bench_chunk_size",
    "bench_floor",
    "build_problem",
    "distill_step",
    "floor_step",
    "run_sweep",
    "tune_in_process",
]

Distill = Callable[..., Tensor]
""":func:`kdfuse.fused_linear_distill`'s signature."""

AUTO_TIME_BUDGET_S = 10.0
"""Seconds of measurement an in-process tuning may spend (after one untimed warm-up step that
compiles the chunk function); candidates not reached by then are skipped and the entry marked
partial. The budget is checked before each measurement, so the last one runs over it."""
# Rounds over the candidates (autotune.tune's ``rounds``), as far as the time budget goes: a GPU
# at its power limit throttles within a second of load, and the first candidates measured would
# otherwise catch the faster clocks. Short rounds (1 untimed step, the chunk function is compiled
# by then; 3 timed), and after the first only the candidates within 6% of the fastest run again:
# one further behind would need its second measurement within 2% to reach the contest (4%, twice
# the slack, on the median of its two). Two rounds only screen: the budget goes to the contest.
_AUTO_WARMUP, _AUTO_REPEAT, _AUTO_ROUNDS, _AUTO_RERUN_WITHIN = 1, 3, 2, 0.06
# Pairs per contest (autotune.tune's ``pairs``); a time budget decides a contest on the pairs it has.
_CONTEST_PAIRS = 5
# The in-process tuning tries a candidate only if its working set (kdfuse.tuning.working_set),
# plus this fraction of it and this many bytes, fits in the memory available at the call: the
# first training step must not run out of memory where every later one fits.
_FREE_MARGIN, _FREE_RESERVE = 0.10, 128 * 2**20


# --------------------------------------------------------------------------------------------
# The benchmark: inputs of the key's shapes, forward + backward, and the GEMM floor.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchProblem:
    """A distillation call to time: random inputs of a key's shapes (:func:`build_problem`), or
    a real call's own tensors (detached: timing them touches neither their graph nor ``.grad``)."""

    key: TuningKey
    student_hidden: Tensor  # (N, Hs), requires grad when key.with_grad
    student_weight: Tensor  # (V, Hs), requires grad when key.with_grad
    teacher_hidden: Tensor | None = None  # (N, Ht)
    teacher_weight: Tensor | None = None  # (V, Ht)
    teacher_logits: Tensor | None = None  # (N, V)
    teacher_topk: tuple[Tensor, Tensor] | None = None  # ((N, k) ids, (N, k) log-probs)
    labels: Tensor | None = None  # (N,)
    student_bias: Tensor | None = None  # (V,), requires grad when key.with_grad
    teacher_bias: Tensor | None = None  # (V,)
    divergence: DivergenceLike = "forward_kl"
    options: Mapping[str, object] = field(default_factory=dict)  # more fused_linear_distill keywords

    @property
    def device(self) -> torch.device:
        return self.student_hidden.device

    @property
    def rows(self) -> int:
        return self.student_hidden.shape[0]


def bench_divergence(key: TuningKey) -> str:
    """The key's divergence if it is a built-in for its teacher; a user divergence (only its name
    reaches the key) is timed as forward KL (dense or top-k bucket), a stand-in of the same
    memory-bound cost."""
    sparse = key.teacher == "topk"
    try:
        if registry.get(key.divergence).sparse == sparse:
            return key.divergence
    except ValueError:
        pass
    return "topk_forward_kl_bucket" if sparse else "forward_kl"


def build_problem(key: TuningKey, device: torch.device, seed: int = 0) -> BenchProblem:
    """Random inputs with unit-scale logits at N = the key's bucket, drawn from a private
    generator (the global RNG state is left alone) and created outside inference mode so they
    can require grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, dtype = key.rows_bucket, key.torch_dtype

    def randn(*size: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=dtype).mul_(scale)

    with torch.inference_mode(False):
        hidden = randn(n, key.student_hidden).requires_grad_(key.with_grad)
        weight = randn(key.vocab, key.student_hidden, scale=key.student_hidden**-0.5).requires_grad_(key.with_grad)
        teacher = {}
        if key.teacher == "topk":
            # K distinct ids per row, holding 90% of the teacher's mass (a tail as real top-k has).
            first = torch.randint(0, key.vocab, (n, 1), generator=gen, device=device)
            ids = (first + torch.arange(key.teacher_dim, device=device)) % key.vocab
            logprobs = randn(n, key.teacher_dim).float().log_softmax(-1).add_(math.log(0.9))
            teacher["teacher_topk"] = (ids, logprobs)
        elif key.teacher == "logits":
            teacher["teacher_logits"] = randn(n, key.vocab)
        else:
            ht = key.teacher_dim
            teacher.update(teacher_hidden=randn(n, ht), teacher_weight=randn(key.vocab, ht, scale=ht**-0.5))
        labels = None
        if key.with_ce:
            labels = torch.randint(0, key.vocab, (n,), generator=gen, device=device)
            labels[torch.rand(n, generator=gen, device=device) < 0.1] = -100
    return BenchProblem(key, hidden, weight, labels=labels, divergence=bench_divergence(key), **teacher)


def distill_step(
    problem: BenchProblem, chunk_size: int, distill: Distill, validate: bool = True
) -> Callable[[], object]:
    """One ``distill`` forward and, with key.with_grad, its backward through
    ``torch.autograd.grad`` w.r.t. the student's hidden states and weight (and bias)."""
    p, key = problem, problem.key
    kwargs = {
        "teacher_logits": p.teacher_logits,
        "teacher_topk": p.teacher_topk,
        "labels": p.labels,
        "student_bias": p.student_bias,
        "teacher_bias": p.teacher_bias,
        "divergence": p.divergence,
        "soft_weight": 0.5 if key.with_ce else 1.0,
        "hard_weight": 0.5 if key.with_ce else 0.0,
        **p.options,
        "chunk_size": chunk_size,
        "impl": key.impl,
        "validate": validate,
    }
    if key.fp32_logits:  # (only then: a baseline checkout's distill may predate the option)
        kwargs["fp32_logits"] = True
    leaves = [t for t in (p.student_hidden, p.student_weight, p.student_bias) if t is not None]

    def step() -> object:
        with torch.inference_mode(False), torch.set_grad_enabled(key.with_grad):
            loss = distill(p.student_hidden, p.student_weight, p.teacher_hidden, p.teacher_weight, **kwargs)
            return torch.autograd.grad(loss, leaves) if key.with_grad else loss

    return step


def floor_step(problem: BenchProblem) -> Callable[[], object]:
    """The GEMMs alone: student logits, teacher logits (unless given dense) and, with gradients,
    grad_hidden = dlogits @ W and grad_weight = dlogits.T @ h (the logits stand in for dlogits)."""
    p = problem

    def step() -> list[Tensor]:
        with torch.no_grad():
            logits = p.student_hidden @ p.student_weight.t()
            out = [logits]
            if p.teacher_hidden is not None:
                out.append(p.teacher_hidden @ p.teacher_weight.t())
            if p.key.with_grad:
                out += [logits @ p.student_weight, logits.t() @ p.student_hidden]
            return out

    return step


def bench_chunk_size(
    problem: BenchProblem, chunk_size: int, distill: Distill, *, warmup: int, repeat: int
) -> tuple[float, int]:
    """(median ms, peak extra bytes) of :func:`distill_step`, via :func:`autotune.measure`."""
    return measure(distill_step(problem, chunk_size, distill), warmup=warmup, repeat=repeat, device=problem.device)


def bench_floor(problem: BenchProblem, *, warmup: int, repeat: int) -> tuple[float, int]:
    """(median ms, peak extra bytes) of :func:`floor_step`."""
    return measure(floor_step(problem), warmup=warmup, repeat=repeat, device=problem.device)


# --------------------------------------------------------------------------------------------
# Sweeps.
# --------------------------------------------------------------------------------------------


def run_sweep(
    key: TuningKey,
    device: torch.device,
    candidates: tuple[int, ...],
    *,
    distill: Distill,
    problem: BenchProblem | None = None,
    warmup: int = 3,
    repeat: int = 10,
    time_budget_s: float | None = None,
    with_floor: bool = True,
    on_step: Callable[[], None] | None = None,
    rounds: int = 1,
    rerun_within: float | None = None,
) -> Sweep:
    """Measure every candidate (and the GEMM floor, unless it runs out of memory) on ``problem``
    (default: :func:`build_problem`'s), pruning and scoring by the key's memory budget, in
    ``rounds`` interleaved rounds (see :func:`autotune.tune`, also for ``rerun_within``), then
    the contests that decide the near-ties, then the floor. ``on_step`` is called after each
    candidate's every round and after the floor (not during the contests). With
    ``time_budget_s``, one untimed step of the first candidate runs first (it compiles the chunk
    function, shared by all candidates) and the budget bounds the measuring."""
    problem = build_problem(key, device) if problem is None else problem
    if time_budget_s is not None:
        _warm_up(problem, candidates[0], distill)
    result = tune(
        candidates,
        lambda chunk: bench_chunk_size(problem, chunk, distill, warmup=warmup, repeat=repeat),
        memory_budget=key.memory_budget,
        estimate_bytes=key_estimate(key, device.type),
        on_result=None if on_step is None else lambda _: on_step(),
        time_budget_s=time_budget_s,
        time_slack=TIME_SLACK,
        rounds=rounds,
        rerun_within=rerun_within,
        pairs=_CONTEST_PAIRS,
    )
    floor_ms = None
    if with_floor:
        # Timed after the candidates, on a device as warm (and, at its power limit, as throttled)
        # as they left it: timed first, it catches the fresh clocks (docs/design.md).
        floor_ms = _floor_ms(problem, warmup, repeat)
        if on_step is not None:
            on_step()
    complete = not any(m.skipped for m in result.measurements)
    return Sweep(key, result.best, result.measurements, floor_ms, complete, result.contests)


def _floor_ms(problem: BenchProblem, warmup: int, repeat: int) -> float | None:
    """The GEMM floor's median ms; ``None`` when its full (N, V) logits do not fit in memory."""
    try:
        return bench_floor(problem, warmup=warmup, repeat=repeat)[0]
    except torch.OutOfMemoryError:
        pass
    torch.cuda.empty_cache()  # outside the except block, once the traceback's tensors are freed
    return None


def _warm_up(problem: BenchProblem, chunk_size: int, distill: Distill) -> None:
    # A failure here is caught and recorded again when the candidate is measured.
    with contextlib.suppress(Exception):
        distill_step(problem, chunk_size, distill)()


# --------------------------------------------------------------------------------------------
# chunk_size="auto": the in-process tuning.
# --------------------------------------------------------------------------------------------


def available_memory(device: torch.device) -> int | None:
    """Bytes a CUDA allocation can get now: the device's free memory plus what PyTorch's caching
    allocator holds unused (it releases that before it reports out of memory); ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


def _fitting(
    key: TuningKey, device: torch.device, candidates: tuple[int, ...], rows: int
) -> tuple[tuple[int, ...], list[Measurement]]:
    """(the candidates whose working set fits in the memory available now, with the margin;
    a skipped measurement for each of the others)."""
    available, need = available_memory(device), working_set(key, device.type, rows)
    fit, skipped = [], []
    for chunk in candidates:
        bytes_ = need(chunk)
        if available is None or bytes_ * (1 + _FREE_MARGIN) + _FREE_RESERVE <= available:
            fit.append(chunk)
        else:
            error = f"skipped: needs ~{format_bytes(bytes_)}, {format_bytes(available)} available at the call"
            skipped.append(Measurement(chunk, math.inf, 0, error))
    return tuple(fit), skipped


def tune_in_process(
    key: TuningKey, preferred: int, *, device: torch.device, problem: BenchProblem, distill: Distill
) -> Sweep | None:
    """A time-bounded sweep on ``problem`` (the call's own tensors: no copies of the inputs),
    nearest ``preferred`` first, of the candidates that fit in the memory available at the call;
    ``None`` if none fits or none could be measured. A candidate that runs out of memory all the
    same is scored ``inf`` and the allocator's cache emptied (:func:`autotune.tune`); after the
    sweep the cache is emptied again, so the blocks the candidates allocated do not stay to
    fragment the steps that follow."""
    candidates = nearest_first(candidate_chunk_sizes(key), preferred)
    fit, skipped = _fitting(key, device, candidates, problem.rows)
    if not fit:
        return None
    try:
        sweep = run_sweep(
            key,
            device,
            fit,
            distill=distill,
            problem=problem,
            warmup=_AUTO_WARMUP,
            repeat=_AUTO_REPEAT,
            rounds=_AUTO_ROUNDS,
            rerun_within=_AUTO_RERUN_WITHIN,
            time_budget_s=AUTO_TIME_BUDGET_S,
            with_floor=False,
        )
    finally:
        torch.cuda.empty_cache()
    measurements = sweep.measurements + tuple(skipped)
    return Sweep(key, sweep.best, measurements, None, sweep.complete and not skipped, sweep.contests)
