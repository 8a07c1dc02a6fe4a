"""How ``chunk_size="auto"`` becomes a number (kdfuse.tuning): keys and their bucketing,
candidates, the memory estimate and the heuristic; the lookup order memo -> cache -> in-process
tuning -> heuristic; the environment knobs and memory budgets; and faults: failing candidates,
a corrupt or unwritable cache, eight processes tuning one key. Measuring is stubbed (the real
benchmark is test_sweep.py's); CUDA's path runs on a faked device (conftest's fake_cuda)."""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import tempfile
import warnings

import pytest
import torch
from helpers import CALL, CANDIDATES, CPU, CUDA, FakeBench, GiB, key_for, resolve, stored, stub_tune

import autotune
import autotune.cache
import kdfuse
from autotune import Measurement, TuningCacheWarning
from kdfuse import env, sweep, tuning
from kdfuse.teacher import TEACHER_ROWS
from kdfuse.tuning import Sweep

pytestmark = pytest.mark.usefixtures("tuning_env")


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
        "fp32_logits": False,
    }
    assert [tuning.rows_bucket(n) for n in (1, 2, 3, 4096, 4097, 8192)] == [1, 2, 4, 4096, 8192, 8192]
    assert key_for(rows=4097) == key_for(rows=8192) == key
    assert key_for(rows=8193).rows_bucket == 16384
    assert (key_for(teacher="logits").teacher, key_for(teacher="logits").teacher_dim) == ("logits", None)
    topk_key = key_for(teacher="topk", teacher_dim=64)
    assert (topk_key.teacher, topk_key.teacher_dim) == ("topk", 64)
    assert "top-64 teacher" in tuning.describe(topk_key)
    assert key_for(impl="eager") != key and "impl=eager" in tuning.describe(key_for(impl="eager"))
    assert key_for(fp32_logits=True) != key and "fp32-logits" in tuning.describe(key_for(fp32_logits=True))
    assert key_for(fp32_logits=True, dtype=torch.float32) == key_for(dtype=torch.float32)  # (a no-op there)
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
    # fp32_logits: float32 student and teacher blocks; the gradient's bf16 copy is made once the
    # teacher's block is freed (in place: the larger of the two), on the generic path on top.
    assert (
        tuning.estimate_bytes(4 * rows, 1000, 64, torch.bfloat16, True, in_place=True, fp32_logits=True)
        == (4 * rows * 4 + max(rows * 4, 4 * rows * 2)) * 1000 + 1000 * 64 * 4
    )
    assert (
        tuning.estimate_bytes(1024, 1000, 64, torch.bfloat16, True, fp32_logits=True)
        == 1024 * 1000 * (3 * 4 + 2 + 2 * 4) + 1000 * 64 * 4
    )
    assert tuning.estimate_bytes(1024, 1000, 64, torch.float32, True, fp32_logits=True) == tuning.estimate_bytes(
        1024, 1000, 64, torch.float32, True
    )
    # One chunk (N <= chunk): the accumulator is allocated once the teacher's block is freed.
    one = dict(in_place=True, rows=4 * rows)
    big = 10**6  # an accumulator larger than the teacher's block
    assert tuning.estimate_bytes(4 * rows, 1000, 64, torch.bfloat16, True, **one) == (4 * rows + rows) * 1000 * 2
    assert (
        tuning.estimate_bytes(4 * rows, 1000, big, torch.bfloat16, True, **one) == 4 * rows * 1000 * 2 + 1000 * big * 4
    )
    assert (
        tuning.estimate_bytes(4 * rows, 1000, 64, torch.bfloat16, True, fp32_logits=True, **one)
        == 4 * rows * 1000 * 4 + 4 * rows * 1000 * 2 + 1000 * 64 * 4
    )
    # A 1-row tail joins the chunk before it (engine.chunk_starts): N = chunk + 1 is one chunk too.
    one_and_tail = tuning.estimate_bytes(4 * rows, 1000, big, torch.bfloat16, True, in_place=True, rows=4 * rows + 1)
    assert one_and_tail == tuning.estimate_bytes(4 * rows, 1000, big, torch.bfloat16, True, **one)
    several = tuning.estimate_bytes(4 * rows, 1000, big, torch.bfloat16, True, in_place=True)
    assert several == (4 * rows + rows) * 1000 * 2 + 1000 * big * 4
    assert tuning.estimate_bytes(4 * rows, 1000, big, torch.bfloat16, True, in_place=True, rows=4 * rows + 2) == several
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


def test_a_single_candidate_is_not_measured(monkeypatch, fake_cuda):
    bench = FakeBench(monkeypatch)
    assert resolve(CUDA, rows=100) == 128 and resolve(CUDA, rows=0) == 1
    assert bench.chunks == [] and fake_cuda.built == [] and stored(CUDA) == {}


def test_all_candidates_failing_falls_back_to_the_heuristic_unsaved(monkeypatch, fake_cuda):
    FakeBench(monkeypatch, {c: RuntimeError("boom") for c in (256, 512, 1024, 2048, 4096, 8192)})
    assert resolve(CUDA) == 2048
    assert stored(CUDA) == {}


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
    # impl="eager": the key is the same but for its impl, and a CPU compile costs seconds.
    kdfuse.fused_linear_distill(
        h, w, teacher_topk=(ids, logprobs), divergence="topk_forward_kl_bucket", chunk_size="auto", impl="eager"
    )

    def scaled_kl(s, t, scale):
        return scale * D.forward_kl(s, t)

    class Halved:
        def __call__(self, s, t):
            return D.forward_kl(s, t) / 2

    for divergence in (functools.partial(scaled_kl, scale=0.5), Halved()):
        kdfuse.fused_linear_distill(
            h, w, torch.randn(6, 5), torch.randn(10, 5), divergence=divergence, chunk_size="auto", impl="eager"
        )
    assert [k.impl for k in seen] == ["eager"] * 3
    assert (seen[0].teacher, seen[0].teacher_dim, seen[0].divergence) == ("topk", 3, "topk_forward_kl_bucket")
    local = "test_fused_call_reaches_the_tuner_with_its_teacher_form_and_a_stable_name.<locals>"
    assert [k.divergence for k in seen[1:]] == [f"{local}.scaled_kl", f"{local}.Halved"]


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


# --- faults: failing candidates, a corrupt or unwritable cache, concurrent processes -------------


def _stored_file() -> dict:
    """The one cache file's JSON document."""
    files = [p for p in env.settings().cache_dir.iterdir() if p.suffix == ".json"]
    assert len(files) == 1, files
    return json.loads(files[0].read_text())


def test_failing_candidates_are_skipped_and_recorded(monkeypatch, fake_cuda):
    """OOM on the big chunks, a compile failure and an error on others: the fastest survivor
    wins, is saved, and the failures are recorded with their reasons."""
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 12.00 GiB")
    outcomes = {
        8192: oom,
        4096: oom,
        2048: RuntimeError("triton compilation failed: out of resources"),
        1024: 3.0,
        512: 2.0,
        256: ValueError("bad block"),
    }
    calls = FakeBench(monkeypatch, outcomes).chunks
    assert resolve(CUDA) == 512
    assert sorted(calls) == list(CANDIDATES)
    (entry,) = [e["value"] for e in _stored_file()["entries"].values()]
    errors = {m["chunk_size"]: m["error"] for m in entry["measurements"]}
    assert errors[8192].startswith("OOM: CUDA out of memory") and errors[4096].startswith("OOM")
    assert errors[2048] == "RuntimeError: triton compilation failed: out of resources"
    assert errors[256] == "ValueError: bad block" and errors[512] is None and errors[1024] is None
    assert entry["chunk_size"] == 512 and entry["complete"] is True


@pytest.mark.parametrize("content", [b'{"device": "Fake GPU (sm_90)", "entries": {"k": ', b"\x00" * 64, b"null"])
def test_corrupt_cache_file_is_rebuilt_with_one_warning(monkeypatch, fake_cuda, content):
    cache_dir = env.settings().cache_dir
    calls = FakeBench(monkeypatch, {1024: 1.0}).chunks
    cache_dir.mkdir(parents=True)
    path = cache_dir / "Fake_GPU_sm_90.json"
    path.write_bytes(content)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert resolve(CUDA) == 1024
        tuning.clear_memo()
        assert resolve(CUDA, rows=6000) == 1024  # same key, from the rebuilt file
    assert len([w for w in caught if issubclass(w.category, TuningCacheWarning)]) == 1
    assert "rebuilding" in str(next(w for w in caught if issubclass(w.category, TuningCacheWarning)).message)
    assert len(calls) == len(CANDIDATES)  # measured once
    doc = json.loads(path.read_text())
    assert doc["device"] == "Fake GPU (sm_90)" and len(doc["entries"]) == 1


def test_unwritable_cache_dir_falls_back_to_memory(monkeypatch, fake_cuda):
    """A read-only cache dir: chmod where permissions apply; as root (which ignores them) the
    write fails the same way, through a mkstemp that raises EACCES."""
    cache_dir = env.settings().cache_dir
    calls = FakeBench(monkeypatch, {2048: 1.0, 4096: 0.5}).chunks
    cache_dir.mkdir(parents=True)
    as_root = not hasattr(os, "geteuid") or os.geteuid() == 0
    if as_root:

        def refuse(*args, **kwargs):
            raise PermissionError(13, "Permission denied", str(cache_dir))

        monkeypatch.setattr(tempfile, "mkstemp", refuse)
        monkeypatch.setattr(autotune.cache.tempfile, "mkstemp", refuse)
    else:
        cache_dir.chmod(0o500)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert resolve(CUDA) == 4096
            assert resolve(CUDA, rows=20000) == 4096  # a second key: still tuned, kept in memory
        unwritable = [w for w in caught if issubclass(w.category, TuningCacheWarning)]
        assert len(unwritable) == 1  # once per process and path
        assert "keeping results in memory" in str(unwritable[0].message)
        assert not [p for p in cache_dir.iterdir() if p.suffix == ".json"]  # nothing written
        assert len(calls) == 2 * len(CANDIDATES)
    finally:
        cache_dir.chmod(0o700)


def _tune_in_child(barrier, queue) -> None:
    tuning.clear_memo()
    barrier.wait()  # all tune, read-merge-write at the same time
    try:
        queue.put(resolve(CUDA))
    except BaseException as exc:
        queue.put(repr(exc))


def test_8_processes_tuning_one_key_leave_one_valid_file(monkeypatch, fake_cuda):
    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("needs fork (the stubs are monkeypatched into this process)")
    cache_dir = env.settings().cache_dir
    FakeBench(monkeypatch, {1024: 1.0})
    ctx = multiprocessing.get_context("fork")
    barrier, queue = ctx.Barrier(8), ctx.Queue()
    procs = [ctx.Process(target=_tune_in_child, args=(barrier, queue)) for _ in range(8)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * 8
    assert results == [1024] * 8
    doc = _stored_file()  # exactly one .json, and valid JSON
    assert len(doc["entries"]) == 1
    (entry,) = doc["entries"].values()
    assert entry["value"]["chunk_size"] == 1024
    leftovers = [p.name for p in cache_dir.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    tuning.clear_memo()
    assert resolve(CUDA) == 1024  # and this process reads it
