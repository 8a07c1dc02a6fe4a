"""How ``chunk_size="auto"`` becomes a number of rows per chunk.

:func:`resolve_chunk_size` (called by :func:`kdfuse.fused_linear_distill`) looks the choice up in
this order, keyed by a :class:`TuningKey` (N bucketed to the next power of two, V, Hs, the
teacher's form and size, dtype, divergence, with_ce, with_grad, memory budget, impl):

1. an in-process memo: after the first call for a shape no file is read and nothing is measured;
2. the on-disk :class:`autotune.TuningCache` for this device and these torch/triton/kdfuse
   versions (written by ``kdfuse tune`` or by an earlier in-process tuning), unless
   ``KDFUSE_FORCE_RETUNE=1``;
3. on CUDA with ``KDFUSE_AUTOTUNE`` not ``0``: the caller's ``tune`` (kdfuse.sweep.tune_in_process:
   a time-bounded sweep on the call's own tensors, of the candidates that fit in the memory free
   at the call), persisted to the cache;
4. otherwise (CPU, ``KDFUSE_AUTOTUNE=0``, or nothing could be measured) :func:`heuristic_choice`.

``KDFUSE_AUTOTUNE=0`` turns off measuring only: results already cached (e.g. by ``kdfuse tune``)
are still used. ``KDFUSE_PRINT_AUTOTUNING=1`` prints each choice and its source to stderr.

The choice depends on N only through its bucket, so N varying inside a bucket keeps one chunk
size (and the compiled chunk function, whose row dim is dynamic, never recompiles for it).

A memory budget (``memory_budget=`` or ``KDFUSE_MEMORY_BUDGET``: bytes, or a fraction in (0, 1] of
the device's free memory when the shape is first seen) prunes candidates whose
:func:`estimate_bytes` exceeds it and scores measured peaks above it as ``inf``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from autotune import Measurement, TuningCache, software_versions

from . import registry
from ._version import __version__
from .chunk import fast_kernel
from .engine import chunk_starts
from .env import MemoryBudget, Settings, check_memory_budget, settings
from .teacher import TEACHER_FORMS, TEACHER_ROWS, TeacherForm

__all__ = [
    "TIME_SLACK",
    "Sweep",
    "Tune",
    "TuningKey",
    "bucket_memory_budget",
    "cached_sweep",
    "candidate_chunk_sizes",
    "choose_chunk_size",
    "clear_memo",
    "describe",
    "estimate_bytes",
    "format_bytes",
    "free_memory",
    "heuristic_choice",
    "heuristic_chunk_size",
    "key_estimate",
    "make_key",
    "nearest_first",
    "open_cache",
    "resolve_chunk_size",
    "resolve_memory_budget",
    "rows_bucket",
    "runs_in_place",
    "working_set",
]

# Elements of one (chunk, V) logits block to aim for: on a GPU, large enough for the chunk GEMMs
# to run near peak while the blocks stay around 1.5 GiB at V = 128k; on a CPU, nearer the caches.
_TARGET_ELEMENTS = {"cuda": 2**28, "cpu": 2**22}
_MIN_CHUNK, _MAX_CHUNK = 16, 8192
# Candidates start at 256 rows for LLM-sized vocabularies (smaller chunks only add launch and
# weight-reload overhead there) and at 64 below this vocabulary size.
_LARGE_VOCAB, _MIN_CANDIDATE, _MIN_CANDIDATE_SMALL_VOCAB = 32768, 256, 64

TIME_SLACK = 0.02
"""Chunk sizes within this fraction of the fastest are near-ties, decided for the leanest by a
paired contest (:func:`autotune.tune`): a GPU at its power limit drifts by more than this
between two measurements of one candidate (docs/benchmarks.md, the tuner's section)."""

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


@dataclass(frozen=True)
class TuningKey:
    """What a tuned chunk size is specific to (besides the device and software versions, which
    identify the cache itself)."""

    rows_bucket: int  # N rounded up to a power of two; benchmarks run at exactly this N
    vocab: int
    student_hidden: int
    teacher: TeacherForm  # computed from its "hidden" states, given as "logits", or its "topk"
    teacher_dim: int | None  # Ht for "hidden", k for "topk", None for "logits"
    dtype: str  # e.g. "bfloat16"
    divergence: str  # canonical name, e.g. "jsd_beta0.5"
    with_ce: bool
    with_grad: bool
    memory_budget: int | None  # bytes, bucketed; None: unbounded
    impl: str = "compile"
    fp32_logits: bool = False  # fused_linear_distill(fp32_logits=True): float32 blocks of logits

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def _canonical_divergence(name: str) -> str:
    """A built-in's full name (``"jsd"`` -> ``"jsd_beta0.5"``); other names as given."""
    try:
        return registry.get(name).__name__
    except ValueError:
        return name


def make_key(
    *,
    rows: int,
    vocab: int,
    student_hidden: int,
    teacher: TeacherForm,
    teacher_dim: int | None,
    dtype: torch.dtype,
    divergence: str,
    with_ce: bool,
    with_grad: bool,
    memory_budget: int | None,
    impl: str = "compile",
    fp32_logits: bool = False,
) -> TuningKey:
    """The key for one call's shapes; ``memory_budget`` is in bytes (it is bucketed here)."""
    if teacher not in TEACHER_FORMS:
        raise ValueError(f"teacher must be one of {TEACHER_FORMS}, got {teacher!r}")
    return TuningKey(
        rows_bucket=rows_bucket(rows),
        vocab=vocab,
        student_hidden=student_hidden,
        teacher=teacher,
        teacher_dim=None if teacher == "logits" else teacher_dim,
        dtype=str(dtype).removeprefix("torch."),
        divergence=_canonical_divergence(divergence),
        with_ce=with_ce,
        with_grad=with_grad,
        memory_budget=None if memory_budget is None else bucket_memory_budget(memory_budget),
        impl=impl,
        fp32_logits=fp32_logits and dtype in (torch.float16, torch.bfloat16),  # (a no-op for wider inputs)
    )


def describe(key: TuningKey) -> str:
    """One line naming the key, e.g. ``N<=8192 V=128256 Hs=2048 Ht=4096 bfloat16 forward_kl+ce``."""
    teacher = {"hidden": f"Ht={key.teacher_dim}", "logits": "teacher logits", "topk": f"top-{key.teacher_dim} teacher"}
    text = f"N<={key.rows_bucket} V={key.vocab} Hs={key.student_hidden} {teacher[key.teacher]}"
    text += f" {key.dtype} {key.divergence}"
    text += "+ce" if key.with_ce else ""
    text += "" if key.with_grad else " forward-only"
    text += "" if key.impl == "compile" else f" impl={key.impl}"
    text += " fp32-logits" if key.fp32_logits else ""
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


def estimate_bytes(
    chunk: int,
    vocab: int,
    student_hidden: int,
    dtype: torch.dtype,
    with_grad: bool,
    teacher: TeacherForm = "hidden",
    in_place: bool = False,
    fp32_logits: bool = False,
    rows: int | None = None,
) -> int:
    """Peak extra bytes a chunk size needs, roughly.

    Per (chunk, V) element: the student's logits and, with gradients, the logit gradient (each in
    ``dtype``), the teacher's logits where this call computes them (``teacher="hidden"``; given
    as ``"logits"`` they are the caller's tensor, read in place; ``"topk"`` has no such block),
    plus the compute-dtype copies of the dense logits: the generic ``torch.func`` path.
    ``in_place``: the hand-written kernels, which write the logit gradient over the student's
    logits and make no copies, so only the student's block and, for ``"hidden"``, a teacher block
    of at most :data:`kdfuse.teacher.TEACHER_ROWS` rows. With gradients also the ``(V, Hs)``
    compute-dtype grad_weight accumulator; it is allocated once the first chunk's teacher logits
    are freed, so where ``rows`` (N) fit in one chunk the in-place path counts the larger of the
    teacher's block and the accumulator (N unknown: several chunks). The compute dtype is float32
    (float64 for float64 inputs). ``fp32_logits`` (16-bit inputs): the computed logits and their
    gradient are float32, and the gradient is rounded to ``dtype`` for the gradient matmuls, a
    copy made once the teacher's block is freed (in place: the larger of the two counts). The
    returned gradients are not counted (see :func:`working_set`)."""
    if teacher not in TEACHER_FORMS:
        raise ValueError(f"teacher must be one of {TEACHER_FORMS}, got {teacher!r}")
    item = dtype.itemsize
    compute = 8 if dtype == torch.float64 else 4
    wide = fp32_logits and item < 4
    logits_item = 4 if wide else item
    rounded = item if wide and with_grad else 0  # the gradient's 16-bit copy, per element
    accumulator = vocab * student_hidden * compute if with_grad else 0
    computed = teacher == "hidden"  # a teacher block this call allocates
    if in_place:
        teacher_block = min(chunk, TEACHER_ROWS) * logits_item * vocab if computed else 0
        rounded_block = chunk * rounded * vocab
        if rows is not None and len(chunk_starts(rows, chunk)) == 1:  # no accumulator beside the teacher's
            return chunk * logits_item * vocab + max(teacher_block, rounded_block + accumulator)
        return chunk * logits_item * vocab + max(teacher_block, rounded_block) + accumulator
    copies = 1 if teacher == "topk" else 2
    per_element = (1 + computed + with_grad) * logits_item + rounded + copies * compute
    return chunk * vocab * per_element + accumulator


def runs_in_place(key: TuningKey, device_type: str) -> bool:
    """Whether a call with this key runs kdfuse's hand-written kernels in place
    (:func:`estimate_bytes`' ``in_place``): a built-in with a kernel (kdfuse.chunk.fast_kernel),
    bfloat16 or float32 (float16 keeps a float32 gradient block). A divergence the key names but
    no built-in has runs the generic path."""
    try:
        fn = registry.get(key.divergence).fn
    except ValueError:  # a user's divergence, named by its function
        return False
    kernel = fast_kernel(
        fn,
        softcap=False,
        compute_dtype=torch.float64 if key.dtype == "float64" else torch.float32,
        device_type=device_type,
        compiled=key.impl == "compile",
        wide_grad=key.dtype == "float16",
    )
    return kernel is not None and key.dtype != "float16"


def key_estimate(key: TuningKey, device_type: str) -> Callable[[int], int]:
    """:func:`estimate_bytes` of the key's shapes and path, as a function of the chunk size."""
    in_place = runs_in_place(key, device_type)
    return lambda chunk: estimate_bytes(
        chunk,
        key.vocab,
        key.student_hidden,
        key.torch_dtype,
        key.with_grad,
        key.teacher,
        in_place,
        key.fp32_logits,
        key.rows_bucket,
    )


def working_set(key: TuningKey, device_type: str, rows: int | None = None) -> Callable[[int], int]:
    """All the bytes a call allocates, as a function of the chunk size: :func:`estimate_bytes`
    plus, with gradients, the gradients it returns (grad_weight in the dtype, grad_hidden in the
    compute dtype and then the dtype) for ``rows`` rows (default: the key's bucket)."""
    estimate = key_estimate(key, device_type)
    item, compute = key.torch_dtype.itemsize, 8 if key.dtype == "float64" else 4
    rows = key.rows_bucket if rows is None else rows
    outputs = (key.vocab + rows * (1 + compute / item)) * key.student_hidden * item if key.with_grad else 0
    return lambda chunk: estimate(chunk) + int(outputs)


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
    estimate, floor = key_estimate(key, device_type), min(_MIN_CHUNK, size)
    while size > floor and estimate(size) > key.memory_budget:
        size //= 2
    return size


def nearest_first(candidates: tuple[int, ...], preferred: int) -> tuple[int, ...]:
    """Candidates ordered by distance from ``preferred`` in powers of two, smaller first on ties."""
    return tuple(sorted(candidates, key=lambda c: (abs(math.log2(c / preferred)), c)))


# --------------------------------------------------------------------------------------------
# A sweep's cache entry.
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
                {
                    "chunk_size": m.candidate,
                    "ms": m.ms if math.isfinite(m.ms) else None,
                    "peak_bytes": m.peak_bytes,
                    "error": m.error,
                }
                for m in self.measurements
            ],
            "contests": [[chunk, ratio] for chunk, ratio in self.contests.items()],
        }

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


def open_cache(cache_dir, device: torch.device) -> TuningCache:
    """The tuning cache for ``device`` in ``cache_dir``, tagged with the torch, triton, python
    and kdfuse versions."""
    return TuningCache(cache_dir, device, versions=software_versions({"kdfuse": __version__}))


def cached_sweep(cache: TuningCache, key: TuningKey) -> Sweep | None:
    """The stored sweep for ``key``, or ``None`` (missing, other versions, or malformed)."""
    return Sweep.from_entry(key, cache.get(key.as_dict()))


# --------------------------------------------------------------------------------------------
# chunk_size="auto".
# --------------------------------------------------------------------------------------------

Tune = Callable[[TuningKey, int], "Sweep | None"]
"""``tune(key, preferred) -> Sweep | None``: an in-process sweep (see kdfuse.sweep.tune_in_process)."""


def _can_tune(device: torch.device) -> bool:
    """Whether chunk_size="auto" may measure on ``device`` (tests patch this)."""
    return device.type == "cuda"


def _report(cfg: Settings, key: TuningKey, size: int, source: str) -> None:
    if cfg.print_autotuning:
        print(f"kdfuse: chunk_size={size} for {describe(key)} ({source})", file=sys.stderr, flush=True)


def _why_not_tune(key: TuningKey, device: torch.device, cfg: Settings, tune: Tune | None) -> str | None:
    """Why chunk_size="auto" must not measure this key here, or ``None`` if it may."""
    if not cfg.autotune:
        return "KDFUSE_AUTOTUNE=0"
    if tune is None:
        return "no tuner given"
    if not _can_tune(device):
        return f"no tuning on {device.type}"
    if len(candidate_chunk_sizes(key)) == 1:
        return "one candidate for this N"
    return None


def choose_chunk_size(key: TuningKey, device: torch.device, cfg: Settings, tune: Tune | None = None) -> int:
    """Steps 2-4 of the module docstring: the cache, ``tune``, or the heuristic."""
    cache = open_cache(cfg.cache_dir, device)
    if not cfg.force_retune and (hit := cached_sweep(cache, key)) is not None:
        _report(cfg, key, hit.best, f"cached in {cache.path}")
        return hit.best
    preferred = heuristic_choice(key, device.type)
    reason = _why_not_tune(key, device, cfg, tune)
    if reason is None:
        start = time.monotonic()
        sweep = tune(key, preferred)
        if sweep is not None and sweep.best is not None:
            cache.put(key.as_dict(), sweep.to_entry())
            measured = sum(m.error is None for m in sweep.measurements)
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
    teacher: TeacherForm,
    teacher_dim: int | None,
    dtype: torch.dtype,
    device: torch.device,
    divergence: str,
    with_ce: bool,
    with_grad: bool,
    memory_budget: MemoryBudget | None = None,
    impl: str = "compile",
    fp32_logits: bool = False,
    tune: Tune | None = None,
) -> int:
    """The chunk size to use: ``chunk_size`` itself when it is an int; for ``"auto"`` the memoised,
    cached, tuned or heuristic choice for this shape's key (see the module docstring).

    ``memory_budget`` (bytes, or a fraction in (0, 1] of free device memory) overrides
    ``KDFUSE_MEMORY_BUDGET``; a fraction is taken of the memory free when the key is first seen.
    """
    if chunk_size != "auto":
        return int(chunk_size)
    cfg = settings()
    budget = cfg.memory_budget if memory_budget is None else memory_budget
    shape = (
        rows_bucket(rows),
        vocab,
        student_hidden,
        teacher,
        teacher_dim,
        dtype,
        divergence,
        with_ce,
        with_grad,
        impl,
        fp32_logits,
    )
    memo_key = (cfg, device, shape, budget)
    size = _memo.get(memo_key)
    if size is None:
        key = make_key(
            rows=rows,
            vocab=vocab,
            student_hidden=student_hidden,
            teacher=teacher,
            teacher_dim=teacher_dim,
            dtype=dtype,
            divergence=divergence,
            with_ce=with_ce,
            with_grad=with_grad,
            memory_budget=resolve_memory_budget(budget, device),
            impl=impl,
            fp32_logits=fp32_logits,
        )
        size = _memo[memo_key] = choose_chunk_size(key, device, cfg, tune)
    return size
