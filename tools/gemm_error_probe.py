"""How far the bf16 gradient GEMMs put the KD gradient from exact, and what accuracy costs.

    python tools/gemm_error_probe.py [--shape 8b-1b] [--rows 4096] [--configs 128x128x64:p16:s4:w8 ...]

Takes one block of the benchmark's inputs (tools/bench.py) and its exact logit gradient ``dl``
(bf16, as autograd rounds it), and computes grad_hidden = dl @ W, a reduction over the vocabulary
(K = V), in float64 (exact), in an fp32 SGEMM (TF32 off), in cuBLAS's bf16 GEMM (fp32 output),
split over the vocabulary into S cuBLAS GEMMs summed in fp32 (``addmm``, beta = 1), and in
kdfuse's promoted Triton GEMM (``kdfuse.triton_mm``) with partials of P K-blocks; then
grad_weight += dlᵀ @ h (K = the block's rows) into a float32 accumulator, by cuBLAS and by the
promoted GEMM. For each it prints the error before rounding (‖g − g_exact‖/‖g_exact‖) and after
rounding both sides to bf16 (the benchmark's ``grad err``, which shows a pre-rounding difference
δ as ≈ √(δ·2⁻⁸)), and the median time, all GEMMs of a kind timed in interleaved rounds; with ``--energy S``, also
the energy per call, each GEMM run back to back for S seconds (tools/energy_probe.py: on a GPU
at its power limit, energy is what a step's time follows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench  # noqa: E402
import energy_probe  # noqa: E402
from autotune import measure_interleaved  # noqa: E402
from kdfuse import divergences as D  # noqa: E402
from kdfuse.triton_mm import MMConfig, promoted_mm  # noqa: E402


def logit_gradient(cfg: bench.Config, inputs, rows: slice) -> torch.Tensor:
    """The reference's bf16 logit gradient for ``rows`` (see bench.reference)."""
    h, ws, th, wt, y = inputs
    s = (h[rows].detach() @ ws.detach().t()).requires_grad_()
    t = (th[rows] @ wt.t()).float()
    valid, count = y[rows] != -100, (y != -100).sum().clamp_min(1)
    soft = torch.where(valid, D.get(cfg.divergence)(s.float() / cfg.temperature, t / cfg.temperature), 0).sum()
    hard = F.cross_entropy(s.float(), y[rows], ignore_index=-100, reduction="sum")
    (dl,) = torch.autograd.grad((cfg.soft_weight * soft + cfg.hard_weight * hard) / count, s)
    return dl


def errors(g: torch.Tensor, exact: torch.Tensor) -> tuple[float, float]:
    """(before rounding, after rounding both sides to bf16), relative to exact."""
    rounded = (g.to(torch.bfloat16).double() - exact.to(torch.bfloat16).double()).norm() / exact.norm()
    return bench.rel(g, exact), float(rounded)


def label(c: MMConfig) -> str:
    return f"{c.bm}x{c.bn}x{c.bk}:p{c.promote}:s{c.stages}:w{c.warps}:g{c.group}"


def parse(text: str) -> MMConfig:
    """The MMConfig of a ``label``."""
    tile, *rest = text.split(":")
    bm, bn, bk = map(int, tile.split("x"))
    keys = {"p": "promote", "s": "stages", "w": "warps", "g": "group"}
    return MMConfig(bm=bm, bn=bn, bk=bk, **{keys[part[0]]: int(part[1:]) for part in rest})


def report(title: str, out: torch.Tensor, exact: torch.Tensor, fns: dict, rounds: int, energy: float) -> None:
    """Run each of ``fns`` (each writes ``out``) once for its error, then time them all in rounds
    (and, with ``energy`` seconds, read each one's energy per call)."""
    from rich.console import Console
    from rich.table import Table

    errs = {}
    for name, fn in fns.items():
        fn()
        errs[name] = errors(out, exact)
    times = measure_interleaved(fns, rounds=rounds, warmup=3, repeat=10)
    base = times[next(iter(fns))][0]
    joules = {}
    if energy:
        nvml = energy_probe.Nvml(out.device)
        joules = {name: energy_probe.read(nvml, fn, energy).joules for name, fn in fns.items()}
    table = Table(title=title)
    table.add_column("GEMM", no_wrap=True)
    for col in ("before rounding", "after (grad err)", "ms", "× first", *(("J", "J × first") if energy else ())):
        table.add_column(col)
    for name, (ms, _) in times.items():
        cells = [f"{errs[name][0]:.2e}", f"{errs[name][1]:.2e}", f"{ms:.3f}", f"{ms / base:.3f}"]
        if energy:
            cells += [f"{joules[name]:.3f}", f"{joules[name] / joules[next(iter(fns))]:.3f}"]
        table.add_row(name, *cells)
    Console(width=140).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8b-1b", choices=list(bench.SHAPES))
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--splits", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--configs", nargs="+", default=[label(MMConfig())], help="promoted GEMMs, BMxBNxBK:pPROMOTE:sSTAGES:wWARPS[:gGROUP]")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--energy", type=float, default=0.0, help="seconds per GEMM for its energy per call (0: not measured)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    inputs = bench.make_inputs(bench.SHAPES[args.shape], args.rows)
    h, w = inputs[0].detach(), inputs[1].detach()
    dl = logit_gradient(bench.CONFIGS["fkl_ce"], inputs, slice(0, args.rows))
    vocab = w.shape[0]
    configs = {f"promoted {text}": parse(text) for text in args.configs}

    exact = dl.double() @ w.double()
    out = torch.empty(args.rows, w.shape[1], device=dev)
    print(f"{torch.cuda.get_device_name()}: fp32 SGEMM (TF32 off), K = {vocab}: before/after rounding "
          "{:.2e} / {:.2e}".format(*errors(dl.float() @ w.float(), exact)))  # fmt: skip
    fns = {f"cuBLAS, K = {vocab}": lambda: torch.mm(dl, w, out=out, out_dtype=torch.float32)}
    for splits in args.splits:
        size = -(-vocab // splits)

        def split_mm(size=size):
            for start in range(0, vocab, size):
                part = slice(start, start + size)
                torch.addmm(out, dl[:, part], w[part], beta=0.0 if start == 0 else 1.0, out=out, out_dtype=torch.float32)

        fns[f"cuBLAS, {splits} × K = {size}"] = split_mm
    for name, cfg in configs.items():
        fns[name] = lambda cfg=cfg: promoted_mm(out, dl, w, accumulate=False, config=cfg)
    report(f"grad_hidden = dl ({args.rows} x {vocab}) @ W ({vocab} x {w.shape[1]})", out, exact, fns, args.rounds, args.energy)

    # grad_weight += dlᵀ @ h into an accumulator that already holds a first chunk's product
    # (here: that of the same block, so the exact sum is twice one block's).
    first = dl.t().float() @ h.float()
    exact_w = 2 * (dl.double().t() @ h.double())
    acc = torch.empty(w.shape, device=dev)

    def into(fn):
        def run():
            acc.copy_(first)
            fn()

        return run

    fns = {"copy alone": lambda: acc.copy_(first)}
    fns[f"cuBLAS addmm, K = {args.rows}"] = into(lambda: torch.addmm(acc, dl.t(), h, out=acc, out_dtype=torch.float32))
    for name, cfg in configs.items():
        fns[name] = into(lambda cfg=cfg: promoted_mm(acc, dl.t(), h, accumulate=True, config=cfg))
    report(f"grad_weight += dlᵀ ({vocab} x {args.rows}) @ h ({args.rows} x {w.shape[1]}), times include a copy",
           acc, exact_w, fns, args.rounds, args.energy)  # fmt: skip


if __name__ == "__main__":
    main()
