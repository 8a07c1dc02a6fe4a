"""Tests for the KD-agnostic ``autotune`` package (CPU only, no real timing in the search tests)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import types

import pytest
import torch

import autotune
import autotune.cache
import autotune.timing
import autotune.tuner
from autotune import Measurement, TuningCache, TuningCacheWarning, measure, measure_interleaved, tune

VERSIONS = {"torch": "1.0", "triton": "none", "python": "3.11", "app": "0.1"}


def _bench_from(times: dict, peaks: dict | None = None, calls: list | None = None):
    """A bench returning canned (ms, peak) per candidate; an Exception value is raised instead."""

    def bench(candidate):
        if calls is not None:
            calls.append(candidate)
        result = times[candidate]
        if isinstance(result, Exception):
            raise result
        return result, (peaks or {}).get(candidate, 0)

    return bench


# --- tune ---------------------------------------------------------------------------------------


def test_tune_picks_fastest_and_reports_every_candidate():
    seen = []
    result = tune(["a", "b", "c"], _bench_from({"a": 3.0, "b": 1.0, "c": 2.0}, {"b": 7}), on_result=seen.append)
    assert result.best == "b"
    assert result.measurements == (
        Measurement("a", 3.0, 0),
        Measurement("b", 1.0, 7),
        Measurement("c", 2.0, 0),
    )
    assert list(result.measurements) == seen
    assert result.by_candidate["c"].ms == 2.0


def test_tune_ties_go_to_earlier_candidate():
    assert tune([1, 2, 3], _bench_from({1: 2.0, 2: 1.0, 3: 1.0})).best == 2
    assert tune([3, 2, 1], _bench_from({1: 2.0, 2: 1.0, 3: 1.0})).best == 3


def test_tune_time_slack_picks_the_leanest_near_tie():
    times = {"a": 10.0, "b": 10.2, "c": 10.5, "d": 9.9}
    peaks = {"a": 3, "b": 2, "c": 1, "d": 5}
    assert tune(list(times), _bench_from(times, peaks)).best == "d"  # no slack: the fastest
    # within 3% of 9.9 (<= 10.197): d, a; b (10.2) and c (10.5) are not, however lean
    assert tune(list(times), _bench_from(times, peaks), time_slack=0.03).best == "a"
    assert tune(list(times), _bench_from(times, peaks), time_slack=0.07).best == "c"
    same = {"a": 2, "b": 2, "c": 2, "d": 2}  # equal peaks: the faster, then the earlier
    assert tune(list(times), _bench_from(times, same), time_slack=0.07).best == "d"
    with pytest.raises(ValueError, match="time_slack"):
        tune(list(times), _bench_from(times, peaks), time_slack=-0.1)


def _sequence_bench(times: dict, peaks: dict, calls: list):
    """A bench whose candidate's i-th call returns ``times[c][i]`` (the last value once they run
    out), an Exception value raised instead, and ``peaks[c]`` (a number, or a list like times)."""

    def nth(seq, candidate):
        return seq[min(calls.count(candidate), len(seq)) - 1] if isinstance(seq, list) else seq

    def bench(candidate):
        calls.append(candidate)
        result = nth(times[candidate], candidate)
        if isinstance(result, Exception):
            raise result
        return result, nth(peaks[candidate], candidate)

    return bench


def test_tune_time_slack_contest_measures_the_leaner_near_ties_in_pairs_with_the_fastest():
    """b was measured 5% behind a (noise pushed it out of the 3% slack, not out of twice that):
    paired with a, alternately before and after it, it times 1% behind, so it wins; c, 20% behind,
    is not contested."""
    calls, seen = [], []
    # b's contest ratios: 1.0, 1.01, 1.10; their median (1.01) decides, not the last or the mean.
    times = {"a": [10.0], "b": [10.5, 10.0, 10.1, 11.0], "c": [12.0]}
    bench = _sequence_bench(times, {"a": 5, "b": 1, "c": 1}, calls)
    result = tune(list(times), bench, time_slack=0.03, on_result=seen.append)
    assert calls == ["a", "b", "c"] + ["b", "a", "a", "b", "b", "a"] and result.best == "b"
    assert result.contests == {"b": pytest.approx(1.01)} and len(seen) == 3  # contest runs not reported
    # The reported times stay the rounds': a, run in every contest, would gather a drifting
    # clock's extra runs.
    assert result.by_candidate["b"].ms == 10.5 and result.by_candidate["a"].ms == 10.0
    calls.clear()  # without slack, or with the fastest also the leanest, there is no contest
    assert tune(list(times), _sequence_bench(times, {"a": 5, "b": 1, "c": 1}, calls)).best == "a"
    assert calls == ["a", "b", "c"]
    calls.clear()
    assert tune(list(times), _sequence_bench(times, dict.fromkeys(times, 1), calls), time_slack=0.03).best == "a"
    assert calls == ["a", "b", "c"]
    with pytest.raises(ValueError, match="pairs"):
        tune(list(times), _sequence_bench(times, dict.fromkeys(times, 1), calls), pairs=0)


def test_tune_time_slack_contest_goes_nearest_first_then_only_leaner():
    calls = []
    # c (nearer) wins; b (leaner still), measured within the slack first, is 6% behind in its
    # contest: c stays the pick. d (leaner than a, 20% behind) is not contested.
    times = {"a": [10.0], "b": [10.2, 10.6], "c": [10.1], "d": [12.0]}
    result = tune(list(times), _sequence_bench(times, {"a": 5, "b": 1, "c": 3, "d": 1}, calls), time_slack=0.03)
    assert calls == ["a", "b", "c", "d"] + ["c", "a", "a", "c", "c", "a"] + ["b", "a", "a", "b", "b", "a"]
    assert result.best == "c" and result.by_candidate["b"].ms == 10.2
    assert result.contests == {"c": pytest.approx(1.01), "b": pytest.approx(1.06)}
    calls.clear()  # the same, but b, heavier than c, cannot make the pick leaner: not contested
    result = tune(list(times), _sequence_bench(times, {"a": 5, "b": 4, "c": 3, "d": 1}, calls), time_slack=0.03)
    assert calls == ["a", "b", "c", "d"] + ["c", "a", "a", "c", "c", "a"] and result.best == "c"
    calls.clear()  # b's contest fails (an exception): b is scored as failed and c is contested
    times = {"a": [10.0], "b": [10.1, RuntimeError("boom")], "c": [10.2]}
    result = tune(list(times), _sequence_bench(times, {"a": 5, "b": 1, "c": 3}, calls), time_slack=0.03)
    assert calls == ["a", "b", "c"] + ["b"] + ["c", "a", "a", "c", "c", "a"]
    assert result.best == "c" and result.by_candidate["b"].error == "RuntimeError: boom"
    assert list(result.contests) == ["c"]  # b's contest did not finish
    calls.clear()  # the fastest fails in a contest: the contests end, the pick is the fastest left
    times = {"a": [10.0, RuntimeError("boom")], "b": [10.1]}
    result = tune(list(times), _sequence_bench(times, {"a": 5, "b": 1}, calls), time_slack=0.03)
    assert calls == ["a", "b", "b", "a"] and result.best == "b"
    calls.clear()  # ... but after a win, the winner stays the pick
    times = {"a": [10.0] * 4 + [RuntimeError("boom")], "b": [10.2], "c": [10.1], "e": [10.05]}
    result = tune(list(times), _sequence_bench(times, {"a": 5, "b": 1, "c": 3, "e": 9}, calls), time_slack=0.03)
    assert calls == list(times) + ["c", "a", "a", "c", "c", "a"] + ["b", "a"] and result.best == "c"
    assert result.by_candidate["a"].error == "RuntimeError: boom"
    calls.clear()  # the contender fails after a complete pair: its ratio so far does not count
    times = {"a": [10.0], "b": [10.1, 10.1, RuntimeError("boom")]}
    result = tune(list(times), _sequence_bench(times, {"a": 5, "b": 1}, calls), time_slack=0.03)
    assert calls == ["a", "b", "b", "a", "a", "b"] and result.best == "a" and result.contests == {}
    assert result.by_candidate["b"].error == "RuntimeError: boom"
    calls.clear()  # the contender's peak grows in its contest to the fastest's: no longer leaner
    times = {"a": [10.0], "b": [10.1]}
    result = tune(list(times), _sequence_bench(times, {"a": 5, "b": [1, 5]}, calls), time_slack=0.03)
    assert result.best == "a" and result.contests == {"b": pytest.approx(1.01)}
    assert result.by_candidate["b"].peak_bytes == 5 and result.by_candidate["b"].ms == 10.1
    calls.clear()  # a 0 ms fastest (a coarse clock) is matched by 0 ms only
    times = {"a": [0.0], "b": [0.0], "c": [0.001]}
    result = tune(list(times), _sequence_bench(times, {"a": 5, "b": 3, "c": 1}, calls), time_slack=0.03)
    assert result.best == "b" and result.contests == {"b": 1.0}  # c: not within twice the slack of 0


@pytest.mark.parametrize(
    "budget,contests,best",
    [
        (3.5, [], "a"),  # spent by the rounds: no contest, the fastest
        (4.5, ["c"], "a"),  # spent before c's first pair is complete: c lost
        (5.5, ["c", "a"], "c"),  # spent after one of c's three pairs: decided on it
        (7.5, ["c", "a", "a", "c"], "c"),  # spent after two of c's three pairs: decided on those
        (10.5, ["c", "a", "a", "c", "c", "a", "b"], "c"),  # spent in b's contest: c's win stands
        (16.5, ["c", "a", "a", "c", "c", "a", "b", "a", "a", "b", "b", "a"], "b"),  # both won: the leaner
    ],
)
def test_tune_time_slack_contest_stops_when_the_time_budget_is_spent(monkeypatch, budget, contests, best):
    clock, calls = [0.0], []
    monkeypatch.setattr(autotune.tuner, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    times = {"a": [10.0], "b": [10.2], "c": [10.1], "d": [12.0]}
    canned = _sequence_bench(times, {"a": 5, "b": 1, "c": 3, "d": 1}, calls)

    def bench(candidate):
        clock[0] += 1.0  # each measurement takes one fake second
        return canned(candidate)

    result = tune(list(times), bench, time_slack=0.03, time_budget_s=budget)
    assert calls == list(times) + contests and result.best == best
    assert list(result.contests) == ["c", "b"][: (len(contests) >= 2) + (len(contests) >= 10)]


def test_tune_prunes_by_estimate_without_running():
    calls = []
    result = tune(
        ["a", "b", "c"],
        _bench_from({"a": 3.0, "b": 1.0, "c": 2.0}, calls=calls),
        memory_budget=100,
        estimate_bytes={"a": 50, "b": 101, "c": 100}.__getitem__,
    )
    assert calls == ["a", "c"]
    assert result.best == "c"
    pruned = result.by_candidate["b"]
    assert pruned.ms == math.inf and pruned.peak_bytes == 0
    assert pruned.error == "pruned: estimated 101 > memory budget 100"


def test_tune_estimate_ignored_without_budget():
    calls = []
    tune(["a"], _bench_from({"a": 1.0}, calls=calls), estimate_bytes=lambda c: 10**30)
    assert calls == ["a"]


def test_tune_scores_measured_peak_over_budget_inf():
    bench = _bench_from({"a": 3.0, "b": 1.0}, {"a": 100, "b": 150})
    result = tune(["a", "b"], bench, memory_budget=100)
    assert result.best == "a"
    assert result.by_candidate["b"] == Measurement("b", math.inf, 150, "over memory budget: 150 > 100")


def test_tune_catches_exceptions_and_empties_cuda_cache_after_oom(monkeypatch):
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    times = {
        "oom": torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nIf reserved but unallocated..."),
        "compile": RuntimeError("triton compilation failed"),
        "shape": ValueError("bad tile"),
        "ok": 5.0,
    }
    result = tune(list(times), _bench_from(times))
    assert result.best == "ok"
    errors = {m.candidate: m.error for m in result.measurements}
    assert errors == {
        "oom": "OOM: CUDA out of memory. Tried to allocate 2.00 GiB",
        "compile": "RuntimeError: triton compilation failed",
        "shape": "ValueError: bad tile",
        "ok": None,
    }
    assert all(result.by_candidate[c].ms == math.inf for c in ("oom", "compile", "shape"))
    assert emptied == [True]  # once, for the one OOM


def test_tune_catches_estimate_errors_and_non_finite_times():
    def estimate(c):
        raise KeyError(c)

    result = tune(["a"], _bench_from({"a": 1.0}), memory_budget=10, estimate_bytes=estimate)
    assert result.best is None and result.measurements[0].error == "KeyError: 'a'"
    result = tune(["a", "b"], _bench_from({"a": math.nan, "b": 4.0}))
    assert result.best == "b" and result.by_candidate["a"].error == "non-finite time: nan"


def test_tune_all_failing_gives_no_best():
    result = tune(["a", "b"], _bench_from({"a": RuntimeError("x"), "b": torch.OutOfMemoryError("y")}))
    assert result.best is None
    assert [m.ms for m in result.measurements] == [math.inf, math.inf]
    assert tune([], _bench_from({})) == autotune.TuneResult(None, ())


def test_tune_time_budget_skips_the_rest(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(autotune.tuner, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))

    def bench(candidate):
        clock[0] += 1.0  # each measurement takes one fake second
        return float(10 - candidate), 0

    seen = []
    result = tune(range(5), bench, time_budget_s=2.5, on_result=seen.append)
    assert [m.ms for m in result.measurements] == [10.0, 9.0, 8.0, math.inf, math.inf]
    assert result.measurements[3].error == "skipped: time budget of 2.5s exhausted"
    assert [m.skipped for m in result.measurements] == [False, False, False, True, True]
    assert result.best == 2
    assert len(seen) == 5


def test_tune_rounds_interleave_and_take_each_candidates_median():
    """Rounds run a, b, c, a, b, c, ...; a drifting device (each call slower than the last) would
    have favoured the first candidate measured once, but each round's drift hits all alike, and
    the median of a candidate's rounds decides. A failure is not run again."""
    order, drift = [], iter(range(100))
    base = {"a": 10.0, "b": 9.5, "c": RuntimeError("no")}
    peaks = {"a": [5, 7, 6], "b": [1, 1, 1]}

    def bench(candidate):
        order.append(candidate)
        if isinstance(base[candidate], Exception):
            raise base[candidate]
        rounds_done = order.count(candidate) - 1
        return base[candidate] + next(drift) * 0.1, peaks[candidate][rounds_done]

    seen = []
    result = tune(["a", "b", "c"], bench, rounds=3, on_result=seen.append)
    assert order == ["a", "b", "c", "a", "b", "a", "b"]
    # a ran at drift 0, 2, 4 (x 0.1 ms), b at 1, 3, 5: medians 10.2 and 9.8.
    assert result.by_candidate["a"].ms == pytest.approx(10.2) and result.by_candidate["a"].peak_bytes == 7
    assert result.by_candidate["b"].ms == pytest.approx(9.8) and result.by_candidate["b"].peak_bytes == 1
    assert result.by_candidate["c"].error == "RuntimeError: no"
    assert result.best == "b"
    assert len(seen) == 9 and [m.candidate for m in seen] == ["a", "b", "c"] * 3
    with pytest.raises(ValueError):
        tune(["a"], bench, rounds=0)


def test_tune_rounds_rerun_only_the_candidates_that_can_still_win():
    calls = []
    times = {"a": [10.0, 10.4], "b": [10.5, 9.7], "c": [12.0], "d": [10.2, 10.6]}

    def bench(candidate):
        calls.append(candidate)
        return times[candidate][calls.count(candidate) - 1], 0

    result = tune(list(times), bench, rounds=2, rerun_within=0.1)
    assert calls == ["a", "b", "c", "d", "a", "b", "d"]  # c: 20% behind a after round 1
    assert result.by_candidate["c"].ms == 12.0 and result.best == "b"  # medians 10.2, 10.1, 12, 10.4
    with pytest.raises(ValueError):
        tune(["a"], bench, rerun_within=-0.1)


def test_tune_rounds_keep_what_the_time_budget_allowed(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(autotune.tuner, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    calls = []

    def bench(candidate):
        calls.append(candidate)
        clock[0] += 1.0
        return float(len(calls)), 0

    result = tune(["a", "b", "c"], bench, rounds=2, time_budget_s=4.5)
    assert calls == ["a", "b", "c", "a", "b"]  # round 2 cut after b
    assert [m.ms for m in result.measurements] == [pytest.approx(2.5), pytest.approx(3.5), 3.0]
    assert not any(m.skipped for m in result.measurements)


def test_tune_rejects_duplicate_candidates():
    with pytest.raises(ValueError):
        tune(["a", "a"], _bench_from({"a": 1.0}))


# --- measure ------------------------------------------------------------------------------------


def test_measure_cpu_counts_calls_and_returns_positive_median():
    calls = []

    def fn():
        calls.append(None)
        return sum(range(1000))

    ms, peak = measure(fn, warmup=2, repeat=5, device="cpu")
    assert len(calls) == 7
    assert 0 < ms < 1000 and peak == 0


def test_measure_cpu_median_excludes_warmup(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(autotune.timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    durations = iter([9.0, 9.0, 0.004, 0.001, 0.003, 0.002, 0.005])  # seconds; two warm-ups first

    def fn():
        clock[0] += next(durations)

    ms, _ = measure(fn, warmup=2, repeat=5, device="cpu")
    assert ms == pytest.approx(3.0)


def test_timed_calls_keeps_each_timed_call(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(autotune.timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    durations = iter([9.0, 0.004, 0.001, 0.003])  # seconds; one warm-up first

    def fn():
        clock[0] += next(durations)

    times, peak = autotune.timed_calls(fn, warmup=1, repeat=3, device="cpu")
    assert times == pytest.approx([4.0, 1.0, 3.0]) and peak == 0


def test_timed_calls_settle_runs_untimed_calls_until_the_seconds_have_passed(monkeypatch):
    """``settle``: past ``warmup``, untimed calls go on until that many seconds (since the first
    warm-up call) have passed; only the ``repeat`` calls after them are timed."""
    clock = [0.0]
    monkeypatch.setattr(autotune.timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    durations = iter([0.4, 0.4, 0.4, 0.004, 0.001, 0.003])  # 0.8 s < settle after 2 calls, 1.2 s after 3
    calls = []

    def fn():
        calls.append(None)
        clock[0] += next(durations)

    times, _ = autotune.timed_calls(fn, warmup=1, repeat=3, device="cpu", settle=1.0)
    assert len(calls) == 6 and times == pytest.approx([4.0, 1.0, 3.0])
    with pytest.raises(ValueError):
        autotune.timed_calls(fn, device="cpu", settle=-1.0)


def test_measure_interleaved_runs_rounds_and_pools_the_timed_calls(monkeypatch):
    """Each round runs every function (warm-up, then timed calls); a function's median is over
    its timed calls of all rounds, so a slow round (a throttled device) weighs on all alike."""
    clock = [0.0]
    monkeypatch.setattr(autotune.timing, "time", types.SimpleNamespace(perf_counter=lambda: clock[0]))
    order = []
    durations = {"a": iter([0.001] * 4 + [0.002] * 4), "b": iter([0.003] * 4 + [0.006] * 4)}

    def by_round(name):
        def fn():
            order.append(name)
            clock[0] += next(durations[name])

        return fn

    result = measure_interleaved({k: by_round(k) for k in durations}, rounds=2, warmup=1, repeat=3, device="cpu")
    assert order == ["a"] * 4 + ["b"] * 4 + ["a"] * 4 + ["b"] * 4
    assert result["a"][0] == pytest.approx(1.5) and result["b"][0] == pytest.approx(4.5)
    with pytest.raises(ValueError):
        measure_interleaved({"a": lambda: None}, rounds=0, device="cpu")
    with pytest.raises(ValueError):
        measure_interleaved({}, repeat=0, device="cpu")


def test_measure_rejects_bad_arguments():
    with pytest.raises(ValueError):
        measure(lambda: None, repeat=0, device="cpu")
    with pytest.raises(ValueError):
        measure(lambda: None, device="meta")


# --- cache --------------------------------------------------------------------------------------


def test_device_identity_cpu_and_cuda(monkeypatch, tmp_path):
    assert autotune.device_identity("cpu").startswith("cpu:")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert autotune.device_identity("cuda:0") == "NVIDIA H100 80GB HBM3 (sm_90)"
    cache = TuningCache(tmp_path, device="cuda:0", versions=VERSIONS)
    assert cache.path == tmp_path / "NVIDIA_H100_80GB_HBM3_sm_90.json"


def test_software_versions_and_default_cache_dir(monkeypatch, tmp_path):
    versions = autotune.software_versions({"kdfuse": "0.1.0"})
    assert versions["torch"] == torch.__version__ and versions["kdfuse"] == "0.1.0"
    assert set(versions) == {"torch", "triton", "python", "kdfuse"}
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert autotune.default_cache_dir("kdfuse") == tmp_path / "xdg" / "kdfuse"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
    assert autotune.default_cache_dir("kdfuse") == tmp_path / "home" / ".cache" / "kdfuse"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert autotune.default_cache_dir("kdfuse") == tmp_path / "home" / ".cache" / "kdfuse"


def test_cache_round_trip_and_file_contents(tmp_path):
    cache = TuningCache(tmp_path / "sub", device="cpu", versions=VERSIONS)
    assert cache.get("missing") is None
    cache.put({"n": 4096, "dtype": "bf16"}, {"chunk": 1024})
    cache.put("plain", (1, 2))
    assert cache.get({"dtype": "bf16", "n": 4096}) == {"chunk": 1024}  # key order does not matter
    assert cache.get({"dtype": "bf16", "n": 8192}) is None
    assert cache.get("plain") == [1, 2]

    doc = json.loads(cache.path.read_text())
    assert doc["device"] == autotune.device_identity("cpu") == cache.identity
    assert doc["entries"]['{"dtype":"bf16","n":4096}'] == {"versions": VERSIONS, "value": {"chunk": 1024}}

    again = TuningCache(tmp_path / "sub", device="cpu", versions=dict(VERSIONS))
    assert again.entries() == {'{"dtype":"bf16","n":4096}': {"chunk": 1024}, "plain": [1, 2]}


def test_cache_version_change_misses(tmp_path):
    TuningCache(tmp_path, device="cpu", versions=VERSIONS).put("k", 1)
    newer = TuningCache(tmp_path, device="cpu", versions={**VERSIONS, "torch": "1.1"})
    assert newer.get("k") is None and newer.entries() == {}
    newer.put("k", 2)
    assert newer.get("k") == 2
    assert TuningCache(tmp_path, device="cpu", versions=VERSIONS).get("k") is None


def test_cache_clear(tmp_path):
    cache = TuningCache(tmp_path, device="cpu", versions=VERSIONS)
    cache.put("a", 1)
    cache.clear()
    assert cache.get("a") is None
    assert json.loads(cache.path.read_text())["entries"] == {}


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_cache_file_mode_follows_the_umask(tmp_path, monkeypatch, umask):
    monkeypatch.setattr(autotune.cache, "_UMASK", umask)
    cache = TuningCache(tmp_path, device="cpu", versions=VERSIONS)
    cache.put("k", 1)
    assert cache.path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    previous = os.umask(umask)
    try:
        assert autotune.cache._read_umask() == umask and os.umask(umask) == umask  # read, left as it was
    finally:
        os.umask(previous)


def test_cache_rejects_unserialisable_value(tmp_path):
    cache = TuningCache(tmp_path, device="cpu", versions=VERSIONS)
    with pytest.raises(TypeError):
        cache.put("k", object())
    assert not cache.path.exists()


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    cache = TuningCache(tmp_path, device="cpu", versions=VERSIONS)
    cache.put("old", 1)
    before = cache.path.read_bytes()

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.warns(TuningCacheWarning, match="disk full"):
        cache.put("new", 2)
    assert cache.path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([cache.path.name, cache.path.name + ".lock"])
    assert cache.get("new") == 2 and cache.get("old") == 1  # carries on in memory


@pytest.mark.parametrize(
    "content", [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'{"device": "elsewhere", "entries": {}}', b""]
)
def test_cache_corrupt_file_warns_once_and_is_rebuilt(tmp_path, recwarn, content):
    cache = TuningCache(tmp_path, device="cpu", versions=VERSIONS)
    cache.path.write_bytes(content)
    assert cache.get("k") is None
    assert cache.entries() == {}
    cache.put("k", 3)
    assert cache.get("k") == 3
    assert len([w for w in recwarn if issubclass(w.category, TuningCacheWarning)]) == 1
    assert json.loads(cache.path.read_text())["entries"]["k"]["value"] == 3


def _assert_falls_back_to_memory(cache: TuningCache, recwarn) -> None:
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1 and cache.get("b") == 2
    assert len([w for w in recwarn if issubclass(w.category, TuningCacheWarning)]) == 1


def test_cache_uncreatable_dir_falls_back_to_memory(tmp_path, recwarn):
    (tmp_path / "a_file").write_text("")
    cache = TuningCache(tmp_path / "a_file" / "cache", device="cpu", versions=VERSIONS)
    _assert_falls_back_to_memory(cache, recwarn)
    assert cache.entries() == {"a": 1, "b": 2}


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_cache_read_only_dir_keeps_existing_entries(tmp_path, recwarn):
    TuningCache(tmp_path, device="cpu", versions=VERSIONS).put("old", 0)
    tmp_path.chmod(0o500)
    try:
        cache = TuningCache(tmp_path, device="cpu", versions=VERSIONS)
        _assert_falls_back_to_memory(cache, recwarn)
        assert cache.entries() == {"old": 0, "a": 1, "b": 2}
    finally:
        tmp_path.chmod(0o700)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores permissions")
def test_cache_lock_file_another_user_created(tmp_path, recwarn):
    """A shared cache directory: the lock file, created by a colleague with umask 022, is
    read-only to us. Locking needs no write access, so our entries still reach the file."""
    TuningCache(tmp_path, device="cpu", versions=VERSIONS).put("old", 0)
    (lock,) = tmp_path.glob("*.lock")
    lock.chmod(0o444)
    cache = TuningCache(tmp_path, device="cpu", versions=VERSIONS)
    cache.put("new", 1)
    assert TuningCache(tmp_path, device="cpu", versions=VERSIONS).entries() == {"old": 0, "new": 1}
    assert not [w for w in recwarn if issubclass(w.category, TuningCacheWarning)]


def _concurrent_writer(cache_dir: str, rank: int, barrier) -> None:
    cache = TuningCache(cache_dir, device="cpu", versions=VERSIONS)
    barrier.wait()  # start together so the read-merge-writes overlap
    for i in range(10):
        cache.put(f"rank{rank}-{i}", rank)
        cache.put("shared", rank)


def test_cache_concurrent_writers_lose_nothing(tmp_path):
    # fork where there is one: the writers only do file I/O, and a spawned child would spend
    # seconds importing torch (8 of them, on a small CI box, dominate the whole test file).
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    barrier = ctx.Barrier(8)
    procs = [ctx.Process(target=_concurrent_writer, args=(str(tmp_path), r, barrier)) for r in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * 8

    cache = TuningCache(tmp_path, device="cpu", versions=VERSIONS)
    entries = json.loads(cache.path.read_text())["entries"]  # valid JSON
    assert set(entries) == {f"rank{r}-{i}" for r in range(8) for i in range(10)} | {"shared"}
    assert all(entries[f"rank{r}-{i}"]["value"] == r for r in range(8) for i in range(10))
    assert cache.get("shared") in range(8)
