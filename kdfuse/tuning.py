"""How ``chunk_size="auto"`` becomes a number of rows per chunk.

:func:`resolve_chunk_size` (called by :func:`kdfuse.fused_linear_distill`) looks the choice up in
this order, keyed by a :class:`TuningKey` (N bucketed to the next power of two, V, Hs, the
teacher's form: Ht, ``"logits"`` or ``"topk:K"``, dtype, divergence, with_ce, with_grad, memory
budget):

1. an in-process memo: after the first call for a shape no file is read and nothing is measured;
2. the on-disk :class:`autotune.TuningCache` for this device and these torch/triton/kdfuse
   versions (written by ``kdfuse tune`` or by an earlier in-process tuning), unless
   ``KDFUSE_FORCE_RETUNE=1``;
3. on CUDA with ``KDFUSE_AUTOTUNE`` not ``0``: a sweep bounded to :data:`AUTO_TIME_BUDGET_S`
   seconds of measurement, tried nearest the heuristic first, persisted to the cache;
   the winner is the leanest candidate within :data:`TIME_SLACK` of the fastest, timed in pairs
   with it (:func:`autotune.tune`'s contest);
4. otherwise (CPU, ``KDFUSE_AUTOTUNE=0``, or no candidate could be measured within the memory
   budget) :func:`heuristic_choice`.

``KDFUSE_AUTOTUNE=0`` turns off measuring only: results already cached (e.g. by ``kdfuse tune``)
are still used. ``KDFUSE_PRINT_AUTOTUNING=1`` prints each choice and its source to stderr.

The choice depends on N only through its bucket, so N varying inside a bucket keeps one chunk
size (and the compiled core, whose row dim is dynamic, never recompiles for it).

A memory budget (``memory_budget=`` or ``KDFUSE_MEMORY_BUDGET``: bytes, or a fraction in (0, 1] of
the device's free memory when the shape is first seen) prunes candidates whose
:func:`estimate_bytes` exceeds it and scores measured peaks above it as ``inf``.

The benchmark pieces (:func:`build_problem`, :func:`distill_step`, :func:`floor_step`,
:func:`run_sweep`) are shared with the ``kdfuse tune`` command.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal, get_args

import torch
from torch import Tensor

from autotune import Measurement, TuningCache, measure, software_versions, tune

from . import divergences as D
from .env import MemoryBudget, Settings, check_memory_budget, settings

__all__ = [
    "AUTO_TIME_BUDGET_S",
    "TIME_SLACK",
    "BenchProblem",
    "Sweep",
    "TuningKey",
    "bench_chunk_size",
    "bench_floor",
    "bucket_memory_budget",
    "build_problem",
    "cached_sweep",
    "candidate_chunk_sizes",
    "choose_chunk_size",
    "clear_memo",
    "describe",
    "distill_step",
    "estimate_bytes",
    "runs_in_place",
    "TEACHER_FORMS",
    "TEACHER_ROWS",
    "TeacherForm",
    "floor_step",
    "format_bytes",
    "free_memory",
    "heuristic_choice",
    "heuristic_chunk_size",
    "make_key",
    "open_cache",
    "resolve_chunk_size",
    "resolve_memory_budget",
    "rows_bucket",
    "run_sweep",
]

# Elements of one (chunk, V) logits block to aim for. On a GPU ~2^28 keeps the chunk's logits,
# teacher logits and logit gradient (bf16) around 1.5 GiB at V=128k while making the chunk GEMMs
# long enough to run near peak; on a CPU a smaller block stays closer to the caches.
_TARGET_ELEMENTS = {"cuda": 2**28, "cpu": 2**22}
_MIN_CHUNK, _MAX_CHUNK = 16, 8192
# Candidates start at 256 rows for LLM-sized vocabularies (smaller chunks only add launch and
# weight-reload overhead there) and at 64 below this vocabulary size.
_LARGE_VOCAB, _MIN_CANDIDATE, _MIN_CANDIDATE_SMALL_VOCAB = 32768, 256, 64

AUTO_TIME_BUDGET_S = 10.0
"""Seconds of measurement an in-process tuning may spend (after one untimed warm-up step that
compiles the core); candidates not reached by then are skipped and the entry marked partial.
The budget is checked before each measurement, so the last one runs over it. On an H100 at
8B->1B, N=32768 (~0.55 s per measurement of a candidate, 0.65 s for JSD) the budget ends in the
first contest, which is then decided on the pairs it has (10.2-10.5 s in all); N=8192 takes
2-5 s."""
# Chunk sizes within this fraction of the fastest are near-ties: of those the one with the smallest
# measured peak memory wins. On an H100 at 8B->1B (N = 8192 and 32768, the benchmark's 15-step
# medians), 4096-row chunks time 0.3-2.3% behind 8192 at 1 GiB less (2.5-2.7 GiB against
# 3.5-3.7), and 2048 rows 1-2% behind 4096 at 0.5 GiB less. A single measurement of a chunk size
# spreads by 3-5% there, so the near-ties (those the rounds put within twice this fraction) are
# timed in pairs with the fastest: autotune.tune's contest.
TIME_SLACK = 0.02
# Rounds over the candidates (autotune.tune's ``rounds``), as far as the time budget goes: a GPU
# at its power limit throttles within a second of load, and the first candidates measured would
# otherwise catch the faster clocks. Short rounds (1 untimed step, the core is compiled by then;
# 3 timed), and after the first only the candidates within 6% of the fastest run again: one
# further behind would need its second measurement within 2% to reach the contest (4%, twice the
# slack, on the median of its two). Two rounds only screen: the budget goes to the contest that
# decides the pick.
_AUTO_WARMUP, _AUTO_REPEAT, _AUTO_ROUNDS, _AUTO_RERUN_WITHIN = 1, 3, 2, 0.06
# Pairs per contest (autotune.tune's ``pairs``). With 3, the median ratio of the same two chunk
# sizes still spread from 0.99 to 1.034 over in-process tunings on an H100 (8B->1B, N=8192); a
# time budget decides a contest on the pairs it has, so large N gets fewer.
_CONTEST_PAIRS = 5

_memo: dict[tuple, int] = {}


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def rows_bucket(rows: int) -> int:
    """The bucket of N: the next power of two >= N."""
    return 1 << (max(int(rows), 1) - 1).bit_length()


def bucket_memory_budget(budget: int) -> int:
    """Round a byte budget down to a power of two or 1.5x one (losing at most a third), so
    budgets a few percent apart, e.g. fractions of free memory on different runs, share a key."""
    base = _pow2_floor(budget)
    return base + base // 2 if budget >= base + base // 2 else base


def format_bytes(n: float) -> str:
    """``1536 -> "1.5 KiB"``; binary units."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# --------------------------------------------------------------------------------------------
# The key.
# --------------------------------------------------------------------------------------------


# How a call gives its teacher (see TuningKey.teacher_form); estimate_bytes depends on it.
TeacherForm = Literal["hidden", "logits", "topk"]
TEACHER_FORMS: tuple[str, ...] = get_args(TeacherForm)


@dataclass(frozen=True)
class TuningKey:
    """What a tuned chunk size is specific to (besides the device and software versions, which
    identify the cache itself)."""

    rows_bucket: int  # N rounded up to a power of two; benchmarks run at exactly this N
    vocab: int
    student_hidden: int
    # Ht; "logits": the teacher is given as dense logits; "topk:K": as its top-K log-probs
    teacher_hidden: int | str
    dtype: str  # e.g. "bfloat16"
    divergence: str  # canonical name, e.g. "jsd_beta0.5"
    with_ce: bool
    with_grad: bool
    memory_budget: int | None  # bytes, bucketed; None: unbounded

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def teacher_form(self) -> TeacherForm:
        """How the teacher is given: computed from its ``"hidden"`` states, as ``"logits"`` or
        as ``"topk"`` log-probs."""
        if self.topk is not None:
            return "topk"
        return "logits" if self.teacher_hidden == "logits" else "hidden"

    @property
    def topk(self) -> int | None:
        """K of a top-K teacher, else None."""
        form = self.teacher_hidden
        return int(form.removeprefix("topk:")) if isinstance(form, str) and form.startswith("topk:") else None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _canonical_divergence(name: str) -> str:
    """A built-in's full name (``"jsd"`` -> ``"jsd_beta0.5"``); other names as given."""
    try:
        return D.get(name).__name__
    except ValueError:
        return name


def make_key(
    *,
    rows: int,
    vocab: int,
    student_hidden: int,
    teacher_hidden: int | None,
    dtype: torch.dtype,
    divergence: str,
    with_ce: bool,
    with_grad: bool,
    memory_budget: int | None,
    teacher_topk: int | None = None,
) -> TuningKey:
    """The key for one call's shapes; ``teacher_hidden=None`` means dense teacher logits, or with
    ``teacher_topk=K`` the teacher's top-K log-probs; ``memory_budget`` is in bytes (it is
    bucketed here)."""
    teacher = "logits" if teacher_hidden is None else teacher_hidden
    return TuningKey(
        rows_bucket=rows_bucket(rows),
        vocab=vocab,
        student_hidden=student_hidden,
        teacher_hidden=teacher if teacher_topk is None else f"topk:{teacher_topk}",
        dtype=str(dtype).removeprefix("torch."),
        divergence=_canonical_divergence(divergence),
        with_ce=with_ce,
        with_grad=with_grad,
        memory_budget=None if memory_budget is None else bucket_memory_budget(memory_budget),
    )


def describe(key: TuningKey) -> str:
    """One line naming the key, e.g. ``N<=8192 V=128256 Hs=2048 Ht=4096 bfloat16 forward_kl+ce``."""
    if key.topk is not None:
        teacher = f"top-{key.topk} teacher"
    else:
        teacher = "teacher logits" if key.teacher_hidden == "logits" else f"Ht={key.teacher_hidden}"
    text = f"N<={key.rows_bucket} V={key.vocab} Hs={key.student_hidden} {teacher} {key.dtype} {key.divergence}"
    text += "+ce" if key.with_ce else ""
    text += "" if key.with_grad else " forward-only"
    return text + ("" if key.memory_budget is None else f" budget={format_bytes(key.memory_budget)}")


def free_memory(device: torch.device) -> int | None:
    """Free bytes on a CUDA device; ``None`` elsewhere."""
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def resolve_memory_budget(budget: MemoryBudget | None, device: torch.device) -> int | None:
    """Bytes for a budget given as bytes (``int``) or a fraction of free device memory
    (``float`` in (0, 1]); a fraction on a device without a free-memory query (CPU) is no bound."""
    if budget is None:
        return None
    budget = check_memory_budget(budget)
    if isinstance(budget, int):
        return budget
    free = free_memory(device)
    return None if free is None else int(budget * free)


# --------------------------------------------------------------------------------------------
# Candidates, memory estimate and heuristic.
# --------------------------------------------------------------------------------------------


# Rows of teacher logits computed at a time where the chunk kernel writes the logit gradient over
# the student's logits (kdfuse.fused._Problem.teacher_blocks): half a 4096-row chunk, the chunk
# the tuner picks at V = 128k. Here because the memory estimate depends on it.
TEACHER_ROWS = 2048


def estimate_bytes(
    chunk: int,
    vocab: int,
    student_hidden: int,
    dtype: torch.dtype,
    with_grad: bool,
    teacher: TeacherForm = "hidden",
    in_place: bool = False,
) -> int:
    """Peak extra bytes a chunk size needs, roughly.

    Per (chunk, V) element: the student's logits and, with gradients, the logit gradient (each in
    ``dtype``), the teacher's logits where this call computes them (``teacher="hidden"``; given
    as ``"logits"`` they are the caller's tensor, read in place; ``"topk"`` has no such block),
    plus the compute-dtype copies of the dense logits: the generic ``torch.func`` path.
    ``in_place``: the hand-written kernels, which write the logit gradient over the student's
    logits and make no copies, so only the student's block and, for ``"hidden"``, a teacher block
    of at most :data:`TEACHER_ROWS` rows. With gradients also the ``(V, Hs)`` compute-dtype
    grad_weight accumulator. The compute dtype is float32 (float64 for float64 inputs)."""
    if teacher not in TEACHER_FORMS:
        raise ValueError(f"teacher must be one of {TEACHER_FORMS}, got {teacher!r}")
    item = dtype.itemsize
    compute = 8 if dtype == torch.float64 else 4
    accumulator = vocab * student_hidden * compute if with_grad else 0
    computed = teacher == "hidden"  # a teacher block this call allocates
    if in_place:
        teacher_rows = min(chunk, TEACHER_ROWS) if computed else 0
        return (chunk + teacher_rows) * vocab * item + accumulator
    copies = 1 if teacher == "topk" else 2
    per_element = (1 + computed + with_grad) * item + copies * compute
    return chunk * vocab * per_element + accumulator


def runs_in_place(key: TuningKey, device_type: str) -> bool:
    """Whether a compiled call with this key runs kdfuse's hand-written Triton kernels, which write
    the logit gradient over the student's logits (:func:`estimate_bytes`' ``in_place``): a
    built-in they implement, on CUDA, in bfloat16 or float32 (float16 keeps a float32 gradient
    block, see kdfuse.fused). A divergence the key names but no built-in has runs the generic path."""
    if device_type != "cuda" or key.dtype not in ("bfloat16", "float32"):
        return False
    from . import fused, triton_chunk, triton_topk  # (imports Triton: CUDA only)

    try:
        kernel, _ = fused._kernel_of(key.divergence)
    except ValueError:  # a user's divergence, named by its function
        return False
    cuda = torch.device("cuda")
    if key.topk is not None:
        return triton_topk.supported(kernel, torch.float32, cuda, softcap=False)
    return triton_chunk.supported(kernel, torch.float32, cuda)


def _key_estimate(key: TuningKey, device_type: str) -> Callable[[int], int]:
    in_place = runs_in_place(key, device_type)
    return lambda chunk: estimate_bytes(
        chunk, key.vocab, key.student_hidden, key.torch_dtype, key.with_grad, key.teacher_form, in_place
    )


def candidate_chunk_sizes(key: TuningKey) -> tuple[int, ...]:
    """Powers of two from 256 (64 for vocabularies under 32768) to 8192, capped at the N bucket
    (a bucket below the smallest candidate is its only candidate)."""
    low = _MIN_CANDIDATE if key.vocab >= _LARGE_VOCAB else _MIN_CANDIDATE_SMALL_VOCAB
    high = min(_MAX_CHUNK, key.rows_bucket)
    if high <= low:
        return (high,)
    return tuple(1 << k for k in range(low.bit_length() - 1, high.bit_length()))


def heuristic_chunk_size(rows: int, vocab: int, device_type: str) -> int:
    """A power of two near ``target / vocab``, never above the next power of two of ``rows``
    (a short batch is one chunk) and within [16, 8192]."""
    target = _TARGET_ELEMENTS.get(device_type, _TARGET_ELEMENTS["cuda"])
    size = min(max(_pow2_floor(target // max(vocab, 1)), _MIN_CHUNK), _MAX_CHUNK)
    return min(size, rows_bucket(rows))


def heuristic_choice(key: TuningKey, device_type: str) -> int:
    """:func:`heuristic_chunk_size`, halved until :func:`estimate_bytes` fits the key's memory
    budget; halving stops at 16 (where no chunk size meets the budget)."""
    size = heuristic_chunk_size(key.rows_bucket, key.vocab, device_type)
    if key.memory_budget is None:
        return size
    estimate, floor = _key_estimate(key, device_type), min(_MIN_CHUNK, size)
    while size > floor and estimate(size) > key.memory_budget:
        size //= 2
    return size


def _nearest_first(candidates: tuple[int, ...], preferred: int) -> tuple[int, ...]:
    """Candidates ordered by distance from ``preferred`` in powers of two, smaller first on ties."""
    return tuple(sorted(candidates, key=lambda c: (abs(math.log2(c / preferred)), c)))


# --------------------------------------------------------------------------------------------
# The benchmark: random inputs of the key's shapes, forward + backward, and the GEMM floor.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BenchProblem:
    """Random inputs for one key at N = the bucket size, on one device."""

    key: TuningKey
    student_hidden: Tensor  # (N, Hs), requires grad when key.with_grad
    student_weight: Tensor  # (V, Hs), requires grad when key.with_grad
    teacher_hidden: Tensor | None  # (N, Ht)
    teacher_weight: Tensor | None  # (V, Ht)
    teacher_logits: Tensor | None  # (N, V) when key.teacher_hidden == "logits"
    teacher_topk: tuple[Tensor, Tensor] | None  # ((N, K) ids, (N, K) log-probs) when key.topk
    labels: Tensor | None  # (N,) with ~10% ignored rows when key.with_ce

    @property
    def device(self) -> torch.device:
        return self.student_hidden.device


def build_problem(key: TuningKey, device: torch.device, seed: int = 0) -> BenchProblem:
    """Random inputs with unit-scale logits, drawn from a private generator (the global RNG state
    is left alone) and created outside inference mode so they can require grad."""
    gen = torch.Generator(device=device).manual_seed(seed)
    n, dtype = key.rows_bucket, key.torch_dtype

    def randn(*size: int, scale: float = 1.0) -> Tensor:
        return torch.randn(*size, generator=gen, device=device, dtype=dtype).mul_(scale)

    with torch.inference_mode(False):
        hidden = randn(n, key.student_hidden).requires_grad_(key.with_grad)
        weight = randn(key.vocab, key.student_hidden, scale=key.student_hidden**-0.5).requires_grad_(key.with_grad)
        t_topk = None
        if key.topk is not None:
            # K distinct ids per row, holding 90% of the teacher's mass (a tail as real top-k has).
            ids = (torch.randint(0, key.vocab, (n, 1), generator=gen, device=device) + torch.arange(key.topk, device=device)) % key.vocab
            logprobs = randn(n, key.topk).float().log_softmax(-1).add_(math.log(0.9))
            t_hidden, t_weight, t_logits, t_topk = None, None, None, (ids, logprobs)
        elif key.teacher_hidden == "logits":
            t_hidden, t_weight, t_logits = None, None, randn(n, key.vocab)
        else:
            t_hidden = randn(n, key.teacher_hidden)
            t_weight, t_logits = randn(key.vocab, key.teacher_hidden, scale=key.teacher_hidden**-0.5), None
        labels = None
        if key.with_ce:
            labels = torch.randint(0, key.vocab, (n,), generator=gen, device=device)
            labels[torch.rand(n, generator=gen, device=device) < 0.1] = -100
    return BenchProblem(key, hidden, weight, t_hidden, t_weight, t_logits, t_topk, labels)


def _bench_divergence(key: TuningKey) -> str:
    """The key's divergence if it is a built-in; a user divergence (only its name reaches the
    key) is timed as forward KL (dense or top-k bucket), a stand-in of the same memory-bound cost."""
    from . import topk  # topk imports this module

    registry, stand_in = (topk, "topk_forward_kl_bucket") if key.topk is not None else (D, "forward_kl")
    try:
        registry.get(key.divergence)
    except ValueError:
        return stand_in
    return key.divergence


def distill_step(
    problem: BenchProblem, chunk_size: int, impl: Literal["compile", "eager"] = "compile", validate: bool = True
) -> Callable[[], object]:
    """One ``fused_linear_distill`` forward and, with key.with_grad, its backward through
    ``torch.autograd.grad`` w.r.t. the student hidden states and weight."""
    from .fused import fused_linear_distill  # fused imports this module

    p, key = problem, problem.key
    args = (p.student_hidden, p.student_weight, p.teacher_hidden, p.teacher_weight)
    kwargs = {
        "teacher_logits": p.teacher_logits, "teacher_topk": p.teacher_topk, "labels": p.labels,
        "divergence": _bench_divergence(key),
        "soft_weight": 0.5 if key.with_ce else 1.0, "hard_weight": 0.5 if key.with_ce else 0.0,
        "chunk_size": chunk_size, "impl": impl, "validate": validate,
    }  # fmt: skip

    def step() -> object:
        with torch.inference_mode(False), torch.set_grad_enabled(key.with_grad):
            loss = fused_linear_distill(*args, **kwargs)
            return torch.autograd.grad(loss, (p.student_hidden, p.student_weight)) if key.with_grad else loss

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
    problem: BenchProblem, chunk_size: int, *, impl: Literal["compile", "eager"], warmup: int, repeat: int
) -> tuple[float, int]:
    """(median ms, peak extra bytes) of :func:`distill_step`, via :func:`autotune.measure`."""
    return measure(distill_step(problem, chunk_size, impl), warmup=warmup, repeat=repeat, device=problem.device)


def bench_floor(problem: BenchProblem, *, warmup: int, repeat: int) -> tuple[float, int]:
    """(median ms, peak extra bytes) of :func:`floor_step`."""
    return measure(floor_step(problem), warmup=warmup, repeat=repeat, device=problem.device)


# --------------------------------------------------------------------------------------------
# A sweep, and its cache entry.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sweep:
    """The measurements for one key: the winner (``None`` if every candidate failed or was
    pruned), each candidate's result, the GEMM floor (``None`` if not measured), whether every
    candidate was reached (``False`` when a time budget cut the sweep short) and the paired
    contests' median ratios to the fastest (:class:`autotune.TuneResult`'s ``contests``)."""

    key: TuningKey
    best: int | None
    measurements: tuple[Measurement, ...]
    floor_ms: float | None
    complete: bool
    contests: dict[int, float] = field(default_factory=dict, hash=False)

    def to_entry(self) -> dict[str, object]:
        """The JSON cache value (infinite times stored as ``null``)."""
        return {
            "chunk_size": self.best,
            "complete": self.complete,
            "floor_ms": self.floor_ms,
            "measurements": [
                {"chunk_size": m.candidate, "ms": m.ms if math.isfinite(m.ms) else None,
                 "peak_bytes": m.peak_bytes, "error": m.error}
                for m in self.measurements
            ],
            "contests": [[chunk, ratio] for chunk, ratio in self.contests.items()],
        }  # fmt: skip

    @classmethod
    def from_entry(cls, key: TuningKey, entry: object) -> Sweep | None:
        """The sweep stored by :meth:`to_entry`; ``None`` if ``entry`` is not one."""
        try:
            best = entry["chunk_size"]
            measurements = tuple(_measurement(m) for m in entry["measurements"])
            floor_ms = None if entry["floor_ms"] is None else float(entry["floor_ms"])
            complete = bool(entry["complete"])
            contests = _contests(entry.get("contests", []))
        except (KeyError, TypeError, ValueError):
            return None
        if not (isinstance(best, int) and best > 0):
            return None
        return cls(key, best, measurements, floor_ms, complete, contests)


def _contests(stored: object) -> dict[int, float]:
    """The ``[[chunk_size, ratio], ...]`` list :meth:`Sweep.to_entry` writes, as a dict; raises
    TypeError or ValueError on anything else."""
    if not isinstance(stored, list) or not all(isinstance(x, list) and len(x) == 2 for x in stored):
        raise TypeError(f"not a list of [chunk_size, ratio] pairs: {stored!r}")
    if not all(isinstance(chunk, int) and isinstance(ratio, (int, float)) for chunk, ratio in stored):
        raise ValueError(f"not a list of [chunk_size, ratio] pairs: {stored!r}")
    return {chunk: float(ratio) for chunk, ratio in stored}


def _measurement(stored: dict) -> Measurement:
    ms = math.inf if stored["ms"] is None else float(stored["ms"])
    return Measurement(int(stored["chunk_size"]), ms, int(stored["peak_bytes"]), stored["error"])


def run_sweep(
    key: TuningKey,
    device: torch.device,
    candidates: tuple[int, ...],
    *,
    impl: Literal["compile", "eager"] = "compile",
    warmup: int = 3,
    repeat: int = 10,
    time_budget_s: float | None = None,
    with_floor: bool = True,
    on_step: Callable[[], None] | None = None,
    rounds: int = 1,
    rerun_within: float | None = None,
) -> Sweep:
    """Measure every candidate (and the GEMM floor, unless it runs out of memory) on
    :func:`build_problem`'s inputs, pruning and scoring by the key's memory budget, in ``rounds``
    interleaved rounds (see :func:`autotune.tune`, also for ``rerun_within``), then the contests
    that decide the near-ties, then the floor. ``on_step`` is called after each candidate's every
    round and after the floor (not during the contests). With ``time_budget_s``, one untimed
    step of the first candidate runs first (it compiles the core, shared by all candidates) and
    the budget bounds the measuring."""
    problem = build_problem(key, device)
    if time_budget_s is not None:
        _warm_up(problem, candidates[0], impl)
    result = tune(
        candidates,
        lambda chunk: bench_chunk_size(problem, chunk, impl=impl, warmup=warmup, repeat=repeat),
        memory_budget=key.memory_budget,
        estimate_bytes=_key_estimate(key, device.type),
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
        # as they left it. Timed first, it caught the fresh clocks: 28.1 ms on an H100 at 8B->1B,
        # N=8192, where the benchmark's interleaved rounds put it at 30-31 ms.
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


def _warm_up(problem: BenchProblem, chunk_size: int, impl: Literal["compile", "eager"]) -> None:
    # A failure here is caught and recorded again when the candidate is measured.
    with contextlib.suppress(Exception):
        distill_step(problem, chunk_size, impl)()


# --------------------------------------------------------------------------------------------
# The cache and chunk_size="auto".
# --------------------------------------------------------------------------------------------


def open_cache(cache_dir: str | os.PathLike[str], device: torch.device) -> TuningCache:
    """The tuning cache for ``device`` in ``cache_dir``, tagged with the torch, triton, python
    and kdfuse versions."""
    import kdfuse  # the package imports this module, so its version is read at call time

    return TuningCache(cache_dir, device, versions=software_versions({"kdfuse": kdfuse.__version__}))


def cached_sweep(cache: TuningCache, key: TuningKey) -> Sweep | None:
    """The stored sweep for ``key``, or ``None`` (missing, other versions, or malformed)."""
    return Sweep.from_entry(key, cache.get(key.as_dict()))


def _can_tune(device: torch.device) -> bool:
    """Whether chunk_size="auto" may measure on ``device`` (tests patch this)."""
    return device.type == "cuda"


def _report(cfg: Settings, key: TuningKey, size: int, source: str) -> None:
    if cfg.print_autotuning:
        print(f"kdfuse: chunk_size={size} for {describe(key)} ({source})", file=sys.stderr, flush=True)


def _why_not_tune(key: TuningKey, device: torch.device, cfg: Settings) -> str | None:
    """Why chunk_size="auto" must not measure this key here, or ``None`` if it may."""
    if not cfg.autotune:
        return "KDFUSE_AUTOTUNE=0"
    if not _can_tune(device):
        return f"no tuning on {device.type}"
    if len(candidate_chunk_sizes(key)) == 1:
        return "one candidate for this N"
    return None


def _tune_in_process(key: TuningKey, device: torch.device, preferred: int) -> Sweep | None:
    """A time-bounded sweep, nearest ``preferred`` first; ``None`` if nothing could be measured."""
    try:
        sweep = run_sweep(
            key, device, _nearest_first(candidate_chunk_sizes(key), preferred),
            warmup=_AUTO_WARMUP, repeat=_AUTO_REPEAT, rounds=_AUTO_ROUNDS, rerun_within=_AUTO_RERUN_WITHIN,
            time_budget_s=AUTO_TIME_BUDGET_S, with_floor=False,
        )  # fmt: skip
    except torch.OutOfMemoryError:  # no room even for the benchmark's inputs
        return None
    return sweep if sweep.best is not None else None


def choose_chunk_size(key: TuningKey, device: torch.device, cfg: Settings) -> int:
    """Steps 2-4 of the module docstring: the cache, an in-process tuning, or the heuristic."""
    cache = open_cache(cfg.cache_dir, device)
    if not cfg.force_retune and (hit := cached_sweep(cache, key)) is not None:
        _report(cfg, key, hit.best, f"cached in {cache.path}")
        return hit.best
    preferred = heuristic_choice(key, device.type)
    reason = _why_not_tune(key, device, cfg)
    if reason is None:
        start = time.monotonic()
        sweep = _tune_in_process(key, device, preferred)
        if sweep is not None:
            cache.put(key.as_dict(), sweep.to_entry())
            measured = sum(not m.skipped for m in sweep.measurements)
            source = f"autotuned {measured}/{len(sweep.measurements)} candidates in {time.monotonic() - start:.1f} s"
            _report(cfg, key, sweep.best, f"{source}, saved to {cache.path}")
            return sweep.best
        reason = "no candidate could be measured"
    _report(cfg, key, preferred, f"heuristic: {reason}")
    return preferred


def clear_memo() -> None:
    """Forget this process's choices, so the next ``"auto"`` call consults the cache again."""
    _memo.clear()


def resolve_chunk_size(
    chunk_size: int | str,
    *,
    rows: int,
    vocab: int,
    student_hidden: int,
    teacher_hidden: int | None,
    dtype: torch.dtype,
    device: torch.device,
    divergence: str,
    with_ce: bool,
    with_grad: bool,
    memory_budget: MemoryBudget | None = None,
    teacher_topk: int | None = None,
) -> int:
    """The chunk size to use: ``chunk_size`` itself when it is an int; for ``"auto"`` the memoised,
    cached, tuned or heuristic choice for this shape's key (see the module docstring).

    ``teacher_hidden=None`` means dense teacher logits, or with ``teacher_topk=K`` a top-K teacher.
    ``memory_budget`` (bytes, or a fraction in (0, 1] of free device memory) overrides
    ``KDFUSE_MEMORY_BUDGET``; a fraction is taken of the memory free when the key is first seen.
    """
    if chunk_size != "auto":
        return int(chunk_size)
    cfg = settings()
    budget = cfg.memory_budget if memory_budget is None else memory_budget
    shape = (rows_bucket(rows), vocab, student_hidden, teacher_hidden, teacher_topk, dtype, divergence, with_ce, with_grad)
    memo_key = (cfg, device, shape, budget)
    size = _memo.get(memo_key)
    if size is None:
        key = make_key(
            rows=rows, vocab=vocab, student_hidden=student_hidden, teacher_hidden=teacher_hidden, dtype=dtype,
            divergence=divergence, with_ce=with_ce, with_grad=with_grad,
            memory_budget=resolve_memory_budget(budget, device), teacher_topk=teacher_topk,
        )  # fmt: skip
        size = _memo[memo_key] = choose_chunk_size(key, device, cfg)
    return size
