"""Where does a kdfuse fwd+bwd spend its time? Kernel-level breakdown with torch.profiler.

    python tools/profile_step.py --tokens 8192 --chunk 4096 [--divergence jsd_beta0.5]

Prints the CUDA kernels by total time for one step (after warm-up).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdfuse import tuning  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--student-hidden", type=int, default=2048)
    ap.add_argument("--teacher-hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--divergence", default="forward_kl")
    args = ap.parse_args()
    key = tuning.make_key(
        rows=args.tokens, vocab=args.vocab, student_hidden=args.student_hidden, teacher_hidden=args.teacher_hidden,
        dtype=torch.bfloat16, divergence=args.divergence, with_ce=True, with_grad=True, memory_budget=None,
    )  # fmt: skip
    problem = tuning.build_problem(key, torch.device("cuda"))

    step = tuning.distill_step(problem, args.chunk)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70))


if __name__ == "__main__":
    main()
