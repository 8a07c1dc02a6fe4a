"""Tests for the ``kdfuse`` command (CPU). Measuring is stubbed except in one real run of ``tiny``."""

from __future__ import annotations

import json
import sys
import threading
import types

import pytest
import torch
from helpers import SweepCalls

import autotune.cache
from autotune import Measurement
from kdfuse import cli, env, registry, sweep, tuning
from kdfuse.tuning import Sweep

CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("tuning_env", "cpu_default")


@pytest.fixture
def cpu_default(monkeypatch):
    """The command's default device is CUDA when there is one; these tests state the CPU's
    defaults (eager timing, the CPU's cache file), so they hide a GPU if the machine has one."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


class FakeBench(SweepCalls):
    """Canned timings: ``ms(chunk)`` per chunk size, floor 1 ms. Every call is recorded in
    ``calls``; ``chunks`` has each sweep's candidates once, in the order its first round ran them."""

    def __init__(self, monkeypatch, best: int = 256):
        self.best = best
        super().__init__()
        self.impls: set[str] = set()
        monkeypatch.setattr(sweep, "bench_chunk_size", self.bench)
        monkeypatch.setattr(sweep, "bench_floor", lambda problem, *, warmup, repeat: (1.0, 0))

    def bench(self, problem, chunk_size, distill, *, warmup, repeat):
        self.record(problem, chunk_size)
        self.impls.add(problem.key.impl)
        return 2.0 + abs(chunk_size - self.best) / 1000, 0


def run(capsys, *argv: str) -> str:
    assert cli.main(list(argv)) == 0
    return capsys.readouterr().out


def cache_file():
    return tuning.open_cache(env.settings().cache_dir, CPU).path


def test_tune_defaults_to_tiny_names_the_winner_and_writes_the_cache(monkeypatch, capsys):
    bench = FakeBench(monkeypatch, best=128)
    out = run(capsys, "tune")
    assert bench.chunks == [64, 128, 256] + [64, 128, 256, 512, 1024]  # buckets 256 and 1024
    assert bench.calls == [64, 128, 256] * 3 + [64, 128, 256, 512, 1024] * 3  # --rounds 3, interleaved
    assert bench.impls == {"eager"}  # CPU default
    assert "N<=256 V=1000 Hs=64 Ht=96 float32 forward_kl+ce impl=eager: chunk_size=128 (2.000 ms, 2.00x floor)" in out
    assert "N<=1024 V=1000 Hs=64 Ht=96 float32 forward_kl+ce impl=eager: chunk_size=128" in out
    assert "★" in out and "impl='eager'" in out and str(cache_file()) in out
    # chunk_size="auto" on this device now reads the CLI's winner.
    auto = tuning.resolve_chunk_size(
        "auto",
        rows=700,
        vocab=1000,
        student_hidden=64,
        teacher="hidden",
        teacher_dim=96,
        dtype=torch.float32,
        device=CPU,
        divergence="forward_kl",
        with_ce=True,
        with_grad=True,
        impl="eager",
    )
    assert auto == 128


def test_second_run_hits_the_cache_unless_forced(monkeypatch, capsys):
    bench = FakeBench(monkeypatch)
    run(capsys, "tune")
    measured = len(bench.chunks)
    out = run(capsys, "tune")
    assert len(bench.chunks) == measured
    assert out.count("chunk_size=256") == 2 and out.count("cached)") == 2
    run(capsys, "tune", "--force")
    assert len(bench.chunks) == 2 * measured
    monkeypatch.setenv("KDFUSE_FORCE_RETUNE", "1")
    run(capsys, "tune")
    assert len(bench.chunks) == 3 * measured


def test_different_candidates_or_a_partial_entry_are_measured_again(monkeypatch, capsys):
    bench = FakeBench(monkeypatch)
    run(capsys, "tune", "--tokens", "256")
    run(capsys, "tune", "--tokens", "256", "--chunks", "32,64")
    assert bench.chunks == [64, 128, 256, 32, 64]
    key = tuning.make_key(
        rows=256,
        vocab=1000,
        student_hidden=64,
        teacher="hidden",
        teacher_dim=96,
        dtype=torch.float32,
        divergence="forward_kl",
        with_ce=True,
        with_grad=True,
        memory_budget=None,
        impl="eager",
    )
    partial = Sweep(key, 128, tuple(Measurement(c, 1.0, 0) for c in (64, 128, 256)), None, complete=False)
    tuning.open_cache(env.settings().cache_dir, CPU).put(key.as_dict(), partial.to_entry())
    run(capsys, "tune", "--tokens", "256")
    assert bench.chunks[5:] == [64, 128, 256]


def test_json_output_parses(monkeypatch, capsys):
    FakeBench(monkeypatch, best=512)
    doc = json.loads(run(capsys, "tune", "--json"))
    assert doc["impl"] == "eager" and doc["peak_memory_measured"] is False
    assert doc["cache_path"] == str(cache_file()) and doc["device"].startswith("cpu:")
    first, second = doc["shapes"]
    assert first["tokens"] == [256] and first["chunk_size"] == 256 and first["cached"] is False
    assert second["key"]["rows_bucket"] == 1024 and second["chunk_size"] == 512 and second["floor_ms"] == 1.0
    assert [m["chunk_size"] for m in second["measurements"]] == [64, 128, 256, 512, 1024]
    assert second["measurements"][3] == {
        "chunk_size": 512,
        "ms": 2.0,
        "x_floor": 2.0,
        "peak_bytes": 0,
        "error": None,
        "paired_ratio": None,
    }
    again = json.loads(run(capsys, "tune", "--json"))
    assert [s["cached"] for s in again["shapes"]] == [True, True]


def test_the_floor_is_timed_after_the_candidates(monkeypatch, capsys):
    """On a GPU at its power limit the floor, timed first, would catch the fresh clocks."""
    bench = FakeBench(monkeypatch)
    monkeypatch.setattr(
        sweep, "bench_floor", lambda problem, *, warmup, repeat: bench.calls.append("floor") or (1.0, 0)
    )
    run(capsys, "tune", "--tokens", "256")
    assert bench.calls == [64, 128, 256] * 3 + ["floor"]


def test_a_leaner_near_tie_wins_its_paired_contest_and_the_table_says_so(monkeypatch, capsys):
    """Peaks grow with the chunk: 256 rows, 1% slower than the fastest 512 when timed in pairs
    with it, is the pick; the table, the JSON and the cache entry carry that ratio."""
    bench = FakeBench(monkeypatch)
    times = {64: 3.0, 128: 2.5, 256: 2.02, 512: 2.0, 1024: 2.3}

    def bench_with_peaks(problem, chunk_size, distill, *, warmup, repeat):
        bench.record(problem, chunk_size)
        return times[chunk_size], chunk_size * 2**20

    monkeypatch.setattr(sweep, "bench_chunk_size", bench_with_peaks)
    out = run(capsys, "tune", "--tokens", "1024")
    pairs = [c for i in range(sweep._CONTEST_PAIRS) for c in ((256, 512) if i % 2 == 0 else (512, 256))]
    assert bench.calls == [64, 128, 256, 512, 1024] * 3 + pairs
    assert "chunk_size=256" in out and "paired: 1.010x the fastest" in out
    doc = json.loads(run(capsys, "tune", "--tokens", "1024", "--json"))  # from the cache
    (shape,) = doc["shapes"]
    assert shape["cached"] and shape["chunk_size"] == 256
    assert [m["paired_ratio"] for m in shape["measurements"]] == [None, None, pytest.approx(1.01), None, None]


def test_explicit_shapes_override_the_preset(monkeypatch, capsys):
    bench = FakeBench(monkeypatch, best=512)
    doc = json.loads(
        run(
            capsys,
            "tune",
            "--preset",
            "llama3-8b-1b",
            "--tokens",
            "300,500",
            "--vocab",
            "40000",
            "--student-hidden",
            "32",
            "--teacher-logits",
            "--dtype",
            "bfloat16",
            "--divergence",
            "jsd",
            "--no-ce",
            "--json",
        )
    )
    (shape,) = doc["shapes"]  # 300 and 500 share the 512 bucket
    assert shape["tokens"] == [300, 500]
    assert shape["key"] == {
        "rows_bucket": 512,
        "vocab": 40000,
        "student_hidden": 32,
        "teacher": "logits",
        "teacher_dim": None,
        "dtype": "bfloat16",
        "divergence": "jsd_beta0.5",
        "with_ce": False,
        "with_grad": True,
        "memory_budget": None,
        "impl": "eager",
        "fp32_logits": False,
    }
    assert bench.chunks == [256, 512]  # V >= 32768: candidates start at 256


def test_top_k_teacher(monkeypatch, capsys):
    """--teacher-topk K tunes the key a top-k call looks up, with a sparse divergence (by default
    topk_forward_kl_bucket); a dense divergence with it, or a sparse one without, is an error."""
    FakeBench(monkeypatch, best=64)
    doc = json.loads(run(capsys, "tune", "--tokens", "1024", "--teacher-topk", "32", "--json"))
    (shape,) = doc["shapes"]
    assert (shape["key"]["teacher"], shape["key"]["teacher_dim"]) == ("topk", 32)
    assert shape["key"]["divergence"] == "topk_forward_kl_bucket"
    doc = json.loads(
        run(
            capsys,
            "tune",
            "--tokens",
            "1024",
            "--teacher-topk",
            "32",
            "--divergence",
            "topk_soft_ce_renormalize",
            "--json",
        )
    )
    assert doc["shapes"][0]["key"]["divergence"] == "topk_soft_ce_renormalize"
    for argv in (["--teacher-topk", "32", "--divergence", "jsd"], ["--divergence", "topk_forward_kl_bucket"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["tune", "--tokens", "1024", *argv])
        assert exc.value.code == 2 and "--teacher-topk" in capsys.readouterr().err


def test_presets():
    llama, qwen = cli.PRESETS["llama3-8b-1b"], cli.PRESETS["qwen2.5-7b-0.5b"]
    assert (llama.student_hidden, llama.teacher_hidden, llama.vocab) == (2048, 4096, 128256)
    assert (qwen.student_hidden, qwen.teacher_hidden, qwen.vocab) == (896, 3584, 151936)


def test_memory_budget_prunes(monkeypatch, capsys):
    bench = FakeBench(monkeypatch)
    budget = tuning.estimate_bytes(128, 1000, 64, torch.float32, True)
    doc = json.loads(run(capsys, "tune", "--tokens", "1024", "--memory-budget", str(budget), "--json"))
    (shape,) = doc["shapes"]
    assert shape["key"]["memory_budget"] == tuning.bucket_memory_budget(budget)
    assert bench.chunks == [64]  # 128 is over the bucketed budget
    assert shape["measurements"][1]["error"].startswith("pruned: estimated")
    json.loads(run(capsys, "tune", "--tokens", "1024", "--memory-budget", "0.5", "--json"))  # no bound on CPU
    assert bench.chunks[1:] == [64, 128, 256, 512, 1024]


@pytest.mark.parametrize(
    "argv",
    [
        ["tune", "--memory-budget", "lots"],
        ["tune", "--tokens", "0"],
        ["tune", "--divergence", "nope"],
        ["tune", "--preset", "mystery-model"],
        ["tune", "--teacher-hidden", "8", "--teacher-logits"],
        ["tune", "--teacher-logits", "--teacher-topk", "8"],
        ["tune", "--divergence", "topk_nope"],
        ["cache"],
    ],
)
def test_bad_arguments_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_plot(monkeypatch, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    FakeBench(monkeypatch)
    out = run(capsys, "tune", "--plot", str(tmp_path / "sweep.png"))
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {tmp_path / 'sweep.png'}" in out


def test_plot_without_matplotlib_is_a_clear_error(monkeypatch, capsys, tmp_path):
    bench = FakeBench(monkeypatch)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails
    with pytest.raises(SystemExit) as exc:
        cli.main(["tune", "--plot", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert "pip install 'kdfuse[plot]'" in capsys.readouterr().err
    assert bench.chunks == []  # before any measuring


def test_cache_path_show_clear(monkeypatch, capsys):
    assert run(capsys, "cache", "path").strip() == str(cache_file())
    assert "no entries for cpu:" in run(capsys, "cache", "show")
    assert run(capsys, "cache", "clear").strip() == f"no cache file at {cache_file()}"
    assert not cache_file().exists()
    FakeBench(monkeypatch)
    run(capsys, "tune")
    shown = run(capsys, "cache", "show")
    assert "2 entries" in shown and "N<=256 V=1000" in shown and "N<=1024 V=1000" in shown and "full" in shown
    cache = tuning.open_cache(env.settings().cache_dir, CPU)
    cache.put("not a key", 1)
    assert "1 entries could not be read" in run(capsys, "cache", "show")
    assert run(capsys, "cache", "clear").strip() == f"cleared {cache_file()}"
    assert cache.entries() == {} and "no entries for cpu:" in run(capsys, "cache", "show")


@pytest.mark.skipif(autotune.cache.fcntl is None, reason="no flock")
def test_cache_clear_waits_for_the_cache_lock(capsys):
    """clear goes through TuningCache.clear, which takes the lock writers hold for their
    read-merge-write; removing the file behind a writer's back would let its write bring it back."""
    cache = tuning.open_cache(env.settings().cache_dir, CPU)
    cache.put("k", 1)
    clearing = threading.Thread(target=cli.main, args=(["cache", "clear"],), daemon=True)
    with open(cache.path.with_name(cache.path.name + ".lock"), "a") as lock:
        autotune.cache.fcntl.flock(lock, autotune.cache.fcntl.LOCK_EX)  # a writer mid-update
        clearing.start()
        clearing.join(timeout=0.5)
        assert clearing.is_alive() and cache.get("k") == 1  # waiting for the lock
    clearing.join(timeout=10)
    assert not clearing.is_alive() and cache.entries() == {}
    assert capsys.readouterr().out.strip() == f"cleared {cache.path}"


@pytest.mark.slow
def test_tiny_end_to_end_for_real(capsys, one_thread):
    """The one unstubbed run: real timing of the tiny preset (few repeats), then a cache hit."""
    out = run(capsys, "tune", "--warmup", "1", "--repeat", "2")
    assert out.count("chunk_size=") == 2 and "cached" not in out
    doc = json.loads(run(capsys, "tune", "--json"))
    assert all(s["cached"] and s["chunk_size"] in (64, 128, 256, 512, 1024) for s in doc["shapes"])
    assert all(m["ms"] > 0 for s in doc["shapes"] for m in s["measurements"])


# --- the first hour: help, errors, plots and timings a new user can trust ---------------------


def test_no_subcommand_prints_help(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert "usage: kdfuse" in out and "tune" in out and "cache" in out


def test_help_and_the_unknown_divergence_error_list_the_same_divergences(capsys):
    """Every built-in (dense and top-k) in both, and the nearest names for a typo."""
    with pytest.raises(SystemExit):
        cli.main(["tune", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as exc:
        cli.main(["tune", "--divergence", "jsd_bta0.3"])
    assert exc.value.code == 2
    error = capsys.readouterr().err
    assert "did you mean 'jsd" in error
    for name in registry.names():
        assert name in help_text and name in error, name


def test_the_plot_title_names_every_shape(monkeypatch, capsys, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.figure

    titles = []
    monkeypatch.setattr(
        matplotlib.figure.Figure, "savefig", lambda fig, path, **kw: titles.append(fig._suptitle.get_text())
    )
    FakeBench(monkeypatch)
    run(capsys, "tune", "--tokens", "256,1024", "--plot", str(tmp_path / "sweep.png"))
    (title,) = titles
    assert "N<=256 V=1000" in title and "N<=1024 V=1000" in title


@pytest.mark.parametrize(
    ("times", "why"),
    [({64: 0.5, 128: 2.0, 256: 2.1}, "less than the GEMMs alone"), ({64: 2.0, 128: 130.0, 256: 2.5}, "65 times apart")],
)
def test_implausible_timings_warn_instead_of_crowning_a_winner(monkeypatch, capsys, times, why):
    """A candidate faster than the GEMMs alone (the floor: 1 ms here), or candidates 60 times
    apart, cannot be right: no winner, nothing cached, and a warning says why."""
    bench = FakeBench(monkeypatch)
    monkeypatch.setattr(sweep, "bench_chunk_size", lambda problem, chunk, distill, *, warmup, repeat: (times[chunk], 0))
    out = run(capsys, "tune", "--tokens", "256")
    assert "warning: implausible timings" in out and why in out and "nothing cached" in out
    assert not cache_file().exists() or not json.loads(cache_file().read_text())["entries"]
    assert bench.calls == []


def test_a_long_cpu_sweep_says_how_long_it_will_take(monkeypatch, capsys):
    """The llama preset's 51 measurements on a CPU (3 rounds of 5, 6 and 6 chunk sizes for its
    three token counts): one step is timed first and the sweep's length announced (here a
    stubbed 2 s step, and stand-in problems: Llama's real ones take seconds and gigabytes)."""
    FakeBench(monkeypatch)
    monkeypatch.setattr(cli, "build_problem", lambda key, device: key)
    monkeypatch.setattr(sweep, "build_problem", lambda key, device: types.SimpleNamespace(key=key))
    monkeypatch.setattr(cli, "distill_step", lambda problem, chunk, distill: lambda: None)
    clock = iter([0.0, 2.0])
    monkeypatch.setattr(cli.time, "perf_counter", lambda: next(clock))
    assert cli.main(["tune", "--preset", "llama3-8b-1b"]) == 0
    err = capsys.readouterr().err
    assert "kdfuse tune: 51 measurements of 8 steps each, about" in err and "one step of N<=4096" in err
    # 2 s per step at N=4096, twice and four times that at 8192 and 16384; 3 rounds of 8 steps
    # per candidate and 8 for the floor.
    steps = 1 * (24 * 5 + 8) + 2 * (24 * 6 + 8) + 4 * (24 * 6 + 8)
    assert f"about {2 * steps / 60:.0f} min" in err


def test_fp32_logits_tunes_the_key_an_fp32_logits_call_looks_up(monkeypatch, capsys):
    """--fp32-logits tunes (and benchmarks) fused_linear_distill(fp32_logits=True)'s key; with a
    32-bit dtype the option is a no-op, and so is the key's flag."""
    problems = []
    bench = FakeBench(monkeypatch, best=256)
    record = bench.record
    monkeypatch.setattr(bench, "record", lambda problem, chunk: (problems.append(problem), record(problem, chunk)))
    argv = ("tune", "--tokens", "512", "--dtype", "bfloat16", "--fp32-logits", "--json")
    (shape,) = json.loads(run(capsys, *argv))["shapes"]
    assert shape["key"]["fp32_logits"] is True
    assert problems and all(p.key.fp32_logits for p in problems)  # (distill gets fp32_logits=True)
    (shape,) = json.loads(run(capsys, "tune", "--tokens", "512", "--dtype", "float32", "--fp32-logits", "--json"))[
        "shapes"
    ]
    assert shape["key"]["fp32_logits"] is False
