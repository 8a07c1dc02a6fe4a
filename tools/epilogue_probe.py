"""Can the chunk kernel's pass 1 move into the logits GEMMs' epilogue? Time our own GEMM.

Pass 1 of ``kdfuse.triton_chunk`` reads both (C, V) logit blocks only for their row log-sum-exps:
4 of the kernel's 10 bytes per element. A logits GEMM that also wrote each output tile's
per-row (max, Σ exp) would save that read, but cuBLAS has no such epilogue: the GEMM would be
ours. This times, on the 8B→1B logits GEMMs of one 4096-row chunk (student K = 2048 with two
log-sum-exps, at T = 2 and 1; teacher K = 4096 with one):

  cublas     ``torch.mm`` (what kdfuse runs now), bf16 out
  triton     a persistent TMA Triton GEMM (tiles in grouped order), bf16 out, no epilogue work
  triton+lse the same plus the per-tile row statistics of the rounded logits
  gluon      ``tools/gluon_epilogue.py``'s warp-specialised GEMM, its epilogue warps only storing
  gluon+lse  the same with the statistics, computed by the epilogue's warps while the main
             loop's warps run the next tile
  gluon+lse² the student's two statistics (τ = 1/2 and 1) from one exp per element

and prints each against cuBLAS, timed in rounds (the GPU at its power limit) and as single calls
after a rest ("cold": at its boost clock), with the saving pass 1 would give (its bytes at the
device copy rate). The fused path pays off only if (GEMM+lse − cublas) < that saving.

    python tools/epilogue_probe.py [--rows 4096] [--vocab 128256] [--triton-configs N]
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune import measure_interleaved  # noqa: E402
from kdfuse.triton_mm import _tile_of  # noqa: E402
import gluon_epilogue as gluon_logits  # noqa: E402  (tools/, beside this file)


@triton.jit
def _mm_kernel(a_desc, b_desc, c_desc, STATS, M, N, K, inv_t, n_programs,
               BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
               LSE: tl.constexpr, STAGES: tl.constexpr):  # fmt: skip
    """C (M, N) = A (M, K) @ B (N, K)ᵀ, persistent; LSE = 1 or 2: also (max, Σ exp(x − max)) per row
    and tile of τ·x (and of x when 2), x the bf16-rounded output, into STATS (M, n_n, LSE, 2)."""
    n_m = tl.cdiv(M, BM)
    n_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    for tile in tl.range(tl.program_id(0), n_m * n_n, n_programs, flatten=True, num_stages=STAGES):
        pid_m, pid_n = _tile_of(tile, n_m, n_n, GROUP)
        acc = tl.zeros((BM, BN), tl.float32)
        for kt in range(k_tiles):
            a = a_desc.load([pid_m * BM, kt * BK])
            b = b_desc.load([pid_n * BN, kt * BK])
            acc = tl.dot(a, b.T, acc)
        c = acc.to(tl.bfloat16)
        c_desc.store([pid_m * BM, pid_n * BN], c)
        if LSE > 0:
            rows = pid_m * BM + tl.arange(0, BM)
            cols = pid_n * BN + tl.arange(0, BN)
            x = tl.where(cols[None, :] < N, c.to(tl.float32), float("-inf"))
            base = STATS + (rows * n_n + pid_n) * (LSE * 2)
            m = tl.max(x, axis=1)
            e = tl.exp((x - m[:, None]) * inv_t)
            tl.store(base, m * inv_t, mask=rows < M)
            tl.store(base + 1, tl.sum(e, axis=1), mask=rows < M)
            if LSE == 2:  # at T = 1 as well; with τ = 1/2, exp(x − m) = exp((x − m)·τ)²
                tl.store(base + 2, m, mask=rows < M)
                tl.store(base + 3, tl.sum(e * e, axis=1), mask=rows < M)


def triton_mm(a, b, c, stats, lse: int, cfg: dict):
    bm, bn, bk = cfg["BM"], cfg["BN"], cfg["BK"]
    descs = (
        TensorDescriptor.from_tensor(a, [bm, bk]),
        TensorDescriptor.from_tensor(b, [bn, bk]),
        TensorDescriptor.from_tensor(c, [bm, bn]),
    )
    sms = torch.cuda.get_device_properties(a.device).multi_processor_count
    tiles = triton.cdiv(a.shape[0], bm) * triton.cdiv(b.shape[0], bn)
    n_programs = min(sms * cfg["per_sm"], tiles)
    return _mm_kernel[(n_programs,)](
        *descs, stats, a.shape[0], b.shape[0], a.shape[1], 0.5, n_programs,
        BM=bm, BN=bn, BK=bk, GROUP=cfg["GROUP"], LSE=lse, STAGES=cfg["stages"], num_warps=cfg["warps"],
    )  # fmt: skip


# per_sm: persistent programs per SM. With two resident (shared memory and registers for both),
# one program's epilogue (the statistics' exps) can run while the other's MMAs do.
CONFIGS = [
    dict(BM=128, BN=256, BK=64, GROUP=8, stages=3, warps=8, per_sm=1),
    dict(BM=128, BN=128, BK=64, GROUP=8, stages=5, warps=4, per_sm=1),
    dict(BM=128, BN=128, BK=64, GROUP=8, stages=2, warps=4, per_sm=2),
    dict(BM=128, BN=128, BK=32, GROUP=8, stages=4, warps=4, per_sm=2),
    dict(BM=64, BN=256, BK=64, GROUP=8, stages=2, warps=4, per_sm=2),
]


def _cold(fns: dict, rounds: int = 3, rest_s: float = 1.0) -> dict:
    """Median time of single calls, each after ``rest_s`` of idle: the GPU at its boost clock, not
    yet at its power limit (the rounds above time it at the limit, where work costs its energy)."""
    import statistics
    import time

    out = {key: [] for key in fns}
    for _ in range(rounds):
        for key, fn in fns.items():
            torch.cuda.synchronize()
            time.sleep(rest_s)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            out[key].append(start.elapsed_time(end))
    return {key: statistics.median(v) for key, v in out.items()}


def _stats_error(out: torch.Tensor, stats: torch.Tensor) -> float:
    """Largest relative error of the Gluon kernel's per-tile statistics (at τ = 1/2, then 1) against
    float64 ones of its own output (only the statistics: the product is checked against cuBLAS)."""
    bn = gluon_logits.BLOCK_N
    rows, n = out.shape
    x = torch.full((rows, stats.shape[1] * bn), float("-inf"), device=out.device, dtype=torch.float64)
    x[:, :n] = out.double()
    x = x.view(rows, -1, bn)
    m = x.amax(-1)
    err = ((stats[..., 0].double() - m).abs() / m.abs().clamp_min(1)).max()
    for j, tau in enumerate((0.5, 1.0)[: stats.shape[-1] - 1]):
        want = ((x - m[..., None]) * tau).exp().sum(-1)
        err = torch.maximum(err, ((stats[..., 1 + j].double() - want).abs() / want).max())
    return err.item()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--triton-configs", type=int, default=len(CONFIGS), help="how many of CONFIGS to time")
    args = parser.parse_args(argv)
    from rich.console import Console
    from rich.table import Table

    g = torch.Generator(device="cuda").manual_seed(0)
    table = Table(title=f"{torch.cuda.get_device_name()}: logits GEMMs of one {args.rows}-row chunk, V = {args.vocab}")
    for col in ("GEMM", "impl", "config", "ms", "× cuBLAS", "cold × cuBLAS; max |Δ| vs cuBLAS; regs, spills, shared"):
        table.add_column(col)
    for name, k, lse in (("student", 2048, 2), ("teacher", 4096, 1)):
        a = torch.randn(args.rows, k, device="cuda", generator=g).bfloat16()
        b = (torch.randn(args.vocab, k, device="cuda", generator=g) * k**-0.5).bfloat16()
        c = torch.empty(args.rows, args.vocab, device="cuda", dtype=torch.bfloat16)
        stats = torch.empty(args.rows * triton.cdiv(args.vocab, 128) * 4, device="cuda")
        ref = torch.mm(a, b.t())
        fns, notes = {("cublas", ""): functools.partial(torch.mm, a, b.t(), out=c)}, {}
        scale = torch.full((1,), 0.5, device="cuda")
        fn = functools.partial(gluon_logits.logits_with_stats, a, b, scale, lse == 2)
        try:
            out, got = fn()
            notes["gluon+lse", "ws"] = f"{(out.float() - ref.float()).abs().max().item():.2g}; stats {_stats_error(out, got):.2g}"
            fns["gluon+lse", "ws"] = fn
        except Exception as exc:
            notes["gluon+lse", "ws"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
        fns["gluon", "ws"] = functools.partial(gluon_logits._launch, a, b, scale, 0)
        if lse == 2:  # τ = 1/2 and 1 from one exp per element
            fns["gluon+lse²", "ws"] = functools.partial(gluon_logits._launch, a, b, scale, 3)
            notes["gluon+lse²", "ws"] = f"stats {_stats_error(*fns['gluon+lse²', 'ws']()):.2g}"
        for cfg in CONFIGS[: args.triton_configs]:
            label = "{BM}x{BN}x{BK} g{GROUP} s{stages} w{warps} p{per_sm}".format(**cfg)
            for epi in (0, lse):
                impl = "triton" + (f"+lse×{epi}" if epi else "")
                fn = functools.partial(triton_mm, a, b, c, stats, epi, cfg)
                try:  # first call: compile, and check the product against cuBLAS's
                    k = fn()
                    shared = k.metadata.shared // 1024
                    notes[impl, label] = (
                        f"{(c.float() - ref.float()).abs().max().item():.2g}; {k.n_regs} regs, "
                        f"{k.n_spills} spills, {shared} KiB shared"
                    )
                    fns[impl, label] = fn
                except Exception as exc:  # a config that does not fit or compile here is a result
                    notes[impl, label] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:60]}"
        # In rounds: this GPU's clocks drift under GEMM load (see autotune.measure_interleaved).
        times = measure_interleaved(fns, rounds=3, warmup=3, repeat=10)
        base = times["cublas", ""][0]
        cold = _cold(fns)
        for (impl, label), (ms, _) in times.items():
            note = f"cold ×{cold[impl, label] / cold['cublas', '']:.3f}; " + notes.get((impl, label), "")
            table.add_row(name, impl, label, f"{ms:.3f}", f"{ms / base:.3f}", note)
        for (impl, label), note in notes.items():
            if (impl, label) not in times:
                table.add_row(name, impl, label, "", "", note)
        del a, b, c, stats, ref, fns
        torch.cuda.empty_cache()
    # Pass 1 reads both bf16 blocks: the bytes of one block copy (one read + one write).
    blocks = torch.empty(2, args.rows, args.vocab, device="cuda", dtype=torch.bfloat16)
    copy = measure_interleaved({"copy": lambda: blocks[1].copy_(blocks[0])}, rounds=1, repeat=20)["copy"][0]
    Console().print(table)
    print(f"pass 1's read of both blocks ~ one block copy: {copy:.3f} ms per chunk (what the fusion could save)")


if __name__ == "__main__":
    main()
