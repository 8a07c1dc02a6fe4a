"""How repeatable chunk_size="auto"'s in-process tuning is: its pick, the pick's peak and the
seconds it took, several times per shape (the tuning runs the same code as the first ``"auto"``
call of a process, though after the first run of a shape the compiled kernels are warm; nothing
is read from or written to the cache).

    python tools/tune_probe.py [--shapes 8b-1b:8192 8b-1b:32768] [--divergences forward_kl jsd_beta0.5] [--runs 3]

One row per tuning: the pick, its measured peak, the tuning's seconds, each candidate's median
time relative to the fastest's (``-`` where it was skipped or pruned), and the paired contests'
median ratios to the fastest (see autotune.tune). ``--slack`` replaces kdfuse.tuning.TIME_SLACK.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench  # noqa: E402
from kdfuse import tuning  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["8b-1b:8192", "8b-1b:32768"], help="SHAPE:N (tools/bench.py's shapes)")
    parser.add_argument("--divergences", nargs="+", default=["forward_kl", "jsd_beta0.5"])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--slack", type=float, default=tuning.TIME_SLACK)
    args = parser.parse_args()
    tuning.TIME_SLACK = args.slack
    device = torch.device("cuda")
    print(f"{torch.cuda.get_device_name()}; in-process budget {tuning.AUTO_TIME_BUDGET_S} s, slack {tuning.TIME_SLACK:.0%}")
    for spec in args.shapes:
        name, rows = spec.split(":")
        shape = bench.SHAPES[name]
        for divergence in args.divergences:
            key = tuning.make_key(
                rows=int(rows), vocab=shape.vocab, student_hidden=shape.student_hidden,
                teacher_hidden=shape.teacher_hidden, dtype=torch.bfloat16, divergence=divergence,
                with_ce=True, with_grad=True, memory_budget=None,
            )  # fmt: skip
            preferred = tuning.heuristic_choice(key, "cuda")
            for run in range(args.runs):
                start = time.monotonic()
                sweep = tuning._tune_in_process(key, device, preferred)
                seconds = time.monotonic() - start
                if sweep is None:
                    print(f"{spec} {divergence} run {run}: nothing could be measured, {seconds:.1f} s")
                    continue
                fastest = min(m.ms for m in sweep.measurements)
                pick = next(m for m in sweep.measurements if m.candidate == sweep.best)
                ratios = " ".join(
                    f"{m.candidate}:{m.ms / fastest:.3f}" if math.isfinite(m.ms) else f"{m.candidate}:-"
                    for m in sorted(sweep.measurements, key=lambda m: m.candidate)
                )
                contests = " ".join(f"{c}:{r:.3f}" for c, r in sweep.contests.items())
                print(
                    f"{spec} {divergence} run {run}: pick {sweep.best} ({pick.peak_bytes / 2**30:.2f} GiB), "
                    f"{seconds:.1f} s; medians {ratios}; paired {contests or '-'}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
