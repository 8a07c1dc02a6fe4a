"""The per-chunk functions (kdfuse.chunk): which spec runs which hand-written kernel, decided on
the host and so checkable without a GPU. (The kernels themselves are compared with the generic
torch.func path in test_triton_chunk.py and test_triton_topk.py.)"""

from __future__ import annotations

import torch

from kdfuse import chunk, registry
from kdfuse import topk as K


def _spec(divergence, **changes) -> chunk.ChunkSpec:
    div = registry.get(divergence)
    base = dict(
        fn=div.fn,
        n_args=len(div.args),
        sparse=div.sparse,
        has_ce=True,
        softcap=False,
        ignore_index=-100,
        compute_dtype=torch.float32,
        with_grad=False,
        compiled=True,
    )
    return chunk.ChunkSpec(**{**base, **changes})


def _kernel(spec: chunk.ChunkSpec, device_type: str = "cuda") -> str | None:
    return chunk.fast_kernel(
        spec.fn,
        softcap=spec.softcap,
        compute_dtype=spec.compute_dtype,
        device_type=device_type,
        compiled=spec.compiled,
        wide_grad=spec.wide_grad,
    )


def test_the_combinator_picks_the_fused_paths_where_they_apply():
    """chunk.fast_kernel: which spec runs which kernel (decided on the host, so checkable
    without a GPU): dense built-ins and built-in sparse divergences without softcap, float32
    compute, impl="compile", CUDA; float16 keeps the generic path for top-k teachers; a user's
    function always the generic path."""
    assert _kernel(_spec("forward_kl")) == "forward_kl" and _kernel(_spec("jsd_beta0.3")) == "jsd"
    assert _kernel(_spec("jsd_beta0")) == "forward_kl"  # the endpoint is forward KL's function
    assert _kernel(_spec("topk_forward_kl_bucket")) == "topk"
    assert _kernel(_spec("forward_kl"), "cpu") is None
    assert _kernel(_spec("forward_kl", compiled=False)) is None
    assert _kernel(_spec("forward_kl", compute_dtype=torch.float64)) is None
    assert _kernel(_spec("tvd")) is None
    assert _kernel(_spec("topk_forward_kl_bucket", softcap=True)) is None
    assert _kernel(_spec("topk_soft_ce_ignore", wide_grad=True)) is None
    assert _kernel(_spec("forward_kl", wide_grad=True)) == "forward_kl"  # writes a float32 buffer

    def user(student, ids, logprobs):  # a user's sparse divergence: the generic path
        return K.forward_kl("renormalize")(student, ids, logprobs)

    assert (
        chunk.fast_kernel(
            user, softcap=False, compute_dtype=torch.float32, device_type="cuda", compiled=True, wide_grad=False
        )
        is None
    )


def test_the_dense_kernel_takes_its_ce_shortcut_at_temperatures_one_and_two():
    """chunk.with_kernel: the CE's probabilities come from the soft ones (triton_chunk.ce_power)
    for the dense kernel with a CE at T = 1 and 2 only."""
    assert [chunk.with_kernel(_spec("forward_kl"), "cuda", t).ce_power for t in (1.0, 2.0, 3.0)] == [1, 2, 0]
    assert chunk.with_kernel(_spec("jsd"), "cuda", 2.0).ce_power == 2
    assert chunk.with_kernel(_spec("forward_kl", has_ce=False), "cuda", 2.0).ce_power == 0
    assert chunk.with_kernel(_spec("topk_forward_kl_bucket"), "cuda", 2.0).ce_power == 0
    assert chunk.with_kernel(_spec("forward_kl"), "cpu", 2.0) == _spec("forward_kl")
