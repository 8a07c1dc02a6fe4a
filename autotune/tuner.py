"""Exhaustive search over candidate configurations, robust to failures and memory budgets."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

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
    """The winning candidate (``None`` if none succeeded), every measurement, in candidate order,
    and each decided contest's median ratio to the fastest (see :func:`tune`), in contest order."""

    best: Hashable | None
    measurements: tuple[Measurement, ...]
    contests: dict[Hashable, float] = field(default_factory=dict, hash=False)

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
    pairs: int = 3,
) -> TuneResult:
    """Benchmark each candidate with ``bench(candidate) -> (ms, peak_bytes)`` and pick the fastest,
    or with ``time_slack`` > 0 the leanest near-tie: a candidate with a smaller measured peak
    whose time, compared pair by pair with the fastest's, is within ``(1 + time_slack)`` of it.

    The near-tie is decided by a paired contest, since timing noise (a few % between two
    measurements of one candidate on a GPU at its power limit) is as large as the gaps the slack
    is meant to forgive. A candidate leaner than the fastest and measured within
    ``(1 + 2 * time_slack)`` of it (noise may have pushed a near-tie out of the slack) is measured
    ``pairs`` more times, alternately just before and just after the fastest (c, f, f, c, c, f,
    ...: a drifting clock hits both alike), and wins if the median of its ``pairs`` ratios to the
    fastest is within the slack and its peak, contests included, is still below the pick's so far.
    Contests go nearest the fastest first; after a win only a leaner candidate is contested. The
    pick is the last winner, else the fastest. When the time budget runs out mid-contest, that
    contest is decided on the pairs it has (none: lost), and no other runs. A contender whose
    measurement fails loses and is reported failed; if the fastest fails, the contests end, and
    with no winner yet the pick is the fastest of the rest. A candidate's reported time stays its
    rounds' median (the fastest, run in every contest, would otherwise gather the extra runs of a
    drifting clock), its peak is the largest of all its runs; contest runs are not reported to
    ``on_result``. :attr:`TuneResult.contests` has each decided contest's median ratio.

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
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
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
                    done.append(
                        Measurement(candidate, math.inf, 0, f"{_SKIPPED}time budget of {time_budget_s}s exhausted")
                    )
                m = done[-1]
            else:
                m = _evaluate(candidate, bench, memory_budget, estimate_bytes)
                done.append(m)
            if on_result is not None:
                on_result(m)
    rounds_only = [_combine(runs[candidate]) for candidate in candidates]
    fastest = _fastest(rounds_only)
    best, contests = fastest, {}
    extra: dict[Hashable, list[Measurement]] = {candidate: [] for candidate in candidates}
    if time_slack and fastest is not None:

        def evaluate(candidate: Hashable) -> Measurement | None:
            """One more measurement of ``candidate``, kept in ``extra``; ``None`` once the budget is spent."""
            if _budget_spent(start, time_budget_s):
                return None
            extra[candidate].append(_evaluate(candidate, bench, memory_budget, estimate_bytes))
            return extra[candidate][-1]

        best = _contest(rounds_only, fastest, evaluate, time_slack, pairs, contests)
    measurements = [_with_contest(m, extra[m.candidate]) for m in rounds_only]
    if best is None:  # the fastest failed in a contest
        best = _fastest(measurements)
    return TuneResult(best, tuple(measurements), contests)


def _budget_spent(start: float, time_budget_s: float | None) -> bool:
    """Whether ``time_budget_s`` (``None``: no budget) has elapsed since ``start`` (``time.monotonic``)."""
    return time_budget_s is not None and time.monotonic() - start >= time_budget_s


def _combine(runs: list[Measurement]) -> Measurement:
    """One candidate's rounds as one measurement: its failure if the last round failed (a
    candidate is not run after a failure), else the median time and the largest peak."""
    if not math.isfinite(runs[-1].ms):
        return runs[-1]
    return Measurement(runs[0].candidate, statistics.median(m.ms for m in runs), max(m.peak_bytes for m in runs))


def _with_contest(rounds: Measurement, contest: list[Measurement]) -> Measurement:
    """A candidate's rounds' measurement with its contest's runs: its failure if one failed, else
    the rounds' time (the fastest, run in every contest, would otherwise carry a drifting clock's
    extra runs into its median) with the largest peak of all."""
    if not contest or not math.isfinite(rounds.ms):
        return rounds
    if not math.isfinite(contest[-1].ms):
        return contest[-1]
    return Measurement(rounds.candidate, rounds.ms, max(rounds.peak_bytes, *(m.peak_bytes for m in contest)))


def _near(measurements: list[Measurement], slack: float) -> list[Measurement]:
    """The finite measurements within ``(1 + slack)`` times the fastest, in order."""
    finite = [m for m in measurements if math.isfinite(m.ms)]
    fastest = min((m.ms for m in finite), default=math.inf)
    return [m for m in finite if m.ms <= fastest * (1 + slack)]


def _fastest(measurements: list[Measurement]) -> Hashable | None:
    """The candidate with the smallest finite time (the earlier one on ties), or ``None``."""
    finite = [m for m in measurements if math.isfinite(m.ms)]
    # min() keeps the first of equal keys, so ties go to the earlier candidate.
    return min(finite, key=lambda m: m.ms).candidate if finite else None


def _contest(
    measurements: list[Measurement],
    fastest: Hashable,
    evaluate: Callable[[Hashable], Measurement | None],
    time_slack: float,
    pairs: int,
    ratios_out: dict[Hashable, float],
) -> Hashable | None:
    """The leanest candidate that wins a paired contest against ``fastest``, else ``fastest``
    (see :func:`tune`); ``None`` if the fastest fails before any win. Each decided contest's
    median ratio goes into ``ratios_out``."""
    peaks = {m.candidate: m.peak_bytes for m in measurements}  # the largest so far, contests included
    best = fastest
    contenders = [m for m in _near(measurements, 2 * time_slack) if m.peak_bytes < peaks[fastest]]
    # Nearest the fastest first (sorted() is stable: the earlier candidate on ties), so a time
    # budget cuts the long shots; after a win only a leaner candidate can change the pick.
    for contender in (m.candidate for m in sorted(contenders, key=lambda m: m.ms)):
        if peaks[contender] >= peaks[best]:
            continue
        ratios, spent = [], False
        for i in range(pairs):
            ms = {}
            for candidate in (contender, fastest) if i % 2 == 0 else (fastest, contender):
                m = evaluate(candidate)
                if m is None or not math.isfinite(m.ms):
                    break
                ms[candidate], peaks[candidate] = m.ms, max(peaks[candidate], m.peak_bytes)
            if m is None:
                spent = True
                break
            if len(ms) < 2:
                if candidate == fastest:  # nothing left to contest against
                    return None if best == fastest else best
                ratios = []  # the contender failed: it is out
                break
            ratios.append(_ratio(ms[contender], ms[fastest]))
        # A contest the time budget cut is decided on the pairs it has: one pair, measured back
        # to back, is noisier than ``pairs`` but still shares the clock's drift, which the
        # rounds' medians do not; falling back to the fastest would pick the heaviest near-tie.
        if ratios:
            ratios_out[contender] = statistics.median(ratios)
            if ratios_out[contender] <= 1 + time_slack and peaks[contender] < peaks[best]:
                best = contender
        if spent:
            break
    return best


def _ratio(ms: float, fastest_ms: float) -> float:
    """``ms / fastest_ms``, where a 0 ms fastest (a stubbed or too coarse clock) is matched only by 0 ms."""
    if fastest_ms > 0:
        return ms / fastest_ms
    return 1.0 if ms == 0 else math.inf


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
