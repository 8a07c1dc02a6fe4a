"""Side-by-side KD loss benchmark: kdfuse vs the matmul floor and the losses people use today.

Every contender runs forward + backward (gradients for the student hidden states and lm_head
weight) on the same inputs in one process; we report the median time after warm-up (timed in
rounds over all contenders; in each round a contender first runs ``--settle`` seconds untimed,
so it is timed at the clock its own load settles at, as in a training loop), the energy per
step (NVML's energy counter over ``--energy`` seconds of back-to-back steps, also in rounds: on
a GPU at its power limit the time follows it), the peak device memory above the inputs
(``torch.cuda.max_memory_allocated``), the ratios to the floor, and the gradient error against a
reference.

    python tools/bench.py                                   # every shape; configs fkl_ce and jsd
    python tools/bench.py --cases 8b-1b:8192 --configs fkl_ce --json out.json --png out.png
    python tools/bench.py --configs fkl jsd_soft            # soft only, TRL's kernel among them

Contenders:
  floor          the four bf16 GEMMs alone: student logits, teacher logits, grad_hidden, grad_weight
  eager          full logits, fp32 loss math, plain autograd
  compile        the same function under torch.compile
  liger-c<k>     Liger-Kernel's chunked LigerFusedLinearJSDLoss with chunk_size k (if installed)
  liger-triton   Liger-Kernel's Triton LigerFusedLinearJSD (soft loss only: no CE term)
  trl-chunked    (soft-only configs: fkl, jsd_soft) TRL 1.16's DistillationTrainer kernel,
                 trl.trainer.distillation_trainer._chunked_divergence_loss (Triton), called as the
                 trainer calls it, with the ignored rows as its completion mask (if trl imports);
                 it has no CE term, and it also returns the student's entropy
  kdfuse-auto    kdfuse.fused_linear_distill(chunk_size="auto"); kdfuse-c<k>: fixed chunk sizes
  kdfuse-fp32-c<k>  the same with fp32_logits=True (float32 logits, as TRL's kernel keeps them)
  kdfuse-topk64  (forward KL configs) the student against the teacher's top-64 log-probs, extracted
                 once beforehand with kdfuse.teacher_topk; compare with floor-student, the student's
                 three GEMMs alone
  baseline-c<k>  with --baseline DIR: the kdfuse package of another checkout (DIR/kdfuse, e.g. a
                 `git worktree` of an earlier commit), same calls, timed in the same rounds: a
                 regression check that shares the GPU's clocks with this checkout's kdfuse

Gradient error, the worse of grad_hidden and grad_weight, against g_exact: the full-logits
computation a bf16 model does (bf16 logits, fp32 loss math, the logit gradient rounded to bf16 as
autograd rounds it) with the two gradient GEMMs in float64. The reference runs over blocks of rows
so it fits at any N. Two measures:
  grad err   ‖g − bf16(g_exact)‖ / ‖g_exact‖, against the exact gradient rounded to bf16. Both
             sides are rounded, so a small difference δ before rounding shows as ≈ √(δ·2⁻⁸):
             it magnifies differences far below bf16's resolution (fp32 summation order: ~1e-4).
  vs exact   ‖g − g_exact‖ / ‖g_exact‖, what the user's gradient is off by; no bf16 gradient gets
             below bf16(g_exact)'s own error, printed in the floor row's note.
The floor row's errors are those of its GEMMs: the reference's logit gradient through cuBLAS bf16
GEMMs (fp32 output, grad_weight summed over the reference's blocks in fp32), rounded once.
"""

from __future__ import annotations

import argparse
import ctypes
import functools
import importlib.util
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kdfuse
from autotune import measure_interleaved
from kdfuse import divergences as D

GiB = 2**30


@dataclass(frozen=True)
class Shape:
    name: str
    student_hidden: int
    teacher_hidden: int
    vocab: int


SHAPES = {
    "8b-1b": Shape("llama3.1-8b→3.2-1b", 2048, 4096, 128256),
    "qwen7b-0.5b": Shape("qwen2.5-7b→0.5b", 896, 3584, 151936),
    "same-4096": Shape("same-size 4096", 4096, 4096, 128256),
}
DEFAULT_CASES = ["8b-1b:4096", "8b-1b:8192", "8b-1b:32768", "qwen7b-0.5b:8192", "same-4096:8192"]


@dataclass(frozen=True)
class Config:
    name: str
    divergence: str
    beta: float  # Liger's and TRL's JSD beta giving the same soft loss
    temperature: float = 2.0
    soft_weight: float = 0.5
    hard_weight: float = 0.5


CONFIGS = {
    "fkl_ce": Config("forward KL + CE", "forward_kl", 0.0),
    "jsd": Config("JSD β=0.5 + CE", "jsd_beta0.5", 0.5),
    # Soft only, the loss TRL's kernel computes (it has no CE term): the divergence's mean.
    "fkl": Config("forward KL", "forward_kl", 0.0, soft_weight=1.0, hard_weight=0.0),
    "jsd_soft": Config("JSD β=0.5", "jsd_beta0.5", 0.5, soft_weight=1.0, hard_weight=0.0),
}
DEFAULT_CONFIGS = ["fkl_ce", "jsd"]
TRL_CONTENDER = "trl-chunked"


@dataclass
class Row:
    case: str
    config: str
    contender: str
    ms: float = math.nan
    peak_gib: float = math.nan
    ratio: float = math.nan
    joules: float = math.nan  # per step
    joules_ratio: float = math.nan  # to the floor's
    grad_err: float = math.nan
    grad_err_exact: float = math.nan
    loss_err: float = math.nan
    first_call_s: float = math.nan
    note: str = ""
    extra: dict = field(default_factory=dict)


Step = Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def make_inputs(shape: Shape, n: int, seed: int = 0, device: str = "cuda"):
    g = torch.Generator(device=device).manual_seed(seed)
    dt, dev = torch.bfloat16, device

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g, device=dev, dtype=torch.float32) * scale).to(dt)

    h = randn(n, shape.student_hidden).requires_grad_()
    ws = randn(shape.vocab, shape.student_hidden, scale=shape.student_hidden**-0.5).requires_grad_()
    th = randn(n, shape.teacher_hidden)
    wt = randn(shape.vocab, shape.teacher_hidden, scale=shape.teacher_hidden**-0.5)
    y = torch.randint(0, shape.vocab, (n,), generator=g, device=dev)
    y[torch.rand(n, generator=g, device=dev) < 0.1] = -100  # some ignored rows, as in real batches
    return h, ws, th, wt, y


def full_logits_loss(cfg: Config) -> Callable:
    div = D.get(cfg.divergence)

    def loss_fn(h, ws, th, wt, y):
        s = (h @ ws.t()).float()
        with torch.no_grad():
            t = (th @ wt.t()).float()
        valid = y != -100
        soft = torch.where(valid, div(s / cfg.temperature, t / cfg.temperature), 0).sum()
        return (cfg.soft_weight * soft + cfg.hard_weight * hard_loss(s, y, cfg)) / valid.sum().clamp_min(1)

    return loss_fn


def hard_loss(logits: torch.Tensor, y: torch.Tensor, cfg: Config) -> torch.Tensor:
    """The CE term's sum, not computed in a soft-only config (it would be multiplied by 0)."""
    if cfg.hard_weight == 0:
        return logits.new_zeros((), dtype=torch.float32)
    return F.cross_entropy(logits, y, ignore_index=-100, reduction="sum")


@functools.cache
def trl_kernel() -> Callable | None:
    """TRL 1.16's DistillationTrainer loss, looked up where the trainer looks it up; None (said
    once) where trl or one of its imports (accelerate, datasets) is missing."""
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss
    except Exception as exc:
        print(f"{TRL_CONTENDER}: skipped, trl does not import ({type(exc).__name__}: {str(exc).splitlines()[0][:80]})")
        return None
    return _chunked_divergence_loss


def trl_loss(kernel: Callable, cfg: Config) -> Callable:
    """``kernel`` called as DistillationTrainer._compute_loss calls it: the rows whose label is
    not ignored as the completion mask, TRL's β (the same as Liger's) and temperature; without
    num_items_in_batch it is the mean over those rows, as the soft-only configs' loss is."""

    def loss_fn(h, ws, th, wt, y):
        loss, _entropy_sum, _n_valid = kernel(h, th, ws, wt, y != -100, cfg.beta, temperature=cfg.temperature)
        return loss

    return loss_fn


def grads_of(loss_fn: Callable, h, ws, th, wt, y) -> Step:
    def step():
        loss = loss_fn(h, ws, th, wt, y)
        gh, gw = torch.autograd.grad(loss, (h, ws))
        return loss, gh, gw

    return step


def floor_step(inputs) -> Step:
    """The four bf16 GEMMs alone: student logits, teacher logits, grad_hidden, grad_weight."""
    h, ws, th, wt, _ = inputs

    def floor():
        s = h @ ws.t()
        t = th @ wt.t()
        return t, s @ ws, s.t() @ h  # s stands in for the logit gradient

    return floor


def load_baseline(checkout: str) -> ModuleType:
    """``checkout``'s kdfuse package, imported as ``kdfuse_baseline`` (its modules import each other
    relatively; ``autotune`` is this checkout's)."""
    root = Path(checkout) / "kdfuse"
    spec = importlib.util.spec_from_file_location(
        "kdfuse_baseline", root / "__init__.py", submodule_search_locations=[str(root)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["kdfuse_baseline"] = module
    spec.loader.exec_module(module)
    return module


def kdfuse_steps(package: ModuleType, prefix: str, cfg: Config, chunks: list, inputs, **options) -> dict[str, Step]:
    """``package.fused_linear_distill`` at each chunk size ("auto" included), named prefix-c<k>;
    ``options``: more of its keywords."""
    y = inputs[-1]
    out = {}
    for c in chunks:
        kw = dict(
            labels=y,
            divergence=cfg.divergence,
            temperature=cfg.temperature,
            soft_weight=cfg.soft_weight,
            hard_weight=cfg.hard_weight,
            chunk_size=c,
            **options,
        )
        name = f"{prefix}-auto" if c == "auto" else f"{prefix}-c{c}"
        distill = package.fused_linear_distill
        out[name] = grads_of(lambda h, ws, th, wt, y, kw=kw, f=distill: f(h, ws, th, wt, **kw), *inputs)
    return out


def contenders(cfg: Config, chunks: list[int], liger_chunks: list[int], inputs, baseline=None) -> dict[str, Step]:
    h, ws, th, wt, y = inputs
    out: dict[str, Step] = {}

    def floor_student():  # the top-k teacher's floor: no teacher GEMM
        s = h @ ws.t()
        return s @ ws, s.t() @ h

    out["floor"] = floor_step(inputs)
    out["floor-student"] = floor_student
    out["eager"] = grads_of(full_logits_loss(cfg), *inputs)
    out["compile"] = grads_of(torch.compile(full_logits_loss(cfg)), *inputs)
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError:
        pass
    else:
        for c in liger_chunks:
            mod = LigerFusedLinearJSDLoss(
                weight_hard_loss=cfg.hard_weight,
                weight_soft_loss=cfg.soft_weight,
                beta=cfg.beta,
                temperature=cfg.temperature,
                chunk_size=c,
            )
            out[f"liger-c{c}"] = grads_of(lambda h, ws, th, wt, y, mod=mod: mod(h, ws, th, wt, y), *inputs)
        triton_jsd = LigerFusedLinearJSD(jsd_beta=cfg.beta, temperature=cfg.temperature)
        out["liger-triton"] = grads_of(lambda h, ws, th, wt, y: triton_jsd(h, ws, th, wt, y), *inputs)
    kernel = trl_kernel() if cfg.hard_weight == 0 else None  # TRL's kernel has no CE term
    if kernel is not None:
        out[TRL_CONTENDER] = grads_of(trl_loss(kernel, cfg), *inputs)
    out.update(kdfuse_steps(kdfuse, "kdfuse", cfg, ["auto", *chunks], inputs))
    out.update(kdfuse_steps(kdfuse, "kdfuse-fp32", cfg, chunks, inputs, fp32_logits=True))
    if baseline is not None:
        out.update(kdfuse_steps(baseline, "baseline", cfg, chunks, inputs))
    if cfg.divergence == "forward_kl":  # sparse teacher: top-64 log-probs extracted once, offline
        topk = kdfuse.teacher_topk(th, wt, 64, temperature=cfg.temperature)
        kw = dict(
            teacher_topk=topk,
            labels=y,
            divergence="topk_forward_kl_renormalize",
            temperature=cfg.temperature,
            soft_weight=cfg.soft_weight,
            hard_weight=cfg.hard_weight,
        )
        out["kdfuse-topk64"] = grads_of(
            lambda h, ws, th, wt, y, kw=kw: kdfuse.fused_linear_distill(h, ws, **kw), *inputs
        )
    return out


@dataclass
class Reference:
    loss: torch.Tensor  # () float64: fp32 loss math per block of rows, the blocks summed in float64
    grads: tuple[torch.Tensor, torch.Tensor]  # g_exact: grad_hidden (N, Hs), grad_weight (V, Hs), float64
    floor_grads: tuple[torch.Tensor, torch.Tensor]  # the same through cuBLAS bf16 GEMMs, in bf16


def reference(cfg: Config, inputs, block: int = 4096) -> Reference:
    h, ws, th, wt, y = inputs
    div = D.get(cfg.divergence)
    count = (y != -100).sum().clamp_min(1)
    loss = torch.zeros((), dtype=torch.float64, device=h.device)
    gh = torch.empty(h.shape, dtype=torch.float64, device=h.device)
    gw = torch.zeros(ws.shape, dtype=torch.float64, device=h.device)
    gh_floor = torch.empty(h.shape, dtype=torch.float32, device=h.device)
    gw_floor = torch.zeros(ws.shape, dtype=torch.float32, device=h.device)
    for start in range(0, h.shape[0], block):
        rows = slice(start, start + block)
        s = (h[rows].detach() @ ws.detach().t()).requires_grad_()  # bf16 logits, as the model has them
        with torch.no_grad():
            t = (th[rows] @ wt.t()).float()
        sf, valid = s.float(), y[rows] != -100
        soft = torch.where(valid, div(sf / cfg.temperature, t / cfg.temperature), 0).sum()
        part = (cfg.soft_weight * soft + cfg.hard_weight * hard_loss(sf, y[rows], cfg)) / count
        (dl,) = torch.autograd.grad(part, s)  # bf16, rounded as autograd rounds it
        loss += part.detach().double()
        gh[rows] = dl.double() @ ws.detach().double()
        gw += dl.double().t() @ h[rows].detach().double()
        torch.mm(dl, ws.detach(), out=gh_floor[rows], out_dtype=torch.float32)
        torch.addmm(gw_floor, dl.t(), h[rows].detach(), out=gw_floor, out_dtype=torch.float32)
    return Reference(loss, (gh, gw), (gh_floor.to(h.dtype), gw_floor.to(ws.dtype)))


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


def grad_errors(grads, ref: Reference) -> tuple[float, float]:
    """(grad err, vs exact) of (grad_hidden, grad_weight), each the worse of the two; see the top."""
    rounded = max(rel(g, e.to(g.dtype).double()) for g, e in zip(grads, ref.grads))
    return rounded, max(rel(g, e) for g, e in zip(grads, ref.grads))


def run_case(case: str, cfg_key: str, args) -> list[Row]:
    shape_key, n = case.split(":")
    shape, n = SHAPES[shape_key], int(n)
    cfg = CONFIGS[cfg_key]
    inputs = make_inputs(shape, n)
    ref = reference(cfg, inputs)
    torch.cuda.empty_cache()
    rows: list[Row] = []
    baseline = load_baseline(args.baseline) if args.baseline else None
    steps = contenders(cfg, args.chunks, args.liger_chunks, inputs, baseline)
    steps = {
        name: step
        for name, step in steps.items()
        if not args.contenders or any(name.startswith(c) for c in args.contenders)
    }
    # First calls one contender at a time (compile time, errors, crashes); then the timing, in
    # rounds over every contender that ran (see autotune.measure_interleaved: the clocks of a GPU
    # at its power limit drift, and contenders timed one after the other would not share them).
    for name, step in steps.items():
        row = Row(case, cfg_key, name)
        try:
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = step()
            torch.cuda.synchronize()
            row.first_call_s = time.perf_counter() - t0
            if name == "floor":
                row.grad_err, row.grad_err_exact = grad_errors(ref.floor_grads, ref)
                rounding = max(rel(e.to(p.dtype), e) for e, p in zip(ref.grads, inputs[:2]))
                row.note = f"bf16(g_exact) vs exact: {rounding:.1e}"
            elif name != "floor-student":
                loss, gh, gw = out
                row.grad_err, row.grad_err_exact = grad_errors((gh, gw), ref)
                row.loss_err = abs(loss.item() - ref.loss.item()) / abs(ref.loss.item())
            del out
        except torch.OutOfMemoryError:
            row.note = "OOM"
        except Exception as exc:  # a peer crashing is a result, not the end of the run
            row.note = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        torch.cuda.empty_cache()
        if name == "liger-triton" and cfg.hard_weight != 0:
            row.note = (row.note + " soft loss only (no CE)").strip()
        if name == "kdfuse-topk64":
            row.note = (row.note + " top-64 teacher: a different loss, error vs the dense reference").strip()
        rows.append(row)
        print(f"  {case} {cfg_key} {name}: first call {row.first_call_s:.1f} s {row.note}", flush=True)
    ran = {r.contender: steps[r.contender] for r in rows if math.isfinite(r.first_call_s)}
    timings = measure_interleaved(ran, rounds=args.rounds, warmup=args.warmup, repeat=args.repeat, settle=args.settle)
    joules = energy_rounds(ran, args.rounds, args.settle, args.energy) if args.energy else {}
    for r in rows:
        if r.contender in timings:
            r.ms, peak = timings[r.contender]
            r.peak_gib = peak / GiB
            r.joules = joules.get(r.contender, math.nan)
    floor = next((r for r in rows if r.contender == "floor"), Row(case, cfg_key, "floor"))
    for r in rows:
        r.ratio, r.joules_ratio = r.ms / floor.ms, r.joules / floor.joules
    print_table(rows)
    return rows


class Nvml:
    """NVML's total-energy counter of the CUDA device, through ctypes (no pynvml needed)."""

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


def joules_per_call(nvml: Nvml, fn: Callable[[], object], seconds: float, settle: float) -> float:
    """Run ``fn`` back to back for ``settle`` seconds untimed, then for ``seconds`` while reading
    the energy counter; joules per call of the second loop."""
    for budget in (settle, seconds):
        torch.cuda.synchronize()
        calls, start, energy = 0, time.perf_counter(), nvml.energy_mj()
        while time.perf_counter() - start < budget or calls == 0:
            fn()
            calls += 1
            if calls % 4 == 0:  # keep the host at most a few calls ahead
                torch.cuda.synchronize()
        torch.cuda.synchronize()
        used = nvml.energy_mj() - energy
    return used / 1e3 / calls


def energy_rounds(steps: dict[str, Step], rounds: int, settle: float, seconds: float) -> dict[str, float]:
    """Each step's energy per call (J), the median of ``rounds`` rounds over all steps, each
    reading ``seconds`` of back-to-back calls after ``settle`` seconds of them: one reading moves
    by ~2-3% from run to run."""
    nvml = Nvml(torch.device("cuda"))
    readings: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            readings[name].append(joules_per_call(nvml, step, seconds, settle))
    return {name: statistics.median(js) for name, js in readings.items()}


def print_table(rows: list[Row]) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"KD loss fwd+bwd on {torch.cuda.get_device_name()} (bf16)", box=box.MARKDOWN)
    cols = (
        "case",
        "config",
        "contender",
        "× floor",
        "ms",
        "J × floor",
        "J",
        "peak GiB",
        "grad err",
        "vs exact",
        "loss err",
        "1st call s",
        "note",
    )
    for col in cols:
        table.add_column(col, justify="left" if col in ("case", "config", "contender", "note") else "right")
    for r in rows:
        table.add_row(
            r.case,
            r.config,
            r.contender,
            f"{r.ratio:.3f}",
            f"{r.ms:.2f}",
            f"{r.joules_ratio:.3f}",
            f"{r.joules:.2f}",
            f"{r.peak_gib:.2f}",
            f"{r.grad_err:.1e}",
            f"{r.grad_err_exact:.2e}",
            f"{r.loss_err:.1e}",
            f"{r.first_call_s:.1f}",
            r.note,
        )
    Console(width=200).print(table)


def plot(rows: list[Row], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r.case, r.config) for r in rows})
    fig, axes = plt.subplots(len(groups), 1, figsize=(10, 2.8 * len(groups)), squeeze=False)
    for ax, (case, cfg) in zip(axes[:, 0], groups):
        sel = [
            r for r in rows if (r.case, r.config) == (case, cfg) and r.contender != "floor" and math.isfinite(r.ratio)
        ]
        ax.barh(
            [r.contender for r in sel],
            [r.ratio for r in sel],
            color=["tab:green" if r.contender.startswith("kdfuse") else "tab:gray" for r in sel],
        )
        ax.axvline(1.0, color="k", lw=0.8)
        ax.set_title(f"{case} {cfg}: time / floor", fontsize=9)
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="SHAPE:N, shapes: " + ", ".join(SHAPES))
    parser.add_argument(
        "--configs",
        nargs="+",
        default=DEFAULT_CONFIGS,
        choices=list(CONFIGS),
        help=f"fkl_ce, jsd: T=2, soft and CE weighted 0.5 each; fkl, jsd_soft: T=2, soft only. {TRL_CONTENDER} "
        "(TRL 1.16's DistillationTrainer kernel, soft only) runs in the soft-only configs alone",
    )
    parser.add_argument("--contenders", nargs="*", default=None, help="name prefixes to run (default: all)")
    parser.add_argument("--chunks", type=int, nargs="*", default=[1024, 2048, 4096])
    parser.add_argument("--liger-chunks", type=int, nargs="*", default=[1024, 4096])
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per contender per round")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds over all contenders (see autotune.measure_interleaved)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=1.0,
        help="seconds each contender runs untimed before its timed calls, each round",
    )
    parser.add_argument(
        "--energy", type=float, default=1.0, help="seconds of steps whose energy is read per contender (0: none)"
    )
    parser.add_argument("--baseline", metavar="DIR", help="a checkout whose kdfuse runs as baseline-c<k> (see above)")
    parser.add_argument("--json", help="write all rows here")
    parser.add_argument("--png", help="draw time/floor per case here")
    args = parser.parse_args(argv)
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    rows: list[Row] = []
    for case in args.cases:
        for cfg in args.configs:
            rows += run_case(case, cfg, args)
            if args.json:  # after every case: a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if args.png:
        plot(rows, args.png)


if __name__ == "__main__":
    main()
