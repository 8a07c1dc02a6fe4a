"""Measuring chunk sizes (kdfuse.sweep): the in-process tuning of ``chunk_size="auto"`` within
the memory free at the call and a time budget (measuring stubbed, on a faked CUDA device), and
the real benchmark problems, steps and sweeps on tiny CPU shapes."""

from __future__ import annotations

import math
import types
from dataclasses import replace

import pytest
import torch
from helpers import CPU, CUDA, FakeBench, GiB, key_for, resolve, stored

import autotune.tuner
import kdfuse
from kdfuse import sweep, tuning

pytestmark = pytest.mark.usefixtures("tuning_env")


# --- in-process tuning: time budget and free memory (stubbed measuring) ---------------------------


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


# --- the real benchmark on tiny shapes (no stubs) ---------------------------------------------


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
