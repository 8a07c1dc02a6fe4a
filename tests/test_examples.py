"""The examples run, and what they claim holds: examples/distill_stdlib.py's kdfuse student follows
the float64 full-logits reference step by step and beats the student trained without a teacher."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_distill_stdlib_small_run(capsys):
    example = load("distill_stdlib")
    runs = example.run(example.SMALL, "cpu")
    # Same initial weights, same batches: kdfuse and the reference differ only by the float32
    # rounding of the student's chunked logits, which 150 AdamW steps magnify to about 1e-5.
    assert example.worst_relative_gap(runs["kdfuse"].losses, runs["reference"].losses) < 1e-4
    assert example.worst_relative_gap(runs["kdfuse"].losses[:1], runs["reference"].losses[:1]) < 1e-6
    assert abs(runs["kdfuse"].final - runs["reference"].final) < 1e-3
    # ... and so do the parameters: every tensor within 1e-3 relative (Frobenius) of the reference
    # run's (measured: at most 1.5e-4, the byte embedding, whose rare rows take Adam steps on tiny
    # gradients), while the run without a teacher is 4e-2 to 2e-1 away.
    reference = dict(runs["reference"].model.named_parameters())
    for name, param in runs["kdfuse"].model.named_parameters():
        gap = (param - reference[name]).norm() / reference[name].norm()
        assert gap < 1e-3, (name, gap.item())
    # The teacher is better than any student, and the distilled student beats the one trained on
    # the labels alone by a clear margin (about 0.1 nats/byte at these sizes).
    assert runs["teacher"].final < runs["kdfuse"].final
    assert runs["kdfuse"].final < runs["no teacher"].final - 0.05
    example.report(runs, example.SMALL, png=None)
    table = capsys.readouterr().out
    assert "no teacher" in table and "first step" in table and "worst step" in table


def test_distill_stdlib_large_trains_on_the_whole_tree():
    """--large's teacher saw the top-level modules 7 times over and overfitted them (it ended
    worse than its students): it reads every package of the standard library (over four times
    the bytes), while the laptop run keeps the top-level modules."""
    example = load("distill_stdlib")
    assert example.LARGE.whole_tree and not example.SMALL.whole_tree
    top, tree = example.stdlib_bytes(), example.stdlib_bytes(whole_tree=True)
    assert len(tree) > 4 * len(top)
    assert len(example.stdlib_bytes(limit=1000, whole_tree=True)) == 1000
