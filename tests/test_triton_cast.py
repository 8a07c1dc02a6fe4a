"""kdfuse.triton_cast against the PyTorch expression it replaces.

Without a GPU the kernel runs under Triton's interpreter (see conftest.py), so CI checks the kernel
source the GPU runs.
"""

from __future__ import annotations

import importlib

import pytest
import torch
from helpers import sparse_floats
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("triton")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@given(
    numel=st.sampled_from([0, 1, 7, 4095, 4096, 4097, 3 * 4096 + 5]),
    dtype=st.sampled_from([torch.bfloat16, torch.float16, torch.float32]),
    scale=st.sampled_from([1.0, 0.5, 3.0, -1e-3, 2.0**-20]),
    data=st.data(),
)
def test_scaled_cast_is_the_rounded_float32_product(numel, dtype, scale, data):
    tc = importlib.import_module("kdfuse.triton_cast")
    # Up to 12293 float32 values: hypothesis' sparse arrays (a few hundred drawn entries at drawn
    # positions, the rest one drawn value).
    x = data.draw(sparse_floats((numel,), 400.0, torch.float32), label="x").reshape(-1, 1).to(DEVICE)  # 2-D
    s = torch.tensor(scale, device=DEVICE)
    got = tc.scaled_cast(x, s, dtype)
    assert got.dtype == dtype and got.shape == x.shape
    # The product is formed in float32 and rounded once, exactly as torch.mul into `dtype` does.
    want = torch.mul(x, s, out=torch.empty_like(x, dtype=dtype))
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        # Triton's interpreter has no bfloat16 (numpy has none) and converts by truncating the
        # float32; the GPU rounds to nearest even. So here: the same float32 product, within one
        # bfloat16 step of it, on the side of zero. The interpreter's conversion of float32
        # subnormals (|x| < 2^-126) is wrong (triton.runtime.interpreter._convert_float keeps the
        # normalised significand under a clamped exponent: 6.7e-43 becomes 1.0e-38), so those
        # products are left to the GPU's exact comparison below.
        exact = (x * s).float()
        normal = (exact == 0) | (exact.abs() >= 2.0**-126)
        exact, got = exact[normal], got[normal]
        step = 2.0 ** (torch.frexp(exact).exponent - 8).double()
        assert ((exact.double() - got.double()).abs() < step).all()
        assert (got.double().abs() <= exact.double().abs()).all()
        return
    assert torch.equal(got, want)
