"""Tests for kdfuse.tuning and kdfuse.env: keys, the memo -> cache -> tune -> heuristic order, the
environment knobs and memory budgets. CPU only; measuring is stubbed except in the few tests
that run the real benchmark on tiny shapes."""

from __future__ import annotations

import json
import math
import types
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from bench_stubs import SweepCalls

import autotune
import autotune.tuner
import kdfuse
from autotune import Measurement
from kdfuse import env, sweep, tuning
from kdfuse.teacher import TEACHER_ROWS
from kdfuse.tuning import Sweep, TuningKey

GiB = 2**30
CPU = torch.device("cpu")
CUDA = torch.device("cuda", 0)
# An LLM-sized call: V >= 32768, so candidates run 256 .. min(8192, bucket).
CALL = {
    "rows": 5000,
    "vocab": 128256,
    "student_hidden": 2048,
    "teacher": "hidden",
    "teacher_dim": 4096,
    "dtype": torch.bfloat16,
    "divergence": "forward_kl",
    "with_ce": True,
    "with_grad": True,
}


pytestmark = pytest.mark.usefixtures("tuning_env")


def stub_tune(device: torch.device):
    """resolve_chunk_size's ``tune``: kdfuse.sweep.tune_in_process on a stand-in problem (the
    call's own tensors in kdfuse.fused; the benches are stubbed here)."""

    def tune(key, preferred):
        problem = sweep.build_problem(key, device)
        return sweep.tune_in_process(key, preferred, device=device, problem=problem, distill=None)

    return tune


def resolve(device: torch.device = CPU, **overrides) -> int:
    return tuning.resolve_chunk_size("auto", device=device, tune=stub_tune(device), **{**CALL, **overrides})


def key_for(**overrides) -> TuningKey:
    call = {**CALL, "memory_budget": None, **overrides}
    return tuning.make_key(**call)


class FakeBench(SweepCalls):
    """Replaces the measuring functions: canned ms (and peak bytes) per chunk size. Every call is
    recorded in ``calls``; ``chunks`` has each sweep's candidates once, in the order its first
    round ran them."""

    def __init__(self, monkeypatch, times: dict[int, float] | None = None, peaks: dict[int, int] | None = None):
        self.times, self.peaks = times or {}, peaks or {}
        super().__init__()
        self.floors = 0
        self.problems: list[TuningKey] = []
        monkeypatch.setattr(sweep, "bench_chunk_size", self.bench)
        monkeypatch.setattr(sweep, "bench_floor", self.floor)

    def bench(self, problem, chunk_size, distill, *, warmup, repeat):
        self.record(problem, chunk_size)
        result = self.times.get(chunk_size, 10.0 + chunk_size / 1000)
        if isinstance(result, Exception):
            raise result
        return result, self.peaks.get(chunk_size, 0)

    def floor(self, problem, *, warmup, repeat):
        self.floors += 1
        return 1.0, 0


@pytest.fixture
def no_problem(monkeypatch):
    """The benchmark's inputs are not built and its warm-up step does nothing (for stubbed benches
    at LLM sizes); records the keys built and the chunk sizes warmed up."""
    built, warmed = [], []
    monkeypatch.setattr(
        sweep,
        "build_problem",
        lambda key, device: built.append(key) or types.SimpleNamespace(key=key, rows=key.rows_bucket),
    )
    monkeypatch.setattr(sweep, "distill_step", lambda problem, chunk, distill: lambda: warmed.append(chunk))
    return types.SimpleNamespace(built=built, warmed=warmed)


@pytest.fixture
def fake_cuda(monkeypatch, no_problem):
    """Lets resolve_chunk_size take its real CUDA path on this CPU-only machine: the device
    queries are stubbed (40 of 80 GiB free), and so is the benchmark problem."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (40 * GiB, 80 * GiB))
    return no_problem


def stored(device: torch.device = CPU) -> dict:
    return tuning.open_cache(env.settings().cache_dir, device).entries()


# --- env --------------------------------------------------------------------------------------


def test_settings_defaults_and_knobs(monkeypatch, tmp_path):
    cfg = env.settings()
    assert cfg == env.Settings(True, tmp_path / "cache", False, False, None)
    monkeypatch.delenv("KDFUSE_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert env.settings().cache_dir == autotune.default_cache_dir("kdfuse") == tmp_path / "xdg" / "kdfuse"
    monkeypatch.setenv("KDFUSE_AUTOTUNE", "0")
    monkeypatch.setenv("KDFUSE_PRINT_AUTOTUNING", "yes")
    monkeypatch.setenv("KDFUSE_FORCE_RETUNE", "On")
    monkeypatch.setenv("KDFUSE_MEMORY_BUDGET", "0.5")
    monkeypatch.setenv("KDFUSE_CACHE_DIR", "~/kd")
    assert env.settings() == env.Settings(False, Path.home() / "kd", True, True, 0.5)


@pytest.mark.parametrize(
    ("name", "value"), [("AUTOTUNE", "maybe"), ("FORCE_RETUNE", "2"), ("MEMORY_BUDGET", "lots"), ("MEMORY_BUDGET", "0")]
)
def test_settings_bad_values_name_the_variable(monkeypatch, name, value):
    monkeypatch.setenv(env.PREFIX + name, value)
    with pytest.raises(ValueError, match=env.PREFIX + name):
        env.settings()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.5", 0.5),
        ("1", 1.0),
        ("8000000000", 8 * 10**9),
        ("8e9", 8 * 10**9),
        ("16GiB", 16 * GiB),
        ("512 MB", 512 * 10**6),
        ("0.5GiB", GiB // 2),
    ],
)
def test_parse_memory_budget(text, expected):
    value = env.parse_memory_budget(text)
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("text", ["", "-1", "0", "1.5", "inf", "nan", "12 parsecs", "1b", "GiB"])
def test_parse_memory_budget_rejects(text):
    with pytest.raises(ValueError):
        env.parse_memory_budget(text)


# --- keys, candidates, estimate, heuristic ------------------------------------------------------


def test_key_contents_and_bucketing():
    key = key_for()
    assert key.as_dict() == {
        "rows_bucket": 8192,
        "vocab": 128256,
        "student_hidden": 2048,
        "teacher": "hidden",
        "teacher_dim": 4096,
        "dtype": "bfloat16",
        "divergence": "forward_kl",
        "with_ce": True,
        "with_grad": True,
        "memory_budget": None,
        "impl": "compile",
    }
    assert [tuning.rows_bucket(n) for n in (1, 2, 3, 4096, 4097, 8192)] == [1, 2, 4, 4096, 8192, 8192]
    assert key_for(rows=4097) == key_for(rows=8192) == key
    assert key_for(rows=8193).rows_bucket == 16384
    assert (key_for(teacher="logits").teacher, key_for(teacher="logits").teacher_dim) == ("logits", None)
    topk_key = key_for(teacher="topk", teacher_dim=64)
    assert (topk_key.teacher, topk_key.teacher_dim) == ("topk", 64)
    assert "top-64 teacher" in tuning.describe(topk_key)
    assert key_for(impl="eager") != key and "impl=eager" in tuning.describe(key_for(impl="eager"))
    with pytest.raises(ValueError, match="teacher must be one of"):
        key_for(teacher="dense")
    assert key_for(divergence="jsd").divergence == "jsd_beta0.5"  # same key as D.jsd() passes
    assert key_for(divergence="my_divergence").divergence == "my_divergence"
    assert key_for(memory_budget=int(3.2 * GiB)).memory_budget == 3 * GiB


@pytest.mark.parametrize(
    ("budget", "bucket"),
    [(GiB, GiB), (GiB + 1, GiB), (3 * GiB // 2 - 1, GiB), (3 * GiB // 2, 3 * GiB // 2), (2 * GiB - 1, 3 * GiB // 2)],
)
def test_bucket_memory_budget(budget, bucket):
    assert tuning.bucket_memory_budget(budget) == bucket


def test_candidates_are_powers_of_two_capped_at_the_bucket():
    assert tuning.candidate_chunk_sizes(key_for()) == (256, 512, 1024, 2048, 4096, 8192)
    assert tuning.candidate_chunk_sizes(key_for(rows=60000)) == (256, 512, 1024, 2048, 4096, 8192)
    assert tuning.candidate_chunk_sizes(key_for(rows=300)) == (256, 512)
    assert tuning.candidate_chunk_sizes(key_for(rows=100)) == (128,)
    assert tuning.candidate_chunk_sizes(key_for(rows=1000, vocab=1000)) == (64, 128, 256, 512, 1024)


def test_estimate_bytes():
    # bf16: student + teacher logits + logit gradient (2 B each) + two fp32 copies, per element.
    assert tuning.estimate_bytes(1024, 1000, 64, torch.bfloat16, True) == 1024 * 1000 * (3 * 2 + 2 * 4) + 1000 * 64 * 4
    assert tuning.estimate_bytes(1024, 1000, 64, torch.bfloat16, False) == 1024 * 1000 * (2 * 2 + 2 * 4)
    assert tuning.estimate_bytes(8, 10, 4, torch.float64, True) == 8 * 10 * (3 * 8 + 2 * 8) + 10 * 4 * 8
    # The in-place kernels: the student's block, the teacher's at most TEACHER_ROWS rows, no copies.
    rows = TEACHER_ROWS
    assert (
        tuning.estimate_bytes(4 * rows, 1000, 64, torch.bfloat16, True, in_place=True)
        == 5 * rows * 1000 * 2 + 1000 * 64 * 4
    )
    assert tuning.estimate_bytes(64, 1000, 64, torch.bfloat16, False, in_place=True) == 2 * 64 * 1000 * 2
    assert (
        tuning.estimate_bytes(4 * rows, 1000, 64, torch.bfloat16, True, "topk", True)
        == 4 * rows * 1000 * 2 + 1000 * 64 * 4
    )
    # Teacher logits the caller gives are read where they are: no teacher block of ours, on
    # either path (the generic one still makes its float32 copy).
    assert (
        tuning.estimate_bytes(4 * rows, 1000, 64, torch.bfloat16, True, "logits", True)
        == 4 * rows * 1000 * 2 + 1000 * 64 * 4
    )
    assert (
        tuning.estimate_bytes(1024, 1000, 64, torch.bfloat16, True, "logits")
        == 1024 * 1000 * (2 * 2 + 2 * 4) + 1000 * 64 * 4
    )
    with pytest.raises(ValueError, match="teacher must be one of"):
        tuning.estimate_bytes(1024, 1000, 64, torch.bfloat16, True, "dense")


def test_key_estimate_follows_the_teacher_form():
    logits_key = key_for(teacher="logits")
    estimate = tuning.estimate_bytes(4096, 128256, 2048, torch.bfloat16, True, "logits", in_place=True)
    assert tuning.key_estimate(logits_key, "cuda")(4096) == estimate


def test_working_set_adds_the_returned_gradients():
    key = key_for()
    outputs = (128256 + 8192 * 3) * 2048 * 2  # grad_weight (bf16), grad_hidden (fp32, then bf16)
    assert tuning.working_set(key, "cuda")(4096) == tuning.key_estimate(key, "cuda")(4096) + outputs
    assert tuning.working_set(key_for(with_grad=False), "cuda")(4096) == tuning.key_estimate(
        key_for(with_grad=False), "cuda"
    )(4096)


def test_runs_in_place_names_the_kernels_path():
    """Built-ins the Triton kernels implement, compiled on CUDA in bf16/fp32; nothing else."""
    assert tuning.runs_in_place(key_for(), "cuda")
    assert tuning.runs_in_place(key_for(divergence="jsd", dtype=torch.float32), "cuda")
    assert tuning.runs_in_place(key_for(teacher="topk", teacher_dim=64, divergence="topk_soft_ce_renormalize"), "cuda")
    assert not tuning.runs_in_place(key_for(impl="eager"), "cuda")
    assert not tuning.runs_in_place(key_for(), "cpu")
    assert not tuning.runs_in_place(key_for(dtype=torch.float16), "cuda")  # a float32 gradient block
    assert not tuning.runs_in_place(key_for(divergence="mse_logits"), "cuda")  # a built-in on the generic path
    assert not tuning.runs_in_place(key_for(divergence="my_divergence"), "cuda")  # a user's


def test_memory_budget_prunes_by_the_path_that_runs():
    """With a 3 GiB budget at 8B->1B the kernels' path keeps the heuristic's 2048 rows (2.1 GB
    estimated: the generic path's copies would have forced 1024), and a tuning sweep on CUDA
    is handed the same estimate."""
    key = key_for(memory_budget=3 * 2**30)
    assert tuning.heuristic_choice(key, "cuda") == 2048
    assert (
        tuning.heuristic_choice(
            tuning.make_key(**{**CALL, "memory_budget": 3 * 2**30, "divergence": "mse_logits"}), "cuda"
        )
        == 1024
    )
    assert tuning.key_estimate(key, "cuda")(4096) == tuning.estimate_bytes(
        4096, 128256, 2048, torch.bfloat16, True, in_place=True
    )
    assert tuning.key_estimate(key, "cpu")(4096) == tuning.estimate_bytes(4096, 128256, 2048, torch.bfloat16, True)


def test_heuristic_is_a_function_of_the_bucket_and_fits_the_budget():
    assert (
        tuning.heuristic_chunk_size(5000, 128256, "cuda") == tuning.heuristic_chunk_size(8192, 128256, "cuda") == 2048
    )
    assert tuning.heuristic_chunk_size(100, 128256, "cuda") == 128
    assert tuning.heuristic_choice(key_for(), "cuda") == 2048
    estimate = lambda c: tuning.estimate_bytes(c, 128256, 2048, torch.bfloat16, True, in_place=True)
    key = key_for(memory_budget=estimate(2048))  # bucketed down, so 2048 no longer fits
    assert tuning.heuristic_choice(key, "cuda") == 1024
    assert tuning.heuristic_choice(key_for(memory_budget=10**6), "cuda") == 16  # nothing fits: the floor


# --- resolve_chunk_size: the lookup order ------------------------------------------------------


def test_int_chunk_size_passes_through(monkeypatch):
    monkeypatch.setattr(tuning, "open_cache", lambda *a: pytest.fail("an int must not touch the cache"))
    assert tuning.resolve_chunk_size(300, device=CPU, tune=stub_tune(CPU), **CALL) == 300


def test_cpu_uses_the_heuristic_without_measuring(monkeypatch, tmp_path):
    bench = FakeBench(monkeypatch)
    assert resolve() == tuning.heuristic_chunk_size(8192, 128256, "cpu")
    assert bench.chunks == [] and stored() == {}


def test_memo_then_cache_then_tune(monkeypatch, no_problem):
    monkeypatch.setattr(tuning, "_can_tune", lambda device: True)  # the CPU takes the tuning path
    bench = FakeBench(monkeypatch, {1024: 1.0})

    assert resolve() == 1024  # miss: tuned in process
    assert no_problem.built == [key_for()]
    assert bench.chunks[0] == 256  # nearest the CPU heuristic's 32 first
    assert sorted(bench.chunks) == [256, 512, 1024, 2048, 4096, 8192] and bench.floors == 0
    assert no_problem.warmed == [256]  # one untimed step before the clock starts
    entry = stored()[json.dumps(key_for().as_dict(), sort_keys=True, separators=(",", ":"))]
    assert entry["chunk_size"] == 1024 and entry["complete"] is True and entry["floor_ms"] is None

    opened = []
    real_open = tuning.open_cache
    monkeypatch.setattr(tuning, "open_cache", lambda *a: opened.append(a) or real_open(*a))
    assert resolve(rows=4097) == resolve(rows=8000) == 1024  # same bucket: memo, no file, no bench
    assert opened == [] and len(bench.chunks) == 6

    tuning.clear_memo()
    assert resolve() == 1024  # disk hit, no measuring
    assert len(opened) == 1 and len(bench.chunks) == 6

    assert resolve(rows=9000) in (256, 512, 1024, 2048, 4096, 8192)  # next bucket: tuned again
    assert len(bench.chunks) == 12


def test_tuning_orders_candidates_nearest_the_heuristic():
    assert tuning.nearest_first((256, 512, 1024, 2048, 4096, 8192), 2048) == (2048, 1024, 4096, 512, 8192, 256)
    assert tuning.nearest_first((256, 512), 16) == (256, 512)


def test_cuda_miss_tunes_persists_and_prints(monkeypatch, capsys, fake_cuda):
    monkeypatch.setenv("KDFUSE_PRINT_AUTOTUNING", "1")
    bench = FakeBench(monkeypatch, {4096: 2.0})
    assert resolve(CUDA) == 4096
    assert fake_cuda.built == [key_for()] and fake_cuda.warmed == [2048]
    assert bench.chunks[0] == 2048  # the CUDA heuristic's choice first
    # Rounds, interleaved; after the first only the candidates within 6% of the fastest (4096:
    # 2 ms, the rest 10+ ms) run again.
    assert bench.calls == bench.chunks + [4096] * (sweep._AUTO_ROUNDS - 1)
    assert next(iter(stored(CUDA).values()))["chunk_size"] == 4096
    err = capsys.readouterr().err
    assert "kdfuse: chunk_size=4096 for N<=8192 V=128256" in err and "autotuned 6/6 candidates" in err
    assert "Fake_GPU_sm_90.json" in err

    tuning.clear_memo()
    assert resolve(CUDA) == 4096
    assert "cached in" in capsys.readouterr().err and len(bench.chunks) == 6


def test_near_ties_go_to_the_leanest_chunk(monkeypatch, fake_cuda):
    """Within TIME_SLACK of the fastest, the smallest measured peak wins (the 8B->1B case: 2048,
    4096 and 8192 rows within 1% at 2, 3 and 5 GiB)."""
    times = {256: 30.0, 512: 20.0, 1024: 15.0, 2048: 10.1, 4096: 10.05, 8192: 10.0}
    peaks = {256: 1 * GiB, 512: 1 * GiB, 1024: 1 * GiB, 2048: 2 * GiB, 4096: 3 * GiB, 8192: 5 * GiB}
    FakeBench(monkeypatch, times, peaks)
    assert resolve(CUDA) == 2048
    tuning.clear_memo()
    monkeypatch.setenv("KDFUSE_FORCE_RETUNE", "1")
    FakeBench(monkeypatch, {**times, 2048: 10.0 * (1 + tuning.TIME_SLACK) + 0.01}, peaks)
    assert resolve(CUDA) == 4096  # 2048 is now just outside the slack


def test_no_print_without_the_knob(monkeypatch, capsys, fake_cuda):
    FakeBench(monkeypatch)
    resolve(CUDA)
    resolve()
    assert capsys.readouterr() == ("", "")


def test_time_budget_cuts_the_sweep_and_marks_it_partial(monkeypatch, fake_cuda):
    clock = [0.0]
    monkeypatch.setattr(autotune.tuner, "time", types.SimpleNamespace(monotonic=lambda: clock[0]))
    bench = FakeBench(monkeypatch, {1024: 1.0, 2048: 3.0, 4096: 2.0})
    real_bench = bench.bench

    def slow_bench(*args, **kwargs):
        clock[0] += 4.0  # each candidate takes four fake seconds
        return real_bench(*args, **kwargs)

    monkeypatch.setattr(sweep, "bench_chunk_size", slow_bench)
    assert sweep.AUTO_TIME_BUDGET_S == 10.0
    assert resolve(CUDA) == 1024
    assert bench.chunks == [2048, 1024, 4096]  # three fit in 10 s
    entry = next(iter(stored(CUDA).values()))
    assert entry["complete"] is False
    assert [m["error"] for m in entry["measurements"]][3:] == ["skipped: time budget of 10.0s exhausted"] * 3


def test_a_single_candidate_is_not_measured(monkeypatch, fake_cuda):
    bench = FakeBench(monkeypatch)
    assert resolve(CUDA, rows=100) == 128 and resolve(CUDA, rows=0) == 1
    assert bench.chunks == [] and fake_cuda.built == [] and stored(CUDA) == {}


def test_all_candidates_failing_falls_back_to_the_heuristic_unsaved(monkeypatch, fake_cuda):
    FakeBench(monkeypatch, {c: RuntimeError("boom") for c in (256, 512, 1024, 2048, 4096, 8192)})
    assert resolve(CUDA) == 2048
    assert stored(CUDA) == {}


def _free(monkeypatch, free: int) -> None:
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, 80 * GiB))


def test_in_process_tuning_tries_only_candidates_that_fit_the_free_memory(monkeypatch, fake_cuda):
    """The first step must not run out of memory where every later one fits: candidates whose
    working set (with the margin) exceeds the memory available at the call are not run, and the
    entry says why."""
    need = tuning.working_set(key_for(), "cuda")
    _free(monkeypatch, int(need(1024) * (1 + sweep._FREE_MARGIN)) + sweep._FREE_RESERVE + 1)
    bench = FakeBench(monkeypatch, {256: 3.0, 512: 2.0, 1024: 1.0})
    assert resolve(CUDA) == 1024
    assert sorted(bench.chunks) == [256, 512, 1024]
    (entry,) = stored(CUDA).values()
    errors = {m["chunk_size"]: m["error"] for m in entry["measurements"]}
    assert all(errors[c] is None for c in (256, 512, 1024)) and entry["complete"] is False
    for chunk in (2048, 4096, 8192):
        assert errors[chunk].startswith("skipped: needs ~") and "available at the call" in errors[chunk]


def test_allocator_cache_counts_as_available(monkeypatch, fake_cuda):
    """Memory PyTorch's allocator holds unused is available (it is released before an OOM)."""
    need = tuning.working_set(key_for(), "cuda")
    _free(monkeypatch, 0)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 2 * need(8192))
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 0)
    bench = FakeBench(monkeypatch)
    resolve(CUDA)
    assert sorted(bench.chunks) == [256, 512, 1024, 2048, 4096, 8192]


def test_a_candidate_out_of_memory_leaves_no_trace(monkeypatch, fake_cuda):
    """A candidate that runs out of memory all the same is skipped, the allocator's cache is
    emptied, and the call goes on with the best candidate that ran; the cache is emptied once
    more after the sweep, so the candidates' blocks do not fragment later steps."""
    emptied = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # autotune empties CUDA's cache only
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(len(bench.calls)))
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    bench = FakeBench(monkeypatch, {2048: oom, 1024: 2.0, 4096: 1.5, 8192: 1.0}, peaks={8192: 0})
    bench.times[8192] = oom
    assert resolve(CUDA) == 4096
    (entry,) = stored(CUDA).values()
    errors = {m["chunk_size"]: m["error"] for m in entry["measurements"]}
    assert errors[2048].startswith("OOM: CUDA out of memory") and errors[8192].startswith("OOM")
    assert len(emptied) == 3 and emptied[-1] == len(bench.calls)  # per OOM, and after the sweep


def test_nothing_fits_falls_back_to_the_heuristic_unsaved(monkeypatch, fake_cuda):
    _free(monkeypatch, 100 * 2**20)
    bench = FakeBench(monkeypatch)
    assert resolve(CUDA) == 2048 and bench.chunks == [] and stored(CUDA) == {}


def test_malformed_cache_entry_is_a_miss(monkeypatch, fake_cuda):
    bench = FakeBench(monkeypatch, {512: 1.0})
    cache = tuning.open_cache(env.settings().cache_dir, CUDA)
    cache.put(key_for().as_dict(), {"chunk_size": "big"})
    assert resolve(CUDA) == 512 and len(bench.chunks) == 6


def test_sweep_entry_round_trip():
    sweep = Sweep(
        key_for(),
        512,
        (Measurement(256, 2.0, 10), Measurement(512, 1.0, 20), Measurement(1024, math.inf, 0, "OOM: x")),
        0.5,
        True,
        {256: 1.015},
    )
    entry = json.loads(json.dumps(sweep.to_entry(), allow_nan=False))
    assert entry["measurements"][2]["ms"] is None and entry["contests"] == [[256, 1.015]]
    assert Sweep.from_entry(key_for(), entry) == sweep
    assert Sweep.from_entry(key_for(), None) is None
    assert Sweep.from_entry(key_for(), {**entry, "chunk_size": None}) is None
    # An entry from before the contests has none; a malformed list is no entry at all.
    old = {k: v for k, v in entry.items() if k != "contests"}
    assert Sweep.from_entry(key_for(), old).contests == {}
    for bad in ("12", None, [[256]], [["256", 1.0]], [[256, "x"]], [256, 1.0]):
        assert Sweep.from_entry(key_for(), {**entry, "contests": bad}) is None, bad


# --- environment knobs ------------------------------------------------------------------------


def test_autotune_0_never_measures_but_reads_the_cache(monkeypatch, fake_cuda):
    monkeypatch.setenv("KDFUSE_AUTOTUNE", "0")
    bench = FakeBench(monkeypatch)
    assert resolve(CUDA) == 2048  # the heuristic
    assert bench.chunks == [] and fake_cuda.built == [] and stored(CUDA) == {}
    # A result from `kdfuse tune` is still used: only measuring is off.
    tuning.open_cache(env.settings().cache_dir, CUDA).put(
        key_for().as_dict(), Sweep(key_for(), 512, (), 1.0, True).to_entry()
    )
    tuning.clear_memo()
    assert resolve(CUDA) == 512 and bench.chunks == []


def test_force_retune_measures_despite_a_hit(monkeypatch, fake_cuda):
    bench = FakeBench(monkeypatch, {8192: 1.0})
    tuning.open_cache(env.settings().cache_dir, CUDA).put(
        key_for().as_dict(), Sweep(key_for(), 512, (), None, True).to_entry()
    )
    assert resolve(CUDA) == 512 and bench.chunks == []
    monkeypatch.setenv("KDFUSE_FORCE_RETUNE", "1")
    assert resolve(CUDA) == 8192 and len(bench.chunks) == 6  # the memo is per settings: re-resolved
    assert resolve(CUDA) == 8192 and len(bench.chunks) == 6  # but tuned once per process
    assert next(iter(stored(CUDA).values()))["chunk_size"] == 8192
    assert resolve() == tuning.heuristic_chunk_size(8192, 128256, "cpu")  # CPU + force: heuristic


def test_cache_dir_is_respected(monkeypatch, tmp_path, fake_cuda):
    bench = FakeBench(monkeypatch)
    monkeypatch.setenv("KDFUSE_CACHE_DIR", str(tmp_path / "elsewhere"))
    resolve(CUDA)
    assert [p.name for p in (tmp_path / "elsewhere").glob("*.json")] == ["Fake_GPU_sm_90.json"]
    assert not (tmp_path / "cache").exists()
    monkeypatch.setenv("KDFUSE_CACHE_DIR", str(tmp_path / "third"))
    resolve(CUDA)  # new dir, new memo entry: a miss there
    assert len(bench.chunks) == 12


def test_cache_identity_carries_versions(fake_cuda):
    cache = tuning.open_cache(env.settings().cache_dir, CUDA)
    assert cache.identity == "Fake GPU (sm_90)"
    assert cache.versions == autotune.software_versions({"kdfuse": kdfuse.__version__})


# --- memory budget ----------------------------------------------------------------------------


def _estimate(chunk: int) -> int:
    """The estimate for CALL on (fake) CUDA: forward KL runs the in-place kernels there."""
    return tuning.estimate_bytes(chunk, CALL["vocab"], CALL["student_hidden"], torch.bfloat16, True, in_place=True)


def test_memory_budget_in_bytes_prunes_and_scores_peaks(monkeypatch, fake_cuda):
    budget = 2 * GiB  # a bucket boundary itself
    assert _estimate(2048) <= budget < _estimate(4096)
    bench = FakeBench(monkeypatch, {256: 9.0, 512: 5.0, 1024: 4.0, 2048: 1.0}, peaks={2048: budget * 2})
    assert resolve(CUDA, memory_budget=budget) == 1024  # 2048 ran but went over; 4096+ pruned
    assert sorted(bench.chunks) == [256, 512, 1024, 2048]
    (entry,) = stored(CUDA).values()
    errors = {m["chunk_size"]: m["error"] for m in entry["measurements"]}
    assert errors[2048].startswith("over memory budget") and errors[8192].startswith("pruned: estimated")
    (name,) = stored(CUDA)
    assert json.loads(name)["memory_budget"] == tuning.bucket_memory_budget(budget)


def test_memory_budget_from_the_environment_and_as_a_fraction(monkeypatch, fake_cuda):
    bench = FakeBench(monkeypatch)
    monkeypatch.setenv("KDFUSE_MEMORY_BUDGET", "0.25")  # of 40 GiB free: 10 GiB, bucketed to 8 GiB
    resolve(CUDA)
    (name,) = stored(CUDA)
    assert json.loads(name)["memory_budget"] == 8 * GiB
    assert max(bench.chunks) == max(c for c in (256, 512, 1024, 2048, 4096, 8192) if _estimate(c) <= 8 * GiB)
    # The keyword overrides the environment.
    assert tuning.resolve_memory_budget(0.5, CUDA) == 20 * GiB
    assert tuning.resolve_memory_budget(12345, CUDA) == 12345
    assert tuning.resolve_memory_budget(0.5, CPU) is None  # no free-memory query on CPU
    resolve(CUDA, memory_budget=3 * GiB)
    assert {json.loads(n)["memory_budget"] for n in stored(CUDA)} == {8 * GiB, 3 * GiB}


def test_memory_budget_nothing_fits(monkeypatch, fake_cuda):
    bench = FakeBench(monkeypatch)
    assert resolve(CUDA, memory_budget=10**6) == 16  # everything pruned: the heuristic, shrunk
    assert bench.chunks == [] and stored(CUDA) == {}


# --- the real benchmark on tiny shapes (no stubs) ---------------------------------------------


@pytest.fixture
def one_thread():
    """Real CPU work with one intra-op thread: on a busy machine, spinning OpenMP threads make
    tiny problems many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY = {
    "rows": 200,
    "vocab": 300,
    "student_hidden": 16,
    "teacher": "hidden",
    "teacher_dim": 24,
    "dtype": torch.float32,
    "divergence": "forward_kl",
    "with_ce": True,
    "with_grad": True,
    "memory_budget": None,
    "impl": "eager",
}


@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_problem_and_steps(teacher, one_thread):
    key = tuning.make_key(**{**TINY, "teacher": teacher})
    rng = torch.get_rng_state()
    problem = sweep.build_problem(key, CPU)
    assert torch.equal(torch.get_rng_state(), rng)  # a private generator
    assert problem.student_hidden.shape == (256, 16) and problem.student_hidden.requires_grad
    assert (problem.teacher_logits is None) == (teacher == "hidden")
    assert ((problem.labels == -100).float().mean() - 0.1).abs() < 0.07
    grad_h, grad_w = sweep.distill_step(problem, 64, kdfuse.fused_linear_distill)()
    assert grad_h.shape == (256, 16) and grad_w.shape == (300, 16) and torch.isfinite(grad_w).all()
    assert len(sweep.floor_step(problem)()) == (4 if teacher == "hidden" else 3)


def test_top_k_teacher_problem(one_thread):
    """A top-k key times a top-k call: no teacher GEMM or dense teacher block, K distinct ids per
    row with 90% of the mass, and a smaller memory estimate than the dense teacher's."""
    key = tuning.make_key(**{**TINY, "teacher": "topk", "teacher_dim": 8})
    problem = sweep.build_problem(key, CPU)
    assert problem.teacher_hidden is None and problem.teacher_logits is None
    ids, logprobs = problem.teacher_topk
    assert ids.shape == logprobs.shape == (256, 8) and ids.min() >= 0 and ids.max() < 300
    assert all(len(set(row)) == 8 for row in ids.tolist())
    torch.testing.assert_close(logprobs.logsumexp(-1), torch.full((256,), math.log(0.9)))
    assert sweep.bench_divergence(key) == "topk_forward_kl_bucket"  # not a sparse built-in: the stand-in
    assert sweep.bench_divergence(replace(key, divergence="topk_soft_ce_renormalize")) == "topk_soft_ce_renormalize"
    assert sweep.bench_divergence(replace(key, divergence="my_div")) == "topk_forward_kl_bucket"
    dense = tuning.make_key(**TINY)
    assert sweep.bench_divergence(replace(dense, divergence="my_div")) == "forward_kl"
    grad_h, grad_w = sweep.distill_step(problem, 64, kdfuse.fused_linear_distill)()
    assert grad_h.shape == (256, 16) and torch.isfinite(grad_w).all() and grad_w.abs().sum() > 0
    assert len(sweep.floor_step(problem)()) == 3
    assert tuning.key_estimate(key, "cpu")(64) == tuning.estimate_bytes(
        64, 300, 16, torch.float32, True, teacher="topk"
    )
    assert (
        tuning.estimate_bytes(1024, 1000, 64, torch.bfloat16, True, teacher="topk")
        == 1024 * 1000 * (2 * 2 + 4) + 1000 * 64 * 4
    )


def test_fused_call_reaches_the_tuner_with_its_teacher_form_and_a_stable_name(monkeypatch):
    """fused_linear_distill's key: a top-k teacher as "topk:K", and a divergence without
    __name__ (functools.partial, a callable object) by a name free of memory addresses."""
    import functools

    from kdfuse import divergences as D

    seen = []
    monkeypatch.setattr(tuning, "choose_chunk_size", lambda key, device, cfg, tune: seen.append(key) or 4)
    gen = torch.Generator().manual_seed(0)
    h, w = torch.randn(6, 4, generator=gen), torch.randn(10, 4, generator=gen)
    logprobs, ids = torch.randn(6, 10, generator=gen).log_softmax(-1).topk(3, dim=-1)
    kdfuse.fused_linear_distill(
        h, w, teacher_topk=(ids, logprobs), divergence="topk_forward_kl_bucket", chunk_size="auto"
    )

    def scaled_kl(s, t, scale):
        return scale * D.forward_kl(s, t)

    class Halved:
        def __call__(self, s, t):
            return D.forward_kl(s, t) / 2

    for divergence in (functools.partial(scaled_kl, scale=0.5), Halved()):
        kdfuse.fused_linear_distill(
            h, w, torch.randn(6, 5), torch.randn(10, 5), divergence=divergence, chunk_size="auto"
        )
    assert (seen[0].teacher, seen[0].teacher_dim, seen[0].divergence) == ("topk", 3, "topk_forward_kl_bucket")
    local = "test_fused_call_reaches_the_tuner_with_its_teacher_form_and_a_stable_name.<locals>"
    assert [k.divergence for k in seen[1:]] == [f"{local}.scaled_kl", f"{local}.Halved"]


def test_problem_in_inference_mode_and_forward_only(one_thread):
    key = tuning.make_key(**{**TINY, "with_grad": False, "with_ce": False})
    with torch.inference_mode():
        problem = sweep.build_problem(key, CPU)
        loss = sweep.distill_step(problem, 64, kdfuse.fused_linear_distill)()
    assert loss.dim() == 0 and problem.labels is None
    with torch.inference_mode():
        grads = sweep.distill_step(sweep.build_problem(tuning.make_key(**TINY), CPU), 64, kdfuse.fused_linear_distill)()
    assert grads[1].shape == (300, 16)


def test_run_sweep_for_real(one_thread):
    key = tuning.make_key(**TINY)
    steps = []
    result = sweep.run_sweep(
        key, CPU, (64, 128), distill=kdfuse.fused_linear_distill, warmup=0, repeat=1, on_step=lambda: steps.append(1)
    )
    assert result.best in (64, 128) and result.complete and len(steps) == 3
    assert result.floor_ms > 0 and all(m.ms > 0 and m.error is None for m in result.measurements)
