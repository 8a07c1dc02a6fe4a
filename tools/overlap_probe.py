"""Would two CUDA streams hide the memory-bound chunk kernel under the compute-bound GEMMs? (CUDA)

    python tools/overlap_probe.py

For one chunk (2048 and 4096 rows, 8B->1B shapes) it times the Triton chunk kernel (K, forward
KL + CE), the student + teacher logits GEMMs (L), the gradient GEMMs (G: grad_hidden and the
float32 grad_weight accumulation), each alone, one after the other on one stream (``L;K``) and
concurrently on two (``L||K``). On an H100 the overlap saved 0-8% (docs/benchmarks.md): cuBLAS's
GEMMs occupy every SM, so the kernel's blocks mostly wait for theirs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from autotune import measure  # noqa: E402
from kdfuse import fused, triton_chunk  # noqa: E402


def main() -> None:
    dev, bf16 = torch.device("cuda"), torch.bfloat16
    gen = torch.Generator(device=dev).manual_seed(0)
    vocab, hs_width, ht_width = 128256, 2048, 4096
    kernel, params = fused._kernel_of("forward_kl")
    scalars = torch.tensor([0.5, 0.5, 0.5, 1.0, *params], device=dev)
    side = torch.cuda.Stream()
    ws = torch.randn(vocab, hs_width, device=dev, dtype=bf16, generator=gen) * 0.02
    wt = torch.randn(vocab, ht_width, device=dev, dtype=bf16, generator=gen) * 0.02
    acc = torch.empty(vocab, hs_width, device=dev, dtype=torch.float32)
    for rows in (2048, 4096):
        hs = torch.randn(rows, hs_width, device=dev, dtype=bf16, generator=gen)
        ht = torch.randn(rows, ht_width, device=dev, dtype=bf16, generator=gen)
        student, teacher = hs @ ws.t(), ht @ wt.t()
        dlogits = torch.empty_like(student)
        grad_h = torch.empty(rows, hs_width, device=dev, dtype=torch.float32)
        labels = torch.randint(0, vocab, (rows,), device=dev, generator=gen)
        valid = torch.ones(rows, dtype=torch.bool, device=dev)
        weights = torch.full((rows,), 1.0 / rows, device=dev)

        def k():
            triton_chunk.chunk_step(kernel, True, False, -100, student, teacher, labels, valid, weights, scalars, out=dlogits)

        def logits():
            torch.mm(hs, ws.t()), torch.mm(ht, wt.t())

        def grads():
            torch.mm(dlogits, ws, out=grad_h, out_dtype=torch.float32)
            torch.addmm(acc, dlogits.t(), hs, out=acc, out_dtype=torch.float32)

        def serial(gemms):
            return lambda: (gemms(), k())

        def overlapped(gemms):
            def run():
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    k()
                gemms()
                torch.cuda.current_stream().wait_stream(side)

            return run

        cases = {"K": k, "L": logits, "G": grads, "L;K": serial(logits), "L||K": overlapped(logits),
                 "G;K": serial(grads), "G||K": overlapped(grads)}  # fmt: skip
        times = {name: measure(fn, warmup=5, repeat=20, device=dev)[0] for name, fn in cases.items()}
        print(f"{rows} rows (ms): " + "  ".join(f"{name} {ms:.3f}" for name, ms in times.items()))


if __name__ == "__main__":
    main()
