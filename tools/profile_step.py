"""Where does a kdfuse fwd+bwd spend its time? Kernel-level breakdown with torch.profiler.

    python tools/profile_step.py --tokens 8192 --chunk 4096 [--divergence jsd_beta0.5] [--steps 3] [--no-validate]
        [--warm-steps 40]

Prints, for kdfuse and then the floor (the four GEMMs alone, kdfuse.sweep.floor_step), the
CUDA kernels by total time over ``--steps`` profiled steps, run after ``--warm-steps``
unprofiled ones (a few catch the clock a rested GPU starts at; ~40, over a second of load, the
power-capped clock that timed runs see). Then, per step: the span on the device (first kernel
start to last kernel end), the time kernels and copies ran, the idle time between them and the
largest idle gaps (with the activity each precedes); next to it the median step time measured
the way tools/bench.py measures it (CUDA events around back-to-back steps), and how long the
host takes to queue steps against how long the device takes to run them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune import measure
from kdfuse import fused_linear_distill, sweep, tuning


def timeline(prof: profile, steps: int, top: int = 5) -> str:
    """Per step: span, busy and idle time of the profiled steps' device activity (busy split into
    kernels and copies/fills), and the largest gaps."""
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name)
        for e in prof.events()
        if e.device_type == torch.autograd.DeviceType.CUDA
    )
    if not spans:
        return "no device activity recorded"
    busy, gaps, reach = 0.0, [], spans[0][0]
    copies = sum(end - start for start, end, name in spans if name.startswith(("Memcpy", "Memset")))
    for start, end, name in spans:
        if start > reach:
            gaps.append((start - reach, name))
        busy += max(0, end - max(start, reach))
        reach = max(reach, end)
    span = reach - spans[0][0]
    ms = 1e3 * steps
    lines = [
        f"per step: device span {span / ms:.2f} ms, busy {busy / ms:.2f} ms (kernels {(busy - copies) / ms:.2f}, "
        f"copies and fills {copies / ms:.2f}), idle {(span - busy) / ms:.2f} ms"
    ]
    for gap, name in sorted(gaps, reverse=True)[:top]:
        lines.append(f"  idle {gap:8.1f} us before {name[:80]}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--student-hidden", type=int, default=2048)
    ap.add_argument("--teacher-hidden", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=128256)
    ap.add_argument("--divergence", default="forward_kl")
    ap.add_argument("--no-validate", action="store_true", help="validate=False: no value check (and its one host sync)")
    ap.add_argument("--steps", type=int, default=1, help="steps profiled back to back (the table sums them)")
    ap.add_argument("--warm-steps", type=int, default=3, help="steps run back to back just before the profiled ones")
    args = ap.parse_args()
    key = tuning.make_key(
        rows=args.tokens,
        vocab=args.vocab,
        student_hidden=args.student_hidden,
        teacher="hidden",
        teacher_dim=args.teacher_hidden,
        dtype=torch.bfloat16,
        divergence=args.divergence,
        with_ce=True,
        with_grad=True,
        memory_budget=None,
    )
    problem = sweep.build_problem(key, torch.device("cuda"))

    step = sweep.distill_step(problem, args.chunk, fused_linear_distill, validate=not args.no_validate)
    floor = sweep.floor_step(problem)
    for name, fn in (("kdfuse", step), ("floor", floor)):
        for _ in range(args.warm_steps):
            fn()
        torch.cuda.synchronize()  # (too short for the clock to recover)
        # Back to back, as in training and in tools/bench.py: no sync between the steps.
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.steps):
                fn()
            torch.cuda.synchronize()
        print(f"{name}:")
        print(
            prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=14 if name == "kdfuse" else 6, max_name_column_width=70
            )
        )
        ms, _ = measure(fn, warmup=3, repeat=10)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        queued = time.perf_counter() - t0
        torch.cuda.synchronize()
        done = time.perf_counter() - t0
        # If the host needs about as long to queue a step as the device to run it, the device
        # waits for the host (idle gaps before the first ops of a step). With the value check
        # (kdfuse without --no-validate) the host also waits for each step's check, so "queued"
        # then includes those waits: compare with --no-validate.
        host, device = queued * 1e3, done * 1e3
        print(f"{name}: 10 steps queued by the host in {host:.1f} ms, done on the device after {device:.1f} ms")
        print(f"{name}, {args.steps} steps profiled, {timeline(prof, args.steps)}")
        print(f"{name}: median step (CUDA events, back to back, as tools/bench.py times it): {ms:.2f} ms")


if __name__ == "__main__":
    main()
