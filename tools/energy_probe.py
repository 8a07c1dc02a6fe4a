"""Energy per call of a kdfuse step, of the floor's, and of their parts, from NVML's counter (CUDA).

    python tools/energy_probe.py [--tokens 8192] [--chunk 4096] [--seconds 2]

On a GPU at its power limit a step's time follows the energy it needs (docs/benchmarks.md,
"Power"), so the question "what would bring kdfuse's step closer to the floor's" is "what in it
costs energy the floor does not spend". Each part below runs back to back for ``--seconds``
after a second of warm-up; its energy is the difference of NVML's total-energy counter
(millijoules) across the timed loop, divided by the calls. Printed per part: ms per call, J per
call, mean watts, the SM clock at the loop's end, and the share of a floor step's energy.

Parts are run alone, each at the clock its own power draw settles at, so a memory-bound kernel
that runs at a higher clock (and voltage) than it would inside a step is charged somewhat more
than in the step; the last lines compare the whole steps with the sum of their parts.
"""

from __future__ import annotations

import argparse
import ctypes
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdfuse import fused, triton_cast, triton_chunk, triton_mm, tuning  # noqa: E402

_NVML_CLOCK_SM = 1


class Nvml:
    """The few NVML calls this probe needs, through ctypes (no pynvml on the device machine)."""

    def __init__(self, device: torch.device) -> None:
        self.lib = ctypes.CDLL("libnvidia-ml.so.1")
        self._check(self.lib.nvmlInit_v2())
        props = torch.cuda.get_device_properties(device)
        bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0".encode()
        self.handle = ctypes.c_void_p()
        self._check(self.lib.nvmlDeviceGetHandleByPciBusId_v2(bus, ctypes.byref(self.handle)))

    @staticmethod
    def _check(status: int) -> None:
        if status != 0:
            raise RuntimeError(f"NVML call failed with status {status}")

    def energy_mj(self) -> int:
        value = ctypes.c_ulonglong()
        self._check(self.lib.nvmlDeviceGetTotalEnergyConsumption(self.handle, ctypes.byref(value)))
        return value.value

    def sm_clock_mhz(self) -> int:
        value = ctypes.c_uint()
        self._check(self.lib.nvmlDeviceGetClockInfo(self.handle, _NVML_CLOCK_SM, ctypes.byref(value)))
        return value.value


@dataclass(frozen=True)
class Reading:
    ms: float  # per call
    joules: float  # per call
    mhz: int  # SM clock at the end of the timed loop


def read(nvml: Nvml, fn: Callable[[], object], seconds: float, settle: float = 1.0) -> Reading:
    """Run ``fn`` back to back for ``settle`` seconds, then for ``seconds`` timed; energy and time per call."""
    for budget in (settle, seconds):
        torch.cuda.synchronize()
        calls, start, energy = 0, time.perf_counter(), nvml.energy_mj()
        while time.perf_counter() - start < budget:
            fn()
            calls += 1
            if calls % 4 == 0:  # keep the host at most a few calls ahead
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        elapsed, used = time.perf_counter() - start, nvml.energy_mj() - energy
    return Reading(1e3 * elapsed / calls, used / 1e3 / calls, nvml.sm_clock_mhz())


def parts(problem: tuning.BenchProblem, chunk: int, gen: torch.Generator) -> dict[str, Callable[[], object]]:
    """The kernels of one kdfuse chunk and of the floor, on inputs shaped as a step's."""
    p, dev = problem, problem.device
    h, w = p.student_hidden[:chunk], p.student_weight  # (C, Hs), (V, Hs)
    th, tw = p.teacher_hidden[:chunk], p.teacher_weight  # (C, Ht), (V, Ht)
    vocab = w.shape[0]
    with torch.no_grad():
        student, teacher = h @ w.t(), th @ tw.t()
    dlogits = student.clone()
    acc = torch.empty(w.shape, dtype=torch.float32, device=dev)
    grad_h = torch.empty(h.shape, dtype=torch.float32, device=dev)
    labels = torch.randint(0, vocab, (chunk,), device=dev, generator=gen)
    valid = torch.ones(chunk, dtype=torch.bool, device=dev)
    weights = torch.full((chunk,), 1.0 / chunk, device=dev)
    one = torch.ones((), device=dev)

    def kernel(divergence: str) -> Callable[[], object]:
        fn, params = fused._kernel_of(divergence)
        scalars = torch.tensor([0.5, 0.5, 0.5, 1.0, *params], device=dev)
        # The kernel overwrites the student block with its gradient: run it on a scratch block
        # (the copy is a part of its own below, to subtract).
        return lambda: triton_chunk.chunk_step(fn, True, False, -100, dlogits.copy_(student), teacher, labels, valid,
                                               weights, scalars, out=dlogits)  # fmt: skip

    return {
        "copy of a (C, V) block": lambda: dlogits.copy_(student),
        "chunk kernel forward KL + CE (+ copy)": kernel("forward_kl"),
        "chunk kernel JSD + CE (+ copy)": kernel("jsd"),
        "student logits (C rows), cuBLAS": lambda: torch.mm(h, w.t()),
        "teacher logits (C rows), cuBLAS": lambda: torch.mm(th, tw.t()),
        "teacher logits (C rows) in TEACHER_ROWS blocks": lambda: [torch.mm(th[i : i + tuning.TEACHER_ROWS], tw.t())
                                                               for i in range(0, chunk, tuning.TEACHER_ROWS)],
        "grad_hidden bf16 out, cuBLAS (floor)": lambda: torch.mm(dlogits, w),
        "grad_hidden fp32 out, promoted_mm (kdfuse)": lambda: triton_mm.promoted_mm(grad_h, dlogits, w, accumulate=False),
        "grad_weight bf16 out, cuBLAS (floor)": lambda: torch.mm(dlogits.t(), h),
        "grad_weight fp32 =, cuBLAS (kdfuse 1st chunk)": lambda: torch.mm(dlogits.t(), h, out=acc, out_dtype=torch.float32),
        "grad_weight fp32 +=, cuBLAS (kdfuse later chunks)": lambda: torch.addmm(acc, dlogits.t(), h, out=acc, out_dtype=torch.float32),
        "grad_weight fp32 +=, promoted_mm": lambda: triton_mm.promoted_mm(acc, dlogits.t(), h, accumulate=True),
        "final scale + cast (V, Hs) fp32 -> bf16": lambda: triton_cast.scaled_cast(acc, one, torch.bfloat16),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--chunk", type=int, default=4096)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    dev = torch.device("cuda")
    nvml = Nvml(dev)
    gen = torch.Generator(device=dev).manual_seed(0)

    def problem(divergence: str) -> tuning.BenchProblem:
        key = tuning.make_key(
            rows=args.tokens, vocab=128256, student_hidden=2048, teacher_hidden=4096, dtype=torch.bfloat16,
            divergence=divergence, with_ce=True, with_grad=True, memory_budget=None,
        )  # fmt: skip
        return tuning.build_problem(key, dev)

    fkl, jsd = problem("forward_kl"), problem("jsd_beta0.5")
    steps = {
        "floor step (4 GEMMs, N rows)": tuning.floor_step(fkl),
        "kdfuse step forward KL + CE": tuning.distill_step(fkl, args.chunk, validate=False),
        "kdfuse step JSD + CE": tuning.distill_step(jsd, args.chunk, validate=False),
    }
    print(f"{torch.cuda.get_device_name(dev)}, N={args.tokens}, chunk {args.chunk}, 8B->1B shapes (Hs 2048, Ht 4096, V 128256)")
    readings: dict[str, Reading] = {}
    for name, fn in {**steps, **parts(fkl, args.chunk, gen)}.items():
        readings[name] = read(nvml, fn, args.seconds)
    floor_j = readings["floor step (4 GEMMs, N rows)"].joules
    print(f"{'part':52} {'ms':>8} {'J':>8} {'W':>6} {'MHz':>6} {'x floor J':>9}")
    for name, r in readings.items():
        print(f"{name:52} {r.ms:8.3f} {r.joules:8.3f} {r.joules / r.ms * 1e3:6.0f} {r.mhz:6d} {r.joules / floor_j:9.3f}")

    j = {name: r.joules for name, r in readings.items()}
    n_chunks = -(-args.tokens // args.chunk)
    copy = j["copy of a (C, V) block"]
    common = n_chunks * (j["student logits (C rows), cuBLAS"] + j["teacher logits (C rows) in TEACHER_ROWS blocks"]
                         + j["grad_hidden fp32 out, promoted_mm (kdfuse)"])  # fmt: skip
    grad_w = j["grad_weight fp32 =, cuBLAS (kdfuse 1st chunk)"] + (n_chunks - 1) * j["grad_weight fp32 +=, cuBLAS (kdfuse later chunks)"]
    tail = j["final scale + cast (V, Hs) fp32 -> bf16"]
    for label, kernel in (("forward KL", "chunk kernel forward KL + CE (+ copy)"), ("JSD", "chunk kernel JSD + CE (+ copy)")):
        chunk_j = j[kernel] - copy
        total = common + grad_w + tail + n_chunks * chunk_j
        print(f"sum of parts, kdfuse {label}: {total:.3f} J = {total / floor_j:.3f} x floor step; chunk kernels "
              f"{n_chunks * chunk_j:.3f} J, grad_weight GEMMs {grad_w:.3f}, cast {tail:.3f}")  # fmt: skip
    floor_parts = (args.tokens / args.chunk) * (j["student logits (C rows), cuBLAS"] + j["teacher logits (C rows), cuBLAS"]
                                                + j["grad_hidden bf16 out, cuBLAS (floor)"] + j["grad_weight bf16 out, cuBLAS (floor)"])  # fmt: skip
    print(f"sum of parts, floor: {floor_parts:.3f} J = {floor_parts / floor_j:.3f} x floor step")


if __name__ == "__main__":
    main()
