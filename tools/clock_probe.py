"""Does sustained load throttle this GPU's clocks, and how fast? (CUDA; why tools/bench.py times
in rounds.)

    python tools/clock_probe.py [--tokens 8192] [--chunk 4096]

After a rest, runs bursts of 30 back-to-back steps of the floor (the four GEMMs alone), kdfuse,
and the floor again, printing each burst's first, median and last step times with the SM clock,
power draw, temperature and active throttle reasons read from nvidia-smi right after it; then the
three interleaved step by step, as a check that their medians agree when they share the clocks.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune import timed_calls  # noqa: E402
from kdfuse import tuning  # noqa: E402


def gpu_state() -> str:
    query = "clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active"
    out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"], capture_output=True, text=True)
    return out.stdout.strip()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=4096)
    args = ap.parse_args()
    key = tuning.make_key(
        rows=args.tokens, vocab=128256, student_hidden=2048, teacher_hidden=4096, dtype=torch.bfloat16,
        divergence="forward_kl", with_ce=True, with_grad=True, memory_budget=None,
    )  # fmt: skip
    problem = tuning.build_problem(key, torch.device("cuda"))
    steps = {"floor": tuning.floor_step(problem), "kdfuse": tuning.distill_step(problem, args.chunk)}
    steps["floor again"] = steps["floor"]
    for fn in steps.values():
        fn()
    torch.cuda.synchronize()
    time.sleep(5)
    print(f"{torch.cuda.get_device_name()} at rest: {gpu_state()}")
    for name, fn in steps.items():
        for burst in range(4):
            t, _ = timed_calls(fn, warmup=0, repeat=30)
            print(f"{name} burst {burst}: first {t[0]:.2f} median {statistics.median(t):.2f} last {t[-1]:.2f} ms | {gpu_state()}")
        time.sleep(3)
    interleaved = {name: [] for name in steps}
    for _ in range(20):
        for name, fn in steps.items():
            interleaved[name] += timed_calls(fn, warmup=0, repeat=1)[0]
    print("interleaved step by step, medians (ms):", {k: round(statistics.median(v), 2) for k, v in interleaved.items()})


if __name__ == "__main__":
    main()
