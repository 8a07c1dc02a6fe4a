"""Exhaustive search over candidate configurations, robust to failures and memory budgets."""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Sequence

import torch

__all__ = ["Measurement", "TuneResult", "tune"]

_SKIPPED = "skipped: "


@dataclass(frozen=True)
class Measurement:
    """The outcome for one candidate.

    ``ms`` is ``math.inf`` when the candidate failed, was pruned or skipped, and ``error`` says why.
    ``peak_bytes`` is the measured peak, 0 when the candidate never ran to completion.
    """

    candidate: Hashable
    ms: float
    peak_bytes: int
    error: str | None = None

    @property
    def skipped(self) -> bool:
        """Whether the candidate never ran because the time budget ran out."""
        return self.error is not None and self.error.startswith(_SKIPPED)


@dataclass(frozen=True)
class TuneResult:
    """The winning candidate (``None`` if none succeeded) and every measurement, in candidate order."""

    best: Hashable | None
    measurements: tuple[Measurement, ...]

    @property
    def by_candidate(self) -> dict[Hashable, Measurement]:
        return {m.candidate: m for m in self.measurements}


def tune(
    candidates: Sequence[Hashable],
    bench: Callable[[Hashable], tuple[float, int]],
    *,
    memory_budget: int | None = None,
    estimate_bytes: Callable[[Hashable], int] | None = None,
    on_result: Callable[[Measurement], None] | None = None,
    time_budget_s: float | None = None,
    time_slack: float = 0.0,
    rounds: int = 1,
    rerun_within: float | None = None,
) -> TuneResult:
    """Benchmark each candidate with ``bench(candidate) -> (ms, peak_bytes)`` and pick the fastest,
    or with ``time_slack`` > 0 the leanest: the smallest measured peak among the candidates within
    ``(1 + time_slack)`` times the fastest time (timing noise makes near-ties arbitrary anyway).
    A leaner pick than the fastest is confirmed: every candidate within the slack is measured once
    more, and those new measurements (which replace the old in the result) decide among them by
    the same rule, so one noisy measurement cannot trade a real slowdown for memory. The
    confirmation counts against ``time_budget_s`` too: if the budget runs out before every
    near-tie is measured again, the leaner pick is not confirmed and the pick is the fastest
    (the retakes taken so far replace the old measurements, as above).

    With ``rounds`` > 1 the candidates are benchmarked in that many rounds, each round running
    every candidate once (a, b, c, a, b, c, ...); a candidate's time is the median of its rounds'
    and its peak the largest. On a GPU whose clocks drift under load (a power limit), candidates
    then share the drift instead of the first ones catching the fastest clocks. A candidate that
    fails is not run again, nor, with ``rerun_within`` set, one whose time so far is more than
    ``(1 + rerun_within)`` times the fastest's: it cannot win, and a time budget is better spent
    on the near-ties.

    With ``memory_budget`` set, a candidate whose ``estimate_bytes`` exceeds it is pruned without running,
    and one whose measured peak exceeds it is scored ``inf``. Any ``Exception`` raised by ``bench`` or
    ``estimate_bytes`` (CUDA OOM, compile errors, ...) scores the candidate ``inf`` instead of propagating.
    Once ``time_budget_s`` has elapsed, nothing more is run: a candidate keeps the rounds it has,
    and one with none is skipped. ``on_result`` is called ``rounds`` times per candidate, after
    each of its rounds, with that round's measurement (its last one again when it is not run).
    Ties go to the earlier candidate.
    """
    if len(set(candidates)) != len(candidates):
        raise ValueError("candidates must be distinct")
    if not time_slack >= 0:
        raise ValueError(f"time_slack must be >= 0, got {time_slack}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if rerun_within is not None and not rerun_within >= 0:
        raise ValueError(f"rerun_within must be >= 0, got {rerun_within}")
    start = time.monotonic()
    runs: dict[Hashable, list[Measurement]] = {candidate: [] for candidate in candidates}
    for round_ in range(rounds):
        rerun = set(candidates)
        if round_ and rerun_within is not None:
            rerun = {m.candidate for m in _near([_combine(runs[c]) for c in candidates], rerun_within)}
        for candidate in candidates:
            done = runs[candidate]
            if done and (not math.isfinite(done[-1].ms) or candidate not in rerun):
                m = done[-1]  # failed, pruned, skipped or out of the running: not run again
            elif _budget_spent(start, time_budget_s):
                if not done:
                    done.append(Measurement(candidate, math.inf, 0, f"{_SKIPPED}time budget of {time_budget_s}s exhausted"))
                m = done[-1]
            else:
                m = _evaluate(candidate, bench, memory_budget, estimate_bytes)
                done.append(m)
            if on_result is not None:
                on_result(m)
    measurements = [_combine(runs[candidate]) for candidate in candidates]
    best = _pick(measurements, time_slack)
    if best != _pick(measurements, 0.0):
        near, again = _near(measurements, time_slack), {}
        for m in near:
            if _budget_spent(start, time_budget_s):
                break
            again[m.candidate] = _evaluate(m.candidate, bench, memory_budget, estimate_bytes)
        measurements = [again.get(m.candidate, m) for m in measurements]
        # The leaner pick needs every near-tie retaken: the rule compares them with each other.
        best = _pick(list(again.values()), time_slack) if len(again) == len(near) else _pick(measurements, 0.0)
    return TuneResult(best, tuple(measurements))


def _budget_spent(start: float, time_budget_s: float | None) -> bool:
    """Whether ``time_budget_s`` (``None``: no budget) has elapsed since ``start`` (``time.monotonic``)."""
    return time_budget_s is not None and time.monotonic() - start >= time_budget_s


def _combine(runs: list[Measurement]) -> Measurement:
    """One candidate's rounds as one measurement: its failure if the last round failed (a
    candidate is not run after a failure), else the median time and the largest peak."""
    if not math.isfinite(runs[-1].ms):
        return runs[-1]
    return Measurement(runs[0].candidate, statistics.median(m.ms for m in runs), max(m.peak_bytes for m in runs))


def _near(measurements: list[Measurement], time_slack: float) -> list[Measurement]:
    """The finite measurements within ``(1 + time_slack)`` times the fastest, in order."""
    finite = [m for m in measurements if math.isfinite(m.ms)]
    fastest = min((m.ms for m in finite), default=math.inf)
    return [m for m in finite if m.ms <= fastest * (1 + time_slack)]


def _pick(measurements: list[Measurement], time_slack: float) -> Hashable | None:
    near = _near(measurements, time_slack)
    # min() keeps the first of equal keys, so ties go to the earlier candidate.
    return min(near, key=lambda m: (m.peak_bytes, m.ms) if time_slack else m.ms).candidate if near else None


def _evaluate(
    candidate: Hashable,
    bench: Callable[[Hashable], tuple[float, int]],
    memory_budget: int | None,
    estimate_bytes: Callable[[Hashable], int] | None,
) -> Measurement:
    try:
        if memory_budget is not None and estimate_bytes is not None:
            estimate = estimate_bytes(candidate)
            if estimate > memory_budget:
                error = f"pruned: estimated {estimate} > memory budget {memory_budget}"
                return Measurement(candidate, math.inf, 0, error)
        ms, peak = bench(candidate)
    except Exception as exc:
        oom = isinstance(exc, torch.OutOfMemoryError)
        # A CUDA OOM message goes on with allocator advice; its first line says what failed.
        first_line = str(exc).partition("\n")[0]
        error = f"OOM: {first_line}" if oom else f"{type(exc).__name__}: {exc}"
    else:
        if memory_budget is not None and peak > memory_budget:
            return Measurement(candidate, math.inf, int(peak), f"over memory budget: {peak} > {memory_budget}")
        if not math.isfinite(ms):
            return Measurement(candidate, math.inf, int(peak), f"non-finite time: {ms}")
        return Measurement(candidate, float(ms), int(peak))
    # Emptied outside the except block: by now the traceback, and the tensors its frames held, are freed.
    if oom and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return Measurement(candidate, math.inf, 0, error)
