"""The benchmark tools on a CPU: tools/bench_e2e.py's smoke mode end to end (every contender a
CPU runs, their losses against the float64 reference) and its --max-fit search, TRL's kernel
wired into tools/bench.py's soft-only configs, and tools/kernel_bench.py's kernel calls."""

from __future__ import annotations

import importlib.util
import inspect
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import torch

TOOLS = Path(__file__).resolve().parents[1] / "tools"
TINY_RUN = ["--device", "cpu", "--tiny", "--warmup", "0", "--repeat", "1", "--rounds", "1"]


def importable(name: str) -> bool:
    """Whether ``name`` imports (trl needs datasets and accelerate besides its own package)."""
    try:
        importlib.import_module(name)
    except Exception:
        return False
    return True


@pytest.fixture
def load_tool(monkeypatch) -> Callable[[str], ModuleType]:
    """``load_tool("bench")``: tools/bench.py as a module, registered in sys.modules while the
    test runs (dataclasses look their module up there while the class is built)."""

    def load(name: str) -> ModuleType:
        spec = importlib.util.spec_from_file_location(f"{name}_tool", TOOLS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        monkeypatch.setitem(sys.modules, spec.name, module)
        spec.loader.exec_module(module)
        return module

    return load


# --- tools/bench_e2e.py --------------------------------------------------------------------------


def expected_to_run(e2e: ModuleType) -> set[str]:
    """The contenders a CPU runs here: all but those whose library does not import."""
    missing = set()
    if not importable("trl.experimental.gkd.gkd_trainer"):
        missing.add("gkd-full-logits")
    if not importable("trl.trainer.distillation_trainer"):
        missing.add("trl-chunked")
    if not importable("liger_kernel.chunked_loss"):
        missing.add("liger-chunked")
    if "fp32_logits" not in inspect.signature(e2e.kdfuse.fused_linear_distill).parameters:
        missing.add("kdfuse-fp32")
    return set(e2e.CONTENDERS) - missing


@pytest.mark.slow
def test_bench_e2e_tiny_runs_every_contender_and_the_losses_agree(load_tool, tmp_path, capsys):
    e2e = load_tool("bench_e2e")
    out = tmp_path / "e2e.json"
    assert e2e.main([*TINY_RUN, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    result = json.loads(out.read_text())
    rows = result["rows"]
    runs = expected_to_run(e2e)
    for pair in e2e.PAIRS:
        for div in e2e.DIVERGENCES:
            mine = {r["contender"]: r for r in rows if (r["pair"], r["divergence"]) == (pair, div)}
            sparse_only = {"no-loss-student", "kdfuse-topk64"} if div != "fkl" else set()
            assert set(mine) == set(e2e.CONTENDERS) - sparse_only, (pair, div)
            for name, row in mine.items():
                if name in runs:
                    assert math.isfinite(row["step_ms"]) and row["step_ms"] > 0, row
                else:
                    assert row["note"].startswith("skipped: "), row
    for name in runs:
        assert name in printed  # the table names every contender
    compared = [r for r in rows if r["agrees"] is not None]
    assert all(r["agrees"] for r in compared), [r for r in compared if not r["agrees"]]
    kdfuse_rows = [r for r in compared if r["contender"] == "kdfuse"]
    assert len(kdfuse_rows) == 4 and all(r["loss_rel_err"] < e2e.LOSS_RTOL for r in kdfuse_rows)
    assert "all agree" in printed and "CPU" in result["device"]
    assert "llama jsd: kdfuse's step" in printed  # comparison_lines, after the table


def test_bench_e2e_compares_kdfuse_with_each_rival(load_tool):
    e2e = load_tool("bench_e2e")

    def row(contender, div, ms, peak):
        return e2e.Row("llama", div, contender, 1, 8, step_ms=ms, peak_gib=peak)

    rows = [
        row("no-loss", "fkl", 80.0, 20.0),
        row("trl-chunked", "fkl", 125.0, 31.4),
        row("kdfuse", "fkl", 100.0, 30.6),
    ]
    rows += [row("liger-chunked", "fkl", 110.0, 30.8), row("gkd-full-logits", "fkl", math.nan, math.nan)]
    rows += [row("trl-chunked", "jsd", 130.0, 31.4)]  # no kdfuse row: no line
    assert e2e.comparison_lines(rows) == [
        "llama fkl: kdfuse's step 0.800× trl-chunked, 0.909× liger-chunked; "
        "peak 30.60 GiB, lowest rival 30.80 (liger-chunked)"
    ]


@pytest.mark.slow
def test_bench_e2e_max_fit_runs_on_a_cpu(load_tool, capsys):
    e2e = load_tool("bench_e2e")
    knobs = {name: os.environ.get(name) for name in ("KDFUSE_AUTOTUNE", "KDFUSE_CACHE_DIR")}
    argv = [*TINY_RUN, "--max-fit", "--max-batch", "3", "--pairs", "qwen", "--divergences", "fkl"]
    assert e2e.main([*argv, "--contenders", "no-loss", "kdfuse", "no-loss-student", "kdfuse-topk64"]) == 0
    assert {name: os.environ.get(name) for name in knobs} == knobs  # kdfuse's knobs are put back
    printed = capsys.readouterr().out
    for name in ("no-loss", "kdfuse", "no-loss-student", "kdfuse-topk64"):
        assert name in printed
    assert "≥ 192" in printed  # 3 × 64 tokens: nothing runs out of memory on a CPU
    assert "teacher moved to the host" in printed


@pytest.mark.parametrize(
    ("limit", "resolution", "largest", "expected"),
    [
        (64, 0.0, 11, (11, 12)),  # 1 .. 8 fit, 16 does not; bisected to the exact edge
        (64, 0.125, 40, (40, 44)),  # bisected until hi − lo <= max(1, lo / 8)
        (8, 0.125, 100, (8, None)),  # nothing failed up to the limit
        (6, 0.0, 100, (6, None)),  # the limit is tried where doubling steps over it
        (6, 0.0, 5, (5, 6)),
        (64, 0.0, 0, (0, 1)),  # even one does not fit
    ],
)
def test_largest_fitting_doubles_then_bisects(load_tool, limit, resolution, largest, expected):
    e2e = load_tool("bench_e2e")
    tried = []

    def fits(value: int) -> bool:
        tried.append(value)
        return value <= largest

    assert e2e.largest_fitting(fits, limit, resolution) == expected
    assert len(tried) == len(set(tried))  # no size is tried twice


def test_bench_e2e_configs_are_the_published_ones(load_tool):
    e2e = load_tool("bench_e2e")
    pair = e2e.PAIRS["qwen"]
    assert (pair.teacher["vocab_size"], pair.student["vocab_size"]) == (152064, 151936)
    assert e2e.PAIRS["llama"].student["tie_word_embeddings"] and pair.student["tie_word_embeddings"]
    import transformers

    config = e2e.make_config(transformers.LlamaConfig, e2e.PAIRS["llama"].teacher)
    assert config.head_dim * config.num_attention_heads == config.hidden_size == 4096


# --- tools/bench.py ------------------------------------------------------------------------------


def test_bench_help_names_the_trl_contender(load_tool, capsys):
    bench = load_tool("bench")
    with pytest.raises(SystemExit):
        bench.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "trl-chunked" in text and "soft-only configs" in text
    assert "trl-chunked" in bench.__doc__


def test_bench_runs_trls_kernel_in_the_soft_only_configs(load_tool):
    pytest.importorskip("trl.trainer.distillation_trainer", exc_type=ImportError)
    bench = load_tool("bench")
    inputs = bench.make_inputs(bench.Shape("tiny", 32, 48, 300), 96, device="cpu")
    assert "trl-chunked" not in bench.contenders(bench.CONFIGS["fkl_ce"], [], [], inputs)
    for key in ("fkl", "jsd_soft"):
        cfg = bench.CONFIGS[key]
        steps = bench.contenders(cfg, [], [], inputs)
        loss, grad_hidden, grad_weight = steps["trl-chunked"]()
        # Against the eager full-logits contender (bench.reference is CUDA-only): TRL's logits
        # are float32 GEMM outputs, eager's bf16, so the losses are a few 1e-5 apart, and the
        # bf16 gradients differ by a few bf16 roundings.
        ref_loss, ref_hidden, ref_weight = steps["eager"]()
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-3)
        for grad, ref in ((grad_hidden, ref_hidden), (grad_weight, ref_weight)):
            assert ((grad.double() - ref.double()).norm() / ref.double().norm()).item() < 2e-2


def test_bench_soft_only_configs_compute_no_cross_entropy(load_tool):
    bench = load_tool("bench")
    logits, labels = torch.randn(4, 10), torch.tensor([1, 2, -100, 3])
    assert bench.hard_loss(logits, labels, bench.CONFIGS["fkl"]).item() == 0.0
    assert bench.hard_loss(logits, labels, bench.CONFIGS["fkl_ce"]).item() > 0.0


# --- tools/kernel_bench.py -----------------------------------------------------------------------


@pytest.mark.slow
def test_kernel_bench_calls_every_kernel_as_kdfuse_does(load_tool, capsys):
    """A smoke run under Triton's interpreter: the tool calls the kernels with their current
    signatures (it once passed a stale softcap flag and scalars layout, and failed on a GPU)."""
    pytest.importorskip("triton")
    load_tool("kernel_bench").main(
        ["--device", "cpu", "--rows", "2", "--vocab", "300", "--k", "4", "--blocks", "128", "--warps", "4"]
    )
    lines = capsys.readouterr().out.splitlines()
    timed = {line.split()[0] for line in lines if line.split() and line.split()[0] in ("fkl", "jsd", "topk")}
    assert timed == {"fkl", "jsd", "topk"}
