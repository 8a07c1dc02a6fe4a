"""How far cuBLAS's bf16 GEMMs put the KD gradient from exact, and what splitting the reduction costs.

    python tools/gemm_error_probe.py [--shape 8b-1b] [--rows 4096]

Takes one block of the benchmark's inputs (tools/bench.py) and its exact logit gradient ``dl``
(bf16, as autograd rounds it), and computes grad_hidden = dl @ W, a reduction over the vocabulary
(K = V), in float64 (exact), in cuBLAS's bf16 GEMM (fp32 output), in an fp32 SGEMM (TF32 off),
and split over the vocabulary into S GEMMs summed in fp32 (``addmm``, beta = 1), with the time of
each; then grad_weight = dlᵀ @ h summed over row blocks of K rows. For each it prints the error
before rounding (‖g − g_exact‖/‖g_exact‖) and after rounding both sides to bf16 (the benchmark's
``grad err``), which shows a pre-rounding difference δ as ≈ √(δ·2⁻⁸).
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
from autotune import measure  # noqa: E402
from kdfuse import divergences as D  # noqa: E402


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


def errors(g: torch.Tensor, exact: torch.Tensor) -> str:
    rounded = (g.to(torch.bfloat16).double() - exact.to(torch.bfloat16).double()).norm() / exact.norm()
    return f"before rounding {bench.rel(g, exact):.2e}, after {rounded:.2e}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="8b-1b", choices=list(bench.SHAPES))
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--splits", type=int, nargs="+", default=[4, 8, 16, 32, 64])
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = torch.device("cuda")
    inputs = bench.make_inputs(bench.SHAPES[args.shape], args.rows)
    h, w = inputs[0].detach(), inputs[1].detach()
    dl = logit_gradient(bench.CONFIGS["fkl_ce"], inputs, slice(0, args.rows))
    exact = dl.double() @ w.double()
    print(f"{torch.cuda.get_device_name()}: grad_hidden = dl ({args.rows} x {w.shape[0]}) @ W ({w.shape[0]} x {w.shape[1]})")
    out = torch.empty(args.rows, w.shape[1], device=dev)
    ms, _ = measure(lambda: torch.mm(dl, w, out=out, out_dtype=torch.float32), warmup=3, repeat=10, device=dev)
    print(f"  cuBLAS bf16, K = {w.shape[0]}: {errors(out, exact)}; {ms:.3f} ms")
    print(f"  fp32 SGEMM: {errors(dl.float() @ w.float(), exact)}")
    vocab = w.shape[0]
    for splits in args.splits:
        size = -(-vocab // splits)

        def split_mm(size=size):
            for start in range(0, vocab, size):
                part = slice(start, start + size)
                torch.addmm(out, dl[:, part], w[part], beta=0.0 if start == 0 else 1.0, out=out, out_dtype=torch.float32)

        split_mm()
        err = errors(out, exact)
        ms, _ = measure(split_mm, warmup=3, repeat=10, device=dev)
        print(f"  {splits:3} GEMMs of K = {size}: {err}; {ms:.3f} ms")
    exact_w = dl.double().t() @ h.double()
    for block in (1024, 2048, 4096):
        gw = torch.zeros(w.shape, device=dev)
        for start in range(0, args.rows, block):
            torch.addmm(gw, dl[start : start + block].t(), h[start : start + block], out=gw, out_dtype=torch.float32)
        print(f"grad_weight over blocks of K = {block} rows: {errors(gw, exact_w)}")


if __name__ == "__main__":
    main()
