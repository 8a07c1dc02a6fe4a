"""How many rows of teacher logits at a time? (CUDA)

    python tools/teacher_rows_probe.py --cases 8b-1b:8192 8b-1b:32768 [--rounds 5]

Where the chunk kernel writes the logit gradient over the student's block, kdfuse computes the
teacher's logits ``kdfuse.fused._TEACHER_ROWS`` rows at a time (see
``_Problem.teacher_blocks``): the student's block keeps the chunk's length for the gradient
matmuls, the teacher's is smaller. This times forward + backward (tools/bench.py's inputs and
configs) for chunk sizes × teacher rows against the four-GEMM floor, in rounds, with the peak
extra memory, so the constant's memory saving is weighed against its cost in one run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402
import kdfuse  # noqa: E402
from autotune import measure_interleaved  # noqa: E402
from kdfuse import fused  # noqa: E402

WHOLE = 1 << 30  # teacher rows: the whole chunk at once
PAIRS = ((2048, 2048), (4096, 1024), (4096, 2048), (4096, WHOLE), (8192, 2048), (8192, 4096), (8192, WHOLE))


def kdfuse_step(inputs, cfg: bench.Config, chunk: int, teacher_rows: int):
    h, ws, th, wt, y = inputs
    kw = dict(
        labels=y, divergence=cfg.divergence, temperature=cfg.temperature,
        soft_weight=cfg.soft_weight, hard_weight=cfg.hard_weight, chunk_size=chunk,
    )  # fmt: skip

    def step():
        old, fused._TEACHER_ROWS = fused._TEACHER_ROWS, teacher_rows
        try:
            return torch.autograd.grad(kdfuse.fused_linear_distill(h, ws, th, wt, **kw), (h, ws))
        finally:
            fused._TEACHER_ROWS = old

    return step


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["8b-1b:8192", "8b-1b:32768"])
    parser.add_argument("--configs", nargs="+", default=list(bench.CONFIGS), choices=list(bench.CONFIGS))
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{torch.cuda.get_device_name()}: teacher logits rows at a time")
    for col in ("case", "config", "chunk", "teacher rows", "ms", "× floor", "peak GiB"):
        table.add_column(col)
    for case in args.cases:
        shape_key, n = case.split(":")
        shape, n = bench.SHAPES[shape_key], int(n)
        for cfg_key in args.configs:
            cfg = bench.CONFIGS[cfg_key]
            inputs = bench.make_inputs(shape, n)
            steps = {("floor", ""): bench.floor_step(inputs)}
            for chunk, rows in PAIRS:
                if chunk <= n:
                    steps[chunk, "whole" if rows == WHOLE else rows] = kdfuse_step(inputs, cfg, chunk, rows)
            for step in steps.values():  # compile and warm up outside the timing
                step()
            times = measure_interleaved(steps, rounds=args.rounds, warmup=3, repeat=5)
            floor = times["floor", ""][0]
            for (chunk, rows), (ms, peak) in times.items():
                table.add_row(case, cfg_key, str(chunk), str(rows), f"{ms:.2f}", f"{ms / floor:.3f}", f"{peak / 2**30:.2f}")
            del inputs, steps
            torch.cuda.empty_cache()
    Console().print(table)


if __name__ == "__main__":
    main()
