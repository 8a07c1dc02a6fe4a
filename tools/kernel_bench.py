"""Time kdfuse's Triton chunk kernels alone, against the memory traffic they must do (CUDA).

    python tools/kernel_bench.py                      # 4096 x 128256 bf16 chunk, defaults
    python tools/kernel_bench.py --rows 2048 --blocks 1024 2048 4096 --warps 4 8 --stages 1 2 3
    TRITON_INTERPRET=1 python tools/kernel_bench.py --device cpu --rows 2 --vocab 300 --blocks 128 --warps 4
                                                      # a smoke run of the calls, no timing worth reading

For each (BLOCK, num_warps[, pipeline stages of the dense kernel's loops]) it times
``triton_chunk.chunk_step`` (forward KL + CE and JSD + CE, T = 2, with gradient) and
``triton_topk.chunk_step`` (top-64, bucket, + CE), reports the median ms and the effective
bandwidth of the bytes each must move (forward KL: two reads of both logit blocks and one write;
JSD: three reads of both and one write; top-k: three reads and one write of the student block),
next to a plain device copy of one block as the attainable rate. The chosen defaults live in
the kernel modules (_BLOCK, _NUM_WARPS, _STAGES). It also times the backward's
final scale + cast of the float32 grad_weight accumulator (kdfuse.triton_cast against torch.mul).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune import measure
from kdfuse import registry


def time_cast(vocab: int, dev: torch.device, gen: torch.Generator) -> None:
    """The backward's last pass: the float32 grad_weight accumulator (V, 2048) times grad_output,
    to bf16, by PyTorch's elementwise kernel and by kdfuse.triton_cast."""
    from kdfuse import triton_cast

    acc = torch.randn(vocab, 2048, device=dev, generator=gen)
    grad_output = torch.ones((), device=dev)
    casts = {
        "torch.mul": lambda: torch.mul(acc, grad_output, out=torch.empty_like(acc, dtype=torch.bfloat16)),
        "triton": lambda: triton_cast.scaled_cast(acc, grad_output, torch.bfloat16),
    }
    for name, cast in casts.items():
        ms, _ = measure(cast, warmup=3, repeat=20, device=dev)
        print(f"grad_weight scale+cast ({name}): {ms:.3f} ms = {acc.numel() * 6 / ms / 1e6:.0f} GB/s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--blocks", type=int, nargs="+", default=[2048, 4096, 8192])
    parser.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument(
        "--stages",
        type=int,
        nargs="+",
        default=[0],
        help="dense kernel: pipeline stages of its loops (0: the module's)",
    )
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run under Triton's interpreter")
    args = parser.parse_args(argv)
    from kdfuse import scalars as S
    from kdfuse import triton_chunk, triton_topk

    dev = torch.device(args.device)
    gen = torch.Generator(device=dev).manual_seed(0)
    rows, vocab = args.rows, args.vocab
    student = torch.randn(rows, vocab, device=dev, dtype=torch.bfloat16, generator=gen) * 3
    teacher = torch.randn(rows, vocab, device=dev, dtype=torch.bfloat16, generator=gen) * 3
    labels = torch.randint(0, vocab, (rows,), device=dev, generator=gen)
    valid = torch.ones(rows, dtype=torch.bool, device=dev)
    weights = torch.full((rows,), 1.0 / rows, device=dev)
    # T = 2, soft and hard weights 0.5, no softcaps (kdfuse.scalars' slots).
    scalars = torch.zeros(S.PARAMS, device=dev)
    scalars[[S.INV_T, S.SOFT_W, S.HARD_W, S.S_CAP, S.T_CAP]] = torch.tensor([0.5, 0.5, 0.5, 1.0, 1.0], device=dev)
    logprobs, ids = teacher.float().log_softmax(-1).topk(args.k, dim=-1)
    block_bytes = student.numel() * student.element_size()
    work = torch.empty_like(student)

    copy_ms, _ = measure(lambda: work.copy_(student), warmup=3, repeat=20, device=dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"{name}: chunk {rows} x {vocab} bf16 ({block_bytes / 1e9:.2f} GB per block)")
    print(f"copy of one block: {copy_ms:.3f} ms = {2 * block_bytes / copy_ms / 1e6:.0f} GB/s")
    sparse = registry.ENTRIES["topk_forward_kl_bucket"].reduced

    def dense(name):
        divergence = registry.get(name)
        kernel = registry.entry_of(divergence.fn).kernel
        with_params = torch.cat([scalars, torch.tensor(divergence.args, device=dev)])

        def step():
            work.copy_(student)  # the kernel overwrites its input; the copy is timed separately above
            triton_chunk.chunk_step(
                kernel,
                True,
                (False, False),
                -100,
                work,
                teacher,
                labels,
                valid,
                weights,
                with_params,
                out=work,
                ce_power=triton_chunk.ce_power(2.0),  # T = 2: the CE's probabilities from the soft ones, as kdfuse does
            )

        return step

    def topk():
        work.copy_(student)
        triton_topk.chunk_step(sparse, True, work, ids, logprobs, labels, valid, weights, scalars)

    time_cast(vocab, dev, gen)
    defaults = dict(triton_chunk._STAGES)
    print(f"{'kernel':8} {'BLOCK':>6} {'warps':>5} {'stages':>6} {'ms':>8} {'GB/s':>7}")
    cases = (
        ("fkl", dense("forward_kl"), 5 * block_bytes),
        ("jsd", dense("jsd"), 7 * block_bytes),
        ("topk", topk, 4 * block_bytes),
    )
    for name, step, traffic in cases:
        for block in args.blocks:
            for warps in args.warps:
                for stages in [0] if name == "topk" else args.stages:
                    triton_chunk._BLOCK = triton_topk._BLOCK = block
                    triton_chunk._NUM_WARPS = triton_topk._NUM_WARPS = warps
                    triton_chunk._STAGES = {k: stages or v for k, v in defaults.items()}
                    ms, _ = measure(step, warmup=3, repeat=20, device=dev)
                    ms -= copy_ms
                    print(f"{name:8} {block:>6} {warps:>5} {stages or '-':>6} {ms:8.3f} {traffic / ms / 1e6:7.0f}")


if __name__ == "__main__":
    main()
